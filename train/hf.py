"""Load MODEL for the PyTorch path: a Hugging Face directory, a GGUF file (dequantised by
transformers' own GGUF loader), or a hub id. No trust_remote_code; weights from safetensors/GGUF."""

from pathlib import Path
from typing import Optional, Tuple

import torch

from pudding_mlx.errors import PuddingError, first_line

from .scoring import default_dtype


def pick_device(device: Optional[str] = None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_hf(model: str, device: Optional[str] = None, dtype: Optional[str] = None) -> Tuple[object, object, str]:
    """(model in eval mode on device, tokenizer, a short name for reports)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else default_dtype(dev)
    path = Path(model).expanduser()
    kwargs = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PuddingError(f"{path}: no such GGUF file")
        src, kwargs["gguf_file"], name = str(path.parent), path.name, path.stem
    elif path.exists():
        if not (path / "config.json").is_file():
            raise PuddingError(f"{path}: no config.json; MODEL must be a Hugging Face model directory, a .gguf file or a hub id")
        src, name = str(path), path.name
    else:
        src, name = model, model.split("/")[-1]
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **kwargs)
    except OSError as e:
        raise PuddingError(f"{model}: could not load it ({first_line(e)})")
    return lm.to(dev).eval(), tokenizer, name
