"""Zero-shot accuracy on the MLX runtime, with blocks skipped: the MLX twin of `train.scoring`.

Same templates (`pudding_mlx.tasks`), same tokenization, truncation and metrics (`pudding_mlx.requests`, shared
code, torch-free and mlx-free), so an accuracy measured here is the one the training side measures
on the same weights. Only the forward pass differs: an mlx-lm model run through
`pudding_mlx.skip.SkipView(model, omitted)`, without a KV cache, one forward per batch.

Batching: requests are sorted by input length (longest first) and padded on the RIGHT with no
attention mask. The attention is causal, so a real position only attends to positions at or before
it, and those are all real tokens: right padding never changes a real position's logits (tested:
batched == unbatched). The padded positions' logits are garbage and are never read. A batch holds at
most `batch_size` requests and `batch_tokens` padded tokens. By the same causality, requests whose input
is a prefix of another request's input with the same context (BoolQ's " no" / " yes", MMLU's
letters: identical inputs) read their logits from that one forward (`_carriers`).

Scores: only the continuation positions get logits: for llama / mistral / qwen2 / qwen3 the view
runs the decoder without its LM head (`_Headless`), and the head is applied to the gathered
continuation positions (the head is a large share of a small model's compute, and a batch's full
logits are tokens x vocab floats); other families gather from the stock forward's full logits.
Then log-softmax in float32 on those rows only; the token log-probs are summed per request (`pudding_mlx.requests.Score`). Per example,
acc / acc_norm are `pudding_mlx.requests.metrics` (lm-eval's definitions; acc_norm divides by the character
length of `Example.norm_texts`).

Modes (`evaluate`): a fixed omission set (dense is the empty one), or routed: per example, the
bundle's router picks a candidate from `example.router_text`; examples are grouped by candidate and
each group is scored with that candidate's set.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .errors import PuddingError
from .skip import SkipView
from .requests import Score, encode_requests, metrics, model_inputs
from .tasks import Example, Request, eval_metric, is_user_file

Progress = Callable[[int], None]  # called with the number of requests just scored

# mlx-lm model classes whose forward is exactly `head(self.model(inputs, cache, input_embeddings))`,
# the head being `model.embed_tokens.as_linear` when `args.tie_word_embeddings`, else `lm_head`
# (checked in mlx-lm 0.32; mistral loads as llama). For these the head runs on the continuation
# positions only; other families (gemma3_text) compute the full logits and select from them.
_HEAD_SPLIT = frozenset({"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3"})


class _Headless:
    """`model` without its LM head, for `SkipView`: the same decoder object (weights shared), and a
    call that returns the final (normed) hidden states instead of logits."""

    def __init__(self, model):
        self.model = model.model
        self.args = model.args
        self.model_type = getattr(model, "model_type", None) or model.args.model_type

    def __call__(self, inputs, cache=None, input_embeddings=None):
        return self.model(inputs, cache, input_embeddings)


class _Scorer:
    """Logits of a model with blocks `omitted` skipped, at chosen positions only."""

    def __init__(self, model, omitted):
        self.model = model
        if type(model).__module__ in _HEAD_SPLIT and hasattr(model, "args"):
            self.view, self.split = SkipView(_Headless(model), omitted), True
        else:
            self.view, self.split = SkipView(model, omitted), False

    def logits_at(self, ids: mx.array, rows: mx.array, cols: mx.array) -> mx.array:
        """[N, vocab] logits at (rows[n], cols[n]) of the batch `ids` [B, T]."""
        out = self.view(ids)
        if not self.split:
            return out[rows, cols]
        h = out[rows, cols]  # [N, hidden]
        if self.model.args.tie_word_embeddings:
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)


def hf_tokenizer(tokenizer):
    """The Hugging Face tokenizer inside an mlx-lm TokenizerWrapper (or the tokenizer itself)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def model_type(model) -> str:
    args = getattr(model, "args", None)
    return str(getattr(model, "model_type", None) or getattr(args, "model_type", "") or "")


def default_add_bos(model) -> bool:
    """lm-eval's rule, as `train.scoring`: encode with special tokens only for gemma models."""
    return "gemma" in model_type(model)


