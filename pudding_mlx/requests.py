"""The framework-free half of scoring: (context, continuation) requests -> token ids, and per-choice
log-likelihoods -> lm-eval's acc / acc_norm and the PuDDing search losses.

Imports neither torch nor mlx, so the PyTorch path (`train.scoring`) and the MLX runtime
(`pudding_mlx.evaluate`) tokenize, truncate and score requests with the same code.

Tokenization (lm-eval's `HFLM._encode_pair`): trailing whitespace of the context moves to the front
of the continuation; then `whole = enc(context + continuation)`, `ctx = enc(context)`, and the
continuation tokens are `whole[len(ctx):]` -- the boundary is decided by encoding the whole string
and splitting at the context's token count, so a token that merges across the boundary counts as
continuation. The model input is `(ctx + cont)[:-1]` (left-truncated to `max_length + 1` tokens
first, `model_inputs`). An empty context is replaced by the prefix token (BOS, else EOS). `enc`
uses `add_special_tokens=add_bos`. If the split leaves no continuation token (the context
swallowed it), the last token of `whole` is scored. `tokenizer` is a Hugging Face tokenizer (it is
called on a list of strings and has `bos_token_id` / `eos_token_id`).

Per request (`Score`): summed log-prob of the continuation tokens, their count, whether greedy
decoding would produce them (`is_greedy`), and the UTF-8 byte length of the continuation string.
Per example (`metrics`): ell-bar = sum / n_tokens, the mean log-likelihood per token (the PuDDing
score); acc = argmax of the sums is gold; acc_norm = argmax of sum / len(norm_text) is gold, where
norm_text is lm-eval's doc_to_choice string (character length, no delimiter). Search losses over a
set of examples (`losses`): `likelihood` = -sum_x ell-bar(gold), `likelihood_diff`
= -sum_x sum_{k != gold} (ell-bar(gold) - ell-bar(k)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pudding_mlx.errors import PuddingError

from .tasks import Example, Request

# -- tokenization --------------------------------------------------------------------------------------


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


def model_inputs(encoded: Sequence[Tuple[List[int], List[int]]], max_length: Optional[int] = None
                 ) -> Tuple[List[List[int]], List[List[int]]]:
    """(model inputs, continuation tokens) per encoded request: the input is `(ctx + cont)[:-1]`,
    left-truncated to `max_length + 1` tokens of `ctx + cont` first (None: no limit). The logit at
    input position p predicts token p + 1, so the continuation is predicted at positions
    `len(input) - len(cont)` .. `len(input) - 1`."""
    inputs, conts = [], []
    for ctx, cont in encoded:
        full = list(ctx) + list(cont)
        if max_length is not None and len(full) > max_length + 1:
            if len(cont) > max_length:
                raise PuddingError(f"a continuation of {len(cont)} tokens exceeds max_length "
                                   f"{max_length}")
            full = full[-(max_length + 1):]
        inputs.append(full[:-1])
        conts.append(list(cont))
    return inputs, conts


# -- per-request scores ----------------------------------------------------------------------------------


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
