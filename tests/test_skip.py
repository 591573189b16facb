"""The routed runtime against stock mlx-lm, on tiny random models of every supported family.

Identities checked per architecture:
  1. omitted = {}  -> token-identical to stock mlx-lm generation on the same model, same logits;
  2. omitted = S   -> token-identical to stock mlx-lm on a copy whose blocks S were physically deleted
                      (llama, llama with sliding layers, qwen2, qwen3);
  3. omitted = S   -> equal to a from-scratch, cache-free run of the stock model whose blocks S are
                      replaced by identities (every family, gemma3_text included: a deleted copy of
                      gemma3 is not a valid reference, since stock gemma3 derives sliding vs global
                      attention from the block's position).
"""

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from pudding_mlx.errors import PuddingError
from helpers import TINY, tiny_model
from pudding_mlx.shapes import build_model
from pudding_mlx.skip import SkipView

ARCHS = TINY
DELETABLE = ["llama", "llama_sliding", "qwen2", "qwen3"]
# Sets chosen so every family loses a block of each attention type, the first block included
# (mask building reads the first kept block's cache).
OMIT = (0, 2, 5)
PROMPT = [7, 99, 3, 250, 17, 42, 8, 301, 77, 5, 66, 123]  # longer than the sliding windows
N_NEW = 12


def make(arch, quantize_bits=None):
    return tiny_model(arch, quantize_bits)


def deleted_copy(model, config, omitted, quantize_bits=None):
    """Stock mlx-lm model with blocks `omitted` physically removed (weights shared by value)."""
    n = config["num_hidden_layers"]
    kept = [i for i in range(n) if i not in omitted]
    cfg = dict(config, num_hidden_layers=len(kept))
    if "layer_types" in cfg:
        cfg["layer_types"] = [cfg["layer_types"][i] for i in kept]
    copy = build_model(cfg, mx.float32, materialise=False)
    if quantize_bits:
        nn.quantize(copy, group_size=32, bits=quantize_bits)
    weights = []
    for key, value in tree_flatten(model.parameters()):
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if m:
            if int(m[1]) in omitted:
                continue
            key = f"model.layers.{kept.index(int(m[1]))}.{m[2]}"
        weights.append((key, value))
    copy.load_weights(weights)
    return copy


