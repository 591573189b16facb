"""Decode speed of each depth on a real model: dense and every --omit set, measured in one run.

    python benchmarks/depth_speed.py MODEL --omit "9;9,14;13,14,15;11,12,13,14,15" --json out.json

Why: the adaptive frontier (`train adaptive-report`) gives speed as the ideal L / (L - mean k). An adaptive
budget runs each prompt at one depth, so its decode time is the mix of these per-depth times, weighted by the
routing. This script measures the per-depth times that the mix is made of, on the machine at hand.

Per round, dense and each set decode --decode-tokens tokens after the same random --decode-prompt. The
order rotates each round, so no runner always goes first (`pudding_mlx.bench.interleaved_rounds`). The loop
is mlx-lm's `generate_step`, timed per token after the first (`skip_speed.time_decode`). A set's speedup in a round is dense's time over its time.
Reported per set: the median over rounds with a bootstrap 95% interval (`pudding_mlx.bench.interval`), beside
the ideal. Healing adapters, where the bundle has them, stay off (`--healed` turns them on).
"""

import argparse
import sys

import mlx.core as mx

from pudding_mlx.atomic import write_json
from pudding_mlx.bench import MIN_ROUNDS_FOR_CLAIMS, interleaved_rounds, interval
from pudding_mlx.errors import PuddingError
from pudding_mlx.load import backend, load
from pudding_mlx.omission import check_omitted, ideal_speedup, parse_omit_sets
from pudding_mlx.skip import SkipView
from skip_speed import time_decode


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a bundle or mlx-lm model directory")
    ap.add_argument("--omit", required=True, help="the sets, separated by semicolons: '9;9,14;13,14,15'")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, the stored dtype elsewhere")
    ap.add_argument("--decode-prompt", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--runs", type=int, default=MIN_ROUNDS_FOR_CLAIMS)
    ap.add_argument("--healed", action="store_true", help="time the sets with their healing adapters on")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args(argv)
    try:
        loaded = load(a.model, dtype=a.dtype, with_router=False, healed=a.healed)
        n_blocks = loaded.n_blocks
        sets = [list(check_omitted(s, n_blocks, "--omit")) for s in parse_omit_sets(a.omit)]
    except PuddingError as e:
        sys.exit(f"depth_speed: {e}")
    model = loaded.model
    runners = {"dense": SkipView(model, ())}
    runners.update({",".join(map(str, s)): SkipView(model, s, healed=a.healed) for s in sets})
    prompt = mx.random.randint(0, model.args.vocab_size, (a.decode_prompt,), key=mx.random.key(0))

    for name, view in runners.items():  # warm-up: kernels compiled, weights resident
        time_decode(view, prompt, 2)
    times = interleaved_rounds(
        {name: (lambda v=view: time_decode(v, prompt, a.decode_tokens)) for name, view in runners.items()}, a.runs,
        on_round=lambda r, t: print(f"round {r + 1}/{a.runs}: " + ", ".join(f"{n} {1e3 * v[-1]:.1f} ms/token"
                                                                           for n, v in t.items()), flush=True))

    rows = []
    for s in sets:
        name = ",".join(map(str, s))
        speedup = interval([d / t for d, t in zip(times["dense"], times[name])])
        ideal = ideal_speedup(n_blocks, len(s))
        rows.append({"omitted": s, "k": len(s), "ms_per_token": 1e3 * interval(times[name])["median"],
                     "speedup": speedup, "ideal": ideal, "speedup_over_ideal": speedup["median"] / ideal})
    down = getattr(model.layers[0], "mlp", None) and model.layers[0].mlp.down_proj
    # a quantized linear packs its weight in uint32: the compute dtype is its scales'
    dtype = str(getattr(down, "scales", getattr(down, "weight", None)).dtype).removeprefix("mlx.core.") if down else a.dtype
    result = {"backend": backend(), "model": loaded.path.name, "dtype": dtype, "bits": getattr(down, "bits", None),
              "blocks": n_blocks, "decode_prompt": a.decode_prompt, "decode_tokens": a.decode_tokens, "runs": a.runs,
              "healed": a.healed, "dense_ms_per_token": 1e3 * interval(times["dense"])["median"], "rows": rows,
              "times_s": times}

    print(f"# depth_speed: {loaded.path.name} ({n_blocks} blocks), backend {backend()}, decode {a.decode_tokens} tokens "
          f"after {a.decode_prompt}, median of {a.runs} interleaved rounds [bootstrap 95%]")
    print(f"dense: {result['dense_ms_per_token']:.1f} ms/token")
    print("| k | omitted | ms/token | speedup [95%] | ideal | speedup/ideal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["speedup"]["ci95"]
        print(f"| {r['k']} | {r['omitted']} | {r['ms_per_token']:.1f} | {r['speedup']['median']:.3f} [{lo:.3f}, {hi:.3f}] | "
              f"{r['ideal']:.3f} | {r['speedup_over_ideal']:.3f} |")
    if a.json:
        write_json(a.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
