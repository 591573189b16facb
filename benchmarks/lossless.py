"""Lossless mode: acceptance rate, speed and divergence from dense of self-speculative decoding with
three drafts of equal cost (k blocks omitted), on real prompts, against dense greedy decoding.

    python benchmarks/lossless.py BUNDLE --static 3,14,15,16,17,18,19 [--per-task 2] [--max-tokens 32]
        [--draft-tokens 1,2,3,4] [--strict | --no-strict] [--json FILE] [--md FILE]

Drafts: "routed" (the bundle's router picks the set per prompt; router time counted in its
speedup), "static" (one fixed set, e.g. the report's best static set), "early-exit" (the last k
blocks dropped, LayerSkip-style). Prompts: the router texts of the first --per-task validation
examples of the six tasks, plus a few chat prompts. Each --draft-tokens value is a full pass, so the
default can be chosen by measurement.

What "lossless" guarantees: the output is the dense model's under multi-token verification. In
float32 that is token-identical to one-token dense greedy decoding (tested on the CPU). In bf16/fp16
a verify forward over several tokens rounds differently from a one-token forward, so where two tokens
are near-tied the lossless output can differ from one-token dense decoding. This script measures it:
for every run, whether the tokens equal dense greedy, the share of token positions that differ and
the first differing position; per draft and size, the share of prompts and of tokens that diverged.
--strict (the default when the model computes in float32) fails on the first mismatch instead.

Every runner is warmed up before anything is timed: dense and lossless generation, dense once more on
every prompt (its first run of a new prompt length compiles on a GPU), and the router
on every prompt (its first call on a shape compiles).

Reports, per draft and draft size: mean share of tokens accepted from the draft, mean speedup vs
dense, divergence from dense, and paired-bootstrap 95% intervals of routed - static and routed -
early-exit acceptance.
"""

import argparse
import json
import statistics
import sys
import time
from typing import Optional, Sequence

import numpy as np

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


def divergence(dense: Sequence[int], other: Sequence[int]) -> dict:
    """How `other` differs from `dense`: identical or not, the first differing position (None if
    identical), and how many of the max(len) positions differ (a missing token differs)."""
    n = max(len(dense), len(other))
    differ = [i for i in range(n) if i >= len(dense) or i >= len(other) or dense[i] != other[i]]
    return {"identical": not differ, "first": differ[0] if differ else None, "differing": len(differ),
            "positions": n}


def divergence_summary(runs: Sequence[dict]) -> dict:
    """Share of prompts whose output diverged, share of token positions that differ, first
    divergence positions (of the prompts that diverged)."""
    firsts = [r["first"] for r in runs if r["first"] is not None]
    return {"prompts_diverged": len(firsts), "prompts": len(runs), "share_prompts": len(firsts) / max(1, len(runs)),
            "share_tokens": sum(r["differing"] for r in runs) / max(1, sum(r["positions"] for r in runs)),
            "first_divergence": {"min": min(firsts), "median": statistics.median(firsts),
                                 "max": max(firsts)} if firsts else None}


class Mismatch(Exception):
    pass


