"""Load what MODEL names: a pudding-mlx bundle, a plain mlx-lm model directory, or a hub id.

Weights stay lazy (`mlx_lm.load(..., lazy=True)`): nothing is read from disk until a block runs, so
a block that a request omits is never materialised.

dtype: on the MLX CPU backend bfloat16/float16 matmuls are very slow (a 256-token prefill of a
16-layer, 512-wide model took 6 s in bf16), so by default floating weights are cast to float32 there;
on Metal and CUDA the stored dtype is kept. `dtype=` overrides both.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import hub
from .adapters import attach, check_routable, read_adapter
from .bundle import (Manifest, check_bundle_files, check_weights_complete, config_blocks, is_bundle,
                     read_manifest)
from .errors import PuddingError, first_line
from .skip import num_blocks

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    path: Path
    manifest: Optional[Manifest] = None  # None for a plain model directory
    router: object = None  # pudding_mlx.router.Router when the bundle has one
    # the bundle's reason to run dense when the user names no set (its manifest's default_routing), unless
    # load(routed=True); None: route by default (routing.fixed_choice)
    dense_by_default: Optional[str] = None
    adapters: list = field(default_factory=list)  # the healing adapters attached (pudding_mlx.adapters.Adapter)

    @property
    def n_blocks(self) -> int:
        return num_blocks(self.model)


def backend() -> str:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def default_dtype() -> Optional[mx.Dtype]:
    """float32 on the CPU backend (bf16 is very slow there); the stored dtype elsewhere."""
    return mx.float32 if backend() == "cpu" else None


def resolve(model: str) -> Path:
    """A local directory as is; otherwise a hub id through mlx-lm's own download (cache first)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PuddingError(f"{path}: not a directory; MODEL must be a bundle, an mlx-lm model directory or a hub id (convert a GGUF file with `pudding-mlx convert llm`)")
        return path
    if not hub.is_hub_id(model):
        raise PuddingError(f"{model}: no such directory, and not a hub id of the form owner/name")
    local = hub.cached(model)  # the local cache first: no network round trip for a model already here
    if local is not None:
        return local
    hub.check_may_fetch(model)
    from mlx_lm.utils import _download

    try:
        return Path(_download(model))
    except Exception as e:
        raise PuddingError(f"{model}: could not fetch it from the hub ({type(e).__name__}: {first_line(e)}); pass a local directory instead")


def read_model_dir(path: Path) -> Optional[Manifest]:
    """Check what a model directory promises before any weight is touched: a bundle's manifest
    (against the LLM's block count in config.json) and files, or a plain mlx-lm directory's
    config.json. Returns the manifest (None for a plain directory)."""
    if not is_bundle(path):
        if not (path / "config.json").is_file():
            raise PuddingError(f"{path}: no config.json and no pudding.json; not an mlx-lm model directory or a bundle")
        return None
    manifest = read_manifest(path, llm_blocks=config_blocks(path) if (path / "config.json").is_file() else None)
    check_bundle_files(path, manifest)
    return manifest


