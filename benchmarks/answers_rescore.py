"""Recompute a `pudding-mlx bench --answers` result without some prompts (a one-off outlier), from its stored
per-answer times and token counts; prints a markdown table.

    python benchmarks/answers_rescore.py results/bench/answers_qwen_preset_cuda.json --drop chat-00
"""

import argparse
import json

from pudding_mlx.answer_time import rescore, row_summary

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("result")
ap.add_argument("--drop", default="", help="comma-separated prompt ids to leave out")
a = ap.parse_args()
result = json.load(open(a.result))
drop = [d for d in a.drop.split(",") if d]
rows = rescore(result, drop)
print(f"{a.result}: {len(result['prompts']) - len(set(drop) & set(result['prompts']))} prompts"
      + (f" (without {', '.join(drop)})" if drop else "") + f", {result['backend']}, {result['max_tokens']} tokens at most\n")
print("| configuration | median s | answer speedup [95%] | total speedup [95%] | per-token speedup [95%] | tokens vs dense | hit limit |")
print("|---|---|---|---|---|---|---|")
for name, r in rows.items():
    ci = lambda k: f"{r[k]:.3f} [{r[k + '_ci95'][0]:.3f}, {r[k + '_ci95'][1]:.3f}]"  # noqa: E731
    print(f"| {name} | {r['seconds_median']:.3f} | {ci('answer_speedup')} | {ci('total_speedup')} | {ci('token_speedup')} "
          f"| {r['tokens_vs_dense']:.2f} | {r['hit_limit']}/{r['n']} |")
print()
for name, r in rows.items():
    if name != "dense":
        print(f"{name}: {row_summary(r)}")