def max_length(model) -> Optional[int]:
    """The config's max_position_embeddings (inputs are left-truncated to it), or None."""
    v = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    return v if isinstance(v, int) and v > 0 else None


def _batches(order: Sequence[int], lengths: Sequence[int], batch_size: int, batch_tokens: int
             ) -> List[List[int]]:
    """Consecutive slices of `order` (longest first) of at most `batch_size` requests and at most
    `batch_tokens` padded tokens (a single longer request still gets a batch of its own)."""
    out: List[List[int]] = []
    cur: List[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # `order` is longest first
        if cur and (len(cur) >= batch_size or width * (len(cur) + 1) > batch_tokens):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _carriers(encoded, inputs) -> List[int]:
    """For each request, the request whose forward pass it reads its logits from: itself, or a
    request with the same context whose input starts with its input (BoolQ's " no" / " yes" and
    MMLU's letters have identical inputs; a choice can be a prefix of another). With causal
    attention the logits at a prefix's positions are the same in the longer sequence."""
    carrier = list(range(len(inputs)))
    by_ctx: Dict[tuple, List[int]] = {}
    for i, (ctx, _) in enumerate(encoded):
        by_ctx.setdefault(tuple(ctx), []).append(i)
    for members in by_ctx.values():
        kept: List[int] = []
        for i in sorted(members, key=lambda i: (-len(inputs[i]), i)):
            n = len(inputs[i])
            j = next((j for j in kept if inputs[j][:n] == inputs[i]), None)
            if j is None:
                kept.append(i)
            else:
                carrier[i] = j
    return carrier


def score_requests(
    model,
    tokenizer,
    requests: Sequence[Request],
    omitted: Iterable[int] = (),
    batch_size: int = 16,
    batch_tokens: int = 2048,
    progress: Optional[Progress] = None,
    add_bos: Optional[bool] = None,
    max_len: Optional[int] = None,
) -> List[Score]:
    """Score every (context, continuation) request with blocks `omitted` skipped; request order.

    `model`: an mlx-lm model (not a view); `tokenizer`: its TokenizerWrapper or the Hugging Face
    tokenizer. `add_bos`: default True for gemma, else False. `max_len`: left-truncate inputs to
    this many tokens (default: the config's max_position_embeddings). `progress(n)` is called
    after each batch with the number of requests it held.
    """
    if batch_size < 1:
        raise PuddingError(f"batch size must be >= 1, got {batch_size}")
    requests = list(requests)
    if not requests:
        return []
    scorer = _Scorer(model, omitted)
    if add_bos is None:
        add_bos = default_add_bos(model)
    if max_len is None:
        max_len = max_length(model)
    tok = hf_tokenizer(tokenizer)
    pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0

    encoded = encode_requests(tok, requests, add_bos=add_bos)
    inputs, conts = model_inputs(encoded, max_len)
    lengths = [len(x) for x in inputs]
    carrier = _carriers(encoded, inputs)
    riders: Dict[int, List[int]] = {}
    for i, c in enumerate(carrier):
        riders.setdefault(c, []).append(i)
    order = sorted(riders, key=lambda i: (-lengths[i], i))
    results: List[Optional[Score]] = [None] * len(requests)
    for batch in _batches(order, lengths, batch_size, batch_tokens):
        T = lengths[batch[0]]  # longest first
        ids = np.full((len(batch), T), pad_id, dtype=np.int32)
        rows, cols, targets, owner = [], [], [], []
        for r, c in enumerate(batch):
            ids[r, : lengths[c]] = inputs[c]
            for i in riders[c]:  # c itself and the requests whose input is a prefix of c's
                # the logit at input position p predicts token p + 1
                start = lengths[i] - len(conts[i])
                rows += [r] * len(conts[i])
                cols += range(start, lengths[i])
                targets += conts[i]
                owner += [i] * len(conts[i])
        # Right padding, no mask: causal attention keeps every real position blind to the pads
        # after it (module doc), so the real positions' logits equal an unpadded run's.
        sel = scorer.logits_at(mx.array(ids), mx.array(rows), mx.array(cols)).astype(mx.float32)
        tgt = mx.array(targets, dtype=mx.int32)
        tok_lp = mx.take_along_axis(sel, tgt[:, None], axis=-1)[:, 0] - mx.logsumexp(sel, axis=-1)
        greedy = mx.argmax(sel, axis=-1) == tgt
        mx.eval(tok_lp, greedy)
        tok_lp, greedy = np.array(tok_lp, dtype=np.float64), np.array(greedy)
        owner = np.array(owner)
        n_done = 0
        for c in batch:
            for i in riders[c]:
                m = owner == i
                results[i] = Score(logprob=float(tok_lp[m].sum()), n_tokens=len(conts[i]),
                                   is_greedy=bool(greedy[m].all()),
                                   n_bytes=len(requests[i][1].encode("utf-8")))
                n_done += 1
        if progress is not None:
            progress(n_done)
    return results  # type: ignore[return-value]


def _summary(task: str, m: dict) -> dict:
    out = {"acc": m["acc"], "acc_norm": m["acc_norm"], "n": m["n"]}
    if not is_user_file(task):
        out["metric"] = eval_metric(task)  # the task's standard metric
    return out


def evaluate(
    loaded,
    examples: Dict[str, List[Example]],
    omitted: Optional[Sequence[int]] = None,
    batch_size: int = 16,
    batch_tokens: int = 2048,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> dict:
    """Accuracy per task of `examples` ({task: examples}) on `loaded` (a `pudding_mlx.load.Loaded`).

    `omitted` given (`()` is dense): every example runs with that set; the result has "omitted".
    `omitted` None: routed by `loaded.router` (which must exist); the result has "routing":
    {"candidates": [omitted per candidate], "usage": [examples per candidate], "router_ms_mean"},
    and each task its own "usage". `progress(phase, done, total)`: phase is "route" or "score",
    counted in examples and requests.
    """
    tasks = list(examples)
    kw = dict(batch_size=batch_size, batch_tokens=batch_tokens)
    if omitted is not None:
        sets = {tuple(sorted(omitted)): [(t, j) for t in tasks for j in range(len(examples[t]))]}
        choice = None
    else:
        if loaded.router is None:
            raise PuddingError(f"{loaded.path}: this model has no router; use --dense or --omit")
        from .routing import candidate_sets

        cands = candidate_sets(loaded)  # the loss predictor's sets under --max-loss
        all_ex = [(t, j) for t in tasks for j in range(len(examples[t]))]
        choice, ms = {}, []
        for n, (t, j) in enumerate(all_ex, 1):
            index, _, t_ms = loaded.router.best(examples[t][j].router_text)
            choice[(t, j)] = index
            ms.append(t_ms)
            if progress is not None:
                progress("route", n, len(all_ex))
        sets = {}
        for m in sorted(set(choice.values())):
            sets.setdefault(cands[m], []).extend(k for k in all_ex if choice[k] == m)

    total = sum(examples[t][j].n_choices for members in sets.values() for t, j in members)
    done = 0
    per_example: Dict[tuple, List[Score]] = {}
    for s, members in sets.items():
        reqs = [r for t, j in members for r in examples[t][j].requests]

        def tick(n):
            nonlocal done
            done += n
            if progress is not None:
                progress("score", done, total)

        scores = score_requests(loaded.model, loaded.tokenizer, reqs, s, progress=tick, **kw)
        k = 0
        for t, j in members:
            n = examples[t][j].n_choices
            per_example[(t, j)] = scores[k:k + n]
            k += n

    result: dict = {"tasks": {}}
    for t in tasks:
        scores = [s for j in range(len(examples[t])) for s in per_example[(t, j)]]
        result["tasks"][t] = _summary(t, metrics(examples[t], scores))
        if choice is not None:
            usage = [0] * len(cands)
            for j in range(len(examples[t])):
                usage[choice[(t, j)]] += 1
            result["tasks"][t]["usage"] = usage
    if choice is None:
        result["omitted"] = sorted(omitted)
    else:
        usage = [0] * len(cands)
        for m in choice.values():
            usage[m] += 1
        result["routing"] = {"candidates": [list(c) for c in cands], "usage": usage,
                             "router_ms_mean": float(np.mean(ms)) if ms else None}
    return result
