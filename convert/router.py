"""Convert a router trained in PyTorch into an MLX router folder (layout: pudding_mlx.router).

Two source layouts are accepted:

(a) An HF `BertForSequenceClassification` directory (what `save_pretrained` writes):

        config.json            BERT config; num_labels / id2label, when present, must equal M
        model.safetensors      `bert.embeddings.*`, `bert.encoder.*`, `bert.pooler.*`,
          or pytorch_model.bin `classifier.weight` [M, hidden], `classifier.bias` [M]
        tokenizer files        tokenizer.json / vocab.txt, tokenizer_config.json, special_tokens_map.json

    pytorch_model.bin is read only with `torch.load(..., map_location="cpu", weights_only=True)`
    (no pickled code runs), and only when there is no model.safetensors; it is the one path
    that needs torch.

(b) A "light" router: a frozen encoder plus a small head saved on its own:

        my-router/
          head.json            {"encoder": "<path of the encoder folder, relative to my-router/>",
                                "num_outputs": M}
          head.safetensors     `weight` [M, hidden], `bias` [M] (float32, like nn.Linear(hidden, M))
          <encoder folder>     a plain HF `BertModel` directory (config.json, model.safetensors or
                               pytorch_model.bin, tokenizer files); tensor names with or without
                               a `bert.` prefix; it must include the pooler (`pooler.dense.*`)

    The tokenizer files are taken from my-router/ when it has them, else from the encoder folder.

The head scores the BERT pooler output (tanh(dense([CLS]))), as in the paper.

Safetensors files are read with `safetensors.numpy` (a bfloat16 file, which numpy cannot hold,
through `mx.load`), so neither layout with safetensors needs torch.

The output is written into a temporary folder next to OUT, loaded back once as a check, then moved
into place with os.replace: OUT is either the complete router or untouched. An existing OUT is
refused unless force=True.
"""

import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from pudding_mlx.bert import BertConfig, BertModel
from pudding_mlx.atomic import building
from pudding_mlx.errors import PuddingError, first_line
from pudding_mlx.jsonio import read_json
from pudding_mlx.router import (
    FORMAT,
    SCHEMA_VERSION,
    SETTINGS,
    TOKENIZER_FILES,
    WEIGHTS,
    check_weights,
    load_router,
    load_tokenizer,
)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
HEAD_JSON = "head.json"
HEAD_WEIGHTS = "head.safetensors"


# --------------------------------------------------------------------------- reading the source


def read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except TypeError as e:
        if "bfloat16" not in str(e):
            raise PuddingError(f"{path}: could not read the safetensors file ({first_line(e, 300)}); re-save it") from None
    except Exception as e:  # SafetensorError, OSError: truncated or not safetensors at all
        raise PuddingError(f"{path}: not a readable safetensors file ({first_line(e, 300)}); it may be truncated, save it again") from None
    # bfloat16 tensors: numpy has no such dtype, MLX reads them; float32 holds bf16 exactly.
    try:
        arrays = mx.load(str(path))
        mx.eval(arrays)
    except Exception as e:
        raise PuddingError(f"{path}: not a readable safetensors file ({first_line(e, 300)}); it may be truncated, save it again") from None
    return {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in arrays.items()}


def read_torch_bin(path: Path) -> Dict[str, np.ndarray]:
    try:
        import torch  # only this branch needs it
    except ImportError:
        raise PuddingError(
            f"{path}: reading pytorch_model.bin needs PyTorch (pip install 'pudding-mlx[train]'); "
            "or save the checkpoint as model.safetensors"
        ) from None
    try:
        # weights_only=True: tensors and plain containers only, no pickled code is executed.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PuddingError(f"{path}: could not be loaded as a weights-only PyTorch state dict ({first_line(e, 300)}); save it as model.safetensors") from None
    if not isinstance(state, dict):
        raise PuddingError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. a stray training counter; only tensors are weights
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(torch.float32)  # exact for fp16/bf16; numpy has no bf16
        out[key] = value.numpy()
    return out


