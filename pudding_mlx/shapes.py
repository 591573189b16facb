"""Random-weight models of known shapes: for speed measurements of models this machine cannot hold
(`pudding-mlx bench --shape`). (The tests' tiny models of every family are in tests/helpers.py.)

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
