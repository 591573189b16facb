"""Are the model's logits finite on the examples of given training steps? The steps are rebuilt exactly as
`train heal` / benchmarks/heal_gpu.py drew them (`heal.schedule`: the same examples, seed, batch size and set),
and each micro-batch runs as in training (same padding), dense (the teacher) and with the set skipped, no adapter.
A step of a run that went NaN, probed here, tells a bad example (not finite already without the adapter) from the
adapter's own updates. Usage, from the repository root:

    python benchmarks/heal_step_probe.py MODEL --steps 111-120 [--set 5,13,14] [--dtype bfloat16]

The examples are heal_gpu.py wide's: the train split of results/distill/{prompts,answers} then of
{prompts-code,answers-code}. Slow on a CPU (~2 minutes a step of 16 for Qwen2.5-Coder-1.5B in bfloat16).
"""
import argparse
import time
from pathlib import Path

import torch

from pudding_mlx.train import distill as D
from pudding_mlx.train import heal as H
from pudding_mlx.train.hf import load_hf
from pudding_mlx.train.scoring import skip_blocks
from pudding_mlx.train.search import model_identity

DISTILL = Path(__file__).resolve().parents[1] / "results" / "distill"

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("model")
p.add_argument("--steps", required=True, help="first-last (1-based, as the training log counts them)")
p.add_argument("--set", default="5,13,14")
p.add_argument("--batch", type=int, default=16)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--dtype", default="bfloat16")
args = p.parse_args()
first, last = (int(x) for x in args.steps.split("-"))
omitted = [int(b) for b in args.set.split(",")]

made_by = {D.read_answers(DISTILL / f)[0]["model"] for f in ("answers.jsonl.gz", "answers-code.jsonl.gz")}
if made_by != {model_identity(args.model)}:
    raise SystemExit(f"{args.model}: not the model that answered the distillation prompts ({', '.join(made_by)})")
lm, tok, _ = load_hf(args.model, "cpu", args.dtype)
examples = D.build_examples_of(tok, [(DISTILL / "prompts.json", DISTILL / "answers.jsonl.gz"),
                                     (DISTILL / "prompts-code.json", DISTILL / "answers-code.jsonl.gz")], split="train")
print(f"{len(examples)} train examples", flush=True)
torch.set_grad_enabled(False)
for step, (rows, _) in enumerate(H.schedule(len(examples), [omitted], last, args.batch, args.seed), start=1):
    if step < first:
        continue
    for part in H.micro_batches([examples[i] for i in rows], 4096):
        t0 = time.perf_counter()
        ids, mask, target = D.pad_batch(part, D._pad_id(tok), "cpu")
        teacher, _, which = D.target_logits(lm, ids, mask, target)
        with skip_blocks(lm, omitted):
            student, _, _ = D.target_logits(lm, ids, mask, target)
        bad = sorted(set(which[~(torch.isfinite(teacher).all(-1) & torch.isfinite(student).all(-1))].tolist()))
        print(f"step {step} {tuple(ids.shape)}: dense finite {bool(torch.isfinite(teacher).all())}, skipping "
              f"finite {bool(torch.isfinite(student).all())}, examples not finite {[part[r].id for r in bad]} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
