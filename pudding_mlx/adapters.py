"""Healing adapters: LoRA weights that apply only while blocks are skipped.

An adapter is trained (`pudding_mlx.train.heal`, PEFT on PyTorch) for one or more omission sets and
brought here by `pudding-mlx convert adapter`. In a bundle it is a folder:

    adapters/<name>/
      adapter.json          {"format": "pudding-mlx-adapter", "schema_version": 1, "rank": r,
                             "scale": alpha / r, "sets": [[13, 14, 15], ...], "blocks": [4, 5, ...],
                             "source": {...}}
      adapter.safetensors   "layers.<i>.<path>.lora_a" [in, r] and "layers.<i>.<path>.lora_b" [r, out]
                            for each adapted linear of block i (e.g. path "self_attn.q_proj")

A linear with an adapter computes  y = W x + scale * (x @ lora_a) @ lora_b  while that adapter is
active, and exactly W x otherwise: the same module call as before attaching, so the dense model (no
set skipped, no adapter active) stays the stock mlx-lm model, token for token.

Two ways to run the active adapter (`attach(..., fused=)`):
  fused (the default of `load`)  a second copy of each adapted linear with the adapter merged in,
          W' = W + scale * (lora_a @ lora_b)^T, made once at load by mlx-lm's `LoRALinear.fuse`; a
          quantized W is dequantized, merged and quantized again at its group size and at 8 bits or
          more (`fuse_linear`: at 4 bits most of a trained delta rounds away). Decode then runs one
          matmul per linear, as the unhealed set does, for the memory of a second, 8-bit copy of the
          adapted linears (W' carries its own rounding: it is W + delta to 8-bit precision).
  LoRA terms  the two small matmuls beside W at every call: no extra memory, exact to the adapter, but
          on a GPU at batch 1 the extra kernels cost more than the skipped blocks save (H100: 0.40x
          decode speed; results/qwen2.5-coder-1.5b/heal/mlx-out).

Which adapter runs is decided by the omission set alone (`adapter_for`): the adapter whose `sets`
list holds it, else none (that set runs unhealed). `SkipView` looks it up when it is made and makes it
active for the duration of each call (under the view's lock, as it swaps the layer list), so every
path that runs a set through a view (generate, chat, eval, bench, serve, the lossless draft) is healed
without knowing about adapters; `SkipView(model, s, healed=False)` runs the set unhealed.

An adapter changes what every block it touches computes. The chat cache rule therefore treats a
change of adapter like a change of set at the first block either adapter touches (`first_block`),
and the free routed prefill, which runs blocks 0..after before the set is known, needs adapters
that leave those blocks alone (`check_routable`).
"""

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from .errors import PuddingError, first_line
from .jsonio import field_checker, read_json
from .omission import check_omitted

FORMAT = "pudding-mlx-adapter"
SCHEMA_VERSION = 1
SETTINGS_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
REDO = "convert the adapter again with `pudding-mlx convert adapter`"


@dataclass
class Adapter:
    name: str
    path: Path
    rank: int
    scale: float
    sets: List[tuple]
    weights: Dict[str, mx.array]  # "layers.<i>.<path>.lora_a" / ".lora_b"
    source: dict = field(default_factory=dict)

    @property
    def blocks(self) -> List[int]:
        return sorted({int(k.split(".")[1]) for k in self.weights})

    def modules(self) -> List[Tuple[int, str]]:
        """(block, module path) of every adapted linear."""
        return sorted({(int(k.split(".")[1]), k.split(".", 2)[2].rsplit(".", 1)[0]) for k in self.weights})


