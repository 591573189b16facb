"""Run an mlx-lm decoder with a set of transformer blocks omitted.

A skipped block is an exact identity on the residual stream, so omitting block i is the same function
as deleting it from `model.model.layers`. `SkipView` does exactly that for the duration of one call:
it points the stock model's layer list at the kept blocks, runs the stock forward, and puts the list
back. The KV cache it makes has one entry per *kept* block, so KV memory scales with L - k, and a
block that never runs is never touched, so mlx's lazy loading never reads its weights.

Most families need nothing more. Two need an adapter (see `_FAMILIES`):
  * llama precomputes `fa_idx` / `swa_idx` (first full / first sliding layer) for mask building;
    they are positions in the layer list, so they are recomputed for the kept list.
  * gemma3_text decides sliding vs global attention from the loop index (`i % pattern`); after a
    skip the index no longer says what the block is, so its forward is rebuilt from each kept
    block's own `is_sliding` flag.

The swap mutates the shared model object during a call, so calls are serialised by a lock.

A set with a healing adapter (`pudding_mlx.adapters`) runs with it active during the view's calls;
`healed=False` runs the set as it is. Dense never has an adapter.
"""

import contextlib
import threading
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache

from .adapters import adapter_for, using
from .omission import check_omitted, kept_blocks
from .errors import PuddingError

_SWAP_LOCK = threading.RLock()


def decoder(model: nn.Module) -> nn.Module:
    """The module that owns the list of transformer blocks (`.layers`)."""
    for path in (("model",), ("language_model", "model"), ("language_model",)):
        m = model
        for name in path:
            m = getattr(m, name, None)
            if m is None:
                break
        if m is not None and isinstance(getattr(m, "layers", None), list):
            return m
    raise PuddingError(
        f"model type {getattr(model, 'model_type', type(model).__name__)!r} has no list of "
        "transformer blocks at model.model.layers; this architecture is not supported"
    )


def num_blocks(model: nn.Module) -> int:
    return len(decoder(model).layers)


# -- per-family forwards ---------------------------------------------------------------------------
# Each takes (model, decoder, kept_layers, inputs, cache, **kwargs) and returns logits.


def _swap_forward(model, inner, layers, inputs, cache=None, **kwargs):
    saved = {"layers": inner.layers}
    inner.layers = layers
    # llama-style models cache positions of the first full / sliding layer: recompute for `layers`.
    if hasattr(inner, "fa_idx"):
        saved["fa_idx"], saved["swa_idx"] = inner.fa_idx, inner.swa_idx
        sliding = [getattr(l, "use_sliding", False) for l in layers]
        inner.fa_idx = sliding.index(False) if False in sliding else 0
        inner.swa_idx = sliding.index(True) if True in sliding else None
    try:
        return model(inputs, cache=cache, **kwargs)
    finally:
        for k, v in saved.items():
            setattr(inner, k, v)


def _gemma3_forward(model, inner, layers, inputs, cache=None, input_embeddings=None):
    # Mirrors mlx_lm.models.gemma3_text.Gemma3Model.__call__, with the sliding/global choice taken
    # from each block's own attention instead of its position in the loop.
    h = input_embeddings if input_embeddings is not None else inner.embed_tokens(inputs)
    h *= mx.array(inner.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    if cache is None:
        cache = [None] * len(layers)
    sliding = [l.self_attn.is_sliding for l in layers]
    global_mask = sliding_mask = None
    if False in sliding:
        global_mask = create_attention_mask(h, cache[sliding.index(False)])
    if True in sliding:
        sliding_mask = create_attention_mask(
            h, cache[sliding.index(True)], window_size=inner.window_size
        )
    for layer, c, s in zip(layers, cache, sliding):
        h = layer(h, sliding_mask if s else global_mask, c)
    out = inner.norm(h)
    if model.tie_word_embeddings:
        return inner.embed_tokens.as_linear(out)
    return model.lm_head(out)


_FAMILIES: Dict[str, Callable] = {
    "llama": _swap_forward,
    "mistral": _swap_forward,
    "qwen2": _swap_forward,
    "qwen3": _swap_forward,
    "gemma3_text": _gemma3_forward,
}


def family_forward(model: nn.Module) -> Callable:
    model_type = getattr(model, "model_type", None) or getattr(model.args, "model_type", None)
    if model_type not in _FAMILIES:
        raise PuddingError(
            f"model type {model_type!r} is not supported for block skipping; "
            f"supported: {', '.join(sorted(_FAMILIES))}"
        )
    return _FAMILIES[model_type]


class SkipView:
    """`model` with blocks `omitted` skipped; usable wherever mlx-lm expects a model.

    mlx-lm's generation only calls `model(tokens, cache=...)`, `model.layers` and
    `model.make_cache()`, so a view can be passed to `mlx_lm.stream_generate`, and as the
    `draft_model` of its speculative decoding. The view owns no weights: every view of one model
    shares them.
    """

    def __init__(self, model: nn.Module, omitted: Sequence[int] = (), healed: bool = True):
        self.model = model
        self._decoder = decoder(model)
        all_layers = self._decoder.layers
        self.n_blocks = len(all_layers)
        self.omitted = check_omitted(omitted, self.n_blocks)
        self.kept = kept_blocks(self.omitted, self.n_blocks)
        self._layers = [all_layers[i] for i in self.kept]
        self._forward = family_forward(model)
        # the healing adapter of this set, active during each call (pudding_mlx.adapters); never for dense
        self.adapter = adapter_for(model, self.omitted) if healed else None

    @property
    def layers(self) -> List[nn.Module]:
        """The kept blocks, in order (the blocks themselves, shared with the model)."""
        return self._layers

    @property
    def model_type(self):
        return self.model.model_type

    def make_cache(self, max_kv_size: Optional[int] = None) -> list:
        """A cache with one entry per kept block, each of the type the block needs."""
        full = make_prompt_cache(self.model, max_kv_size)
        return [full[i] for i in self.kept]

    def __call__(self, inputs: mx.array, cache=None, **kwargs) -> mx.array:
        if cache is not None and len(cache) != len(self.kept):
            raise ValueError(
                f"cache has {len(cache)} entries but this view runs {len(self.kept)} blocks"
            )
        with self.active():
            return self._forward(self.model, self._decoder, self._layers, inputs, cache, **kwargs)

    @contextlib.contextmanager
    def active(self):
        """This view's adapter active (and the lock held) for code that runs its blocks directly."""
        with _SWAP_LOCK, using(self.model, self.adapter):
            yield

    def __repr__(self):
        healed = f", adapter={self.adapter!r}" if self.adapter else ""
        return f"SkipView({type(self.model).__module__}, omitted={list(self.omitted)}{healed})"
