"""The bundle: one directory that holds everything `pudding-mlx` needs to serve a model.

    my-bundle/
      pudding.json          the manifest (below)
      config.json, model*.safetensors, tokenizer files
                            a standard mlx-lm model directory: stock `mlx_lm.load` loads the bundle
      router/               optional: the converted router (kept in a subfolder because mlx-lm
                            loads every top-level model*.safetensors as LLM weights)

pudding.json, schema version 1 (version 2 adds "router": {..., "kind": "hidden"} for the hidden-state
router, pudding_mlx.hidden_router; a BERT router's kind is "bert", the default):

    {
      "format": "pudding-mlx-bundle",
      "schema_version": 1,
      "num_blocks": 30,
      "candidates": [
        {"omitted": [3, 7, 21], "task": "arc_easy", "loss": "likelihood", "order": [21, 3, 7]},
        ...
      ],
      "router": {"path": "router", "max_tokens": 512, "lowercase": true},
      "provenance": {"source_model": "...", "tasks": [...], "losses": [...], "k": 3}
    }

`candidates[m].omitted` are 0-based block indices; the router's output m scores candidate m.
`router` is null (or absent) for a bundle used only with --dense / --omit.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from numbers import Integral
from typing import Iterable, List, Optional

from .errors import PuddingError

MANIFEST = "pudding.json"
ROUTER_KINDS = ("bert", "hidden")
FORMAT = "pudding-mlx-bundle"
SCHEMA_VERSION = 1  # what a bundle with a BERT router (or none) is written as
SCHEMA_VERSIONS = (1, 2)  # 2: router.kind "hidden" (read: both)


@dataclass
class Candidate:
    omitted: tuple
    task: Optional[str] = None
    loss: Optional[str] = None
    order: Optional[list] = None

    def to_json(self) -> dict:
        out = {"omitted": list(self.omitted)}
        for key in ("task", "loss", "order"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class RouterSettings:
    path: str = "router"
    max_tokens: int = 512
    lowercase: bool = True
    kind: str = "bert"  # "bert": a BERT encoder + head (pudding_mlx.router); "hidden": the LLM's own
    #                     hidden state + a linear head (pudding_mlx.hidden_router); schema version 2


@dataclass
class Manifest:
    num_blocks: int
    candidates: List[Candidate] = field(default_factory=list)
    router: Optional[RouterSettings] = None
    provenance: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "schema_version": 2 if self.router is not None and self.router.kind != "bert" else self.schema_version,
            "num_blocks": self.num_blocks,
            "candidates": [c.to_json() for c in self.candidates],
            "router": None if self.router is None else vars(self.router),
            "provenance": self.provenance,
        }


def check_omitted(omitted: Iterable[int], n_blocks: int, what: str = "omission set") -> tuple:
    """Validate a set of 0-based block indices against a model of `n_blocks` blocks; return it
    sorted. Shared by the MLX runtime and the PyTorch side (this module imports neither)."""
    omitted = list(omitted)
    for i in omitted:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise PuddingError(f"{what}: block index {i!r} is not an integer")
        if not 0 <= i < n_blocks:
            raise PuddingError(
                f"{what}: block index {i} is out of range; the model has blocks 0..{n_blocks - 1}"
            )
    omitted = [int(i) for i in omitted]
    if len(set(omitted)) != len(omitted):
        dup = sorted({i for i in omitted if omitted.count(i) > 1})
        raise PuddingError(f"{what}: block indices {dup} are repeated (appear more than once)")
    if len(omitted) >= n_blocks:
        raise PuddingError(f"{what}: omits all {n_blocks} blocks; at least one must run")
    return tuple(sorted(omitted))


def is_bundle(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def parse_manifest(data, where: str) -> Manifest:
    """Validate a manifest's JSON object; `where` names the file in error messages."""

    def fail(field_name, problem):
        raise PuddingError(f"{where}: field '{field_name}' {problem}")

    if not isinstance(data, dict):
        raise PuddingError(f"{where}: the manifest must be a JSON object")
    if data.get("format") != FORMAT:
        fail("format", f"must be {FORMAT!r}, got {data.get('format')!r}")
    version = data.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        fail(
            "schema_version",
            f"is {version!r}; this pudding-mlx reads versions {', '.join(map(str, SCHEMA_VERSIONS))} "
            "(upgrade pudding-mlx or rebuild the bundle)",
        )
    n = data.get("num_blocks")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        fail("num_blocks", f"must be a positive integer, got {n!r}")

    raw = data.get("candidates", [])
    if not isinstance(raw, list):
        fail("candidates", "must be a list")
    candidates = []
    for m, c in enumerate(raw):
        name = f"candidates[{m}].omitted"
        omitted = c.get("omitted") if isinstance(c, dict) else c
        if not isinstance(omitted, list):
            fail(name, "must be a list of 0-based block indices")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in omitted):
            fail(name, f"must hold integers only, got {omitted}")
        bad = [i for i in omitted if not 0 <= i < n]
        if bad:
            fail(name, f"has block indices {bad} out of range 0..{n - 1}")
        if len(set(omitted)) != len(omitted):
            fail(name, f"repeats block indices: {omitted}")
        if len(omitted) >= n:
            fail(name, f"omits all {n} blocks; at least one must run")
        extra = c if isinstance(c, dict) else {}
        candidates.append(
            Candidate(tuple(sorted(omitted)), extra.get("task"), extra.get("loss"), extra.get("order"))
        )

    router = data.get("router")
    if router is not None:
        if not isinstance(router, dict):
            fail("router", "must be an object or null")
        settings = RouterSettings(**{k: router[k] for k in ("path", "max_tokens", "lowercase", "kind") if k in router})
        if settings.kind not in ROUTER_KINDS:
            fail("router.kind", f"must be one of {', '.join(ROUTER_KINDS)}, got {settings.kind!r}")
        if settings.kind != "bert" and version < 2:
            fail("schema_version", f"is {version}, but router.kind {settings.kind!r} needs schema version 2")
        if not isinstance(settings.path, str) or not settings.path:
            fail("router.path", "must be a relative folder name")
        if isinstance(settings.max_tokens, bool) or not isinstance(settings.max_tokens, int) or settings.max_tokens < 2:
            fail("router.max_tokens", f"must be an integer >= 2, got {settings.max_tokens!r}")
        if not candidates:
            fail("candidates", "is empty, but a router needs one candidate set per output")
        router = settings
    provenance = data.get("provenance", {})
    if not isinstance(provenance, dict):
        fail("provenance", "must be an object")
    return Manifest(n, candidates, router, provenance, version)


