"""How much could a self-speculative loop that shares the leading blocks' KV gain over mlx-lm's
speculative decoding (which `--lossless` uses)? A ceiling, measured, before writing that loop.

    python benchmarks/lossless_sharing.py BUNDLE [--per-task 1] [--draft-tokens 3] [--runs 7] [--json FILE]

With omission set S and f = min(S), blocks 0..f-1 see the same inputs in the draft and in the dense
model, so their K/V for drafted tokens are identical. A loop that shared them could start the dense
verification of the drafted tokens at block f, from the draft's hidden states. mlx-lm's loop instead
runs the verification through all L blocks. Per draft-verify cycle (N drafted tokens):

    mlx-lm:  N * t_draft + t_verify        t_verify: dense forward of N+1 tokens on the cache
    shared:  N * t_draft + t_tail          t_tail:   the same forward with blocks 0..f-1 skipped

t_tail is a lower bound for the shared loop's verification (the last drafted token still needs
blocks 0..f-1), so 1 - shared/mlx-lm is an upper bound on what sharing saves per cycle. Every time is
the median of --runs forwards on a cache holding the real prompt, trimmed back after each.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

from pudding_mlx.generate import prompt_tokens
from pudding_mlx.load import backend, load
from pudding_mlx.skip import SkipView
from pudding_mlx.tasks import load_task

TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande")


def forward_time(view, cache, tokens, runs):
    """Median seconds of one forward of `tokens` on `cache`, which is trimmed back after each."""
    times = []
    for _ in range(runs):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(view(mx.array(tokens)[None], cache=cache))
        mx.synchronize()
        times.append(time.perf_counter() - t0)
        for c in cache:
            c.trim(len(tokens))
    return statistics.median(times)


def prefilled(view, ids):
    cache = view.make_cache()
    mx.eval(view(mx.array(ids)[None], cache=cache))
    mx.eval([c.state for c in cache])
    return cache


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--per-task", type=int, default=1)
    ap.add_argument("--draft-tokens", type=int, default=3)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    loaded = load(a.bundle)
    n = a.draft_tokens
    rows = []
    for task in TASKS:
        for ex in load_task(task, None, a.data_dir, limit=a.per_task):
            ids = prompt_tokens(loaded.tokenizer, ex.router_text)
            omitted = loaded.manifest.candidates[loaded.router.best(ex.router_text)[0]].omitted
            f = min(omitted)
            dense, draft, tail = (SkipView(loaded.model, s) for s in ((), omitted, tuple(range(f))))
            step = ids[-1:]
            t_draft = forward_time(draft, prefilled(draft, ids[:-1]), step, a.runs)
            block = ids[-(n + 1):]
            t_verify = forward_time(dense, prefilled(dense, ids[:-(n + 1)]), block, a.runs)
            t_tail = forward_time(tail, prefilled(tail, ids[:-(n + 1)]), block, a.runs)
            base, shared = n * t_draft + t_verify, n * t_draft + t_tail
            rows.append({"task": task, "omitted": list(omitted), "first_omitted": f, "t_draft": t_draft,
                         "t_verify": t_verify, "t_tail": t_tail, "saving_ceiling": 1 - shared / base})
            print(f"{task:14s} f={f:2d} draft {1e3 * t_draft:7.2f} ms  verify {1e3 * t_verify:7.2f} ms  "
                  f"tail {1e3 * t_tail:7.2f} ms  ceiling {100 * rows[-1]['saving_ceiling']:.1f}%", flush=True)
    mean = statistics.mean(r["saving_ceiling"] for r in rows)
    print(f"\n{loaded.path.name} ({backend()}), {n} drafted per cycle: sharing the leading blocks' KV could save at "
          f"most {100 * mean:.1f}% of a cycle (mean over {len(rows)} prompts; "
          f"mean first omitted block {statistics.mean(r['first_omitted'] for r in rows):.1f} of {loaded.n_blocks})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"bundle": str(loaded.path), "backend": backend(), "draft_tokens": n, "runs": a.runs,
                       "rows": rows, "mean_saving_ceiling": mean}, fh, indent=2)


if __name__ == "__main__":
    main()
