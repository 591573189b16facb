"""Scored continuations per second: our batched engine vs one sequence at a time (how the official
PuDDing code scores), same model, same requests, same run.

    python benchmarks/scoring_throughput.py MODEL [--task arc_easy] [--n 1024] [--batch-size 64]
"""

import argparse
import json
import time

import torch

from pudding_mlx.train.hf import load_hf
from pudding_mlx.train.scoring import flatten, score_requests
from pudding_mlx.tasks import load_task


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tasks", default="arc_easy,hellaswag,piqa,winogrande")
    ap.add_argument("--n", type=int, default=1024, help="requests in all")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    model, tok, name = load_hf(a.model)
    tasks = a.tasks.split(",")
    requests = []
    for t in tasks:
        requests += flatten(load_task(t, "validation", a.data_dir, limit=a.n))[: a.n // len(tasks)]
    score_requests(model, tok, requests[:64], batch_size=a.batch_size)  # warm-up
    batched, t_batched = timed(lambda: score_requests(model, tok, requests, batch_size=a.batch_size))
    single, t_single = timed(lambda: score_requests(model, tok, requests, batch_size=1))
    diff = max(abs(x.logprob - y.logprob) for x, y in zip(batched, single))
    out = dict(model=name, device=str(next(model.parameters()).device), dtype=str(next(model.parameters()).dtype),
               requests=len(requests), batch_size=a.batch_size, batched_per_s=len(requests) / t_batched,
               single_per_s=len(requests) / t_single, ratio=t_single / t_batched, max_abs_logprob_diff=diff)
    print(f"| engine | continuations/s |\n|---|---|\n| batched (batch {a.batch_size}) | {out['batched_per_s']:.1f} |\n"
          f"| one at a time | {out['single_per_s']:.1f} |\n\nratio {out['ratio']:.1f}x on {out['device']} "
          f"({out['dtype']}), {len(requests)} requests from {a.tasks}; max |logprob diff| {diff:.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
