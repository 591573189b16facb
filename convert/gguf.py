"""GGUF specifics for the LLM converter: read a llama.cpp GGUF file into mlx-lm weight names and an mlx-lm config.

What maps and what does not:

* Q4_0, Q4_1 and Q8_0 blocks (32 weights, one float16 scale, Q4_1 also a float16 minimum) are exactly MLX's
  affine quantization with group size 32: w = scale * q + bias, with
      Q4_0: q = nibble,      scale = d, bias = -8 d
      Q4_1: q = nibble,      scale = d, bias = m
      Q8_0: q = int8 + 128,  scale = d, bias = -128 d
  All three biases are exact in float16 (a product by a power of two), so the repacking loses nothing; these
  tensors can stay quantized (`weight` uint32 / `scales` / `biases`, bits 4 or 8, group size 32).
* Q4_K super-blocks (256 weights: float16 d and dmin, eight 6-bit scales sc_j and mins m_j, 4-bit codes) are
  eight groups of 32 with w = (d sc_j) q - (dmin m_j) (ggml's dequantize_row_q4_K), so MLX affine 4-bit, group
  size 32, with scale = d sc_j and bias = -dmin m_j. The codes are kept exactly. Those products need up to
  17 significant bits: in float32 they are exact (float32 is what ggml computes them in), so a float32
  conversion loses nothing; stored in float16 (the default) or bfloat16 they are rounded once, to the nearest,
  relative error at most 2^-11 (float16; 2^-8 for bfloat16) per scale and bias (measured on
  Qwen2.5-Coder-1.5B Q4_K_M: see README). Each weight is then off by at most 15 |d(scale)| + |d(bias)|.
* Every other GGML type (Q5_K, Q6_K, Q5_0, BF16, ...) is dequantized with the `gguf` package's reference
  dequantizers (the same code transformers uses) and comes out as float.

Why the `gguf` package and not `mx.load` for the tensors: `mx.load` (MLX 0.32) reads GGUF lazily and maps
Q4_0/Q4_1/Q8_0 the same way, but it refuses whole files that hold Q5_0, Q5_1, Q5_K or Q3_K tensors
("gguf_tensor_to_f16 failed"), it converts BF16 to float16 (range loss), and its Q4_K decoding disagrees with
llama.cpp's reference (measured on synthetic blocks: max error 8.2 on values up to 9). The repacking here is
checked bit for bit against `mx.load`'s own triplets in tests/test_convert_llm.py.

llama.cpp's llama converter permutes the rows of the Q and K projections (HF's half-split rotary layout ->
interleaved pairs, per head); `unpermute_rows` undoes it (its qwen2 and gemma3 converters keep HF's order). The
permutation is over output rows, so it is applied alike to a float weight, to the packed uint32 rows of a
quantized weight and to their scales and biases rows.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from pudding_mlx.errors import PuddingError, first_line

GROUP_SIZE = 32  # the block size of Q4_0 / Q4_1 / Q8_0, the sub-block size of Q4_K
KEEPABLE = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q4_K": 4}  # GGML type -> MLX affine bits (see above for Q4_K)


def _gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PuddingError("converting a GGUF file needs the `gguf` package; install it with `pip install 'gguf>=0.10'`")
    return gguf


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class GGUFTensor:
    name: str
    type_name: str  # GGML type name: "Q4_1", "F32", ...
    shape: Tuple[int, ...]  # numpy order: (rows, columns) for a matrix
    raw: object  # the reader's memory-mapped data


class GGUFFile:
    """Metadata and tensor table of one GGUF file (memory-mapped: nothing is read until a tensor is converted)."""

    def __init__(self, path):
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise PuddingError(f"{self.path}: no such GGUF file; check the path")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise PuddingError(f"{self.path}: not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
        try:
            reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # numpy reshape / struct errors on truncated or damaged files
            raise PuddingError(
                f"{self.path}: the GGUF file is truncated or corrupt ({type(e).__name__}: {first_line(e)}); "
                "download it again"
            )
        self.meta: Dict[str, object] = {}
        for key, fld in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.meta[key] = fld.contents()
            except Exception:
                pass
        self.tensors: Dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise PuddingError(f"{self.path}: tensor {t.name} extends past the end of the file (truncated download?); download it again")
            self.tensors[t.name] = GGUFTensor(
                name=t.name,
                type_name=t.tensor_type.name,
                shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                raw=t.data,
            )
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise PuddingError(f"{self.path}: the GGUF metadata has no general.architecture; the file is not a llama.cpp model")
        self.arch = arch

    def get(self, key: str, default=None):
        return self.meta.get(key, default)

    def need(self, key: str):
        if key not in self.meta:
            raise PuddingError(f"{self.path}: the GGUF metadata lacks {key}; the file is incomplete or from an unsupported converter")
        return self.meta[key]


# ---------------------------------------------------------------------------------------------------------------
# Tensor decoding


def _blocks(t: GGUFTensor, block_bytes: int) -> np.ndarray:
    raw = np.asarray(t.raw, dtype=np.uint8)
    rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
    return raw.reshape(rows, -1, block_bytes)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """q: (rows, cols) uint8 codes -> MLX packing: uint32 words, element i at bits `bits * (i % (32 // bits))`."""
    if bits == 4:
        q = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(q).view("<u4")


def _q4_k_scales_mins(sm: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of each Q4_K block (..., 12) -> its eight 6-bit scales and mins (..., 8) each, as
    ggml's get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks
    4-7 in the nibbles of bytes 8-11 (low: scale, high: min) plus the top 2 bits of bytes 0-3 / 4-7."""
    s_lo, m_lo, hi = sm[..., 0:4], sm[..., 4:8], sm[..., 8:12]
    scales = np.concatenate([s_lo & 63, (hi & 0x0F) | ((s_lo >> 6) << 4)], axis=-1)
    mins = np.concatenate([m_lo & 63, (hi >> 4) | ((m_lo >> 6) << 4)], axis=-1)
    return scales, mins


