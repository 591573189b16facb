"""The bundle: one directory that holds everything `pudding-mlx` needs to serve a model.

    my-bundle/
      pudding.json          the manifest (below)
      config.json, model*.safetensors, tokenizer files
                            a standard mlx-lm model directory: stock `mlx_lm.load` loads the bundle
      router/               optional: the converted router (kept in a subfolder because mlx-lm
                            loads every top-level model*.safetensors as LLM weights)

pudding.json, schema version 1 (version 2 adds "router": {..., "kind": "hidden"} for the hidden-state
router, pudding_mlx.hidden_router; a BERT router's kind is "bert", the default; version 3 adds
"adapters": [{"name": "pool-k3", "path": "adapters/pool-k3"}, ...], the healing adapters, each a folder
of the bundle that says which sets it heals, pudding_mlx.adapters; version 4 adds "adaptive": {"path":
"predictor"}, the loss predictor of adaptive depth, a folder of the bundle as pudding_mlx.adaptive
defines it, read by pudding_mlx.adaptive_router):

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .atomic import write_json
from .errors import PuddingError, first_line
from .jsonio import read_json
from .omission import check_omitted

MANIFEST = "pudding.json"
ROUTER_KINDS = ("bert", "hidden")
FORMAT = "pudding-mlx-bundle"
SCHEMA_VERSION = 1  # what a bundle with a BERT router (or none) is written as
SCHEMA_VERSIONS = (1, 2, 3, 4)  # 2: router.kind "hidden"; 3: healing adapters; 4: a loss predictor (read: all)


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
    # {"mode": "dense" | "routed", "reason": str}: what runs when the user names no set (routing.default_dense)
    default_routing: Optional[dict] = None
    # [{"name": str, "path": str}]: the healing adapters' folders (schema version 3)
    adapters: List[dict] = field(default_factory=list)
    # {"path": str}: the loss predictor's folder (adaptive depth, schema version 4); used only under --max-loss
    adaptive: Optional[dict] = None

    def to_json(self) -> dict:
        version = (4 if self.adaptive else 3 if self.adapters
                   else 2 if self.router is not None and self.router.kind != "bert" else self.schema_version)
        return {
            "format": FORMAT,
            "schema_version": version,
            "num_blocks": self.num_blocks,
            "candidates": [c.to_json() for c in self.candidates],
            "router": None if self.router is None else vars(self.router),
            "provenance": self.provenance,
            **({"default_routing": self.default_routing} if self.default_routing else {}),
            **({"adapters": self.adapters} if self.adapters else {}),
            **({"adaptive": self.adaptive} if self.adaptive else {}),
        }


def is_bundle(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def parse_manifest(data, where: str, llm_blocks: Optional[int] = None) -> Manifest:
    """Validate a manifest's JSON object; `where` names the file in error messages. `llm_blocks`:
    the block count of the LLM beside it, checked before the sets (a wrong `num_blocks` is blamed
    on `num_blocks`, not on the first set it puts out of range)."""

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
    if llm_blocks is not None and n != llm_blocks:
        fail("num_blocks", f"is {n} but the LLM has {llm_blocks} blocks")

    raw = data.get("candidates", [])
    if not isinstance(raw, list):
        fail("candidates", "must be a list")
    candidates = []
    for m, c in enumerate(raw):
        omitted = c.get("omitted") if isinstance(c, dict) else c
        if not isinstance(omitted, list):
            fail(f"candidates[{m}].omitted", "must be a list of 0-based block indices")
        omitted = check_omitted(omitted, n, f"{where}: field 'candidates[{m}].omitted'")
        extra = c if isinstance(c, dict) else {}
        candidates.append(Candidate(omitted, extra.get("task"), extra.get("loss"), extra.get("order")))

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
    default = data.get("default_routing")
    if default is not None:
        if not isinstance(default, dict) or default.get("mode") not in ("dense", "routed") \
                or not isinstance(default.get("reason", ""), str):
            fail("default_routing", 'must be {"mode": "dense" | "routed", "reason": text} or absent')
        if default["mode"] == "dense" and router is None:
            fail("default_routing", "says dense by default, but the bundle has no router to fall back from")
    adapters = data.get("adapters", [])
    if not isinstance(adapters, list):
        fail("adapters", "must be a list")
    for m, a in enumerate(adapters):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not a["name"] \
                or not isinstance(a.get("path"), str) or not a["path"]:
            fail(f"adapters[{m}]", 'must be {"name": text, "path": a folder of the bundle}')
    if adapters and version < 3:
        fail("schema_version", f"is {version}, but 'adapters' needs schema version 3")
    if len({a["name"] for a in adapters}) != len(adapters):
        fail("adapters", "names an adapter twice; give each a name of its own")
    adaptive = data.get("adaptive")
    if adaptive is not None:
        if not isinstance(adaptive, dict) or not isinstance(adaptive.get("path"), str) or not adaptive["path"]:
            fail("adaptive", 'must be {"path": the loss predictor\'s folder in the bundle} or absent')
        if version < 4:
            fail("schema_version", f"is {version}, but 'adaptive' needs schema version 4")
    return Manifest(n, candidates, router, provenance, version, default, adapters, adaptive)


def read_manifest(bundle_dir, llm_blocks: Optional[int] = None) -> Manifest:
    """The bundle's manifest, checked; with `llm_blocks`, also against the LLM's block count."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise PuddingError(f"{path}: no bundle manifest here (is {bundle_dir} a pudding-mlx bundle?)")
    data = read_json(path, "the bundle manifest", "rebuild the bundle with `pudding-mlx convert bundle`", want=None)
    return parse_manifest(data, str(path), llm_blocks)


