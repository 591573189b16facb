"""What fusing a healing adapter into the weights keeps of its effect (issue "Healed omission sets", item 6).

The runtime runs an adapter fused by default: each adapted linear gets a merged copy W' = W + scale * A B made
at load, so decode costs what the unhealed set costs (pudding_mlx.adapters). On a quantized model W' is
quantized again (8 bits, W's group size), which rounds part of the (small) adapter delta away. This script
measures how much: the NLL per token of the dense model's own replies to the val split of the distillation
prompts (results/distill; never HumanEval or an evaluation split) under dense, the set unhealed, the set with
the adapter as LoRA terms (exact) and fused, all in one process on the same inputs.

    python benchmarks/adapter_fuse.py HEALED_BUNDLE --omit 13,14,15 [--replies 24] [--json F] [--md F]

"kept" is (unhealed - fused) / (unhealed - lora): the share of the adapter's NLL gain the fused copy keeps.
Speed is `pudding-mlx bench HEALED_BUNDLE --omit SET` (fused) against the same with --lora-terms.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from pudding_mlx.atomic import write_json, write_text
from pudding_mlx.errors import PuddingError
from pudding_mlx.load import backend, load
from pudding_mlx.omission import parse_omit
from pudding_mlx.skip import SkipView

REPO = Path(__file__).resolve().parents[1]
PROMPTS, ANSWERS = REPO / "results" / "distill" / "prompts.json", REPO / "results" / "distill" / "answers.jsonl.gz"


def reply_nll(view, ids, start) -> tuple:
    """(summed NLL of ids[start:], their count) under `view` (one forward, no cache)."""
    logits = view(mx.array([ids[:-1]]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    targets = mx.array(ids[1:])
    picked = mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    return float(-picked[start - 1:].sum()), len(ids) - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="a bundle with a healing adapter for --omit")
    ap.add_argument("--omit", required=True, help="the set, e.g. 13,14,15 (one the adapter heals)")
    ap.add_argument("--replies", type=int, default=24, help="val replies scored (the first N, answers-file order)")
    ap.add_argument("--max-tokens", type=int, default=768, help="longest example (prompt + reply), tokens")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--md")
    args = ap.parse_args()
    omit = sorted(parse_omit(args.omit))
    for out in (args.json_out, args.md):
        if out and not Path(out).parent.is_dir():
            raise PuddingError(f"{out}: its folder does not exist; create it first")
    from pudding_mlx.train.distill import build_examples  # the train side's examples: same ids, same targets

    fused = load(args.bundle, with_router=False)
    lora = load(args.bundle, with_router=False, lora_terms=True)
    if not fused.adapters:
        raise PuddingError(f"{args.bundle}: the bundle has no healing adapter; add one with `convert bundle --adapter`")
    examples = [e for e in build_examples(fused.tokenizer, PROMPTS, ANSWERS, split="val", kinds=("code", "task"),
                                          max_tokens=args.max_tokens)][:args.replies]
    views = {"dense": SkipView(fused.model, []), "unhealed": SkipView(fused.model, omit, healed=False),
             "lora": SkipView(lora.model, omit), "fused": SkipView(fused.model, omit)}
    if views["fused"].adapter is None:
        raise PuddingError(f"--omit {args.omit}: no adapter of {args.bundle} heals this set; pick one its adapter.json lists")
    sums = {k: [0.0, 0] for k in views}
    per = {k: [] for k in views}
    t0 = time.perf_counter()
    for n, e in enumerate(examples, 1):
        for name, view in views.items():
            s, c = reply_nll(view, e.ids, e.start)
            sums[name][0] += s
            sums[name][1] += c
            per[name].append(s / c)
        print(f"\r{n}/{len(examples)} replies ({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    nll = {k: v[0] / v[1] for k, v in sums.items()}
    gain_lora, gain_fused = nll["unhealed"] - nll["lora"], nll["unhealed"] - nll["fused"]
    diff = np.array(per["fused"]) - np.array(per["lora"])
    rep = {"bundle": str(args.bundle), "set": omit, "adapter": views["fused"].adapter, "backend": backend(),
           "replies": len(examples), "tokens": sums["dense"][1], "nll_per_token": nll,
           "kept": gain_fused / gain_lora if gain_lora else None,
           "fused_minus_lora_per_reply": {"mean": float(diff.mean()), "max_abs": float(np.abs(diff).max())},
           "command": "python benchmarks/adapter_fuse.py " + " ".join(sys.argv[1:])}
    lines = [f"# Fused vs LoRA-term adapter on {Path(args.bundle).name}, set {omit}", "",
             f"NLL per token of the dense model's replies to {len(examples)} val distillation prompts "
             f"({sums['dense'][1]} reply tokens). Command: `{rep['command']}`", "",
             "| run | NLL per token |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in nll.items()]
    lines += ["", f"The fused copy keeps {100 * rep['kept']:.1f}% of the adapter's NLL gain "
              f"(unhealed - fused {gain_fused:+.4f} against unhealed - LoRA {gain_lora:+.4f})." if rep["kept"] is not None
              else "The adapter changes nothing here."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json_out:
        write_json(args.json_out, rep)
    if args.md:
        write_text(args.md, text)


if __name__ == "__main__":
    try:
        main()
    except PuddingError as e:
        sys.exit(f"error: {e}")
