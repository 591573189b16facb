"""Batched log-likelihood scoring of (context, continuation) requests on a Hugging Face causal LM,
with a set of decoder blocks skipped -- the PuDDing score and the lm-eval acc / acc_norm metrics.

Block skipping (`skip_blocks`) never copies weights: for the duration of one call it points the
decoder's `layers` at an `nn.ModuleList` of the kept blocks, sets `config.num_hidden_layers` to the
kept count and, where the config has per-layer `layer_types` (gemma2/3, qwen2/3, smollm3: the
decoder picks each block's attention mask and rotary table by `config.layer_types[i]` with `i` the
position in the loop), narrows `layer_types` to the kept blocks' own types. Everything is restored
in a `finally`, also after an exception. Blocks keep their `layer_idx`, which is only a KV-cache key,
so the forward runs with `use_cache=False`. Only families whose decoder forward was checked for
per-position state (transformers 5.23) are accepted; others raise a PuddingError.

Tokenization, `Score` and the metrics are framework-free and live in `pudding_mlx.requests` (shared with
the MLX evaluator, `pudding_mlx.evaluate`); they are re-exported here. Tokenization (lm-eval's
`HFLM._encode_pair`): trailing whitespace of the context moves to the front
of the continuation; then `whole = enc(context + continuation)`, `ctx = enc(context)`, and the
continuation tokens are `whole[len(ctx):]` -- the boundary is decided by encoding the whole string
and splitting at the context's token count, so a token that merges across the boundary counts as
continuation. The model input is `(ctx + cont)[:-1]` (left-truncated to `max_length + 1` tokens
first). An empty context is replaced by the prefix token (BOS, else EOS). `enc` uses
`add_special_tokens=add_bos`, default False except for gemma models (lm-eval's rule). If the split
leaves no continuation token (the context swallowed it), the last token of `whole` is scored.

Per request (`Score`): summed log-prob of the continuation tokens, their count, whether greedy
decoding would produce them (`is_greedy`), and the UTF-8 byte length of the continuation string.
Per example: ell-bar = sum / n_tokens, the mean log-likelihood per token (the PuDDing score);
acc = argmax of the sums is gold; acc_norm = argmax of sum / len(norm_text) is gold, where
norm_text is lm-eval's doc_to_choice string (character length, no delimiter), as lm-eval defines
it. Search losses over a set of examples: `likelihood` = -sum_x ell-bar(gold), `likelihood_diff`
= -sum_x sum_{k != gold} (ell-bar(gold) - ell-bar(k)).

Batching: requests are sorted by input length (longest first), padded on the right with an
attention mask, and only the logits of the continuation positions are computed (`logits_to_keep`)
and turned into float32 log-probs. bf16 on GPU, float32 on CPU (`default_dtype`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from pudding_mlx.omission import check_omitted, kept_blocks
from pudding_mlx.errors import PuddingError

# the torch-free half (tokenization, Score, metrics) lives in .requests; re-exported here
from pudding_mlx.requests import (Score, _prefix_token, _split_space, encode_requests, flatten, losses,  # noqa: F401
                       metrics, model_inputs)
from pudding_mlx.tasks import Example, Request

# Decoder families whose forward (transformers 5.23) was checked: the block loop is
# `self.layers[: config.num_hidden_layers]`, optionally with `config.layer_types[i]`; `layer_idx`
# is used only at __init__ or as a cache key.
SUPPORTED_FAMILIES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
    "gemma3_text", "phi3", "olmo2", "granite", "smollm3",
})

_SWAP_LOCK = threading.RLock()


# -- the model ---------------------------------------------------------------------------------------


def default_dtype(device: Union[str, torch.device, None]) -> torch.dtype:
    """bf16 on an accelerator, float32 on the CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return torch.float32 if dev.type == "cpu" else torch.bfloat16


