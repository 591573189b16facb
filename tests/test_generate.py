"""End to end on a real mlx-lm model directory (tiny random llama + SmolLM2's real tokenizer):
pudding-mlx generation against stock mlx-lm, the CLI's --json contract, and running without torch."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm import stream_generate as mlx_lm_stream_generate

from pudding_mlx.generate import generate, prompt_tokens
from pudding_mlx.load import load
from pudding_mlx.skip import SkipView

PROMPT = "Which gas do plants take in from the air to make food?"


def test_dense_generation_is_token_identical_to_mlx_lm(tiny_llm_dir):
    loaded = load(str(tiny_llm_dir))
    ids = prompt_tokens(loaded.tokenizer, PROMPT)
    ours = generate(loaded.model, loaded.tokenizer, ids, (), max_tokens=24)
    model, tokenizer = mlx_lm_load(str(tiny_llm_dir))
    stock = list(mlx_lm_stream_generate(model, tokenizer, mx.array(ids), max_tokens=24))
    assert ours.token_ids == [int(r.token) for r in stock]
    assert ours.text == "".join(r.text for r in stock)
    assert len(set(ours.token_ids)) > 3
    assert ours.prompt_tokens == len(ids) and ours.prefill_tps > 0 and ours.decode_tps > 0


def test_routed_generation_runs_the_view(tiny_llm_dir):
    loaded = load(str(tiny_llm_dir))
    ids = prompt_tokens(loaded.tokenizer, PROMPT)
    result = generate(loaded.model, loaded.tokenizer, ids, (1, 3), max_tokens=12)
    stock = list(mlx_lm_stream_generate(SkipView(loaded.model, (1, 3)), loaded.tokenizer,
                                        mx.array(ids), max_tokens=12))
    dense = generate(loaded.model, loaded.tokenizer, ids, (), max_tokens=12)
    assert result.token_ids == [int(r.token) for r in stock]
    assert result.token_ids != dense.token_ids
    assert result.omitted == [1, 3]


def run_cli(*args, block_torch=False, env=None):
    code = "import sys\n"
    if block_torch:  # importing torch now fails, and transformers sees it as absent
        code += "sys.modules['torch'] = None\n"
    code += "from pudding_mlx.app.cli import main\nsys.argv = ['pudding-mlx'] + sys.argv[1:]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


def test_cli_generate_json_without_torch(tiny_llm_dir):
    done = run_cli("generate", str(tiny_llm_dir), "--prompt", PROMPT, "--omit", "1,3",
                   "--max-tokens", "8", "--json", block_torch=True)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    for key in ("text", "token_ids", "omitted", "prompt_tokens", "prefill_tps", "decode_tps"):
        assert key in payload
    assert payload["omitted"] == [1, 3] and payload["routing"] == "omit"
    loaded = load(str(tiny_llm_dir))
    ids = prompt_tokens(loaded.tokenizer, PROMPT)
    assert payload["prompt_tokens"] == len(ids)
    assert payload["token_ids"] == generate(loaded.model, loaded.tokenizer, ids, (1, 3), max_tokens=8).token_ids


def test_cli_streams_text_and_footer(tiny_llm_dir):
    done = run_cli("generate", str(tiny_llm_dir), "-p", PROMPT, "--dense", "-m", "6")
    assert done.returncode == 0, done.stderr
    assert "Prompt:" in done.stderr and "Generation: 6 tokens" in done.stderr
    assert "omitted []" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--omit", "1,x"], "comma-separated"),
    (["--omit", "99"], "out of range"),
    (["--omit", "0,1,2,3,4,5"], "omits all 6 blocks"),
    (["--dense", "--omit", "2"], "contradict"),
])
def test_cli_bad_options_one_line(tiny_llm_dir, args, message):
    done = run_cli("generate", str(tiny_llm_dir), "-p", "hi", *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_generate_lossless(tiny_llm_dir):
    """`generate --lossless` on the command line: the pruned set (--omit) only drafts and the dense
    model verifies, so the tokens are dense's (float32: identical), not the pruned set's; --json
    says how many came from the draft, the streamed form prints them."""
    loaded = load(str(tiny_llm_dir))
    ids = prompt_tokens(loaded.tokenizer, PROMPT)
    dense = generate(loaded.model, loaded.tokenizer, ids, (), max_tokens=12)
    assert generate(loaded.model, loaded.tokenizer, ids, (1, 3), max_tokens=12).token_ids != dense.token_ids
    done = run_cli("generate", str(tiny_llm_dir), "-p", PROMPT, "--omit", "1,3", "--lossless", "--draft-tokens", "3",
                   "-m", "12", "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["token_ids"] == dense.token_ids and payload["omitted"] == [1, 3]
    assert payload["lossless"] is True and payload["draft_tokens"] == 3 and 0 < payload["accepted_from_draft"] <= 1
    streamed = run_cli("generate", str(tiny_llm_dir), "-p", PROMPT, "--omit", "1,3", "--lossless", "-m", "12")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.rstrip("\n") == dense.text
    assert "tokens accepted from the pruned draft" in streamed.stderr


def test_cpu_default_casts_floats_to_float32(tiny_llm_dir, tmp_path, monkeypatch):
    """On the CPU backend `load` casts floating weights to float32 unless --dtype says otherwise
    (bf16/fp16 matmuls are very slow there): a float16 model runs in float32; a 4-bit model keeps
    its packed weights and gets float32 scales; on Metal/CUDA the stored dtype is kept."""
    import contextlib
    import io

    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.convert import convert as mlx_lm_convert

    import pudding_mlx.load as loader

    def dtypes(loaded):
        return {str(v.dtype) for _, v in tree_flatten(loaded.model.parameters())}

    with contextlib.redirect_stdout(io.StringIO()):
        mlx_lm_convert(str(tiny_llm_dir), mlx_path=str(tmp_path / "f16"), dtype="float16")
        mlx_lm_convert(str(tiny_llm_dir), mlx_path=str(tmp_path / "q4"), quantize=True, q_bits=4, dtype="float16")
    assert loader.backend() == "cpu"
    assert dtypes(load(str(tmp_path / "f16"))) == {"mlx.core.float32"}
    assert dtypes(load(str(tmp_path / "f16"), dtype="float16")) == {"mlx.core.float16"}
    q4 = load(str(tmp_path / "q4"))
    q = q4.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and q.weight.dtype == mx.uint32 and q.scales.dtype == mx.float32
    assert dtypes(q4) == {"mlx.core.float32", "mlx.core.uint32"}
    ids = prompt_tokens(q4.tokenizer, PROMPT)
    assert len(generate(q4.model, q4.tokenizer, ids, (1, 3), max_tokens=4).token_ids) == 4
    monkeypatch.setattr(loader, "backend", lambda: "metal")
    assert dtypes(load(str(tmp_path / "f16"))) == {"mlx.core.float16"}
