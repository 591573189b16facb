"""What a bundle or an mlx-lm model directory holds, for `pudding-mlx info`: read from config files
and safetensors headers only (no weights are loaded), checked as `load` checks it."""

import math
from pathlib import Path

from .errors import PuddingError
from .jsonio import read_json
from .load import read_model_dir
from .weights import weights_summary


def model_info(path: Path) -> dict:
    """Everything `pudding-mlx info` reports, from config files and safetensors headers."""
    manifest = read_model_dir(path)  # a bundle's num_blocks checked against the LLM, as `load` does
    config_path = path / "config.json"
    if not config_path.is_file():
        raise PuddingError(f"{config_path}: missing; the bundle holds no LLM")
    config = read_json(config_path, "the LLM's config", "convert the LLM again")
    weights = weights_summary(path)
    out = {"path": str(path), "kind": "mlx-lm" if manifest is None else "bundle",
           **llm_info(config, weights), "candidates": None, "router": None, "provenance": None}
    rdir = None
    if manifest is not None:
        out["candidates"] = {"count": len(manifest.candidates),
                             "sets": [list(c.omitted) for c in manifest.candidates],
                             "sources": [[c.task, c.loss] for c in manifest.candidates]}
        out["provenance"] = manifest.provenance or None
        if manifest.router is not None:
            rdir = path / manifest.router.path
            out["router"] = router_info(rdir, manifest.router.max_tokens)
        out["adapters"] = [adapter_info(path / a["path"], a["name"]) for a in manifest.adapters]
        if manifest.adaptive is not None:
            out["predictor"] = predictor_info(path / manifest.adaptive["path"], config)
    out["disk"] = disk_use(path, weights["files"], rdir)
    return out


def adapter_info(folder: Path, name: str) -> dict:
    """A healing adapter: the sets it heals, its rank and blocks, its size (settings and header only)."""
    from .adapters import SETTINGS_FILE, WEIGHTS_FILE, quantized_copy_bytes
    from .bundle import safetensors_header

    s = read_json(folder / SETTINGS_FILE, "the adapter's settings", "rebuild the bundle")
    header = {k: v for k, v in safetensors_header(folder / WEIGHTS_FILE).items() if k != "__metadata__"}
    n = sum(math.prod(v["shape"]) for v in header.values())
    # the merged copies a fused load makes of a quantized model (pudding_mlx.adapters.fused_bytes), estimated
    # from the adapter's shapes alone: lora_a is [in, r], lora_b [r, out]
    fused = sum(quantized_copy_bytes(v["shape"][0], header[k[:-len("lora_a")] + "lora_b"]["shape"][1])
                for k, v in header.items() if k.endswith("lora_a") and k[:-len("lora_a")] + "lora_b" in header)
    return {"name": name, "sets": s.get("sets"), "rank": s.get("rank"), "blocks": s.get("blocks"),
            "modules": len(header) // 2, "parameters": n, "fused_bytes": fused}


def predictor_info(folder: Path, config: dict) -> dict:
    """The loss predictor (adaptive depth): its sets and depths, where it reads, its loss unit, its
    trained default budget (the runtime's default is off: only --max-loss runs it), checked as `load`
    reads it (a small file)."""
    from .adaptive import read_predictor

    p = read_predictor(folder, hidden_size=config.get("text_config", config).get("hidden_size"))
    return {"path": str(folder), "sets": [sorted(s) for s in p.sets], "ks": sorted({len(s) for s in p.sets}),
            "after": p.after, "pooling": p.pooling, "max_tokens": p.max_tokens, "loss": p.settings.get("loss"),
            "default_max_loss": p.default_max_loss, "runtime_default": None}


def llm_info(config: dict, weights: dict) -> dict:
    """The architecture (config.json), sizes (safetensors headers) and quantization of the LLM."""
    text = config.get("text_config", config)
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict):
        overrides = {k: v for k, v in quant.items() if isinstance(v, dict)}
        quant = {k: v for k, v in quant.items() if not isinstance(v, dict)}
        if overrides:
            quant["overrides"] = overrides
    return {
        "model_type": config.get("model_type"),
        "blocks": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "intermediate_size": text.get("intermediate_size"),
        "attention_heads": text.get("num_attention_heads"),
        "kv_heads": text.get("num_key_value_heads"),
        "vocab_size": text.get("vocab_size"),
        "context": text.get("max_position_embeddings"),
        "parameters": weights["parameters"],
        "weights_bytes": weights["bytes"],
        "tensors": weights["tensors"],
        "dtypes": weights["dtypes"],
        "quantization": quant or None,
    }


def router_info(rdir: Path, max_tokens: int) -> dict:
    """The converted router: what its settings name (the encoder), its shape and size; for a
    hidden-state router, the block it reads, its pooling, head and decision rule."""
    settings = read_json(rdir / "router.json", "the router settings", "rebuild the bundle")
    if settings.get("kind") == "hidden":
        head = rdir / "head.safetensors"
        return {"kind": "hidden", "path": str(rdir), "after": settings.get("after"),
                "pooling": settings.get("pooling"), "outputs": len(settings.get("sets", [])),
                "objective": settings.get("objective"), "fallback": settings.get("fallback"),
                "margin": settings.get("margin"), "margin_is": settings.get("margin_is"),
                "max_tokens": settings.get("max_tokens", max_tokens),
                "weights_bytes": head.stat().st_size if head.is_file() else 0}
    rconfig = read_json(rdir / "config.json", "the router's encoder config", "rebuild the bundle")
    rweights = weights_summary(rdir)
    return {"kind": "bert", "path": str(rdir), "encoder": settings.get("encoder"), "outputs": settings.get("num_outputs"),
            "max_tokens": settings.get("max_length", max_tokens),
            "lowercase": settings.get("lowercase"), "pooling": settings.get("pooling"),
            "hidden_size": rconfig.get("hidden_size"), "layers": rconfig.get("num_hidden_layers"),
            "parameters": rweights["parameters"], "weights_bytes": rweights["bytes"]}


def disk_use(path: Path, weight_files, rdir=None) -> dict:
    """Bytes on disk: the whole folder, the LLM weights, the router, the tokenizer, the rest."""
    llm_files = [path / f for f in weight_files] + sorted(path.glob("model*.safetensors.index.json"))
    tok_files = [f for f in path.iterdir() if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens"))
                                                              or f.name in ("vocab.json", "merges.txt", "chat_template.jinja"))]
    disk = {"llm_weights": sum(f.stat().st_size for f in llm_files),
            "tokenizer": sum(f.stat().st_size for f in tok_files),
            "router": _du(rdir) if rdir is not None else 0}
    disk["total"] = _du(path)
    disk["other"] = disk["total"] - disk["llm_weights"] - disk["tokenizer"] - disk["router"]
    return disk


def _du(path: Path) -> int:
    """Bytes of the files under `path` (symlinks not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_symlink() or f.is_file())