def compute_dtype(model) -> str:
    """The dtype the model computes in: that of its first floating-point parameter."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).replace("mlx.core.", "")
    return "unknown"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def warm_up(loaded, texts, static, sizes) -> None:
    """Compile every path before timing: dense and each lossless size, and the router on every
    prompt (it runs each prompt's length once, so the timed call is not its first)."""
    from pudding_mlx.generate import generate, prompt_tokens

    warm = prompt_tokens(loaded.tokenizer, CHAT[0])
    generate(loaded.model, loaded.tokenizer, warm, (), max_tokens=8)
    for size in sizes:
        generate(loaded.model, loaded.tokenizer, warm, static, max_tokens=8, lossless=True, draft_tokens=size)
    for text in texts:
        loaded.router.best(text)


def run_prompt(loaded, task, text, sets_for, sizes, max_tokens, strict) -> dict:
    """Dense greedy once, then every draft at every size: acceptance, speedup, divergence."""
    from pudding_mlx.generate import generate, prompt_tokens

    ids = prompt_tokens(loaded.tokenizer, text)
    # once untimed: a GPU backend compiles kernels for each new prompt length, and the dense run would
    # pay for the drafts' shared prefill shapes (on CUDA it made lossless look 5-11x faster than dense)
    generate(loaded.model, loaded.tokenizer, ids, (), max_tokens=2)
    dense, dense_s = timed(lambda: generate(loaded.model, loaded.tokenizer, ids, (), max_tokens=max_tokens))
    (index, _, _), router_s = timed(lambda: loaded.router.best(text))
    sets = sets_for(index)
    row = {"task": task, "prompt_tokens": len(ids), "generated": len(dense.token_ids), "dense_s": dense_s,
           "router_s": router_s, "sets": {d: list(s) for d, s in sets.items()}, "runs": {}}
    for size in sizes:
        for name, omitted in sets.items():
            out, seconds = timed(lambda: generate(loaded.model, loaded.tokenizer, ids, omitted,
                                                  max_tokens=max_tokens, lossless=True, draft_tokens=size))
            div = divergence(dense.token_ids, out.token_ids)
            if strict and not div["identical"]:
                raise Mismatch(f"lossless output differs from dense ({name} draft, {size} tokens, first at "
                               f"token {div['first']}) on {text[:40]!r}")
            seconds += router_s if name == "routed" else 0.0
            row["runs"][f"{name}@{size}"] = {"accepted": out.extra["accepted_from_draft"],
                                             "speedup": dense_s / seconds, **div}
    return row


def summarize(rows, sizes, n_blocks: int) -> dict:
    from pudding_mlx.omission import lossless_speedup_bound

    def col(d, s, key):
        return [r["runs"][f"{d}@{s}"][key] for r in rows]

    summary = {}
    for s in sizes:
        for d in DRAFTS:
            entry = {"draft_tokens": s, "draft": d, "mean_accepted": statistics.mean(col(d, s, "accepted")),
                     "mean_speedup": statistics.mean(col(d, s, "speedup")),
                     "mean_k": statistics.mean(len(r["sets"][d]) for r in rows),
                     "divergence": divergence_summary([r["runs"][f"{d}@{s}"] for r in rows])}
            if entry["mean_accepted"] < 1:  # what a verify as cheap as one dense step would give (module doc)
                entry["speedup_bound"] = lossless_speedup_bound(entry["mean_accepted"], s, entry["mean_k"], n_blocks)
            if d != "routed":
                entry["routed_minus_this_accepted"] = paired_ci(col("routed", s, "accepted"), col(d, s, "accepted"))
                entry["routed_higher_on"] = sum(x > y for x, y in zip(col("routed", s, "accepted"), col(d, s, "accepted")))
                entry["routed_lower_on"] = sum(x < y for x, y in zip(col("routed", s, "accepted"), col(d, s, "accepted")))
            summary[f"{d}@{s}"] = entry
    return summary


def report(loaded, a, rows, summary, static, early, dtype, strict, cmd) -> str:
    from pudding_mlx.load import backend

    n, k = loaded.n_blocks, len(static)
    best = max((e for e in summary.values() if e["draft"] == "routed"), key=lambda e: e["mean_speedup"])
    diverged = sum(e["divergence"]["prompts_diverged"] for e in summary.values())
    identity = ("every lossless output was asserted identical to dense (--strict)" if strict else
                "every lossless output compared with one-token dense greedy decoding: "
                + ("all identical" if not diverged else f"{diverged} of {len(rows) * len(summary)} runs diverged"))
    routed_k = statistics.mean(e["mean_k"] for e in summary.values() if e["draft"] == "routed")
    lines = [f"# Lossless drafts on {loaded.path.name} ({backend()} backend, {dtype}): static and early-exit drafts "
             f"skip k={k} of {n} blocks, the routed draft the router's sets (mean k={routed_k:.2f})",
             "", f"Command: `{cmd}`", "",
             f"{len(rows)} prompts ({a.per_task} per task x {len(a.tasks.split(','))} tasks + {len(CHAT)} chat), greedy, "
             f"{a.max_tokens} new tokens; {identity}. Every runner (the router included) was warmed up "
             "before timing; router time is counted in the routed speedup. Static draft: " + str(static)
             + f"; early exit: blocks {early}.", "",
             "| draft tokens | draft | mean accepted from draft | mean speedup vs dense | bound at this acceptance "
             "| routed - this, acceptance [95% CI] | routed higher / lower | prompts diverged | tokens differing "
             "| first divergence (min / median / max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary.values():
        ci = e.get("routed_minus_this_accepted")
        cis = f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]" if ci else ""
        hl = f"{e['routed_higher_on']} / {e['routed_lower_on']}" if ci else ""
        dv = e["divergence"]
        first = dv["first_divergence"]
        firsts = f"{first['min']} / {first['median']:g} / {first['max']}" if first else "-"
        bound = f"{e['speedup_bound']:.3f}" if "speedup_bound" in e else "-"
        lines.append(f"| {e['draft_tokens']} | {e['draft']} | {e['mean_accepted']:.3f} | {e['mean_speedup']:.3f} | "
                     f"{bound} | {cis} | {hl} | {dv['prompts_diverged']}/{dv['prompts']} ({dv['share_prompts']:.1%}) | "
                     f"{dv['share_tokens']:.1%} | {firsts} |")
    lines += ["", f"Fastest routed draft size here: {best['draft_tokens']} (mean speedup {best['mean_speedup']:.3f}).",
              "", "Bound at this acceptance: the speedup if the verify over draft tokens + 1 positions cost one dense step "
              "and a pruned step cost (n - k) / n of one (`pudding_mlx.omission.lossless_speedup_bound`); under 1, "
              "lossless cannot pay at this acceptance on any hardware."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None):
    from pudding_mlx.load import backend, load
    from pudding_mlx.omission import parse_omit
    from pudding_mlx.tasks import load_task
    from pudding_mlx.atomic import write_json, write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--static", required=True, help="the static draft set, e.g. the report's best static set")
    ap.add_argument("--tasks", default=",".join(TASKS), help="tasks whose validation examples are prompts")
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--draft-tokens", default="3", help="one or more draft sizes, e.g. 1,2,3,4")
    ap.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                    help="fail on the first output that differs from dense (default: on in float32, where "
                    "identity holds; off in bf16/fp16, where the divergence is measured)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args(argv)

    loaded = load(a.bundle)
    n = loaded.n_blocks
    static = parse_omit(a.static)
    early = list(range(n - len(static), n))
    sizes = [int(x) for x in a.draft_tokens.split(",")]
    dtype = compute_dtype(loaded.model)
    strict = dtype == "float32" if a.strict is None else a.strict
    tasks = [t for t in a.tasks.split(",") if t]
    prompts = [(t, e.router_text) for t in tasks for e in load_task(t, None, a.data_dir, limit=a.per_task)]
    prompts += [("chat", p) for p in CHAT]
    warm_up(loaded, [text for _, text in prompts], static, sizes)

    def sets_for(index):
        return {"routed": loaded.manifest.candidates[index].omitted, "static": static, "early-exit": early}

    rows = []
    for task, text in prompts:
        try:
            row = run_prompt(loaded, task, text, sets_for, sizes, a.max_tokens, strict)
        except Mismatch as e:
            sys.exit(f"error: {e} (--strict; in bf16/fp16 run with --no-strict to measure the divergence)")
        rows.append(row)
        print(f"{task:14s} " + "  ".join(
            f"{d}@{s}: {row['runs'][f'{d}@{s}']['accepted']:.2f} x{row['runs'][f'{d}@{s}']['speedup']:.2f}"
            + ("" if row["runs"][f"{d}@{s}"]["identical"] else f" (differs from {row['runs'][f'{d}@{s}']['first']})")
            for s in sizes for d in DRAFTS), flush=True)

    summary = summarize(rows, sizes, loaded.n_blocks)
    cmd = "python benchmarks/lossless.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = report(loaded, a, rows, summary, static, early, dtype, strict, cmd)
    print("\n" + md)
    if a.md:
        write_text(a.md, md)
    if a.json:
        write_json(a.json, {"bundle": str(loaded.path), "backend": backend(), "dtype": dtype, "strict": strict,
                            "n_blocks": loaded.n_blocks, "k": len(static), "static": static, "early_exit": early,
                            "max_tokens": a.max_tokens, "draft_tokens": sizes, "command": cmd, "rows": rows,
                            "summary": summary}, indent=2)


if __name__ == "__main__":
    main()
