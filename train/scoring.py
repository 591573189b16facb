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

Tokenization (lm-eval's `HFLM._encode_pair`): trailing whitespace of the context moves to the front
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
and turned into float32 log-probs. bf16 on GPU, float32 on CPU (`default_dtype`, `load_model`).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from pudding_mlx.errors import PuddingError

from .tasks import Example, Request

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


def load_model(name_or_path: str, device: Union[str, torch.device, None] = None,
               dtype: Optional[torch.dtype] = None, **kwargs):
    """An AutoModelForCausalLM in eval mode on `device` (default: cuda if available, else cpu),
    in `dtype` (default: `default_dtype(device)`)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype or default_dtype(device), **kwargs)
    return model.to(device).eval()


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


def check_omitted(omitted: Iterable[int], n_blocks: int) -> Tuple[int, ...]:
    """Validate 0-based block indices; return them sorted."""
    omitted = list(omitted)
    for i in omitted:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise PuddingError(f"omission set: block index {i!r} is not an integer")
        if not 0 <= i < n_blocks:
            raise PuddingError(f"omission set: block index {i} is out of range; the model has "
                               f"blocks 0..{n_blocks - 1}")
    omitted = [int(i) for i in omitted]
    if len(set(omitted)) != len(omitted):
        raise PuddingError(f"omission set: repeated block indices in {sorted(omitted)}")
    if len(omitted) >= n_blocks:
        raise PuddingError(f"omission set: omits all {n_blocks} blocks; at least one must run")
    return tuple(sorted(omitted))


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
        kept = [i for i in range(n) if i not in set(omitted)]
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


def _prefix_token(tokenizer) -> int:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise PuddingError("the tokenizer has neither a BOS nor an EOS token for an empty context")
    return int(tid)


def _split_space(context: str, continuation: str) -> Tuple[str, str]:
    n = len(context) - len(context.rstrip())
    if n > 0:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_requests(tokenizer, requests: Sequence[Request], add_bos: bool = False
                    ) -> List[Tuple[List[int], List[int]]]:
    """(context tokens, continuation tokens) per request, as lm-eval splits them (module doc).
    Each distinct context is encoded once."""
    pairs = []
    for r in requests:
        ctx, cont = r[0], r[1]
        if not isinstance(ctx, str) or not isinstance(cont, str) or not cont:
            raise PuddingError(f"bad request {r!r}: context and continuation must be strings, "
                               "and the continuation non-empty")
        pairs.append(_split_space(ctx, cont))

    def enc(texts: List[str]) -> List[List[int]]:
        if not texts:
            return []
        return [list(x) for x in tokenizer(texts, add_special_tokens=add_bos)["input_ids"]]

    uniq = list(dict.fromkeys(c for c, _ in pairs if c))
    ctx_ids = dict(zip(uniq, enc(uniq)))
    nonempty = [i for i, (c, _) in enumerate(pairs) if c]
    wholes = dict(zip(nonempty, enc([pairs[i][0] + pairs[i][1] for i in nonempty])))
    empty = [i for i, (c, _) in enumerate(pairs) if not c]
    conts_alone = dict(zip(empty, enc([pairs[i][1] for i in empty])))

    out = []
    for i, (c, cont) in enumerate(pairs):
        if not c:
            if not conts_alone[i]:
                raise PuddingError(f"continuation {cont!r} encodes to no tokens")
            out.append(([_prefix_token(tokenizer)], conts_alone[i]))
            continue
        whole, ctx = wholes[i], ctx_ids[c]
        cont_ids = whole[len(ctx):]
        if not cont_ids:  # the context's tokens swallowed the continuation: score whole's last
            ctx, cont_ids = whole[:-1], whole[-1:]
        if not cont_ids:
            raise PuddingError(f"continuation {cont!r} encodes to no tokens")
        out.append((ctx, cont_ids))
    return out


# -- scoring -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(continuation token | everything before it)
    n_tokens: int  # continuation tokens scored
    is_greedy: bool  # every continuation token is the argmax of its distribution
    n_bytes: int  # UTF-8 bytes of the continuation string (with its leading space)

    @property
    def mean_logprob(self) -> float:
        """ell-bar: mean log-likelihood per continuation token (the PuDDing score)."""
        return self.logprob / self.n_tokens


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
) -> List[Score]:
    """Score every request with blocks `omitted` skipped; results in request order.

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
    inputs, conts = [], []
    for ctx, cont in encoded:
        full = ctx + cont
        if max_length is not None and len(full) > max_length + 1:
            if len(cont) > max_length:
                raise PuddingError(f"a continuation of {len(cont)} tokens exceeds max_length "
                                   f"{max_length}")
            full = full[-(max_length + 1):]
        inputs.append(full[:-1])
        conts.append(cont)

    order = sorted(range(len(requests)), key=lambda i: (-len(inputs[i]), i))
    use_keep = _accepts_logits_to_keep(model)
    results: List[Optional[Score]] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with skip_blocks(model, omitted), torch.inference_mode():
            for b0 in range(0, len(order), batch_size):
                batch = order[b0:b0 + batch_size]
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
                if progress is not None:
                    progress(min(b0 + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


# -- metrics -------------------------------------------------------------------------------------------


def losses(mean_ll: Sequence[Sequence[float]], gold: Sequence[int]) -> Dict[str, float]:
    """The search losses over examples, from per-choice ell-bar and gold indices:
    likelihood = -sum ell-bar(gold); likelihood_diff = -sum sum_{k!=gold} (ell-bar(gold)-ell-bar(k))."""
    lik = diff = 0.0
    for m, g in zip(mean_ll, gold):
        m = np.asarray(m, dtype=np.float64)
        lik -= m[g]
        diff -= float(np.sum(m[g] - np.delete(m, g)))
    return {"likelihood": float(lik), "likelihood_diff": float(diff)}


def metrics(examples: Sequence[Example], scores: Sequence[Score]) -> dict:
    """acc / acc_norm (in %) and per-example arrays from the flat scores of `examples`' requests
    (in order, as `flatten(examples)` lays them out)."""
    n_req = sum(e.n_choices for e in examples)
    if len(scores) != n_req:
        raise PuddingError(f"{len(scores)} scores for {n_req} requests")
    logprob, mean_ll, correct, correct_norm, gold = [], [], [], [], []
    k = 0
    for e in examples:
        sc = scores[k:k + e.n_choices]
        k += e.n_choices
        lls = np.array([s.logprob for s in sc], dtype=np.float64)
        lens = np.array([float(len(t)) for t in e.norm_texts])
        logprob.append(lls)
        mean_ll.append(np.array([s.mean_logprob for s in sc], dtype=np.float64))
        correct.append(int(np.argmax(lls)) == e.gold)
        correct_norm.append(int(np.argmax(lls / lens)) == e.gold)
        gold.append(e.gold)
    n = len(examples)
    out = {
        "acc": 100.0 * float(np.mean(correct)) if n else float("nan"),
        "acc_norm": 100.0 * float(np.mean(correct_norm)) if n else float("nan"),
        "n": n,
        "ids": [e.id for e in examples],
        "gold": np.array(gold, dtype=np.int64),
        "correct": np.array(correct, dtype=bool),
        "correct_norm": np.array(correct_norm, dtype=bool),
        "logprob": logprob,  # per example: summed log-prob per choice
        "mean_ll": mean_ll,  # per example: ell-bar per choice
        "gold_mean_ll": np.array([m[g] for m, g in zip(mean_ll, gold)], dtype=np.float64),
    }
    out.update(losses(mean_ll, gold))
    return out


def flatten(examples: Sequence[Example]) -> List[Request]:
    return [r for e in examples for r in e.requests]


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