def _repack_q4_k(t: GGUFTensor) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    b = _blocks(t, 144)
    rows = b.shape[0]
    d = b[:, :, 0:2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
    dmin = b[:, :, 2:4].copy().view(np.float16).astype(np.float32)
    scales, mins = _q4_k_scales_mins(b[:, :, 4:16])
    # exact in float32 (11-bit d times a 6-bit integer); the caller rounds once to the model's dtype
    scale = (d * scales.astype(np.float32)).reshape(rows, -1)
    bias = -(dmin * mins.astype(np.float32)).reshape(rows, -1)
    # each 32-byte chunk of codes holds 64 weights: the low nibbles are sub-block 2k, the high ones 2k + 1
    qs = b[:, :, 16:].reshape(rows, -1, 4, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
    return _pack(q, 4), scale, bias, 4


def repack_quantized(t: GGUFTensor) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A Q4_0 / Q4_1 / Q8_0 / Q4_K tensor -> (weight uint32, scales, biases, bits), MLX affine, group 32.
    Scales and biases are float16 (Q4_K: float32, exact; the caller casts them to the model's dtype)."""
    kind = t.type_name
    if kind == "Q4_K":
        return _repack_q4_k(t)
    if kind == "Q8_0":
        b = _blocks(t, 34)
        d = b[:, :, 0:2].copy().view(np.float16)[..., 0]
        q = (b[:, :, 2:].reshape(b.shape[0], -1) ^ 0x80)  # int8 two's complement -> q + 128
        return _pack(q, 8), d, (d * np.float16(-128)).astype(np.float16), 8
    if kind in ("Q4_0", "Q4_1"):
        bb = 18 if kind == "Q4_0" else 20
        b = _blocks(t, bb)
        d = b[:, :, 0:2].copy().view(np.float16)[..., 0]
        if kind == "Q4_0":
            bias = (d * np.float16(-8)).astype(np.float16)
        else:
            bias = b[:, :, 2:4].copy().view(np.float16)[..., 0]
        qs = b[:, :, bb - 16:]
        # in a block, byte j holds element j (low nibble) and element j + 16 (high nibble)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(b.shape[0], -1)
        return _pack(q, 4), d, bias, 4
    raise ValueError(kind)


def dequantize(t: GGUFTensor) -> np.ndarray:
    """Any GGML tensor -> float32 numpy array of t.shape (the gguf package's reference decoders)."""
    gguf = _gguf()
    if t.type_name == "F32":
        return np.asarray(t.raw, dtype=np.float32).reshape(t.shape)
    if t.type_name == "F16":
        return np.asarray(t.raw).view(np.float16).astype(np.float32).reshape(t.shape)
    try:
        out = gguf.quants.dequantize(np.asarray(t.raw), gguf.GGMLQuantizationType[t.type_name])
    except (NotImplementedError, KeyError, ValueError) as e:
        raise PuddingError(f"tensor {t.name}: GGML type {t.type_name} cannot be decoded ({first_line(e)}); use a GGUF with Q4_0/Q4_1/Q8_0/K-quant/F16 tensors")
    return np.asarray(out, dtype=np.float32).reshape(t.shape)


def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (HF -> GGUF: reshape(n_head, 2, d/2).swapaxes(1, 2)).

    Works on any array whose first axis is the output rows: float weights, packed uint32 weights, scales, biases."""
    rows = x.shape[0]
    if rows % (2 * n_head):
        raise PuddingError(f"cannot undo the rotary permutation: {rows} rows for {n_head} heads")
    half = rows // n_head // 2
    return np.ascontiguousarray(x.reshape(n_head, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape))


# ---------------------------------------------------------------------------------------------------------------
# Architectures


@dataclass
class ArchSpec:
    """How one GGUF architecture maps onto an mlx-lm model."""

    gguf_arch: str
    model_type: str
    config: Callable[["GGUFFile"], dict]
    globals_: Dict[str, str]
    block: Dict[str, str]
    permute_qk: bool = False  # llama.cpp's llama converter permutes Q/K rows
    norm_offset: float = 0.0  # gemma: GGUF stores 1 + w for RMSNorm weights
    default_dtype: str = "float16"
    ignore: Tuple[str, ...] = field(default_factory=tuple)  # GGUF tensors with no mlx-lm counterpart


def _f32(x) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _common_ids(g: GGUFFile, cfg: dict) -> dict:
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id"),
                      ("tokenizer.ggml.padding_token_id", "pad_token_id")):
        if key in g.meta:
            cfg[name] = int(g.meta[key])
    return cfg


def _vocab_size(g: GGUFFile, prefix: str) -> int:
    if f"{prefix}.vocab_size" in g.meta:
        return int(g.meta[f"{prefix}.vocab_size"])
    emb = g.tensors.get("token_embd.weight")
    if emb is not None:
        return int(emb.shape[0])
    return len(g.need("tokenizer.ggml.tokens"))


def _decoder_config(g: GGUFFile, a: str, eps: float, theta: float, context: int) -> dict:
    """The keys every decoder family's config shares, from architecture `a`'s metadata (the defaults:
    that family's usual values when the file leaves a key out)."""
    heads = int(g.need(f"{a}.attention.head_count"))
    return {
        "hidden_size": int(g.need(f"{a}.embedding_length")),
        "intermediate_size": int(g.need(f"{a}.feed_forward_length")),
        "num_hidden_layers": int(g.need(f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.get(f"{a}.attention.head_count_kv", heads)),
        "rms_norm_eps": _f32(g.get(f"{a}.attention.layer_norm_rms_epsilon", eps)),
        "rope_theta": _f32(g.get(f"{a}.rope.freq_base", theta)),
        "max_position_embeddings": int(g.get(f"{a}.context_length", context)),
        "vocab_size": _vocab_size(g, a),
        # tied only when the file has no output head (the Qwen2.5-Coder-1.5B Q4_K_M GGUF stores one, as Q6_K)
        "tie_word_embeddings": "output.weight" not in g.tensors,
    }


def _llama_config(g: GGUFFile) -> dict:
    a = "llama"
    if "rope_freqs.weight" in g.tensors:
        raise PuddingError(f"{g.path}: Llama-3-style rope frequency factors (rope_freqs.weight) are not supported yet; convert the original Hugging Face model instead")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_decoder_config(g, a, 1e-5, 10000.0, 2048)}
    cfg["head_dim"] = int(g.get(f"{a}.attention.key_length", cfg["hidden_size"] // cfg["num_attention_heads"]))
    cfg.update(attention_bias="blk.0.attn_q.bias" in g.tensors, mlp_bias="blk.0.ffn_up.bias" in g.tensors,
               hidden_act="silu")
    _add_rope_scaling(g, a, cfg, "type")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    return _common_ids(g, cfg)


def _add_rope_scaling(g: GGUFFile, a: str, cfg: dict, type_key: str) -> None:
    """cfg["rope_scaling"] from the GGUF's rope.scaling keys (linear only), under the key name the
    architecture's config uses for the type ("type" for llama, "rope_type" for gemma3)."""
    scaling = g.get(f"{a}.rope.scaling.type")
    if scaling in (None, "none"):
        return
    if scaling != "linear":
        raise PuddingError(f"{g.path}: rope scaling type {scaling!r} is not supported yet (only linear); "
                           "convert the original Hugging Face model instead")
    cfg["rope_scaling"] = {type_key: "linear", "factor": float(g.need(f"{a}.rope.scaling.factor"))}


LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gemma3_config(g: GGUFFile) -> dict:
    a = "gemma3"
    pattern = 6  # gemma3: five sliding-window layers, then one global
    cfg = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
           **_decoder_config(g, a, 1e-6, 1_000_000.0, 32768)}
    head_dim = int(g.get(f"{a}.attention.key_length", 256))
    layers = cfg["num_hidden_layers"]
    cfg.update({
        "head_dim": head_dim,
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": int(g.get(f"{a}.attention.sliding_window", 512)),
        "sliding_window_pattern": pattern,
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)],
        "hidden_activation": "gelu_pytorch_tanh",
    })
    _add_rope_scaling(g, a, cfg, "rope_type")
    return _common_ids(g, cfg)


GEMMA3_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _qwen2_config(g: GGUFFile) -> dict:
    a = "qwen2"
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **_decoder_config(g, a, 1e-6, 1_000_000.0, 32768)}
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = g.get(f"{a}.attention.key_length")
    if head_dim is not None and int(head_dim) != hidden // heads:  # mlx-lm's qwen2 derives it
        raise PuddingError(f"{g.path}: {a}.attention.key_length {head_dim} is not hidden size / heads "
                           f"({hidden} / {heads}); mlx-lm's qwen2 model cannot hold it")
    cfg["hidden_act"] = "silu"
    _add_rope_scaling(g, a, cfg, "type")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    return _common_ids(g, cfg)


ARCHS: Dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "llama", _llama_config, GLOBALS, LLAMA_BLOCK, permute_qk=True),
    # float16 suits gemma3 too: mlx-lm's gemma3_text clips its float16 residual stream
    "gemma3": ArchSpec("gemma3", "gemma3_text", _gemma3_config, GLOBALS, GEMMA3_BLOCK, norm_offset=-1.0),
    # llama.cpp's Qwen2Model keeps HF's Q/K row order (only its LlamaModel permutes), and the q/k/v
    # biases map like the weights (blk.N.attn_q.bias -> model.layers.N.self_attn.q_proj.bias)
    "qwen2": ArchSpec("qwen2", "qwen2", _qwen2_config, GLOBALS, LLAMA_BLOCK),
}


def arch_spec(g: GGUFFile) -> ArchSpec:
    spec = ARCHS.get(g.arch)
    if spec is None:
        raise PuddingError(
            f"{g.path}: GGUF architecture {g.arch!r} is not supported (supported: {', '.join(sorted(ARCHS))}); "
            "convert the original Hugging Face model directory instead"
        )
    return spec


def mlx_name(spec: ArchSpec, gguf_name: str) -> Optional[str]:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None when it has no counterpart."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in spec.globals_:
        return f"{spec.globals_[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in spec.block:
        return f"model.layers.{parts[1]}.{spec.block[parts[2]]}.{suffix}"
    return None