def find_decoder(model: nn.Module) -> nn.Module:
    """The module that owns the ModuleList of transformer blocks (`.layers`) and reads `.config`."""
    for path in (("model",), ("model", "language_model"), ("language_model", "model"),
                 ("language_model",)):
        m = model
        for name in path:
            m = getattr(m, name, None)
            if m is None:
                break
        if m is not None and isinstance(getattr(m, "layers", None), nn.ModuleList) \
                and getattr(m, "config", None) is not None:
            return m
    raise PuddingError(f"{type(model).__name__} has no ModuleList of transformer blocks at "
                       "model.model.layers; this architecture is not supported")


def num_blocks(model: nn.Module) -> int:
    return len(find_decoder(model).layers)


def _family(model: nn.Module, decoder: nn.Module) -> str:
    types = {getattr(getattr(model, "config", None), "model_type", None),
             getattr(decoder.config, "model_type", None)}
    ok = types & SUPPORTED_FAMILIES
    if not ok:
        name = next((t for t in types if t), type(model).__name__)
        raise PuddingError(f"model type {name!r} is not supported for block skipping; supported: "
                           f"{', '.join(sorted(SUPPORTED_FAMILIES))}")
    return sorted(ok)[0]


@contextlib.contextmanager
def skip_blocks(model: nn.Module, omitted: Iterable[int] = ()):
    """Within the block, `model` runs without the blocks `omitted` (no copy; restored on exit)."""
    omitted = list(omitted)
    if not omitted:  # dense: no swap, so any causal LM will do
        yield model
        return
    decoder = find_decoder(model)
    omitted = check_omitted(omitted, len(decoder.layers))
    if getattr(decoder.config, "is_heterogeneous", False):
        raise PuddingError("heterogeneous (per-layer) configs are not supported for block skipping")
    _family(model, decoder)
    cfg = decoder.config
    with _SWAP_LOCK:
        layers = decoder.layers
        n = len(layers)
        kept = kept_blocks(omitted, n)
        saved_n = cfg.num_hidden_layers
        saved_types = getattr(cfg, "layer_types", None)
        if saved_types is not None and len(saved_types) != n:
            raise PuddingError(f"config.layer_types has {len(saved_types)} entries for {n} blocks")
        try:
            decoder.layers = nn.ModuleList([layers[i] for i in kept])
            cfg.num_hidden_layers = len(kept)
            if saved_types is not None:
                cfg.layer_types = [saved_types[i] for i in kept]
            yield model
        finally:
            decoder.layers = layers
            cfg.num_hidden_layers = saved_n
            if saved_types is not None:
                cfg.layer_types = saved_types


# -- tokenization --------------------------------------------------------------------------------------


def _default_add_bos(model: nn.Module) -> bool:
    return "gemma" in str(getattr(getattr(model, "config", None), "model_type", ""))


# -- scoring -------------------------------------------------------------------------------------------


def _max_length(model: nn.Module) -> Optional[int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


MAX_LOGIT_POSITIONS = 32768  # x vocab x 4 bytes: 20 GB of float32 log-probs at a 151,936-token vocabulary


def _batches(order, inputs, conts, batch_size: int, windowed: bool, max_positions: int):
    """Consecutive runs of `order` (longest input first) of at most batch_size requests whose logits
    window (from the earliest continuation start to the longest input's end; the whole input when
    the model cannot keep a window) times their count stays within max_positions; a single
    request always forms a batch."""
    batch, top, lo = [], 0, None
    for i in order:
        start = len(inputs[i]) - len(conts[i]) if windowed else 0
        new_top = max(top, len(inputs[i]))
        new_lo = start if lo is None else min(lo, start)
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * (new_top - new_lo) > max_positions):
            yield batch
            batch, new_top, new_lo = [], len(inputs[i]), start
        batch.append(i)
        top, lo = new_top, new_lo
    if batch:
        yield batch


