"""Convert an LLM into a standard mlx-lm model directory (config.json, model.safetensors, tokenizer files) that stock
`mlx_lm.load` loads.

Sources:

* a Hugging Face model directory (config.json + safetensors): mlx-lm's own `mlx_lm.convert.convert` does the work;
* a GGUF file (llama.cpp): decoded here (see `convert/gguf.py`); Q4_0/Q4_1/Q8_0 tensors stay quantized (losslessly
  repacked as MLX affine, group size 32), other GGML types come out as float; the tokenizer and chat template come
  from the GGUF metadata through transformers' GGUF support;
* a hub id (owner/name) when online: downloaded by mlx-lm, then as a Hugging Face directory.

After either path the directory is touched up for mlx-lm 0.32 and older tools: a top-level `rope_theta` in
config.json (transformers 5 only writes `rope_parameters.rope_theta`, and mlx-lm falls back to 10000), a
`tokenizer_class` every transformers version knows (`PreTrainedTokenizerFast` instead of transformers 5's
`TokenizersBackend`), and the chat template both in `chat_template.jinja` and inline in tokenizer_config.json.

Writes are atomic (`pudding_mlx.atomic`): the model is built in a hidden temporary directory beside OUT and moved
into place only when complete, with the usual permissions; on any failure nothing is left at OUT.

`progress`, when given, is called as `progress(stage, done, total)` (stage: a short description); `rich_progress`
adapts a `rich.progress.Progress` to it.
"""

import contextlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from pudding_mlx import hub
from pudding_mlx.atomic import publish_dir, scratch_dir
from pudding_mlx.bundle import check_safetensors
from pudding_mlx.errors import PuddingError, first_line
from pudding_mlx.jsonio import read_json

DTYPE_NAMES = ("float16", "bfloat16", "float32")
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)

Progress = Callable[[str, int, int], None]


def rich_progress(progress) -> Progress:
    """A `progress(stage, done, total)` callback that drives a `rich.progress.Progress` (one task per stage)."""
    tasks = {}

    def report(stage: str, done: int, total: int):
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return report


def is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _looks_like_hub_id(src: str) -> bool:
    return hub.is_hub_id(src) and not src.endswith(".gguf")


# ---------------------------------------------------------------------------------------------------------------
# Public entry point


