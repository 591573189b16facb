"""Healing (issue "Healed omission sets", item 3): LoRA adapters (PEFT) that teach the model to run without
the blocks an omission set skips, by distillation from the dense model on `train.distill` examples.

One copy of the weights is both models: the student is the model with a set skipped and the adapter on,
the teacher the same model dense with the adapter off (PEFT's `disable_adapter`), which is exactly the
original model. Per step, on the targets of a batch of train examples:

    loss = CE(student, the dense reply's tokens)  +  kl_weight * KL(teacher || student)

(code-text examples, the standard library's own code, have the KL term only: the aim is the dense model's
behaviour, not the text). The set skipped is drawn per step from a pool of sets (stochastic depth over the
candidates: one adapter for every set) or is always one set (a per-set adapter). The runtime applies an
adapter only while blocks are skipped, so the dense model stays the original one.

An adapter folder is PEFT's own (adapter_config.json + adapter_model.safetensors) plus heal.json: the sets
it was trained for, the settings, the data's digest and the loss curve.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from pudding_mlx.atomic import building, write_json
from pudding_mlx.errors import PuddingError

from .distill import Example, _pad_id, mean_nll, pad_batch, target_logits, target_nll
from .generation import set_name
from .scoring import skip_blocks

HEAL_FORMAT = "pudding-mlx-heal"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Log = Callable[[str], None]


def add_lora(model, rank: int = 16, alpha: int = 32, name: str = "default", targets: Sequence[str] = TARGETS,
             layers: Optional[Sequence[int]] = None):
    """`model` wrapped as a PEFT model with a fresh LoRA adapter `name` on the linear layers of the blocks
    `layers` (default: every block), or, when it is already a PEFT model, a further adapter `name`, made the
    active one. Leave out the blocks a hidden-state router reads (0..after): the runtime routes inside the
    prefill, running those blocks before the set, and so its adapter, is known (`pudding_mlx.adapters`)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none",
                        task_type="CAUSAL_LM", layers_to_transform=None if layers is None else sorted(layers))
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        model.set_adapter(name)
        return model
    return get_peft_model(model, config, adapter_name=name)


def _quiet(message: str) -> None:
    """The log of a rank other than 0: one rank speaks for all."""


def _lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def micro_batches(batch: Sequence[Example], max_targets: int) -> List[List[Example]]:
    """`batch` cut, in order, into runs of at most `max_targets` target tokens (one example may exceed it alone):
    the vocabulary-wide logits of a step cost memory by the target, and long code examples would not fit. An empty
    batch (a rank's share of a step smaller than the world) is no part at all."""
    out, size = [], 0
    for e in batch:
        n = len(e.ids) - e.start
        if not out or (out[-1] and size + n > max_targets):
            out.append([])
            size = 0
        out[-1].append(e)
        size += n
    return out


def target_counts(batch: Sequence[Example]) -> tuple:
    """(every target, the replies' targets) of a batch: what its KL and its CE are divided by."""
    return (sum(len(e.ids) - e.start for e in batch),
            sum(len(e.ids) - e.start for e in batch if e.kind != "code-text"))


def backward(peft_model, tokenizer, batch: Sequence[Example], omitted: Sequence[int], kl_weight: float = 1.0,
             max_targets: int = 4096, counts: Optional[tuple] = None) -> tuple:
    """The batch's loss (module doc: CE per reply target + kl_weight x KL per target) backpropagated into the
    adapter's gradients, `max_targets` target tokens at a time (`micro_batches`: each part's summed losses over the
    whole batch's counts, so the gradients add up to the batch's own, in less memory). `counts`: the whole step's
    `target_counts` where `batch` is one rank's share of it (the ranks' gradients then sum to the step's). Returns
    (CE, KL, bad): `bad` names the examples of a micro-batch whose loss was not finite (not backpropagated), and
    which model's logits were not (the dense teacher's, the skipping student's)."""
    base = peft_model.get_base_model()
    device = next(base.parameters()).device
    n_all, n_ce = counts or target_counts(batch)  # KL over every target; CE over the replies' targets
    ce_sum = kl_sum = 0.0
    bad: List[dict] = []
    for part in micro_batches(batch, max_targets):
        ids, mask, target = pad_batch(part, _pad_id(tokenizer), device)
        with torch.no_grad(), peft_model.disable_adapter():
            teacher, labels, rows = target_logits(base, ids, mask, target)
        with skip_blocks(base, omitted):
            student, _, _ = target_logits(base, ids, mask, target)
        s = torch.log_softmax(student.float(), -1)
        t = torch.log_softmax(teacher.float(), -1)
        kl = torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum")
        replies = torch.tensor([e.kind != "code-text" for e in part], device=device)[rows]
        ce = (torch.nn.functional.nll_loss(s[replies], labels[replies], reduction="sum") if replies.any()
              else s.new_zeros(()))
        loss = ce / max(1, n_ce) + kl_weight * kl / n_all
        if not torch.isfinite(loss):
            bad.append({"examples": [e.id for e in part], "teacher_finite": bool(torch.isfinite(teacher).all()),
                        "student_finite": bool(torch.isfinite(student).all())})
            continue
        loss.backward()
        ce_sum, kl_sum = ce_sum + float(ce.detach()), kl_sum + float(kl.detach())
    return ce_sum / max(1, n_ce), kl_sum / n_all, bad


