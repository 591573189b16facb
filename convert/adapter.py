"""A PEFT LoRA adapter (what `pudding-mlx train heal` writes) to the runtime's adapter folder
(`pudding_mlx.adapters`).

    convert_adapter("runs/heal/pool-k3", "pool-k3-mlx")

PEFT stores lora_A [r, in] and lora_B [out, r] per linear as `...layers.<i>.<module>.lora_A.weight`; the
runtime computes x @ lora_a @ lora_b, so lora_a = A^T and lora_b = B^T, with the scale alpha / r
(alpha / sqrt(r) for rsLoRA). The sets an adapter heals come from heal.json beside it (or `sets=`).
Only plain LoRA on linear layers converts: DoRA, per-module ranks, trained biases or extra trained
modules are refused in one line, since the runtime would silently compute something else.
Read with MLX (bf16 included), no torch.
"""

import re
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx

from pudding_mlx.adapters import FORMAT, SETTINGS_FILE, write_adapter
from pudding_mlx.errors import PuddingError, first_line
from pudding_mlx.jsonio import read_json

PEFT_CONFIG, PEFT_WEIGHTS, HEAL_FILE = "adapter_config.json", "adapter_model.safetensors", "heal.json"
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def is_runtime_adapter(folder) -> bool:
    f = Path(folder) / SETTINGS_FILE
    return f.is_file() and read_json(f, "the adapter's settings").get("format") == FORMAT


def read_peft(folder, sets: Optional[Sequence[Sequence[int]]] = None):
    """(rank, scale, weights in the runtime's naming, sets, source) of a PEFT LoRA folder."""
    folder = Path(folder)
    config_path = folder / PEFT_CONFIG
    if not config_path.is_file():
        raise PuddingError(f"{folder}: no {PEFT_CONFIG}; give a PEFT LoRA folder (`pudding-mlx train heal` "
                           "writes one) or a converted adapter")
    c = read_json(config_path, "the PEFT adapter config", "save the adapter again with PEFT")
    if str(c.get("peft_type", "LORA")).upper() != "LORA":
        raise PuddingError(f"{config_path}: field 'peft_type' is {c.get('peft_type')!r}; only LoRA adapters convert")
    for key, bad, what in (("use_dora", True, "DoRA"), ("fan_in_fan_out", True, "fan_in_fan_out weights")):
        if c.get(key) == bad:
            raise PuddingError(f"{config_path}: field '{key}' is {bad}: {what} is not supported; train plain LoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            raise PuddingError(f"{config_path}: field '{key}' is set: per-module ranks are not supported; "
                               "train one rank for every module")
    if c.get("bias", "none") != "none" or c.get("modules_to_save"):
        raise PuddingError(f"{config_path}: trained biases or modules_to_save are not supported; train with "
                           "bias='none' and no modules_to_save")
    rank, alpha = c.get("r"), c.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise PuddingError(f"{config_path}: fields 'r' and 'lora_alpha' must be a positive integer and a number")
    scale = alpha / (rank ** 0.5) if c.get("use_rslora") else alpha / rank
    wpath = folder / PEFT_WEIGHTS
    try:
        raw = mx.load(str(wpath))
    except Exception as e:
        raise PuddingError(f"{wpath}: not a readable safetensors file ({first_line(e)}); save the adapter "
                           "again with PEFT (safe_serialization=True)") from None
    weights = {}
    for key, w in raw.items():
        m = _KEY.search(key)
        if m is None or w.ndim != 2:
            raise PuddingError(f"{wpath}: tensor {key!r} is not a LoRA matrix of a block's linear layer")
        block, path, ab = m.groups()
        weights[f"layers.{block}.{path}.lora_{'a' if ab == 'A' else 'b'}"] = w.T  # A [r, in] -> [in, r]
    if sets is None:
        heal = folder / HEAL_FILE
        if not heal.is_file():
            raise PuddingError(f"{folder}: no {HEAL_FILE} naming the sets the adapter heals; pass --sets")
        sets = read_json(heal, "the healing record", "pass --sets").get("sets")
        if not isinstance(sets, list) or not sets:
            raise PuddingError(f"{heal}: field 'sets' must be a non-empty list of omission sets")
    source = {"peft": str(folder), "r": rank, "lora_alpha": alpha, "use_rslora": bool(c.get("use_rslora")),
              "base_model": c.get("base_model_name_or_path")}
    return rank, scale, weights, [sorted(int(b) for b in s) for s in sets], source


def convert_adapter(src, out, sets: Optional[Sequence[Sequence[int]]] = None, force: bool = False) -> Path:
    """Write the runtime's adapter folder at `out` from the PEFT folder `src` (atomic)."""
    out = Path(out)
    if out.exists() and not force:
        raise PuddingError(f"{out}: already exists; pass --force to replace it")
    rank, scale, weights, sets, source = read_peft(src, sets)
    mx.eval(weights)
    write_adapter(out, rank, scale, sets, weights, source, force=force)
    return out