def read_checkpoint(folder: Path) -> Tuple[Dict[str, np.ndarray], Path]:
    """The weights of an HF model folder: model.safetensors, else pytorch_model.bin."""
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        return read_safetensors(st), st
    if pt.is_file():
        return read_torch_bin(pt), pt
    if (folder / "model.safetensors.index.json").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        raise PuddingError(f"{folder}: sharded checkpoints are not supported; save the router with a larger max_shard_size")
    raise PuddingError(f"{folder}: no model.safetensors or pytorch_model.bin; point at the folder save_pretrained wrote")


def read_config(folder: Path) -> Tuple[dict, BertConfig]:
    path = folder / "config.json"
    raw = read_json(path, "the HF BERT config", "save the model with save_pretrained, which writes it")
    return raw, BertConfig.from_dict(raw, where=str(path))


def encoder_weights(raw: Dict[str, np.ndarray], where: Path) -> Dict[str, np.ndarray]:
    enc = BertModel.sanitize(raw)
    if "pooler.dense.weight" not in enc:
        raise PuddingError(
            f"{where}: the encoder has no pooler (pooler.dense.*), which the router head reads; "
            "save the BERT model with its pooling layer (add_pooling_layer=True)"
        )
    return enc


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def from_sequence_classification(src: Path):
    raw_config, config = read_config(src)
    raw, wpath = read_checkpoint(src)
    if "classifier.weight" not in raw or "classifier.bias" not in raw:
        raise PuddingError(
            f"{wpath}: tensors 'classifier.weight'/'classifier.bias' are missing; this is not a "
            f"BertForSequenceClassification checkpoint (for a separate head use {HEAD_JSON} + {HEAD_WEIGHTS})"
        )
    weight, bias = raw["classifier.weight"], raw["classifier.bias"]
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise PuddingError(f"{wpath}: classifier.weight {list(weight.shape)} / classifier.bias {list(bias.shape)} are not a linear head [M, hidden] / [M]")
    m = weight.shape[0]
    for field, n in (("num_labels", raw_config.get("num_labels")),
                     ("id2label", len(raw_config["id2label"]) if isinstance(raw_config.get("id2label"), dict) else None)):
        if n is not None and n != m:
            raise PuddingError(f"{src / 'config.json'}: field '{field}' gives {n} outputs but {wpath.name} has a {m}-output classifier; they must match")
    return dict(raw_config=raw_config, config=config, enc=encoder_weights(raw, wpath), weight=weight,
                bias=bias, head_file=wpath, weights_file=wpath, tok_dir=src,
                name=_encoder_name(raw_config, src))


def from_light(src: Path):
    hpath = src / HEAD_JSON
    head = read_json(hpath, "the light router's head description", 'write {"encoder": "<folder>", "num_outputs": M}')
    enc_rel = head.get("encoder")
    if not isinstance(enc_rel, str) or not enc_rel:
        raise PuddingError(f"{hpath}: field 'encoder' must be the encoder folder's path relative to {src}")
    m = head.get("num_outputs")
    if not _is_int(m) or m < 1:
        raise PuddingError(f"{hpath}: field 'num_outputs' must be an integer >= 1, got {m!r}")
    enc_dir = (src / enc_rel).resolve()
    if not enc_dir.is_dir():
        raise PuddingError(f"{hpath}: field 'encoder' names {enc_dir}, which is not a folder")
    raw_config, config = read_config(enc_dir)
    raw, wpath = read_checkpoint(enc_dir)

    wfile = src / HEAD_WEIGHTS
    if not wfile.is_file():
        raise PuddingError(f"{wfile}: the head weights are missing; save them with weight [M, hidden] and bias [M]")
    hw = read_safetensors(wfile)
    if "weight" not in hw or "bias" not in hw:
        raise PuddingError(f"{wfile}: tensors 'weight' and 'bias' are required (found: {', '.join(sorted(hw)) or 'none'})")
    weight, bias = hw["weight"], hw["bias"]
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise PuddingError(f"{wfile}: weight {list(weight.shape)} / bias {list(bias.shape)} are not a linear head [M, hidden] / [M]")
    if weight.shape[0] != m:
        raise PuddingError(f"{wfile}: the head has {weight.shape[0]} outputs but {hpath.name} says num_outputs {m}; they must match")
    tok_dir = src if any((src / f).is_file() for f in ("tokenizer.json", "vocab.txt")) else enc_dir
    return dict(raw_config=raw_config, config=config, enc=encoder_weights(raw, wpath), weight=weight,
                bias=bias, head_file=wfile, weights_file=wpath, tok_dir=tok_dir,
                name=head.get("encoder_name") or _encoder_name(raw_config, enc_dir))