class _Identity(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.use_sliding = getattr(block, "use_sliding", False)

    def __call__(self, x, mask=None, cache=None):
        return x


def greedy(model, n=N_NEW):
    """Stock mlx-lm greedy decoding with a KV cache: (tokens, logprobs per step)."""
    out = list(generate_step(mx.array(PROMPT), model, max_tokens=n))
    return [int(t) for t, _ in out], np.stack([np.array(lp) for _, lp in out])


def greedy_no_cache(model, n=N_NEW):
    seq = list(PROMPT)
    for _ in range(n):
        logits = model(mx.array(seq)[None])[0, -1]
        seq.append(int(mx.argmax(logits)))
    return seq[len(PROMPT):]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dense_view_is_stock_mlx_lm(arch):
    model = make(arch)
    tokens, logprobs = greedy(model)
    view_tokens, view_logprobs = greedy(SkipView(model, ()))
    assert view_tokens == tokens
    np.testing.assert_array_equal(view_logprobs, logprobs)
    assert len(set(tokens)) > 1, "degenerate random model: the identity would prove little"


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("arch", DELETABLE)
def test_skip_equals_deleted_copy(arch, bits):
    model = make(arch, bits)
    ref_tokens, ref_logprobs = greedy(deleted_copy(model, ARCHS[arch], OMIT, bits))
    tokens, logprobs = greedy(SkipView(model, OMIT))
    assert tokens == ref_tokens
    np.testing.assert_allclose(logprobs, ref_logprobs, atol=1e-5, rtol=0)
    dense_tokens, dense_logprobs = greedy(model)
    assert np.abs(dense_logprobs - logprobs).max() > 1e-2, "skipping changed nothing: test is blind"


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_skip_equals_identity_blocks_without_cache(arch, bits):
    model = make(arch, bits)
    tokens, _ = greedy(SkipView(model, OMIT))
    # reference: the stock model with identities in place of the omitted blocks, recomputed from
    # scratch at every step (no KV cache, full-length masks)
    layers = model.model.layers
    model.model.layers = [_Identity(b) if i in OMIT else b for i, b in enumerate(layers)]
    try:
        ref = greedy_no_cache(model)
        # logits of the whole prompt in one pass agree too
        full = model(mx.array(PROMPT)[None])
    finally:
        model.model.layers = layers
    assert tokens == ref
    np.testing.assert_allclose(np.array(SkipView(model, OMIT)(mx.array(PROMPT)[None])),
                               np.array(full), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_chunked_prefill_matches_full_pass(arch):
    # Several tokens at once on a non-empty cache (a second chat turn, chunked prefill): this is
    # where masks are built from a cache's offset and window, so a wrong first-full/first-sliding
    # block index shows up here.
    model = make(arch)
    view = SkipView(model, OMIT)
    cache = view.make_cache()
    chunks = [PROMPT[:4], PROMPT[4:10], PROMPT[10:] + [11, 12, 13, 14]]
    outs = [view(mx.array(c)[None], cache=cache) for c in chunks]
    layers = model.model.layers
    model.model.layers = [_Identity(b) if i in OMIT else b for i, b in enumerate(layers)]
    try:
        full = model(mx.array(sum(chunks, []))[None])
    finally:
        model.model.layers = layers
    np.testing.assert_allclose(np.array(mx.concatenate(outs, axis=1)), np.array(full), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cache_only_for_kept_blocks(arch):
    model = make(arch)
    full_cache = SkipView(model, ()).make_cache()
    view = SkipView(model, OMIT)
    cache = view.make_cache()
    assert len(cache) == len(full_cache) - len(OMIT)
    # each kept block gets the cache type it had in the dense model (sliding vs global)
    assert [type(c) for c in cache] == [type(full_cache[i]) for i in view.kept]
    SkipView(model, ())(mx.array(PROMPT)[None], cache=full_cache)
    view(mx.array(PROMPT)[None], cache=cache)
    # KV memory per cache type scales with the number of kept blocks of that type
    kv_bytes = lambda cs, t: sum(a.nbytes for c in cs if type(c) is t for a in c.state
                                 if isinstance(a, mx.array))
    for t in {type(c) for c in full_cache}:
        n_full = sum(type(c) is t for c in full_cache)
        n_kept = sum(type(c) is t for c in cache)
        assert kv_bytes(cache, t) > 0 or n_kept == 0
        assert kv_bytes(cache, t) * n_full == kv_bytes(full_cache, t) * n_kept
    assert all(c.offset == len(PROMPT) for c in cache)


def test_layers_restored_and_shared():
    model = make("llama")
    layers = model.model.layers
    view = SkipView(model, OMIT)
    view(mx.array(PROMPT)[None])
    assert model.model.layers is layers and model.model.fa_idx == 0
    with pytest.raises(Exception):
        view(mx.array(PROMPT)[None], cache=SkipView(model, ()).make_cache())  # wrong cache length
    assert model.model.layers is layers
    assert all(a is b for a, b in zip(view.layers, [layers[i] for i in view.kept]))


@pytest.mark.parametrize("omitted, message", [
    ((8,), "out of range"), ((-1,), "out of range"), ((3, 3), "more than once"),
    (tuple(range(8)), "omits all 8 blocks"), (("2",), "not an integer"),
])
def test_bad_omission_sets(omitted, message):
    model = make("llama")
    with pytest.raises(PuddingError, match=message):
        SkipView(model, omitted)


def test_unsupported_family():
    model = make("llama")
    model.model_type = "mamba"
    with pytest.raises(PuddingError, match="not supported"):
        SkipView(model, ())