def linear_dims(linear) -> Tuple[int, int]:
    """(in, out) of an nn.Linear or nn.QuantizedLinear."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


def submodule(block, path: str):
    """`block`'s module at the dotted `path` (e.g. "self_attn.q_proj"), or None."""
    m = block
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def read_adapter(folder, layers: Sequence[nn.Module], name: Optional[str] = None) -> Adapter:
    """Read and check an adapter folder against the model's blocks `layers`: every bad field or tensor
    is one line naming the file and what to do."""
    folder = Path(folder)
    where = folder / SETTINGS_FILE
    s = read_json(where, "the adapter's settings", REDO)

    need = field_checker(s, where)

    need("format", lambda v: v == FORMAT, repr(FORMAT))
    need("schema_version", lambda v: v == SCHEMA_VERSION,
         f"{SCHEMA_VERSION} (upgrade pudding-mlx, or {REDO})")
    rank = need("rank", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
    scale = need("scale", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
    raw_sets = need("sets", lambda v: isinstance(v, list) and v and all(isinstance(x, list) and x for x in v),
                    "a non-empty list of non-empty omission sets")
    sets = [check_omitted(x, len(layers), f"{where}: field 'sets[{m}]'") for m, x in enumerate(raw_sets)]
    wpath = folder / WEIGHTS_FILE
    try:
        weights = mx.load(str(wpath))
    except Exception as e:
        raise PuddingError(f"{wpath}: not a readable safetensors file ({first_line(e)}); {REDO}") from None
    if not weights:
        raise PuddingError(f"{wpath}: holds no tensors; {REDO}")
    for key, w in weights.items():
        parts = key.split(".")
        if len(parts) < 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[-1] not in ("lora_a", "lora_b"):
            raise PuddingError(f"{wpath}: tensor {key!r} is not named 'layers.<block>.<module>.lora_a|lora_b'; {REDO}")
        block, path = int(parts[1]), ".".join(parts[2:-1])
        if block >= len(layers):
            raise PuddingError(f"{wpath}: tensor {key!r} is for block {block}, but the model has {len(layers)} blocks; "
                               "the adapter was trained for another model")
        linear = submodule(layers[block], path)
        if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
            raise PuddingError(f"{wpath}: tensor {key!r} names {path}, which block {block} of this model does not "
                               "have as a linear layer; the adapter was trained for another model")
        in_dims, out_dims = linear_dims(linear)
        want = (in_dims, rank) if parts[-1] == "lora_a" else (rank, out_dims)
        if tuple(w.shape) != want:
            raise PuddingError(f"{wpath}: tensor {key!r} is {list(w.shape)}, but block {block}'s {path} takes "
                               f"{in_dims} -> {out_dims} at rank {rank}, so {list(want)} was expected; "
                               "the adapter was trained for another model")
        partner = ".".join(parts[:-1] + ["lora_b" if parts[-1] == "lora_a" else "lora_a"])
        if partner not in weights:
            raise PuddingError(f"{wpath}: tensor {key!r} has no {partner!r} beside it; {REDO}")
    return Adapter(name or folder.name, folder, rank, float(scale), sets, weights, s.get("source", {}))


def write_adapter(folder, rank: int, scale: float, sets: Sequence[Sequence[int]], weights: Dict[str, mx.array],
                  source: Optional[dict] = None, force: bool = False) -> None:
    """Write an adapter folder (adapter.json + adapter.safetensors) atomically: a `building` folder, renamed
    (an existing folder is replaced only with `force`)."""
    from .atomic import building, write_json

    with building(Path(folder), force) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": FORMAT})
        write_json(tmp / SETTINGS_FILE, {"format": FORMAT, "schema_version": SCHEMA_VERSION, "rank": int(rank),
                                         "scale": float(scale), "sets": [sorted(int(b) for b in s) for s in sets],
                                         "blocks": sorted({int(k.split(".")[1]) for k in weights}),
                                         "source": source or {}})


# -- the switchable linear ------------------------------------------------------------------------------


class _Active:
    """The one mutable piece of state: which adapter runs now (None: none). Shared by every switch."""

    def __init__(self):
        self.name: Optional[str] = None


class _LoRA:
    """A plain holder, so the adapters' arrays (and fused copies) stay out of the model's parameters."""

    def __init__(self):
        self.by_name: Dict[str, Tuple[mx.array, mx.array, float]] = {}
        self.fused: Dict[str, nn.Module] = {}


FUSED_MIN_BITS = 8


def quantized_copy_bytes(d_in: int, d_out: int, bits: int = FUSED_MIN_BITS, group_size: int = 64) -> int:
    """The bytes of a fused copy of a quantized d_in -> d_out linear: `bits` per weight plus a float16
    scale and bias per group of `group_size` (`info` estimates with the defaults, without the model)."""
    return d_in * d_out * bits // 8 + d_out * (d_in // group_size) * 4


def fused_bytes(layers: Sequence[nn.Module], adapters: Sequence[Adapter]) -> int:
    """About the memory `attach(..., fused=True)` adds: one copy per adapted linear and adapter, at
    FUSED_MIN_BITS bits and the base's group size (`quantized_copy_bytes`), or in the base's float dtype
    when it is not quantized."""
    total = 0
    for adapter in adapters:
        for block, path in adapter.modules():
            linear = submodule(layers[block], path)
            linear = getattr(linear, "base", linear)  # already wrapped by an earlier attach
            d_in, d_out = linear_dims(linear)
            if isinstance(linear, nn.QuantizedLinear):
                total += quantized_copy_bytes(d_in, d_out, max(linear.bits, FUSED_MIN_BITS), linear.group_size)
            else:
                total += d_in * d_out * linear.weight.dtype.size
    return total


def fuse_linear(base: nn.Module, a: mx.array, b: mx.array, scale: float) -> nn.Module:
    """`base` with the LoRA term merged in (module doc, "fused"), by mlx-lm's LoRALinear.fuse. A quantized
    base's copy is quantized again at its group size and mode but at FUSED_MIN_BITS bits at least: the
    delta of a trained adapter is small against a 4-bit step, and a 4-bit copy rounds most of it away
    (tests/test_adapters.py measures both)."""
    from mlx_lm.tuner.lora import LoRALinear

    lora = LoRALinear.from_base(base, r=a.shape[1], scale=scale)
    lora.lora_a, lora.lora_b = a, b
    fused = lora.fuse(dequantize=True)
    if isinstance(base, nn.QuantizedLinear):
        fused = nn.QuantizedLinear.from_linear(fused, base.group_size, max(base.bits, FUSED_MIN_BITS), mode=base.mode)
    mx.eval(fused.parameters())  # made now, once, not inside the first request
    return fused


class LoRASwitch(nn.Module):
    """A linear layer with any number of named LoRA adapters, at most one active."""

    def __init__(self, base: nn.Module, active: _Active):
        super().__init__()
        self.base = base
        self._active = active
        self._lora = _LoRA()

    def __call__(self, x):
        name = self._active.name
        if name is None:
            return self.base(x)
        fused = self._lora.fused.get(name)
        if fused is not None:
            return fused(x)
        y = self.base(x)
        lora = self._lora.by_name.get(name)
        if lora is None:
            return y
        a, b, scale = lora
        # one fused op for y + scale * (x A) B: at decode every op beside the base matmul is overhead
        return mx.addmm(y, x @ a.astype(x.dtype), b.astype(x.dtype), alpha=scale)


@dataclass
class Registry:
    """What `attach` put on a model: the adapters by name and which set runs under which adapter."""
    active: _Active
    adapters: Dict[str, Adapter]
    by_set: Dict[tuple, str]


def registry(model) -> Optional[Registry]:
    from .skip import decoder

    return getattr(decoder(model), "_pudding_adapters", None)


def attach(model, adapters: Sequence[Adapter], dtype=None, fused: bool = False) -> Registry:
    """Wrap every linear that an adapter touches in a `LoRASwitch` and record which set runs under
    which adapter; `fused`: also make each linear's merged copy (module doc). A set named by two
    adapters is refused (one line). Idempotent per adapter name."""
    from .skip import decoder

    inner = decoder(model)
    reg = registry(model)
    if reg is None:
        reg = Registry(_Active(), {}, {})
        inner._pudding_adapters = reg
    for adapter in adapters:
        for s in adapter.sets:
            other = reg.by_set.get(tuple(s))
            if other is not None and other != adapter.name:
                raise PuddingError(f"{adapter.path}: set {list(s)} is also healed by adapter {other!r}; "
                                   "give each omission set at most one adapter")
        for block, path in adapter.modules():
            parent_path, _, leaf = path.rpartition(".")
            parent = submodule(inner.layers[block], parent_path) if parent_path else inner.layers[block]
            module = getattr(parent, leaf)
            if not isinstance(module, LoRASwitch):
                module = LoRASwitch(module, reg.active)
                setattr(parent, leaf, module)
            a = adapter.weights[f"layers.{block}.{path}.lora_a"]
            b = adapter.weights[f"layers.{block}.{path}.lora_b"]
            if dtype is not None:
                a, b = a.astype(dtype), b.astype(dtype)
            module._lora.by_name[adapter.name] = (a, b, adapter.scale)
            if fused:
                module._lora.fused[adapter.name] = fuse_linear(module.base, a, b, adapter.scale)
        reg.adapters[adapter.name] = adapter
        for s in adapter.sets:
            reg.by_set[tuple(s)] = adapter.name
    return reg


def adapter_for(model, omitted: Sequence[int]) -> Optional[str]:
    """The adapter that heals the set `omitted` on this model, or None (dense, or a set no adapter names)."""
    reg = registry(model)
    if reg is None or not omitted:
        return None
    return reg.by_set.get(tuple(sorted(int(b) for b in omitted)))


def first_block(model, *names: Optional[str]) -> Optional[int]:
    """The first block any of the named adapters touches (None when none touches any)."""
    reg = registry(model)
    blocks = [b for n in names if n is not None and reg is not None for b in reg.adapters[n].blocks]
    return min(blocks) if blocks else None


def check_routable(model, after: int, where: str) -> None:
    """The free routed prefill runs blocks 0..after before the set (and its adapter) is known: every
    adapter must leave them alone."""
    reg = registry(model)
    for adapter in (reg.adapters.values() if reg is not None else ()):
        if adapter.blocks and adapter.blocks[0] <= after:
            raise PuddingError(f"{where}: adapter {adapter.name!r} changes block {adapter.blocks[0]}, which the "
                               f"router reads after (block {after}); train it without blocks 0..{after}")


@contextlib.contextmanager
def using(model, name: Optional[str]):
    """Make the adapter `name` (or none) active for the calls inside; the previous state after. Callers
    hold the view lock (`pudding_mlx.skip`): the state is shared by every view of the model."""
    reg = registry(model)
    if reg is None:
        if name is not None:
            raise PuddingError(f"adapter {name!r} is not attached to this model")
        yield
        return
    saved, reg.active.name = reg.active.name, name
    try:
        yield
    finally:
        reg.active.name = saved