def load(model: str, dtype: Optional[str] = None, lazy: bool = True, with_router: bool = True,
         check_memory: bool = True, routed: bool = False, healed: bool = True,
         max_loss: Optional[float] = None, lora_terms: bool = False) -> Loaded:
    """Load MODEL (bundle, mlx-lm directory or hub id) with its tokenizer, manifest, router and healing
    adapters. check_memory: refuse, in one line, weights that alone exceed the device's memory. routed:
    route even where the bundle's default is dense (the user's --routed). healed=False: leave the
    bundle's adapters off (the user's --unhealed). lora_terms: run them as LoRA terms beside each weight
    instead of merged copies (the user's --lora-terms; `adapters` module doc). max_loss: adaptive depth (the user's --max-loss): the
    bundle's loss predictor is the router, choosing under this budget (`adaptive_router`); it routes
    even where the bundle's default is dense, and a bundle without a predictor is refused in one line."""
    from mlx_lm.utils import load as mlx_lm_load

    from .weights import check_fits

    path = resolve(str(model))
    manifest = read_model_dir(path)
    if max_loss is not None:
        from .adaptive_router import check_max_loss

        check_max_loss(max_loss)
        if manifest is None or manifest.adaptive is None:
            raise PuddingError(f"{path}: --max-loss needs a bundle with a loss predictor (pudding.json has no "
                               "'adaptive' entry); add one with `pudding-mlx convert bundle --predictor DIR`")
        routed = True
    if dtype is not None and dtype not in DTYPES:
        raise PuddingError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype] if dtype else default_dtype()
    check_weights_complete(path)
    weights_bytes = None  # what the weights take once loaded, where checked: the fused adapters add to it
    if check_memory and list(path.glob("model*.safetensors")):
        weights_bytes = check_fits(path, target.size if target is not None else None)["loaded_bytes"]
    try:
        model_obj, tokenizer = mlx_lm_load(str(path), lazy=lazy)
    except FileNotFoundError as e:
        raise PuddingError(f"{path}: {e}")
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise PuddingError(f"{path}: the model could not be loaded ({first_line(e)})")
    if target is not None:
        model_obj.set_dtype(target)  # lazy: a cast is only computed for blocks that run
    loaded = Loaded(model_obj, tokenizer, path, manifest)
    if manifest is not None:
        check_bundle_files(path, manifest, llm_blocks=loaded.n_blocks)
        if healed and manifest.adapters:
            loaded.adapters = attach_bundle_adapters(model_obj, path, manifest, fused=not lora_terms,
                                                     weights_bytes=weights_bytes)
        if max_loss is not None and with_router:  # the loss predictor stands where the router stands
            from .adaptive_router import load_adaptive_router

            loaded.router = load_adaptive_router(path / manifest.adaptive["path"], model_obj, tokenizer,
                                                 [c.omitted for c in manifest.candidates], max_loss)
            check_routable(model_obj, loaded.router.after, str(path / "pudding.json"))
        elif with_router and manifest.router is not None and manifest.router.kind == "hidden":
            from .hidden_router import load_hidden_router

            loaded.router = load_hidden_router(path / manifest.router.path, model_obj, tokenizer,
                                               num_outputs=len(manifest.candidates))
            if [tuple(sorted(s)) for s in loaded.router.sets] != [c.omitted for c in manifest.candidates]:
                raise PuddingError(f"{path / manifest.router.path}/router.json: field 'sets' differs from the "
                                   "bundle's candidates; rebuild the bundle with the candidates the router was trained on")
            check_routable(model_obj, loaded.router.after, str(path / "pudding.json"))
        elif with_router and manifest.router is not None:
            from .router import load_router

            loaded.router = load_router(path / manifest.router.path, num_outputs=len(manifest.candidates))
        default = manifest.default_routing or {}
        if loaded.router is not None and default.get("mode") == "dense" and not routed:
            loaded.dense_by_default = default.get("reason") or "the bundle runs dense by default"
    return loaded


def attach_bundle_adapters(model, path: Path, manifest: Manifest, fused: bool = True,
                           weights_bytes: Optional[int] = None) -> list:
    """Read the bundle's adapters (each checked against the model, one line per fault) and attach them,
    in the dtype the model computes in; fused: as merged copies of the adapted linears, refused in one
    line (before any is made) when the weights (`weights_bytes`, where the caller checked them) and the
    copies would not fit the device's memory."""
    from .adapters import fused_bytes
    from .skip import decoder
    from .weights import memory_size

    layers = decoder(model).layers
    adapters = [read_adapter(path / a["path"], layers, a["name"]) for a in manifest.adapters]
    if fused and weights_bytes is not None:
        extra, limit, weights = fused_bytes(layers, adapters), memory_size(), weights_bytes
        if limit and weights + extra > limit:
            raise PuddingError(f"{path}: the healing adapters' merged copies need about {extra / 1e9:.1f} GB beside "
                               f"the weights' {weights / 1e9:.1f} GB, and this device has {limit / 1e9:.1f} GB; "
                               "pass --lora-terms (no extra memory, slower) or --unhealed")
    embed = decoder(model).embed_tokens
    dtype = getattr(embed, "scales", None)
    dtype = (dtype if dtype is not None else embed.weight).dtype
    attach(model, adapters, dtype=dtype, fused=fused)
    return adapters