def config_blocks(model_dir) -> Optional[int]:
    """The LLM's block count from its config.json (`num_hidden_layers`, also under `text_config`);
    None when the file does not say."""
    path = Path(model_dir) / "config.json"
    config = read_json(path, "the LLM's config", "convert the LLM again with `pudding-mlx convert llm`")
    n = config.get("text_config", config).get("num_hidden_layers", config.get("num_hidden_layers"))
    return n if isinstance(n, int) and not isinstance(n, bool) else None


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
    for m, a in enumerate(manifest.adapters):
        if not (bundle_dir / a["path"]).is_dir():
            raise PuddingError(f"{where}: field 'adapters[{m}].path' names {bundle_dir / a['path']}, which does not "
                               "exist; rebuild the bundle")
    if manifest.adaptive is not None and not (bundle_dir / manifest.adaptive["path"]).is_dir():
        raise PuddingError(f"{where}: field 'adaptive.path' names {bundle_dir / manifest.adaptive['path']}, which does "
                           "not exist; rebuild the bundle (`pudding-mlx convert bundle --predictor DIR`)")


def write_manifest(bundle_dir, manifest: Manifest) -> None:
    """Write pudding.json atomically (a temporary file, then rename)."""
    write_json(Path(bundle_dir) / MANIFEST, manifest.to_json(), indent=2)


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
        raise PuddingError(f"{path}: not a readable safetensors file ({first_line(e)}); convert the model again")


def check_safetensors(path) -> None:
    """A safetensors file is as long as its header says: a file cut short (an interrupted copy or
    download) fails here, in one line, not deep inside the first forward pass (weights are lazy)."""
    path = Path(path)
    header = safetensors_header(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    try:
        ends = [meta["data_offsets"][1] for name, meta in header.items() if name != "__metadata__"]
    except (KeyError, TypeError, IndexError) as e:
        raise PuddingError(f"{path}: not a valid safetensors file ({first_line(e)}); download or save it again")
    need, size = 8 + header_len + max(ends, default=0), path.stat().st_size
    if size < need:
        raise PuddingError(f"{path}: truncated ({size} bytes, its header describes {need}); "
                           "download, copy or convert it again")


def check_weights_complete(model_dir) -> None:
    """`check_safetensors` for every model*.safetensors of a model directory."""
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        check_safetensors(path)