# --------------------------------------------------------------------------- writing the router


def tokenizer_lowercases(folder: Path) -> bool:
    """Whether the tokenizer lowercases: tokenizer_config's do_lower_case, else tokenizer.json's normalizer."""
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if isinstance(cfg.get("do_lower_case"), bool):
            return cfg["do_lower_case"]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        norm = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("normalizer") or {}
    except (OSError, ValueError, AttributeError):
        return False
    parts = norm.get("normalizers", [norm]) if isinstance(norm, dict) else []
    return any(isinstance(p, dict) and (p.get("type") == "Lowercase" or (p.get("type") == "BertNormalizer" and p.get("lowercase", True)))
               for p in parts)


def _encoder_name(raw_config: dict, folder: Path) -> str:
    """The encoder's name as its config records it (a light router's head.json may name it better:
    `encoder_name`; a sentence-transformers model's config names the model it was trained from)."""
    name = raw_config.get("_name_or_path")
    return name if isinstance(name, str) and name else folder.name


def convert_router(
    src,
    out,
    force: bool = False,
    dtype: str = "float32",
    expect_outputs: Optional[int] = None,
    max_length: Optional[int] = None,
) -> Path:
    """Convert SRC (a BertForSequenceClassification folder or a light router) to the MLX router OUT.

    dtype: float32 (default), float16 or bfloat16 for the stored weights. expect_outputs: the
    number of candidates the head must score (checked). max_length: the truncation length
    (default 512, capped at the encoder's max_position_embeddings).
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if dtype not in DTYPES:
        raise PuddingError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if not src.is_dir():
        raise PuddingError(f"{src}: the router source folder does not exist")
    if (out.exists() or out.is_symlink()) and not force:
        raise PuddingError(f"{out}: already exists; pass force=True to replace it")

    if (src / HEAD_JSON).is_file():
        source = from_light(src)
    elif (src / "config.json").is_file():
        source = from_sequence_classification(src)
    else:
        raise PuddingError(
            f"{src}: config.json is missing (and there is no {HEAD_JSON}); expected a "
            "BertForSequenceClassification folder or a light router"
        )

    config, weight, head_file, tok_dir = source["config"], source["weight"], source["head_file"], source["tok_dir"]
    m = int(weight.shape[0])
    if expect_outputs is not None and m != expect_outputs:
        raise PuddingError(f"{head_file}: the router head has {m} outputs but {expect_outputs} were expected (one per candidate set)")
    if max_length is None:
        max_length = min(512, config.max_position_embeddings)
    if not _is_int(max_length) or not 2 <= max_length <= config.max_position_embeddings:
        raise PuddingError(f"max_length must be an integer from 2 to the encoder's max_position_embeddings ({config.max_position_embeddings}), got {max_length!r}")
    load_tokenizer(tok_dir)  # fail here, naming the source, rather than after writing

    weights = {f"encoder.{k}": v for k, v in source["enc"].items()}
    weights["head.weight"], weights["head.bias"] = weight, source["bias"]
    check_weights({k: tuple(v.shape) for k, v in weights.items()}, config, m, str(source["weights_file"]),
                  fix="save the full model (encoder with pooler, and the head)")
    target = DTYPES[dtype]
    arrays = {k: mx.array(v).astype(target) if np.issubdtype(v.dtype, np.floating) else mx.array(v) for k, v in weights.items()}

    settings = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "num_outputs": m,
        "max_length": max_length,
        "lowercase": tokenizer_lowercases(tok_dir),
        "pooling": "pooler",
        "encoder": source["name"],
    }

    with building(out, force) as tmp:
        (tmp / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(source["raw_config"], indent=2) + "\n", encoding="utf-8")
        mx.save_safetensors(str(tmp / WEIGHTS), arrays, metadata={"format": "mlx"})
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, tmp / name)
        try:
            load_router(tmp, num_outputs=m)  # the check: what we wrote loads, tokenizer included
        except PuddingError as e:
            raise PuddingError(f"the converted router did not load back, so nothing was written to {out}: {e}") from None
    return out
