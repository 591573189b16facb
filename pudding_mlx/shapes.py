"""Random-weight models of known shapes: for speed measurements of models this machine cannot hold,
and for tests that need a real mlx-lm model object but no download.

The weights are random, so outputs are meaningless; the shapes, and so the time per token, are real.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes

SHAPES = {
    # LLaMA-3.1-8B: 32 blocks, hidden 4096, MLP 14336, 32 query / 8 KV heads, vocab 128256
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256,
                         rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=131072),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256,
                         rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
                         rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    # a small shape the CPU backend runs in seconds
    "small": dict(model_type="llama", hidden_size=512, num_hidden_layers=16, intermediate_size=1536,
                  num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=32000,
                  rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=4096),
}


# Tiny models of every family the runtime supports, for tests (vocab 512, 8 blocks). Sliding-window
# families get a window shorter than a test prompt.
_TINY_BASE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, vocab_size=512, max_position_embeddings=1024)
TINY = {
    "llama": dict(_TINY_BASE, model_type="llama", num_hidden_layers=8, tie_word_embeddings=False),
    "llama_sliding": dict(_TINY_BASE, model_type="llama", num_hidden_layers=8, sliding_window=5,
                          layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2
                          + ["sliding_attention", "full_attention"]),
    "qwen2": dict(_TINY_BASE, model_type="qwen2", num_hidden_layers=8),
    "qwen3": dict(_TINY_BASE, model_type="qwen3", num_hidden_layers=8, head_dim=16, tie_word_embeddings=True,
                  rope_theta=10000.0),
    "gemma3_text": dict(_TINY_BASE, model_type="gemma3_text", num_hidden_layers=8, head_dim=16,
                        num_key_value_heads=1, sliding_window=5, sliding_window_pattern=3,
                        query_pre_attn_scalar=16),
}


def tiny_model(arch: str, quantize_bits: Optional[int] = None, seed: int = 1, config: Optional[dict] = None) -> nn.Module:
    """A tiny float32 model of family `arch` whose greedy output depends on its context.

    mlx's default init leaves the blocks too weak against the residual stream: such a random model
    repeats one token forever. Block matrices scaled up by 4 make every step depend on the context."""
    from mlx.utils import tree_map

    model = build_model(config or TINY[arch], mx.float32, seed=seed)
    layers = model.model.parameters()["layers"]
    model.model.update({"layers": tree_map(lambda p: p * 4 if p.ndim == 2 else p, layers)})
    if quantize_bits:
        nn.quantize(model, group_size=32, bits=quantize_bits)
    mx.eval(model.parameters())
    return model


def build_model(config: dict, dtype: Optional[mx.Dtype] = None, seed: int = 0, materialise: bool = True) -> nn.Module:
    """An mlx-lm model of `config` with random weights (mlx's default initialisers)."""
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    if dtype is not None:
        model.set_dtype(dtype)
    if materialise:
        mx.eval(model.parameters())
    return model


def random_model(shape: str, dtype: Optional[mx.Dtype] = None, seed: int = 0) -> nn.Module:
    if shape not in SHAPES:
        from .errors import PuddingError

        raise PuddingError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return build_model(SHAPES[shape], dtype, seed)
