"""Lossless mode: acceptance rate and speed of self-speculative decoding with three drafts of equal
cost (k blocks omitted), on real prompts, against dense greedy decoding.

    python benchmarks/lossless.py BUNDLE --static 3,14,15,16,17,18,19 [--per-task 2] [--max-tokens 32]

Drafts: "routed" (the bundle's router picks the set per prompt), "static" (one fixed set, e.g. the
report's best static set), "early-exit" (the last k blocks dropped, LayerSkip-style). Every run's
output is checked to be token-identical to dense greedy. Prompts: the router texts of the first
--per-task validation examples of the six tasks, plus a few chat prompts.
"""

import argparse
import json
import statistics
import time

from pudding_mlx.generate import generate, prompt_tokens
from pudding_mlx.load import backend, load
from pudding_mlx.routing import parse_omit
from pudding_mlx.train.tasks import load_task

CHAT = ["Write a haiku about autumn leaves.", "Explain why the sky is blue in two sentences.",
        "Give me three tips for a good night's sleep.", "What is the boiling point of water at sea level?"]
TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--static", required=True, help="the static draft set, e.g. the report's best static set")
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--draft-tokens", type=int, default=3)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    loaded = load(a.bundle)
    n = loaded.n_blocks
    static = parse_omit(a.static)
    k = len(static)
    early = list(range(n - k, n))
    prompts = [(t, e.router_text) for t in TASKS for e in load_task(t, None, a.data_dir, limit=a.per_task)]
    prompts += [("chat", p) for p in CHAT]
    rows = []
    for task, text in prompts:
        ids = prompt_tokens(loaded.tokenizer, text)
        t0 = time.perf_counter()
        dense = generate(loaded.model, loaded.tokenizer, ids, (), max_tokens=a.max_tokens)
        row = {"task": task, "prompt_tokens": len(ids), "dense_s": time.perf_counter() - t0}
        index, _, _ = loaded.router.best(text)
        drafts = {"routed": loaded.manifest.candidates[index].omitted, "static": static, "early-exit": early}
        for name, omitted in drafts.items():
            t0 = time.perf_counter()
            out = generate(loaded.model, loaded.tokenizer, ids, omitted, max_tokens=a.max_tokens, lossless=True,
                           draft_tokens=a.draft_tokens)
            seconds = time.perf_counter() - t0
            assert out.token_ids == dense.token_ids, f"lossless output differs from dense on {text[:40]!r}"
            row[name] = {"omitted": list(omitted), "accepted": out.extra["accepted_from_draft"],
                         "speedup": row["dense_s"] / seconds}
        rows.append(row)
        print(f"{task:14s} " + "  ".join(f"{d}: acc {row[d]['accepted']:.2f} x{row[d]['speedup']:.2f}" for d in drafts),
              flush=True)
    summary = {d: {"mean_accepted": statistics.mean(r[d]["accepted"] for r in rows),
                   "mean_speedup": statistics.mean(r[d]["speedup"] for r in rows),
                   "routed_better_acceptance": sum(r["routed"]["accepted"] > r[d]["accepted"] for r in rows) if d != "routed" else None}
               for d in ("routed", "static", "early-exit")}
    print(f"\n# lossless drafts on {loaded.path.name} ({backend()}), k={k} of {n}, {len(rows)} prompts, "
          f"{a.max_tokens} tokens, {a.draft_tokens} drafted per step\n")
    print("| draft | mean accepted from draft | mean speedup vs dense |\n|---|---|---|")
    for d, s in summary.items():
        print(f"| {d} | {s['mean_accepted']:.3f} | {s['mean_speedup']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bundle": str(loaded.path), "backend": backend(), "k": k, "static": static, "early_exit": early,
                       "max_tokens": a.max_tokens, "draft_tokens": a.draft_tokens, "rows": rows, "summary": summary},
                      f, indent=2)


if __name__ == "__main__":
    main()
