"""What routing costs with a hidden-state router, on this machine's MLX backend.

    python benchmarks/hidden_router_time.py BUNDLE [--reps 3] [--json OUT]

For a few chat prompts: the pass of blocks 0..after (part of every prefill: the routed prefill runs
it once and continues from it), the head and pooling (the only extra work routing adds), and a dense
prefill of the same prompt for scale. Medians over the prompts and repetitions after one warm-up
round (compiles every shape)."""

import argparse
import json
import statistics
import time

import mlx.core as mx

from pudding_mlx.generate import prompt_tokens
from pudding_mlx.hidden_router import block_output
from pudding_mlx.atomic import write_json
from pudding_mlx.load import backend, load
from pudding_mlx.skip import SkipView

PROMPTS = ["What is the capital of France?", "How do I boil an egg?", "Why is the sky blue? Explain it to a child.",
           "A man is sitting on a roof. He", "Which of these is a mammal: a shark, a dolphin, a trout?"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    loaded = load(a.bundle)
    router = loaded.router
    if getattr(router, "kind", None) != "hidden":
        raise SystemExit(f"{a.bundle}: its router is not a hidden-state router")
    head, blocks, dense, tokens = [], [], [], []
    for rep in range(a.reps + 1):  # round 0 warms up
        for text in PROMPTS:
            x = mx.array([prompt_tokens(loaded.tokenizer, text)])
            t0 = time.perf_counter()
            h = block_output(loaded.model, x, router.after)
            mx.eval(h)
            t1 = time.perf_counter()
            mx.eval(router.scores_of(h))
            t2 = time.perf_counter()
            mx.eval(SkipView(loaded.model, ())(x))
            t3 = time.perf_counter()
            if rep:
                blocks.append(1e3 * (t1 - t0))
                head.append(1e3 * (t2 - t1))
                dense.append(1e3 * (t3 - t2))
                tokens.append(x.shape[1])
    out = {"bundle": a.bundle, "backend": backend(), "after": router.after, "blocks": loaded.n_blocks,
           "prompt_tokens_median": statistics.median(tokens),
           "head_ms": {"median": statistics.median(head), "max": max(head)},
           "leading_blocks_ms": {"median": statistics.median(blocks)},
           "dense_prefill_ms": {"median": statistics.median(dense)},
           "head_over_dense_prefill": statistics.median(h / d for h, d in zip(head, dense)),
           "leading_blocks_over_dense_prefill": statistics.median(b / d for b, d in zip(blocks, dense))}
    print(json.dumps(out, indent=1))
    if a.json:
        write_json(a.json, out)


if __name__ == "__main__":
    main()