def schedule(n_examples: int, sets: Sequence[Sequence[int]], steps: int, batch_size: int = 16,
             seed: int = 0) -> Iterator[tuple]:
    """(example indices, omitted set) of each training step: seeded passes over the examples, each shuffled, and
    the set drawn per step. Its own function so that a step can be rebuilt outside training (e.g. to look at the
    examples of a step that failed: benchmarks/heal_step_probe.py)."""
    rng = random.Random(seed)
    order: List[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            more = list(range(n_examples))
            rng.shuffle(more)
            order += more
        rows = order[:batch_size]
        del order[:batch_size]
        yield rows, list(rng.choice(list(sets)))


def train_adapter(peft_model, tokenizer, examples: Sequence[Example], sets: Sequence[Sequence[int]], steps: int,
                  batch_size: int = 16, lr: float = 2e-4, kl_weight: float = 1.0, seed: int = 0, log: Log = print,
                  every: int = 10, max_targets: int = 4096) -> List[dict]:
    """Train the active adapter (module doc); returns the loss curve, one record per `every` steps. A step whose
    loss or gradient is not finite is skipped (no update: one NaN would spoil every weight after it), logged and
    counted in its record ("skipped", with the examples and which model's logits were not finite).

    Under torchrun (`train.distributed`), data parallel: every rank draws the same steps (the schedule is seeded),
    takes every world-size-th example of each step's batch, and the ranks' gradients are summed before the step,
    so the update is the one a single process makes with the whole batch (up to the order of float sums). The
    gradients are reduced by hand rather than by DistributedDataParallel: the adapter of a block the step skips
    gets no gradient, and a step is several micro-batches, which DDP would need `find_unused_parameters` and
    `no_sync` for. Only rank 0 logs."""
    from .distributed import all_reduce_gradients, broadcast_parameters, gather_lists, sum_everywhere, world

    if not examples or not sets or any(not s for s in sets):
        raise PuddingError("healing needs train examples and non-empty omission sets")
    rank, size = world()
    if rank:
        log = _quiet
    params = [p for p in peft_model.parameters() if p.requires_grad]
    broadcast_parameters(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps, max(1, steps // 20)))
    curve, window, skipped, t0 = [], [], [], time.perf_counter()
    peft_model.eval()  # no dropout anywhere; gradients flow all the same
    for step, (rows, omitted) in enumerate(schedule(len(examples), sets, steps, batch_size, seed)):
        batch = [examples[i] for i in rows]
        opt.zero_grad(set_to_none=True)
        ce, kl, bad = backward(peft_model, tokenizer, batch[rank::size], omitted, kl_weight, max_targets,
                               counts=target_counts(batch))
        if size > 1:
            all_reduce_gradients(params)
            ce, kl = sum_everywhere([ce, kl])
            bad = gather_lists(bad)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if bad or not torch.isfinite(norm):
            skipped.append({"step": step + 1, "set": omitted,
                            "bad": bad or [{"examples": [e.id for e in batch], "gradient_finite": False}]})
            log(f"step {step + 1}: not finite, skipped ({skipped[-1]['bad']})")
        else:
            opt.step()
            window.append((ce, kl))
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            record = {"step": step + 1, "seconds": round(time.perf_counter() - t0, 1)}
            if window:
                ce_m, kl_m = (sum(v) / len(window) for v in zip(*window))
                record.update(ce=round(ce_m, 4), kl=round(kl_m, 4))
            late = [x for x in skipped if x["step"] > step + 1 - every]
            if late:
                record["skipped"] = late
            curve.append(record)
            log(f"step {step + 1}/{steps}: CE {record.get('ce', float('nan')):.4f}, KL "
                f"{record.get('kl', float('nan')):.4f}{f', {len(late)} skipped' if late else ''} "
                f"({time.perf_counter() - t0:.0f} s)")
            window = []
    return curve


def save_adapter(peft_model, out, sets: Sequence[Sequence[int]], info: dict, force: bool = False) -> Path:
    """The active adapter as a folder (module doc), written atomically."""
    name = peft_model.active_adapter
    with building(out, force=force) as new:
        peft_model.save_pretrained(str(new), selected_adapters=[name], safe_serialization=True)
        made = new / name if name != "default" else new  # PEFT writes a named adapter into a subfolder
        if made != new:
            for f in made.iterdir():
                f.rename(new / f.name)
            made.rmdir()
        (new / "README.md").unlink(missing_ok=True)  # PEFT's model card template: nothing of ours in it
        if not (new / "adapter_model.safetensors").is_file():
            raise PuddingError(f"PEFT wrote no adapter_model.safetensors for {out}")
        write_json(new / "heal.json", {"format": HEAL_FORMAT, "schema_version": 1,
                                       "sets": [sorted(int(b) for b in s) for s in sets], **info})
    return Path(out)


def nll_table(peft_model, tokenizer, examples: Sequence[Example], sets: Sequence[Sequence[int]],
              adapters: Sequence[str] = (), batch_size: int = 32) -> Dict[str, dict]:
    """{set name: {"unhealed": mean NLL, adapter: mean NLL, ...}} on `examples` (the val split), and "dense".
    Under torchrun every rank scores every world-size-th example and the sums are added up: every rank gets the
    whole table."""
    from .distributed import sum_everywhere, world

    rank, size = world()
    base = peft_model.get_base_model()
    active = peft_model.active_adapter
    table: Dict[str, dict] = {}

    def nll(s) -> float:  # this rank's summed NLL and count (zeros for no examples), added up over the ranks
        mine = target_nll(base, tokenizer, examples[rank::size], s, batch_size).sum(0)
        return mean_nll(np.array([sum_everywhere(mine)]))

    with peft_model.disable_adapter():
        table["dense"] = {"unhealed": nll(())}
        for s in sets:
            table[set_name(s)] = {"unhealed": nll(s)}
    try:
        for a in adapters:
            peft_model.set_adapter(a)
            for s in sets:
                table[set_name(s)][a] = nll(s)
    finally:
        peft_model.set_adapter(active)
    return table
