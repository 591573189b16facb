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