def convert_llm(
    src,
    out,
    quantize_bits: Optional[int] = None,
    group_size: int = 64,
    dtype: Optional[str] = None,
    dequantize: bool = False,
    force: bool = False,
    progress: Optional[Progress] = None,
) -> Path:
    """Convert SRC (HF model directory, .gguf file, or hub id) into an mlx-lm model directory at OUT.

    quantize_bits: re-quantize every quantizable layer to this many bits (MLX affine, `group_size`); for a GGUF the
        weights are dequantized first. None keeps what the source has: a HF model stays float, a GGUF keeps its
        Q4_0/Q4_1/Q8_0/Q4_K tensors quantized (group size 32).
    dtype: float16 / bfloat16 / float32 for the float weights (and a GGUF's scales). None: the HF config's
        torch_dtype, or for a GGUF float16, which holds GGUF's float16 scales exactly (Q4_K's products
        d * sc rounded once: float32 keeps those exact too; see convert/gguf.py).
    dequantize: write every weight as float (GGUF or an already quantized mlx-lm model).
    force: replace an existing OUT.
    Returns OUT as an absolute Path. Raises PuddingError, one line, for bad input.
    """
    report = progress or (lambda stage, done, total: None)
    if quantize_bits is not None and quantize_bits not in BITS:
        raise PuddingError(f"quantize_bits={quantize_bits!r}: choose one of {', '.join(map(str, BITS))} (or none)")
    if group_size not in GROUP_SIZES:
        raise PuddingError(f"group_size={group_size!r}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise PuddingError(f"dtype={dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
    if quantize_bits is not None and dequantize:
        raise PuddingError("choose either quantize_bits or dequantize, not both")

    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise PuddingError(f"{out}: already exists; pass force=True (--force) to replace it, or choose another output path")

    src_str = str(src)
    src_path = Path(src_str).expanduser()
    if src_path.exists():
        src_path = src_path.absolute()
        if out == src_path or src_path in out.parents:
            raise PuddingError(f"{out}: the output must not be the source or lie inside it; choose another output path")
        if src_path.is_file():
            if not is_gguf(src_path):
                raise PuddingError(f"{src_path}: not a GGUF file; pass a .gguf file or a Hugging Face model directory")
            kind = "gguf"
        elif src_path.is_dir():
            _check_hf_dir(src_path)
            kind = "hf"
        else:
            raise PuddingError(f"{src_path}: neither a file nor a directory")
    elif _looks_like_hub_id(src_str):
        kind = "hub"
    else:
        raise PuddingError(f"{src_str}: no such file or directory, and not a hub id of the form owner/name")

    with scratch_dir(out, "partial") as work:
        build = work / "model"
        if kind == "gguf":
            _convert_gguf(src_path, build, quantize_bits, group_size, dtype, dequantize, report)
        else:
            source = str(src_path) if kind == "hf" else _hub_check(src_str)
            _convert_hf(source, build, quantize_bits, group_size, dtype, dequantize, report)
        _fix_config(build / "config.json")
        _fix_tokenizer(build)
        report("check", 0, 1)
        _check_loads(build)
        report("check", 1, 1)
        publish_dir(build, out, force=True)  # an existing OUT was allowed above (force)
    return out


def _check_loads(path: Path):
    """The result must load with stock mlx-lm (lazily: shapes and names are checked, nothing is computed)."""
    from mlx_lm.utils import load

    try:
        load(str(path), lazy=True)
    except Exception as e:
        raise PuddingError(f"the converted model does not load with mlx-lm ({type(e).__name__}: {first_line(e)}); this is a converter bug, please report it")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face directory / hub id: mlx-lm's own converter


def _check_hf_dir(path: Path):
    cfg = path / "config.json"
    if not cfg.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to convert a GGUF file pass the file itself, e.g. {ggufs[0]}" if ggufs else ""
        raise PuddingError(f"{path}: no config.json; not a Hugging Face model directory{hint}")
    config = read_json(cfg, "the model config", "restore the file from the original model")
    if "model_type" not in config:
        raise PuddingError(f"{cfg}: has no model_type; not a transformers model config")
    from mlx_lm.utils import _get_classes

    try:
        _get_classes(config)
    except ValueError:
        raise PuddingError(f"{cfg}: model_type {config['model_type']!r} is not supported by mlx-lm; no conversion possible")
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise PuddingError(f"{path}: no model*.safetensors files; save the model with safetensors (save_pretrained(..., safe_serialization=True))")
    for f in files:
        check_safetensors(f)  # catches a truncated download before any conversion work


def _hub_check(repo: str) -> str:
    """Resolve a hub id the way mlx-lm will; a clear error offline or for an unknown repository."""
    if hub.cached(repo) is None:
        hub.check_may_fetch(repo)
    return repo


def _convert_hf(source: str, build: Path, bits, group_size, dtype, dequantize, report):
    from mlx_lm.convert import convert

    report("convert", 0, 1)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            convert(
                source,
                mlx_path=str(build),
                quantize=bits is not None,
                q_group_size=group_size if bits is not None else None,
                q_bits=bits,
                dtype=dtype,
                dequantize=dequantize,
            )
    except PuddingError:
        raise
    except Exception as e:
        name = type(e).__name__
        if "NotFound" in name or "Repository" in name or "Offline" in name or "LocalEntry" in name:
            raise PuddingError(f"{source}: could not get it from the Hugging Face hub ({name}); check the id and the network, or pass a local directory")
        raise PuddingError(f"{source}: mlx-lm could not convert it ({name}: {first_line(e)}); check that the model files are complete")
    report("convert", 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# GGUF


def _convert_gguf(path: Path, build: Path, bits, group_size, dtype, dequantize, report):
    """Read the GGUF, fill mlx-lm's model with its tensors, quantize as asked, save with its tokenizer."""
    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    from . import gguf as G

    report("read GGUF", 0, 1)
    g = G.GGUFFile(path)
    spec = G.arch_spec(g)
    config = spec.config(g)
    report("read GGUF", 1, 1)

    dtype = dtype or spec.default_dtype
    keep = bits is None and not dequantize  # Q4_0/Q4_1/Q8_0/Q4_K tensors stay quantized
    model, quant = _gguf_model(path, g, spec, config, getattr(mx, dtype), keep, report)
    config["torch_dtype"] = dtype
    # the transformers that writes the tokenizer files below; without this field transformers 5.x
    # before 5.24 takes a local tokenizer for a Mistral one and warns that its regex is wrong
    config["transformers_version"] = _transformers_version()
    model, config = _quantize(model, config, quant, bits, group_size, report)

    report("save", 0, 1)
    save_model(build, model, donate_model=True)
    save_config(config, build / "config.json")
    _write_gguf_tokenizer(path, g, config, build)
    _write_generation_config(g, config, build)
    report("save", 1, 1)


def _gguf_model(path: Path, g, spec, config: dict, target_dtype, keep: bool, report):
    """mlx-lm's model for `config` with the GGUF's tensors loaded (strictly: every weight, no extra);
    returns it with {module path: quantization} of the modules kept quantized."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    from . import gguf as G

    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))  # random init is lazy: never computed
    modules = dict(model.named_modules())
    weights, quant = {}, {}
    names = list(g.tensors)
    for i, name in enumerate(names):
        target = G.mlx_name(spec, name)
        if target is None:
            if name in spec.ignore:
                continue
            raise PuddingError(f"{path}: tensor {name} has no counterpart in mlx-lm's {spec.model_type} model; this {g.arch} variant is not supported")
        _gguf_tensor(g.tensors[name], name, target, spec, config, modules, keep, target_dtype, weights, quant)
        report("tensors", i + 1, len(names))

    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if quant:
        nn.quantize(model, group_size=G.GROUP_SIZE, bits=4, class_predicate=lambda p, m: quant.get(p, False))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise PuddingError(f"{path}: its tensors do not fit mlx-lm's {spec.model_type} model ({first_line(e)}); the GGUF metadata and tensors disagree")
    mx.eval(model.parameters())
    return model, quant


def _gguf_tensor(t, name: str, target: str, spec, config: dict, modules: dict, keep: bool, target_dtype,
                 weights: dict, quant: dict):
    """One GGUF tensor into `weights` (mlx names): a keepable quantized matrix repacked losslessly as
    weight/scales/biases (recorded in `quant`), anything else dequantized to `target_dtype`. llama.cpp
    stores q/k rows permuted for its rope: undone here."""
    import mlx.core as mx

    from . import gguf as G

    module_path, _, leaf = target.rpartition(".")
    rows_perm = None
    if spec.permute_qk and ".attn_q." in name:
        rows_perm = config["num_attention_heads"]
    elif spec.permute_qk and ".attn_k." in name:
        rows_perm = config["num_key_value_heads"]
    module = modules.get(module_path)
    if (keep and t.type_name in G.KEEPABLE and leaf == "weight" and len(t.shape) == 2
            and hasattr(module, "to_quantized") and "norm" not in module_path):
        w, s, b, nbits = G.repack_quantized(t)
        if rows_perm:
            w, s, b = (G.unpermute_rows(x, rows_perm) for x in (w, s, b))
        weights[f"{module_path}.weight"] = mx.array(w)
        weights[f"{module_path}.scales"] = mx.array(s).astype(target_dtype)
        weights[f"{module_path}.biases"] = mx.array(b).astype(target_dtype)
        quant[module_path] = {"group_size": G.GROUP_SIZE, "bits": nbits, "mode": "affine"}
        return
    x = G.dequantize(t)
    if rows_perm:
        x = G.unpermute_rows(x, rows_perm)
    if spec.norm_offset and "norm.weight" in name:
        x = x + spec.norm_offset
    weights[target] = mx.array(x).astype(target_dtype)


def _quantize(model, config: dict, quant: dict, bits, group_size, report):
    """Re-quantize to `bits` when asked; else record the kept GGUF quantization in the config."""
    from mlx_lm.utils import quantize_model

    from . import gguf as G

    if bits is not None:
        report("quantize", 0, 1)
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, group_size, bits)
        report("quantize", 1, 1)
    elif quant:
        # the most common setting at the top, each module that differs named (mlx_lm.utils.load_model reads
        # config["quantization"][module path] before inferring from the saved shapes)
        top_bits = Counter(q["bits"] for q in quant.values()).most_common(1)[0][0]
        q = {"group_size": G.GROUP_SIZE, "bits": top_bits, "mode": "affine"}
        for p, params in sorted(quant.items()):
            if params["bits"] != top_bits:
                q[p] = params
        config["quantization"] = q
    return model, config


def _write_gguf_tokenizer(path: Path, g, config: dict, build: Path):
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tok = _gguf_tokenizer(path, g)
    except PuddingError:
        raise
    except Exception as e:
        raise PuddingError(f"{path}: transformers could not build the tokenizer from the GGUF metadata ({type(e).__name__}: {first_line(e)})")
    template = g.get("tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    if "max_position_embeddings" in config:
        tok.model_max_length = config["max_position_embeddings"]
    tok.save_pretrained(str(build))


def _gguf_tokenizer(path: Path, g):
    """The fast tokenizer the GGUF metadata describes. transformers' public API first
    (`AutoTokenizer.from_pretrained(folder, gguf_file=...)`, in every transformers version we allow);
    it reads the file through torch, so without torch the fallback builds it from metadata we read
    ourselves with transformers' GGUF tokenizer converters."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError:  # "install torch and gguf to load a GGUF checkpoint"
        return _gguf_tokenizer_without_torch(g)


# transformers' module that maps GGUF tokenizer metadata; private, and it moved between versions
# (transformers.integrations.ggml in 5.17, ...gguf.gguf_tokenizer_mapping in 5.24): used only as the
# torch-free fallback, and a version without it gets one line that says what to install.
def _transformers_version() -> str:
    import transformers

    return transformers.__version__


_GGUF_TOKENIZER_MODULE = "transformers.integrations.gguf.gguf_tokenizer_mapping"


def _gguf_tokenizer_without_torch(g):
    import importlib

    from transformers import PreTrainedTokenizerFast

    try:
        mapping = importlib.import_module(_GGUF_TOKENIZER_MODULE)
        GGUF_TOKENIZER_MAPPING, _SPECIAL_TOKENS, convert_gguf_tokenizer = (
            mapping.GGUF_TOKENIZER_MAPPING, mapping._SPECIAL_TOKENS, mapping.convert_gguf_tokenizer)
    except (ImportError, AttributeError):
        import transformers

        raise PuddingError(f"reading a GGUF tokenizer needs torch with transformers {transformers.__version__} "
                           "(`pip install torch`), or transformers>=5.24 without it") from None

    grouped = {group: {name: g.get(f"tokenizer.{key}") for key, name in renames.items()
                       if g.get(f"tokenizer.{key}") is not None}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":  # as transformers: sentencepiece vocabularies add BOS
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = g.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    fast, extra = convert_gguf_tokenizer(g.need("general.architecture"), tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=fast, **tokenizer_config, **extra)


def _eos_ids(g) -> list:
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in g.meta and int(g.meta[key]) not in ids:
            ids.append(int(g.meta[key]))
    return ids


def _write_generation_config(g, config: dict, build: Path):
    eos = _eos_ids(g)
    gen = {}
    if "bos_token_id" in config:
        gen["bos_token_id"] = config["bos_token_id"]
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if "pad_token_id" in config:
        gen["pad_token_id"] = config["pad_token_id"]
    if len(eos) > 1:  # config.json too: mlx-lm takes the stop tokens from either
        cfg_path = build / "config.json"
        cfg = read_json(cfg_path, "the converted config")
        cfg["eos_token_id"] = eos
        cfg_path.write_text(json.dumps(cfg, indent=4, sort_keys=True))
    (build / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Touch-ups for mlx-lm 0.32 and older tools


def _fix_config(path: Path):
    from mlx_lm.utils import save_config

    cfg = read_json(path, "the converted config")
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if "full_attention" in rp or "sliding_attention" in rp:  # per layer type (gemma3 in transformers 5)
            full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
            if "rope_theta" not in cfg and "rope_theta" in full:
                cfg["rope_theta"] = full["rope_theta"]
            if "rope_local_base_freq" not in cfg and "rope_theta" in local:
                cfg["rope_local_base_freq"] = local["rope_theta"]
            main = full
        else:
            if "rope_theta" not in cfg and "rope_theta" in rp:
                cfg["rope_theta"] = rp["rope_theta"]
            main = rp
        rtype = main.get("rope_type", main.get("type"))
        if rtype not in (None, "default") and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in main.items() if k != "rope_theta"}
    save_config(cfg, path)


def _fix_tokenizer(build: Path):
    tc_path = build / "tokenizer_config.json"
    if not tc_path.is_file():
        return
    tc = read_json(tc_path, "the tokenizer config")
    if tc.get("tokenizer_class") in (None, "TokenizersBackend") and (build / "tokenizer.json").is_file():
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    for junk in ("is_local", "local_files_only"):
        tc.pop(junk, None)
    jinja = build / "chat_template.jinja"
    if "chat_template" not in tc and jinja.is_file():
        tc["chat_template"] = jinja.read_text()  # older transformers read it only from here
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
