"""The candidates file: the candidate omission sets the search writes (`train search`) and
`convert bundle --candidates` reads. Torch-free, so both sides share it.

    {"format": "pudding-mlx-candidates", "schema_version": 1, "model": "...", "num_blocks": 30,
     "k": 7, "protected": [0, 29],
     "calibration": {"split": "train", "n": 128, "seed": 0, "ids": {"arc_easy": ["..."], ...}},
     "candidates": [{"omitted": [..], "order": [..], "task": "arc_easy", "loss": "likelihood",
                     "loss_value": -93.1, "sources": [["arc_easy", "likelihood"], ...]}, ...]}

`omitted` is sorted; `order` is the greedy removal order; `sources` lists every (task, loss)
chain that found the same set (the pool is deduplicated). A plain JSON list of lists of 0-based
block indices (`[[4, 9, 17], [5, 9, 21]]`) is read too.
"""

from pathlib import Path
from typing import List, Optional

from .errors import PuddingError
from .jsonio import read_json
from .omission import check_omitted

CANDIDATES_FORMAT = "pudding-mlx-candidates"
FIX = "write it again (`pudding-mlx train search` writes one)"
MIX = "mix"  # pseudo-task: a SLEB-style calibration set drawn evenly from the listed tasks


def read_candidates(path, n_blocks: Optional[int] = None) -> List[dict]:
    """The sets of a candidates file as [{"omitted": [...], "task"?, "loss"?, "order"?, "sources"?}].
    With `n_blocks`, every set is also checked against an LLM of that many blocks; each error is one
    line naming the file and the set."""
    path = Path(path)
    if not path.is_file():
        raise PuddingError(f"{path}: no such candidates file")
    data = read_json(path, "the candidates file", FIX, want=None)
    if isinstance(data, list):
        if not all(isinstance(s, list) for s in data):
            raise PuddingError(f"{path}: a plain candidates file must be a list of lists of block indices")
        entries, names = [{"omitted": s} for s in data], [f"[{m}]" for m in range(len(data))]
    else:
        entries = _entries(path, data, n_blocks)
        names = [f"field 'candidates[{m}].omitted'" for m in range(len(entries))]
    if n_blocks is not None:
        for name, c in zip(names, entries):
            check_omitted(c["omitted"], n_blocks, f"{path}: {name}")
    return entries


def _entries(path: Path, data, n_blocks: Optional[int]) -> List[dict]:
    if not isinstance(data, dict) or data.get("format") != CANDIDATES_FORMAT:
        raise PuddingError(f"{path}: field 'format' must be {CANDIDATES_FORMAT!r} (or give a plain list of lists)")
    if data.get("schema_version") != 1:
        raise PuddingError(f"{path}: field 'schema_version' is {data.get('schema_version')!r}; this version reads 1")
    if n_blocks is not None and data.get("num_blocks") not in (None, n_blocks):
        raise PuddingError(f"{path}: field 'num_blocks' is {data['num_blocks']} but the LLM has {n_blocks} blocks")
    raw = data.get("candidates", [])
    if not isinstance(raw, list):
        raise PuddingError(f"{path}: field 'candidates' must be a list")
    out = []
    for m, c in enumerate(raw):
        if not isinstance(c, dict) or not isinstance(c.get("omitted"), list):
            raise PuddingError(f"{path}: field 'candidates[{m}].omitted' must be a list of block indices")
        sources = c.get("sources")
        if sources is not None and not (isinstance(sources, list) and all(
                isinstance(p, list) and len(p) == 2 for p in sources)):
            raise PuddingError(f"{path}: field 'candidates[{m}].sources' must be a list of [task, loss] pairs")
        out.append({key: c[key] for key in ("omitted", "task", "loss", "order", "sources") if key in c})
    return out


def provenance(path) -> dict:
    """What a search's candidates file says about where its sets come from ({} for a plain list)."""
    data = read_json(Path(path), "the candidates file", FIX, want=None)
    if not isinstance(data, dict):
        return {}
    return {"source_model": data.get("model_name") or data.get("model"), "k": data.get("k"),
            "calibration": {k: v for k, v in data.get("calibration", {}).items() if k != "ids"}}
