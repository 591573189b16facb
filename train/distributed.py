"""Scoring spread over the GPUs of one host with torch.distributed (launch with `torchrun
--nproc-per-node N` or `accelerate launch`); one process, one GPU, or the CPU run unchanged.

Each rank scores every world_size-th request (round robin, so long and short requests spread
evenly), the scores are gathered to every rank, and the result is the same as one process would
compute. Only rank 0 writes files.
"""

import atexit
import logging
import os
import sys
from typing import Iterable, List, Sequence

import torch
import torch.distributed as dist

from .scoring import flatten, metrics, score_requests
from pudding_mlx.tasks import Example


def init_from_env() -> None:
    """Join the process group that torchrun / accelerate describe in the environment, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        atexit.register(_shutdown)


def _shutdown() -> None:
    # Leave together: a rank whose peers already closed their connections can be aborted by
    # gloo's threads at interpreter exit ("terminate called without an active exception").
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish() -> None:
    """End a multi-process run once its work is done and written: wait for every rank, flush, and
    leave at once with status 0. Nothing runs after the barrier, neither the process group's
    teardown nor the interpreter's, which is where a rank that had finished was seen to die (CI,
    gloo on CPU, two ranks). A rank's barrier returns only once its own messages are sent, so the
    others' barriers complete. Call it last, from the command's main code; in one process it does
    nothing."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def score_requests_everywhere(model, tokenizer, requests, omitted: Iterable[int] = (), **kwargs):
    """`score_requests` with the requests split across ranks; every rank gets all scores."""
    rank, size = world()
    if size == 1:
        return score_requests(model, tokenizer, requests, omitted, **kwargs)
    requests = list(requests)
    mine = score_requests(model, tokenizer, requests[rank::size], omitted, **kwargs)
    gathered = [None] * size
    dist.all_gather_object(gathered, mine)
    merged = [None] * len(requests)
    for r, part in enumerate(gathered):
        merged[r::size] = part
    return merged


def evaluate_everywhere(model, tokenizer, examples: Sequence[Example], omitted: Iterable[int] = (), **kwargs) -> dict:
    """`train.scoring.evaluate`, spread across ranks."""
    scores = score_requests_everywhere(model, tokenizer, flatten(examples), omitted, **kwargs)
    return metrics(examples, scores)


# -- data-parallel training (train.heal): every rank takes its share of each step's batch ----------------------


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Rank 0's values of `params` on every rank: training starts from one set of weights even where a rank's
    random draws differed."""
    if world()[1] > 1:
        for p in params:
            dist.broadcast(p.data, 0)


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum each parameter's gradient over the ranks, in one call (float32, whatever the parameters' dtype). A
    parameter that no rank gave a gradient keeps none, as in one process: the optimizer then leaves it and its
    state alone (e.g. the adapter of a block the step skipped), where a zero gradient would still move it."""
    if world()[1] == 1:
        return
    device = params[0].device
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(had)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params])
    dist.all_reduce(flat)
    at = 0
    for p, h in zip(params, had.tolist()):
        n = p.numel()
        if h:
            p.grad = flat[at:at + n].view_as(p).to(p.dtype)
        at += n


def sum_everywhere(values: Sequence[float]) -> List[float]:
    """`values` summed over the ranks (float64)."""
    if world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if world()[1] == 1:
        return list(items)
    parts = [None] * world()[1]
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]
