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
from typing import Iterable, Sequence

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
