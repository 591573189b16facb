"""A BERT encoder in MLX, written for the router: embeddings, post-LayerNorm encoder layers, pooler.

It follows transformers' `BertModel` (absolute position embeddings, no decoder/cross-attention) so
that a checkpoint trained in PyTorch gives the same pooler output here:

    embeddings  = LayerNorm(word[ids] + position[0..L-1] + token_type[type_ids])
    each layer  = h = LayerNorm(x + Attention(x, padding mask)); LayerNorm(h + MLP(h))
    pooler      = tanh(Linear(hidden[:, 0]))            (the [CLS] token)

Parameter names (MLX side) and where they come from in an HF checkpoint (`sanitize` maps them):

    embeddings.{word,position,token_type}_embeddings.weight  <- embeddings.*_embeddings.weight
    embeddings.norm.*                                        <- embeddings.LayerNorm.*
    layers.N.attention.{query,key,value}.*                   <- encoder.layer.N.attention.self.*
    layers.N.attention.out_proj.*                            <- encoder.layer.N.attention.output.dense.*
    layers.N.attention_norm.*                                <- encoder.layer.N.attention.output.LayerNorm.*
    layers.N.mlp.up_proj.*                                   <- encoder.layer.N.intermediate.dense.*
    layers.N.mlp.down_proj.*                                 <- encoder.layer.N.output.dense.*
    layers.N.mlp_norm.*                                      <- encoder.layer.N.output.LayerNorm.*
    pooler.dense.*                                           <- pooler.dense.*

This module never imports torch.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from .errors import PuddingError
from .jsonio import read_json

# hidden_act values of HF configs we can reproduce exactly. HF "gelu" is the exact erf form
# (nn.gelu); "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation (nn.gelu_approx).
ACTIVATIONS = {
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
}


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, data: dict, where: str = "config.json") -> "BertConfig":
        """Read the fields we need from an HF BERT config; refuse what this encoder cannot run."""
        if not isinstance(data, dict):
            raise PuddingError(f"{where}: expected a JSON object (an HF BERT config)")
        model_type = data.get("model_type", "bert")
        if model_type != "bert":
            raise PuddingError(f"{where}: field 'model_type' is {model_type!r}; only BERT encoders ('bert') are supported")
        # relative/relative_key position embeddings change the attention scores; not implemented.
        pos = data.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise PuddingError(f"{where}: field 'position_embedding_type' is {pos!r}; only 'absolute' is supported")
        if data.get("is_decoder"):
            raise PuddingError(f"{where}: field 'is_decoder' is true; the router needs a bidirectional encoder")
        values = {}
        for name, default in (
            ("vocab_size", None), ("hidden_size", None), ("num_hidden_layers", None),
            ("num_attention_heads", None), ("intermediate_size", None),
            ("max_position_embeddings", 512), ("type_vocab_size", 2),
        ):
            value = data.get(name, default)
            if value is None:
                raise PuddingError(f"{where}: field '{name}' is missing; is this an HF BERT config.json?")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PuddingError(f"{where}: field '{name}' must be a positive integer, got {value!r}")
            values[name] = value
        eps = data.get("layer_norm_eps", 1e-12)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            raise PuddingError(f"{where}: field 'layer_norm_eps' must be a positive number, got {eps!r}")
        act = data.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise PuddingError(f"{where}: field 'hidden_act' is {act!r}; supported: {', '.join(ACTIVATIONS)}")
        if values["hidden_size"] % values["num_attention_heads"]:
            raise PuddingError(
                f"{where}: hidden_size {values['hidden_size']} is not divisible by "
                f"num_attention_heads {values['num_attention_heads']}"
            )
        return cls(**values, layer_norm_eps=float(eps), hidden_act=act)


def load_config(folder: Path) -> BertConfig:
    path = Path(folder) / "config.json"
    return BertConfig.from_dict(read_json(path, "the HF BERT config"), where=str(path))


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array, token_type_ids: Optional[mx.array] = None) -> mx.array:
        # Positions always start at 0: the tokenizer pads on the right, so real tokens keep the
        # positions they had in training (HF's default position_ids buffer).
        positions = mx.arange(input_ids.shape[1])
        if token_type_ids is None:
            # A single segment; HF's default token_type_ids buffer is all zeros.
            token_type_ids = mx.zeros_like(input_ids)
        h = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)
        )
        return self.norm(h)


class Attention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        dim = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.scale = (dim // self.n_heads) ** -0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None) -> mx.array:
        B, L, _ = x.shape

        def heads(t):
            return t.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        # A plain function attribute, not a parameter: MLX modules only track arrays/modules.
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.up_proj(x)))


class EncoderLayer(nn.Module):
    """Post-LayerNorm (original BERT): the norm comes after each residual sum, not before."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None) -> mx.array:
        h = self.attention_norm(x + self.attention(x, mask))
        return self.mlp_norm(h + self.mlp(h))


class Pooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, hidden: mx.array) -> mx.array:
        return mx.tanh(self.dense(hidden[:, 0]))


def padding_mask(attention_mask: mx.array, dtype: mx.Dtype) -> mx.array:
    """[B, L] of 1 (token) / 0 (padding) -> additive [B, 1, 1, L] mask over the keys.

    Like HF, padded keys get the dtype's most negative value rather than -inf: their softmax
    weight is still exactly 0 next to any real key, and a row whose keys are all masked (an
    all-zero attention_mask passed by a caller) gives a uniform average instead of NaN.
    Padded query positions compute garbage that nothing reads: the pooler reads position 0.
    """
    keep = attention_mask.astype(mx.bool_)[:, None, None, :]
    return mx.where(keep, mx.array(0.0, dtype), mx.array(mx.finfo(dtype).min, dtype))


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.pooler = Pooler(config)

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: Optional[mx.array] = None,
        token_type_ids: Optional[mx.array] = None,
    ):
        """Return (last hidden states [B, L, H], pooler output [B, H])."""
        h = self.embeddings(input_ids, token_type_ids)
        mask = None if attention_mask is None else padding_mask(attention_mask, h.dtype)
        for layer in self.layers:
            h = layer(h, mask)
        return h, self.pooler(h)

    @staticmethod
    def sanitize(weights: Dict[str, object]) -> Dict[str, object]:
        """HF `BertModel` names (with or without a `bert.` prefix) -> this module's names.

        Buffers (position_ids, token_type_ids) are dropped; keys that belong to no encoder part
        (e.g. an MLM `cls.*` head) are left out. Missing tensors are the caller's to report.
        """
        out = {}
        for key, value in weights.items():
            name = key[len("bert."):] if key.startswith("bert.") else key
            # Old TF-converted checkpoints call the LayerNorm parameters gamma/beta.
            name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
            name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
            new = _rename(name)
            if new is not None:
                out[new] = value
        return out


_RULES = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight", r"embeddings.\1_embeddings.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embeddings.norm.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)", r"layers.\1.attention.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.attention.out_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.attention_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.mlp.up_proj.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.mlp.down_proj.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1"),
]
_RULES = [(re.compile(pattern), repl) for pattern, repl in _RULES]


def _rename(name: str) -> Optional[str]:
    for pattern, repl in _RULES:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return None


def hf_name(name: str) -> Optional[str]:
    """The HF checkpoint name (without `bert.`) of one of this module's parameters, for messages."""
    back = {
        "embeddings.norm.": "embeddings.LayerNorm.",
        ".attention.out_proj.": ".attention.output.dense.",
        ".attention_norm.": ".attention.output.LayerNorm.",
        ".mlp.up_proj.": ".intermediate.dense.",
        ".mlp.down_proj.": ".output.dense.",
        ".mlp_norm.": ".output.LayerNorm.",
    }
    if not name.startswith(("embeddings.", "layers.", "pooler.")):
        return None
    out = re.sub(r"^layers\.(\d+)\.attention\.(query|key|value)\.", r"encoder.layer.\1.attention.self.\2.", name)
    for a, b in back.items():
        out = out.replace(a, b)
    return re.sub(r"^layers\.", "encoder.layer.", out)
