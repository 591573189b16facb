"""What a model directory holds, from its safetensors headers only (no weights read), and whether
the device can hold it: `load` refuses, in one line, a model whose weights alone exceed the memory.
"""

import json
import os
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx

from .bundle import safetensors_header
from .errors import PuddingError

_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def weights_summary(model_dir: Path, target_float_bytes: Optional[int] = None) -> dict:
    """Tensors, parameters and bytes of the `model*.safetensors` in `model_dir`, from headers.

    parameters: logical weights; a quantized matrix (a `.weight` with `.scales` beside it) counts
    its unpacked elements (packed uint32 elements x 32 / bits), and its scales and biases are not
    parameters. bytes: stored tensor bytes. loaded_bytes: bytes once floating tensors are cast to a
    float of `target_float_bytes` bytes (None: as stored).
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise PuddingError(f"{model_dir}: no model*.safetensors; not an mlx-lm model directory")
    quant = {}
    try:
        config = json.loads((model_dir / "config.json").read_text())
        quant = config.get("quantization") or config.get("quantization_config") or {}
    except (OSError, ValueError):
        pass
    tensors = {}
    for f in files:
        for name, meta in safetensors_header(f).items():
            if name != "__metadata__":
                tensors[name] = meta
    params = stored = loaded = 0
    dtypes: Dict[str, int] = {}
    for name, meta in tensors.items():
        shape, dtype = meta.get("shape", []), meta.get("dtype", "?")
        lo, hi = meta.get("data_offsets", [0, 0])
        size = hi - lo
        stored += size
        dtypes[dtype] = dtypes.get(dtype, 0) + size
        numel = 1
        for d in shape:
            numel *= d
        if dtype in _FLOAT_BYTES and target_float_bytes:
            loaded += numel * target_float_bytes
        else:
            loaded += size
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and f"{base}.weight" in tensors and f"{base}.scales" in tensors:
            continue
        if name.endswith(".weight") and f"{base}.scales" in tensors:
            layer = quant.get(base) if isinstance(quant.get(base), dict) else quant
            bits = (layer or {}).get("bits") or 4
            numel = numel * (8 * {"U32": 4, "U8": 1}.get(dtype, 4)) // bits
        params += numel
    return {"files": [f.name for f in files], "tensors": len(tensors), "parameters": params,
            "bytes": stored, "loaded_bytes": loaded, "dtypes": dtypes}


def memory_size() -> Optional[int]:
    """Bytes of memory the device can use: `mx.device_info()["memory_size"]` where MLX reports it
    (Metal), else the machine's physical memory (sysconf), else None."""
    try:
        info = mx.device_info()
        if isinstance(info, dict) and info.get("memory_size"):
            return int(info["memory_size"])
    except Exception:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(model_dir: Path, target_float_bytes: Optional[int] = None) -> dict:
    """Raise a one-line PuddingError when the weights alone exceed the device's memory."""
    summary = weights_summary(model_dir, target_float_bytes)
    limit = memory_size()
    if limit and summary["loaded_bytes"] > limit:
        raise PuddingError(
            f"{model_dir}: the weights need about {summary['loaded_bytes'] / 1e9:.1f} GB but this device "
            f"has {limit / 1e9:.1f} GB of memory; use a smaller or quantized model "
            "(pudding-mlx convert llm --quantize 4)"
        )
    return summary
