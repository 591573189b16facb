"""The omission set: which 0-based blocks a request skips. The one place that parses `--omit`,
validates a set against a model's block count, and lists the blocks that still run.

Shared by the MLX runtime, the converters and the PyTorch side (this module imports neither)."""

from numbers import Integral
from collections.abc import Iterable
from typing import List, Optional, Tuple

from .errors import PuddingError

OMIT_HINT = "give comma-separated 0-based block indices, e.g. --omit 3,5,9 (for no omitted block, use --dense)"


def parse_omit(text: str) -> List[int]:
    """'3,5,9' -> [3, 5, 9] (spaces allowed). An empty text or an empty item ('3,,5') is an error:
    it must never silently mean "nothing omitted"."""
    parts = text.replace(" ", "").split(",")
    if any(part == "" for part in parts):
        raise PuddingError(f"--omit {text!r}: an empty block index; {OMIT_HINT}")
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise PuddingError(f"--omit {text!r}: {OMIT_HINT}") from None


def parse_omit_sets(text: str) -> List[List[int]]:
    """'3,5;9' -> [[3, 5], [9]]: several sets, separated by semicolons (each as `parse_omit`)."""
    sets = [parse_omit(part) for part in text.split(";") if part.strip()]
    if not sets:
        raise PuddingError(f"--omit {text!r}: no set given; {OMIT_HINT} (several sets: 3,5;9)")
    return sets


def check_omitted(omitted: Iterable[int], n_blocks: int, what: str = "omission set") -> Tuple[int, ...]:
    """Validate a set of 0-based block indices against a model of `n_blocks` blocks; return it
    sorted. `what` names the set in the error (a flag, a file and field)."""
    if isinstance(omitted, (str, bytes)) or not isinstance(omitted, Iterable):
        raise PuddingError(f"{what}: must be a list of 0-based block indices, got {omitted!r}")
    omitted = list(omitted)
    for i in omitted:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise PuddingError(f"{what}: block index {i!r} is not an integer; give integers only")
    omitted = [int(i) for i in omitted]
    bad = [i for i in omitted if not 0 <= i < n_blocks]
    if bad:
        raise PuddingError(f"{what}: block indices {bad} out of range 0..{n_blocks - 1}; the model has "
                           f"{n_blocks} blocks")
    if len(set(omitted)) != len(omitted):
        dup = sorted({i for i in omitted if omitted.count(i) > 1})
        raise PuddingError(f"{what}: block indices {dup} are repeated (appear more than once)")
    if len(omitted) >= n_blocks:
        raise PuddingError(f"{what}: omits all {n_blocks} blocks; at least one must run")
    return tuple(sorted(omitted))


def first_omitted(sets: Iterable[Iterable[int]], n_blocks: Optional[int] = None) -> int:
    """The first block any of `sets` omits: blocks before it run under every set (what a
    hidden-state router may read). `n_blocks` when no set omits anything (None: an error)."""
    firsts = [min(s) for s in map(list, sets) if s]
    if firsts:
        return min(firsts)
    if n_blocks is None:
        raise PuddingError("no set omits any block")
    return n_blocks


def kept_blocks(omitted: Iterable[int], n_blocks: int) -> Tuple[int, ...]:
    """The blocks that run, in order."""
    gone = set(omitted)
    return tuple(i for i in range(n_blocks) if i not in gone)


def ideal_speedup(n_blocks: int, k: float) -> float:
    """Decode speedup of skipping k of n_blocks blocks if time were spent in the blocks alone (embedding, head
    and routing cost nothing): the ceiling a measured speedup is read against."""
    if not 0 <= k < n_blocks:
        raise PuddingError(f"cannot skip {k} of {n_blocks} blocks: at least one block must run")
    return n_blocks / (n_blocks - k)


def lossless_speedup_bound(from_draft: float, draft_tokens: int, k: float, n_blocks: int) -> float:
    """The most lossless decoding (the pruned model drafts `draft_tokens` tokens a round, dense verifies them) can
    gain over dense decoding, given the measured share of output tokens that came from the draft.

    Each round emits the accepted draft tokens and one of dense's, so a round gives 1 / (1 - from_draft) tokens on
    average. It costs `draft_tokens` pruned steps, each (n_blocks - k) / n_blocks of a dense step at best, and one
    dense verify over draft_tokens + 1 positions, counted here as one dense step: what a memory-bound GPU comes
    near and a CPU does not. Real speedups sit below this (embedding, head, cache rewinds, a dearer verify), so a
    bound under 1 shows that lossless cannot pay at that acceptance, whatever the hardware. A round gives at most
    draft_tokens + 1 tokens, so a share above draft_tokens / (draft_tokens + 1) (a short run whose last round ended
    inside the draft) counts as that."""
    if not 0 <= from_draft < 1:
        raise PuddingError(f"share of tokens from the draft must be in [0, 1), not {from_draft}")
    step = 1 / ideal_speedup(n_blocks, k)
    per_round = min(1 / (1 - from_draft), draft_tokens + 1)
    return per_round / (draft_tokens * step + 1)


def lossless_share_needed(speedup: float, draft_tokens: int, k: float, n_blocks: int) -> float:
    """The share of output tokens that must come from the draft for `lossless_speedup_bound` to reach `speedup`
    (above draft_tokens / (draft_tokens + 1), every draft token accepted: out of this draft's reach)."""
    step = 1 / ideal_speedup(n_blocks, k)
    return 1 - 1 / (speedup * (draft_tokens * step + 1))
