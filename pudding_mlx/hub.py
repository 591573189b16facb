"""Hub ids: what counts as one, whether the hub may be asked, and where a cached snapshot lies. The
one owner of hub resolution, for `load` (MODEL) and `convert llm` (SRC)."""

import os
from pathlib import Path
from typing import Optional

from .errors import PuddingError

# huggingface_hub's own reading of the variable (its `constants._is_true`)
_TRUE = ("1", "on", "yes", "true")


def offline() -> bool:
    """HF_HUB_OFFLINE set to a true value, as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def is_hub_id(text: str) -> bool:
    """owner/name, not a path."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1 and all(text.split("/"))


def cached(repo: str) -> Optional[Path]:
    """The local snapshot of `repo` in the hub cache, without a network round trip; None if absent."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        return None


def check_may_fetch(repo: str) -> None:
    """Refuse, in one line, to fetch `repo` when the hub is off limits."""
    if offline():
        raise PuddingError(f"{repo}: not in the local hub cache and HF_HUB_OFFLINE is set; download it first "
                           "or pass a local directory")