def read_manifest(bundle_dir) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise PuddingError(f"{path}: no bundle manifest here (is {bundle_dir} a pudding-mlx bundle?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PuddingError(f"{path}: malformed JSON ({e}); rebuild the bundle with `pudding-mlx convert bundle`")
    return parse_manifest(data, str(path))


def check_bundle_files(bundle_dir, manifest: Manifest, llm_blocks: Optional[int] = None) -> None:
    """Check what the manifest promises against the files and the LLM it sits beside."""
    bundle_dir = Path(bundle_dir)
    where = bundle_dir / MANIFEST
    if not (bundle_dir / "config.json").is_file():
        raise PuddingError(f"{bundle_dir / 'config.json'}: missing; the bundle holds no LLM")
    if not list(bundle_dir.glob("model*.safetensors")):
        raise PuddingError(f"{bundle_dir}: no model*.safetensors; the bundle's LLM weights are missing")
    if llm_blocks is not None and llm_blocks != manifest.num_blocks:
        raise PuddingError(
            f"{where}: field 'num_blocks' is {manifest.num_blocks} but the LLM has {llm_blocks} blocks"
        )
    if manifest.router is not None:
        rdir = bundle_dir / manifest.router.path
        if not rdir.is_dir():
            raise PuddingError(f"{where}: field 'router.path' names {rdir}, which does not exist")


def write_manifest(bundle_dir, manifest: Manifest) -> None:
    """Write pudding.json atomically (a temporary file, then rename)."""
    path = Path(bundle_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > path.stat().st_size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return header
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PuddingError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:200]}); convert the model again")
