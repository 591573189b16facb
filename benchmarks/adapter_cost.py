"""What a healing adapter costs in speed, before any adapter is trained (issue "Healed omission sets", item 6).

An adapter's cost is its matmuls: two thin ones (x @ A @ B, rank r) beside each adapted linear, the same
work whatever the values. This script gives a bundle an adapter of the shape `train heal` trains (rank r on
the 7 linears of every block after the protected leading ones) for one set, with random values, and runs
`pudding-mlx bench` on that set: the bench times the set healed and unhealed in the same rounds
(`healed_over_unhealed`). The adapter's outputs mean nothing; its timing is that of a trained one.

    python benchmarks/adapter_cost.py BUNDLE OUT_BUNDLE --omit 4,7,13,18,19,25,26 [--rank 16] [--first 4]
    pudding-mlx bench OUT_BUNDLE --omit 4,7,13,18,19,25,26 --cells 128+1,128+64 --runs 10 --no-memory --json ...
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

from pudding_mlx.adapters import linear_dims, submodule, write_adapter
from pudding_mlx.convert.bundle import build_bundle
from pudding_mlx.errors import PuddingError
from pudding_mlx.load import load
from pudding_mlx.omission import parse_omit
from pudding_mlx.skip import decoder

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="a bundle (or mlx-lm folder) to copy")
    ap.add_argument("out", help="the new bundle, with the adapter")
    ap.add_argument("--omit", required=True, help="the set the adapter heals, e.g. 4,7,13")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--first", type=int, default=4, help="the first adapted block (blocks before it stay as they are)")
    args = ap.parse_args()
    src = load(args.bundle, with_router=False, check_memory=False)
    layers = decoder(src.model).layers
    weights = {}
    for i in range(args.first, len(layers)):
        for path in TARGETS:
            d_in, d_out = linear_dims(submodule(layers[i], path))
            key = mx.random.key(len(weights))
            weights[f"layers.{i}.{path}.lora_a"] = mx.random.normal((d_in, args.rank), key=key) * d_in ** -0.5
            weights[f"layers.{i}.{path}.lora_b"] = mx.zeros((args.rank, d_out)) + 1e-3
    adapter = Path(args.out).with_name(Path(args.out).name + "-adapter")
    write_adapter(adapter, args.rank, 2.0, [sorted(parse_omit(args.omit))], weights,
                  {"note": "random values, for timing only (benchmarks/adapter_cost.py)"}, force=True)
    cands = src.manifest.candidates if src.manifest else []
    build_bundle(src.path, args.out, candidates=[list(c.omitted) for c in cands] or None, adapters=[adapter],
                 force=True)
    print(f"{args.out}: {len(weights) // 2} adapted linears, rank {args.rank}, blocks {args.first}..{len(layers) - 1}")


if __name__ == "__main__":
    try:
        main()
    except PuddingError as e:
        sys.exit(f"error: {e}")
