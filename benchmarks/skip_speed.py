"""Speed of block skipping: dense vs routed (k blocks omitted) vs stock mlx-lm, one random model, one run.

    python benchmarks/skip_speed.py                          # LLaMA-3.1-8B shape, k = 7 (needs a GPU/Metal)
    python benchmarks/skip_speed.py --shape small --k 4      # a shape the CPU backend runs in seconds

Prefill: one forward over a --prefill-tokens prompt into a fresh cache. Decode: mlx-lm's own
`generate_step` (the loop `mlx_lm.generate` uses), time per token after the first. Each measurement
is the median of --runs rounds after a warm-up; dense, routed and stock are interleaved within a
round so drift hits all three alike. ideal = L / (L - k); the target is speedup >= 0.95 x ideal, and
dense within 2% of stock mlx-lm.
"""

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from pudding_mlx.bench import spread
from pudding_mlx.load import backend
from pudding_mlx.shapes import SHAPES, random_model
from pudding_mlx.skip import SkipView


def time_prefill(model, tokens, make_cache):
    cache = make_cache()
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval(model(tokens[None], cache=cache))
    return time.perf_counter() - t0


def time_decode(model, prompt, n):
    """Seconds per generated token after the first, with mlx-lm's generation loop."""
    stamps = []
    for _ in generate_step(prompt, model, max_tokens=n + 1):
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--k", type=int, default=7, help="blocks omitted in the routed run")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args(argv)

    dtype = getattr(mx, a.dtype) if a.dtype else (mx.float32 if backend() == "cpu" else mx.bfloat16)
    model = random_model(a.shape, dtype)
    n_blocks = len(model.layers)
    omitted = spread(n_blocks, a.k)
    dense, routed = SkipView(model, ()), SkipView(model, omitted)
    runners = {"stock": (model, lambda: make_prompt_cache(model)), "dense": (dense, dense.make_cache),
               "routed": (routed, routed.make_cache)}
    prefill_tokens = mx.random.randint(0, model.args.vocab_size, (a.prefill_tokens,))
    decode_prompt = mx.random.randint(0, model.args.vocab_size, (a.decode_prompt,))

    for name, (m, mk) in runners.items():  # warm-up: kernels compiled, weights resident
        time_prefill(m, prefill_tokens, mk)
        time_decode(m, decode_prompt, 4)
    times = {(phase, name): [] for phase in ("prefill", "decode") for name in runners}
    names = list(runners)
    for r in range(a.runs):
        for name in names[r % 3:] + names[:r % 3]:  # rotate the order: no runner always goes first
            m, mk = runners[name]
            times[("prefill", name)].append(time_prefill(m, prefill_tokens, mk))
            times[("decode", name)].append(time_decode(m, decode_prompt, a.decode_tokens))
    med = {key: statistics.median(v) for key, v in times.items()}

    ideal = n_blocks / (n_blocks - len(omitted))
    rows = []
    for phase in ("prefill", "decode"):
        speedup = med[(phase, "dense")] / med[(phase, "routed")]
        rows.append(dict(phase=phase, stock_ms=1e3 * med[(phase, "stock")], dense_ms=1e3 * med[(phase, "dense")],
                         routed_ms=1e3 * med[(phase, "routed")], speedup=speedup, ideal=ideal,
                         speedup_over_ideal=speedup / ideal,
                         dense_over_stock=med[(phase, "dense")] / med[(phase, "stock")]))
    info = dict(backend=backend(), device=str(mx.default_device()), shape=a.shape, dtype=str(dtype),
                blocks=n_blocks, k=len(omitted), omitted=omitted, prefill_tokens=a.prefill_tokens,
                decode_prompt=a.decode_prompt, decode_tokens=a.decode_tokens, runs=a.runs, rows=rows)
    if backend() == "cuda":
        info["device_name"] = mx.device_info().get("device_name", "")

    print(f"# skip_speed: {a.shape} ({n_blocks} blocks, {dtype}), k={len(omitted)} omitted {omitted}, "
          f"backend {backend()}, median of {a.runs}")
    print("| phase | stock mlx-lm ms | dense ms | routed ms | speedup | ideal | speedup/ideal | dense/stock |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        unit = f" (prompt {a.prefill_tokens})" if r["phase"] == "prefill" else " (per token)"
        print(f"| {r['phase']}{unit} | {r['stock_ms']:.2f} | {r['dense_ms']:.2f} | {r['routed_ms']:.2f} | "
              f"{r['speedup']:.3f} | {r['ideal']:.3f} | {r['speedup_over_ideal']:.3f} | {r['dense_over_stock']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=2)
    return info


if __name__ == "__main__":
    main(sys.argv[1:])
