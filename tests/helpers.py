"""Test-only helpers (not shipped in the package): tiny models of every family the runtime supports,
a PyTorch causal LM for parity tests, and the MLX evaluation of one list of examples."""

import os
import subprocess
import sys
from typing import Iterable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from pudding_mlx.evaluate import score_requests
from pudding_mlx.requests import flatten, metrics
from pudding_mlx.shapes import build_model
from pudding_mlx.tasks import Example


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


def evaluate_examples(model, tokenizer, examples: Sequence[Example], omitted: Iterable[int] = (),
                      **kwargs) -> dict:
    """`pudding_mlx.requests.metrics` of `examples` scored with blocks `omitted` skipped (the MLX
    `train.scoring.evaluate`)."""
    return metrics(examples, score_requests(model, tokenizer, flatten(examples), omitted, **kwargs))


def load_model(name_or_path: str, device=None, dtype=None, **kwargs):
    """An AutoModelForCausalLM in eval mode on `device` (default: cuda if available, else cpu),
    in `dtype` (default: `default_dtype(device)`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pudding_mlx.train.scoring import default_dtype

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype or default_dtype(device), **kwargs)
    return model.to(device).eval()


# `pudding-mlx ARGS` as a user runs it, in a fresh process (one-line errors and exit statuses included)
CLI = [sys.executable, "-c", "import sys\nfrom pudding_mlx.app.cli import main\n"
       "sys.argv = ['pudding-mlx'] + sys.argv[1:]\nmain()\n"]


def run_cli(*args, env: Optional[dict] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `pudding-mlx ARGS` (env: variables added to this process's environment)."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def assert_one_line(done, *needles):
    """A CLI run that failed as bad input should: exit 2, one line on stderr, no traceback, naming `needles`."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr
