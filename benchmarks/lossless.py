"""Lossless mode: acceptance rate and speed of self-speculative decoding with three drafts of equal
cost (k blocks omitted), on real prompts, against dense greedy decoding.

    python benchmarks/lossless.py BUNDLE --static 3,14,15,16,17,18,19 [--per-task 2] [--max-tokens 32]
        [--draft-tokens 1,2,3,4] [--json FILE] [--md FILE]

Drafts: "routed" (the bundle's router picks the set per prompt; router time counted in its
speedup), "static" (one fixed set, e.g. the report's best static set), "early-exit" (the last k
blocks dropped, LayerSkip-style). Every run's output is asserted token-identical to dense greedy.
Prompts: the router texts of the first --per-task validation examples of the six tasks, plus a few
chat prompts. Each --draft-tokens value is a full pass, so the default can be chosen by measurement.
Reports, per draft and draft size: mean share of tokens accepted from the draft, mean speedup vs
dense, and paired-bootstrap 95% intervals of routed - static and routed - early-exit acceptance.
"""

import argparse
import json
import statistics
import time

import numpy as np

from pudding_mlx.generate import generate, prompt_tokens
from pudding_mlx.load import backend, load
from pudding_mlx.omission import parse_omit
from pudding_mlx.tasks import load_task

CHAT = ["Write a haiku about autumn leaves.", "Explain why the sky is blue in two sentences.",
        "Give me three tips for a good night's sleep.", "What is the boiling point of water at sea level?"]
TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande")
DRAFTS = ("routed", "static", "early-exit")


def paired_ci(a, b, n_boot=10000, seed=0):
    """Mean of a - b and its paired-bootstrap 95% interval."""
    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--static", required=True, help="the static draft set, e.g. the report's best static set")
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--draft-tokens", default="3", help="one or more draft sizes, e.g. 1,2,3,4")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args()

    loaded = load(a.bundle)
    n = loaded.n_blocks
    static = parse_omit(a.static)
    k = len(static)
    early = list(range(n - k, n))
    sizes = [int(x) for x in a.draft_tokens.split(",")]
    prompts = [(t, e.router_text) for t in TASKS for e in load_task(t, None, a.data_dir, limit=a.per_task)]
    prompts += [("chat", p) for p in CHAT]
    warm = prompt_tokens(loaded.tokenizer, CHAT[0])
    for lossless in (False, True):  # kernels compiled before anything is timed
        generate(loaded.model, loaded.tokenizer, warm, static, max_tokens=8, lossless=lossless)

    rows = []
    for task, text in prompts:
        ids = prompt_tokens(loaded.tokenizer, text)
        dense, dense_s = timed(lambda: generate(loaded.model, loaded.tokenizer, ids, (), max_tokens=a.max_tokens))
        (index, _, _), router_s = timed(lambda: loaded.router.best(text))
        sets = {"routed": loaded.manifest.candidates[index].omitted, "static": static, "early-exit": early}
        row = {"task": task, "prompt_tokens": len(ids), "generated": len(dense.token_ids), "dense_s": dense_s,
               "router_s": router_s, "sets": {d: list(s) for d, s in sets.items()}, "runs": {}}
        for size in sizes:
            for name, omitted in sets.items():
                out, seconds = timed(lambda: generate(loaded.model, loaded.tokenizer, ids, omitted,
                                                      max_tokens=a.max_tokens, lossless=True, draft_tokens=size))
                assert out.token_ids == dense.token_ids, f"lossless output differs from dense on {text[:40]!r}"
                seconds += router_s if name == "routed" else 0.0
                row["runs"][f"{name}@{size}"] = {"accepted": out.extra["accepted_from_draft"],
                                                 "speedup": dense_s / seconds}
        rows.append(row)
        print(f"{task:14s} " + "  ".join(
            f"{d}@{s}: {row['runs'][f'{d}@{s}']['accepted']:.2f} x{row['runs'][f'{d}@{s}']['speedup']:.2f}"
            for s in sizes for d in DRAFTS), flush=True)

    def col(d, s, key):
        return [r["runs"][f"{d}@{s}"][key] for r in rows]

    summary = {}
    for s in sizes:
        for d in DRAFTS:
            entry = {"draft_tokens": s, "draft": d, "mean_accepted": statistics.mean(col(d, s, "accepted")),
                     "mean_speedup": statistics.mean(col(d, s, "speedup"))}
            if d != "routed":
                entry["routed_minus_this_accepted"] = paired_ci(col("routed", s, "accepted"), col(d, s, "accepted"))
                entry["routed_higher_on"] = sum(x > y for x, y in zip(col("routed", s, "accepted"), col(d, s, "accepted")))
                entry["routed_lower_on"] = sum(x < y for x, y in zip(col("routed", s, "accepted"), col(d, s, "accepted")))
            summary[f"{d}@{s}"] = entry
    best = max((e for e in summary.values() if e["draft"] == "routed"), key=lambda e: e["mean_speedup"])

    cmd = "python benchmarks/lossless.py " + " ".join(__import__("sys").argv[1:])
    lines = [f"# Lossless drafts on {loaded.path.name} ({backend()} backend), k={k} of {n}",
             "", f"Command: `{cmd}`", "",
             f"{len(rows)} prompts ({a.per_task} per task x {len(TASKS)} tasks + {len(CHAT)} chat), greedy, "
             f"{a.max_tokens} new tokens; every lossless output was asserted identical to dense. Router time is "
             "counted in the routed speedup. Static draft: " + str(static) + f"; early exit: blocks {early}.", "",
             "| draft tokens | draft | mean accepted from draft | mean speedup vs dense | routed - this, acceptance [95% CI] | routed higher / lower |",
             "|---|---|---|---|---|---|"]
    for e in summary.values():
        ci = e.get("routed_minus_this_accepted")
        cis = f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]" if ci else ""
        hl = f"{e['routed_higher_on']} / {e['routed_lower_on']}" if ci else ""
        lines.append(f"| {e['draft_tokens']} | {e['draft']} | {e['mean_accepted']:.3f} | {e['mean_speedup']:.3f} | {cis} | {hl} |")
    lines += ["", f"Fastest routed draft size here: {best['draft_tokens']} (mean speedup {best['mean_speedup']:.3f})."]
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bundle": str(loaded.path), "backend": backend(), "k": k, "static": static, "early_exit": early,
                       "max_tokens": a.max_tokens, "draft_tokens": sizes, "command": cmd, "rows": rows,
                       "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