def score_requests(
    model: nn.Module,
    tokenizer,
    requests: Sequence[Request],
    omitted: Iterable[int] = (),
    batch_size: int = 32,
    device: Union[str, torch.device, None] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    add_bos: Optional[bool] = None,
    max_length: Optional[int] = None,
    max_positions: int = MAX_LOGIT_POSITIONS,
) -> List[Score]:
    """Score every request with blocks `omitted` skipped; results in request order.

    A batch holds at most `batch_size` requests and at most `max_positions` logit rows (requests x
    the positions its logits window spans): the window runs from the earliest continuation start
    of the batch to its end, so a few long contexts with one-token answers (BoolQ) would otherwise
    ask for batch x ~1000 x vocab floats (76 GiB at batch 128 with Qwen's 151,936-token vocabulary,
    seen on an H200). Batches are cut where the budget is reached; the scores do not depend on it.

    `device`: where the inputs go (default: the model's first parameter's device; the model is
    never moved). `progress(done, total)` is called after each batch. `add_bos`: encode with
    special tokens (default: True for gemma, else False). `max_length`: left-truncate inputs to
    this many tokens (default: the config's max_position_embeddings).
    """
    if batch_size < 1:
        raise PuddingError(f"batch_size must be >= 1, got {batch_size}")
    requests = list(requests)
    if not requests:
        return []
    if add_bos is None:
        add_bos = _default_add_bos(model)
    if max_length is None:
        max_length = _max_length(model)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    encoded = encode_requests(tokenizer, requests, add_bos=add_bos)
    inputs, conts = model_inputs(encoded, max_length)

    order = sorted(range(len(requests)), key=lambda i: (-len(inputs[i]), i))
    use_keep = _accepts_logits_to_keep(model)
    results: List[Optional[Score]] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with skip_blocks(model, omitted), torch.inference_mode():
            done = 0
            for batch in _batches(order, inputs, conts, batch_size, use_keep, max_positions):
                T = max(len(inputs[i]) for i in batch)
                ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), T), dtype=torch.long)
                for r, i in enumerate(batch):
                    ids[r, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
                    mask[r, : len(inputs[i])] = 1
                # logit at input position p predicts token p+1: the continuation's first token
                # is predicted at len(input) - len(cont).
                starts = [len(inputs[i]) - len(conts[i]) for i in batch]
                lo = min(starts) if use_keep else 0
                kwargs = {"logits_to_keep": torch.arange(lo, T, device=device)} if use_keep else {}
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            use_cache=False, **kwargs)
                # one gather over the whole batch and one transfer to the host, not one per row
                logprobs = torch.log_softmax(out.logits.float(), dim=-1)
                L = logprobs.shape[1]
                target = torch.zeros((len(batch), L), dtype=torch.long)
                in_cont = torch.zeros((len(batch), L), dtype=torch.bool)
                for r, i in enumerate(batch):
                    s = starts[r] - lo
                    target[r, s:s + len(conts[i])] = torch.tensor(conts[i], dtype=torch.long)
                    in_cont[r, s:s + len(conts[i])] = True
                target, in_cont = target.to(logprobs.device), in_cont.to(logprobs.device)
                tok_lp = logprobs.gather(-1, target[..., None]).squeeze(-1)
                sums = torch.where(in_cont, tok_lp, torch.zeros_like(tok_lp)).sum(-1)
                greedy = ((logprobs.argmax(-1) == target) | ~in_cont).all(-1)
                for r, (i, total, g) in enumerate(zip(batch, sums.tolist(), greedy.tolist())):
                    results[i] = Score(logprob=float(total), n_tokens=len(conts[i]), is_greedy=bool(g),
                                       n_bytes=len(requests[i][1].encode("utf-8")))
                done += len(batch)
                if progress is not None:
                    progress(done, len(order))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def evaluate(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    omitted: Iterable[int] = (),
    batch_size: int = 32,
    device: Union[str, torch.device, None] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    add_bos: Optional[bool] = None,
    max_length: Optional[int] = None,
) -> dict:
    """Score `examples` with blocks `omitted` skipped. Returns `metrics(...)`: acc, acc_norm (%),
    n, ids, gold, correct, correct_norm, logprob, mean_ll, gold_mean_ll, likelihood,
    likelihood_diff."""
    scores = score_requests(model, tokenizer, flatten(examples), omitted=omitted,
                            batch_size=batch_size, device=device, progress=progress,
                            add_bos=add_bos, max_length=max_length)
    return metrics(examples, scores)
