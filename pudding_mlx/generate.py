"""Generation with an omission set: mlx-lm's own `stream_generate`, run on a `SkipView`.

Nothing here re-implements decoding: sampling, prefill chunking, the detokenizer and the stop rule
are mlx-lm's. With no blocks omitted the output is token-identical to `mlx_lm.generate` (tested).
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.generate import wired_limit
from mlx_lm.sample_utils import make_sampler

from . import DRAFT_TOKENS
from .errors import PuddingError
from .skip import SkipView


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    omitted: List[int]
    prompt_tokens: int
    prefill_tps: float
    decode_tps: float
    generation_tokens: int
    peak_memory_gb: float
    finish_reason: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k != "extra"}
        out.update(self.extra)
        return out


@contextmanager
def no_length_warning():
    """Encode without transformers' "sequence length is longer than the specified maximum" warning:
    the context is checked here, and an over-long prompt refused in one line, which the warning
    would only precede."""
    from transformers import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def prompt_tokens(tokenizer, prompt: str, chat_template: bool = True, system: Optional[str] = None) -> List[int]:
    """Token ids for `prompt`, through the tokenizer's chat template when it has one. A prompt of no
    tokens (an empty text without the template) is refused: there is nothing to continue."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        with no_length_warning():
            ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    else:
        with no_length_warning():
            ids = list(tokenizer.encode(prompt))
    if not ids:
        raise PuddingError("the prompt is empty (it encodes to no tokens); give some text with --prompt")
    return ids


def context_length(model) -> Optional[int]:
    return getattr(model.args, "max_position_embeddings", None)


def stream_generate(
    model,
    tokenizer,
    prompt: Sequence[int],
    omitted: Sequence[int] = (),
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    prompt_cache=None,
    lossless: bool = False,
    draft_tokens: int = DRAFT_TOKENS,
) -> Iterator:
    """Yield mlx-lm `GenerationResponse`s for `prompt` (token ids) with blocks `omitted` skipped.

    lossless: the pruned view only drafts `draft_tokens` tokens at a time and the dense model
    verifies them (mlx-lm's speculative decoding, with the view as its draft model: both share
    every weight; each keeps its own cache). Output is the dense model's: greedy, token-identical to
    dense decoding in float32; in bf16/fp16 a multi-token verify forward rounds differently from
    one-token decoding, so near-ties can differ; `from_draft` on each
    response says which tokens the draft got right."""
    view = SkipView(model, omitted)
    limit = context_length(model)
    if limit and len(prompt) >= limit:
        raise PuddingError(
            f"the prompt has {len(prompt)} tokens but the model's context is {limit}; shorten it"
        )
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p)
    with wired_limit(model):
        if lossless and view.omitted:  # with nothing omitted there is nothing to draft with
            yield from mlx_stream_generate(
                SkipView(model, ()), tokenizer, mx.array(prompt), max_tokens=max_tokens, sampler=sampler,
                draft_model=view, num_draft_tokens=draft_tokens, prompt_cache=prompt_cache,
            )
            return
        yield from mlx_stream_generate(
            view, tokenizer, mx.array(prompt), max_tokens=max_tokens, sampler=sampler,
            prompt_cache=prompt_cache,
        )


def generate(model, tokenizer, prompt: Sequence[int], omitted: Sequence[int] = (), **kwargs) -> GenerationResult:
    """Run `stream_generate` to the end and collect text, ids and speed."""
    text, ids, last, drafted = "", [], None, 0
    for response in stream_generate(model, tokenizer, prompt, omitted, **kwargs):
        text += response.text
        ids.append(int(response.token))
        drafted += bool(response.from_draft)
        last = response
    if last is None:
        raise PuddingError("generation produced no tokens (is --max-tokens positive?)")
    return GenerationResult(
        text=text,
        token_ids=ids,
        omitted=sorted(int(i) for i in omitted),
        prompt_tokens=last.prompt_tokens,
        prefill_tps=last.prompt_tps,
        decode_tps=last.generation_tps,
        generation_tokens=last.generation_tokens,
        peak_memory_gb=last.peak_memory,
        finish_reason=last.finish_reason,
        extra={"lossless": True, "draft_tokens": kwargs.get("draft_tokens", DRAFT_TOKENS),
               "accepted_from_draft": drafted / len(ids)} if kwargs.get("lossless") else {},
    )
