"""The router's training data (PuDDing, section 4.2): for every calibration example x and every
candidate omission set S_m, the score the router learns to predict, resumable.

Target. y[i, m] = ell-bar(gold | x_i; S_m), the mean log-likelihood per token of the gold
continuation with the blocks of S_m skipped -- the paper's regression target (`train.scoring`).
Next to it the file keeps what accuracy-style targets need: per choice, the summed log-likelihood
and ell-bar, and per set whether the example is answered correctly (acc: argmax of the sums;
acc_norm: argmax of sum / len(norm_text), lm-eval's definitions), plus the same for the dense
model (set = []) as a reference column that is never a candidate.

Router input. `text` is `Example.router_text`: what a user would send as a prompt, the question or
context WITHOUT the answer choices (MMLU keeps its "A. ..." option lines; see `pudding_mlx.tasks`).
The official PuDDing code fed the router a prompt joined with an answer choice; we do not, because
at inference time the router sees only the user's prompt, and a text built with a choice (often the
gold one) is a prompt the router will never meet. The scores y are still computed on the full
lm-eval requests (context + each choice).

Examples. Each task's `split` (default train) in file order, optionally a seeded sample of
`max_per_task` per task (`pudding_mlx.tasks.sample`, the same seed for every task). Ids are the task
files' ids (made unique within a file with "#k", see `pudding_mlx.tasks`).

Resumable. The work is cut into chunks, one per (task, set) plus one dense chunk per task. Each
finished chunk is written atomically as `chunks/<NN>-<task>.<sMMM|dense>.npz` in OUT_DIR, and
`manifest.json` (written atomically after every chunk) records the settings and provenance. A rerun
with the same settings skips every chunk whose file is present and readable (a deleted or corrupt
chunk is recomputed); a rerun with other settings (model, sets, tasks, split, seed, sample, ids) is
refused -- use another OUT_DIR or delete it. Under torchrun every rank scores its share of every
chunk (`evaluate_everywhere`); only rank 0 writes.

Output, once every chunk is done (written atomically):

  router_data.npz   (numpy .npz, no pickled objects; read it with `load_router_data`)
      task          [N] str     the task as given (a built-in name, or the user file's path)
      id            [N] str     the example id within its task
      text_utf8     [T] uint8   the router texts, UTF-8, concatenated
      text_offsets  [N+1] int64 text i is text_utf8[text_offsets[i]:text_offsets[i+1]]
                                (numpy's fixed-width str would take 4 bytes x the LONGEST text per
                                row; `load_router_data` returns them as `text`, an array of str)
      y             [N, M] float32   ell-bar(gold) per candidate set (the target)
      dense         [N] float32      ell-bar(gold) of the dense model
      correct       [N, M] bool      acc per set;  correct_norm [N, M] bool: acc_norm per set
      dense_correct, dense_correct_norm  [N] bool
      n_choices     [N] int64;  gold [N] int64
      logprob, mean_ll          [N, M, C] float32  per choice (summed log-lik, ell-bar); NaN past
                                                   n_choices (C = the most choices of any example)
      dense_logprob, dense_mean_ll  [N, C] float32
  router_data.json  {"format": "pudding-mlx-router-data", "schema_version": 1, "sets": [[...]],
                     "columns": [...], "n": N, "settings": {...}, "provenance": {...}}

Splitting for training (`split_by_question`) is by question, never by row.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import re
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from pudding_mlx.atomic import write_json as atomic_write_json
from pudding_mlx.atomic import write_npz
from pudding_mlx.candidates import read_candidates
from pudding_mlx.errors import PuddingError
from pudding_mlx.jsonio import read_json

FORMAT = "pudding-mlx-router-data"
SCHEMA_VERSION = 1
DATA_FILE = "router_data.npz"
META_FILE = "router_data.json"
MANIFEST = "manifest.json"
CHUNK_DIR = "chunks"
DENSE = "dense"
COLUMNS = ("task", "id", "text", "y", "dense", "correct", "correct_norm", "dense_correct",
           "dense_correct_norm", "n_choices", "gold", "logprob", "mean_ll", "dense_logprob",
           "dense_mean_ll")


# -- inputs --------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_sets(candidates, n_blocks: int) -> Tuple[List[List[int]], dict]:
    """(the candidate sets as sorted 0-based block lists, provenance of where they came from).

    `candidates`: a candidates file (path; `pudding_mlx.candidates.read_candidates`), or a list of sets
    (lists of block indices, or dicts with "omitted")."""
    from pudding_mlx.omission import check_omitted

    source: dict = {}
    if isinstance(candidates, (str, os.PathLike)):
        path = Path(candidates).expanduser()
        entries = read_candidates(path, n_blocks)
        source = {"file": str(path.resolve()), "sha256": _sha256(path)}
    else:
        entries = list(candidates)
        source = {"file": None}
    sets = []
    for m, c in enumerate(entries):
        omitted = c.get("omitted") if isinstance(c, Mapping) else c
        if not isinstance(omitted, (list, tuple)):
            raise PuddingError(f"candidate {m}: expected a list of block indices, got {omitted!r}")
        try:
            sets.append(list(check_omitted(omitted, n_blocks)))
        except PuddingError as e:
            raise PuddingError(f"candidate {m}: {e}") from None
    if not sets:
        raise PuddingError("no candidate sets: the router needs at least one")
    seen: Dict[tuple, int] = {}
    for m, s in enumerate(sets):
        if tuple(s) in seen:
            raise PuddingError(f"candidates {seen[tuple(s)]} and {m} are the same set {s}; "
                               "deduplicate the candidates (the router would score one set twice)")
        seen[tuple(s)] = m
    source["sets"] = sets
    return sets, source


def draw_examples(tasks: Sequence[str], split: str = "train", max_per_task: Optional[int] = None,
                  seed: int = 0, data_dir=None) -> Dict[str, list]:
    """{task: its `split` examples, or a seeded sample of `max_per_task` of them}, in task order."""
    from pudding_mlx.tasks import load_task, sample

    if not tasks:
        raise PuddingError("no tasks: give at least one calibration task")
    if len(set(tasks)) != len(tasks):
        raise PuddingError(f"tasks repeat: {list(tasks)}")
    if max_per_task is not None and max_per_task < 1:
        raise PuddingError(f"max_per_task must be >= 1, got {max_per_task}")
    out = {}
    for t in tasks:
        examples = load_task(t, split, data_dir)
        if not examples:
            raise PuddingError(f"task {t!r}: split {split!r} has no examples")
        out[t] = list(sample(examples, max_per_task, seed)) if max_per_task else examples
    return out


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("pudding-mlx", "torch", "transformers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _model_name(model, given: Optional[str]) -> str:
    if given:
        return str(given)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return str(name) or type(model).__name__


# -- chunks --------------------------------------------------------------------------------------


def _slug(task: str) -> str:
    name = Path(task).name if ("/" in task or os.sep in task) else task
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:48] or "task"


def chunk_name(task_index: int, task: str, m: Optional[int]) -> str:
    """File name of the chunk of task `task_index` and set `m` (None: the dense chunk)."""
    return f"{task_index:02d}-{_slug(task)}.{DENSE if m is None else f's{m:03d}'}.npz"


def _chunk_arrays(result: dict, examples, omitted) -> dict:
    return {
        "ids": np.array([e.id for e in examples], dtype=str),
        "omitted": np.array(list(omitted), dtype=np.int64),
        "n_choices": np.array([e.n_choices for e in examples], dtype=np.int64),
        "gold": np.asarray(result["gold"], dtype=np.int64),
        "logprob": np.concatenate([np.asarray(v, np.float64) for v in result["logprob"]]),
        "mean_ll": np.concatenate([np.asarray(v, np.float64) for v in result["mean_ll"]]),
        "gold_mean_ll": np.asarray(result["gold_mean_ll"], dtype=np.float64),
        "correct": np.asarray(result["correct"], dtype=bool),
        "correct_norm": np.asarray(result["correct_norm"], dtype=bool),
    }


def _read_chunk(path: Path, examples, omitted) -> Optional[dict]:
    """The chunk's arrays, or None when it is missing, unreadable or for other examples/set."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
        return None
    try:
        ok = (list(data["ids"]) == [e.id for e in examples]
              and list(data["omitted"]) == list(omitted)
              and list(data["n_choices"]) == [e.n_choices for e in examples]
              and len(data["mean_ll"]) == sum(e.n_choices for e in examples)
              and len(data["gold_mean_ll"]) == len(examples))
    except KeyError:
        return None
    return data if ok else None


# -- distributed helpers ---------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _from_main(obj):
    """rank 0's `obj` on every rank (a no-op in one process)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier():
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


# -- building ------------------------------------------------------------------------------------


def build_router_data(
    model,
    tokenizer,
    candidates,
    tasks: Sequence[str],
    out_dir,
    max_per_task: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 64,
    data_dir=None,
    progress: Optional[Callable[[int, int, str], None]] = None,
    split: str = "train",
    model_name: Optional[str] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """Score every (task, candidate set) chunk (and each task's dense chunk) and assemble
    OUT_DIR/router_data.npz + router_data.json (module doc). Returns the .npz path.

    `candidates`: a candidates file or a list of sets. `progress(done, total, chunk)` is called after
    each chunk is written or found on disk (an exception there stops the run; finished chunks stay).
    `on_batch(done, total)` is passed to the scorer. `model_name` is recorded (default: the model
    config's `_name_or_path`)."""
    from .distributed import is_main
    from .scoring import num_blocks

    out_dir = Path(out_dir).expanduser()
    n_blocks = num_blocks(model)
    sets, cand_source = resolve_sets(candidates, n_blocks)
    examples = draw_examples(tasks, split, max_per_task, seed, data_dir)
    settings = _settings(model, model_name, n_blocks, sets, tasks, split, seed, max_per_task, examples)
    manifest = _resumed_manifest(out_dir, settings)
    if manifest is None:
        manifest = _new_manifest(settings, cand_source, model, data_dir, batch_size)
    work = _work_list(tasks, sets)
    done_before = _done_chunks(out_dir, work, examples)
    if is_main():
        atomic_write_json(out_dir / MANIFEST, manifest)

    for k, chunk in enumerate(work, 1):
        if chunk.name not in done_before:
            _score_chunk(model, tokenizer, chunk, examples[chunk.task], out_dir, manifest, batch_size,
                         on_batch)
        if progress is not None:
            progress(k, len(work), chunk.name)

    if is_main():
        _assemble(out_dir, examples, sets, list(tasks), work, settings, manifest)
    _barrier()
    return out_dir / DATA_FILE


# -- settings and the manifest: what a resumed run must share with the first -------------------------


def _settings(model, model_name, n_blocks: int, sets, tasks, split: str, seed: int, max_per_task,
              examples: Dict[str, list]) -> dict:
    """Everything the scores depend on; a rerun in the same folder must have the same."""
    try:
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:
        dtype = None
    return {
        "format": FORMAT,
        "model": _model_name(model, model_name),
        "num_blocks": n_blocks,
        "dtype": dtype,
        "sets": sets,
        "tasks": list(tasks),
        "split": split,
        "seed": seed,
        "max_per_task": max_per_task,
        "ids": {t: [e.id for e in ex] for t, ex in examples.items()},
    }


def _resumed_manifest(out_dir: Path, settings: dict) -> Optional[dict]:
    """The manifest an earlier run left in OUT_DIR (None: there is none); refused when that run had
    other settings."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path, "the router data manifest", f"delete {out_dir} to start over")
    old = manifest.get("settings", {})
    if old != settings:
        keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise PuddingError(
            f"{out_dir}: holds router data built with other settings ({', '.join(keys)} "
            "differ); use another output folder or delete this one")
    return manifest


def _new_manifest(settings: dict, cand_source: dict, model, data_dir, batch_size: int) -> dict:
    return {
        "format": FORMAT + "-manifest",
        "settings": settings,
        "provenance": {
            "candidates": {k: v for k, v in cand_source.items() if k != "sets"},
            "data_dir": str(data_dir) if data_dir else os.environ.get("PUDDING_MLX_DATA"),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "versions": _versions(),
            "add_bos": "gemma" in str(getattr(model.config, "model_type", "")),
            "batch_size": batch_size,
            "router_text": "Example.router_text (the prompt without answer choices)",
        },
        "chunks": {},
    }


# -- the work: chunks, which are done, scoring one -------------------------------------------------


class _Chunk(NamedTuple):
    """One unit of work: task number `ti` (`task`) scored with set `m` skipped (None: dense)."""

    ti: int
    task: str
    m: Optional[int]
    omitted: List[int]

    @property
    def name(self) -> str:
        return chunk_name(self.ti, self.task, self.m)


def _work_list(tasks: Sequence[str], sets) -> List[_Chunk]:
    """Every chunk, task by task: the dense one, then one per set in the candidates' order."""
    return [_Chunk(ti, t, m, [] if m is None else sets[m])
            for ti, t in enumerate(tasks) for m in [None] + list(range(len(sets)))]


def _done_chunks(out_dir: Path, work: List[_Chunk], examples: Dict[str, list]) -> List[str]:
    """The names of the chunks already on disk and readable. Decided once, on rank 0, so every rank
    runs the same forward passes."""
    return _from_main([c.name for c in work
                       if _read_chunk(out_dir / CHUNK_DIR / c.name, examples[c.task], c.omitted) is not None])


def _score_chunk(model, tokenizer, chunk: _Chunk, examples: list, out_dir: Path, manifest: dict,
                 batch_size: int, on_batch) -> None:
    """Score the chunk's examples (every rank its share); rank 0 writes the chunk, then the manifest
    that records it."""
    from .distributed import evaluate_everywhere, is_main

    result = evaluate_everywhere(model, tokenizer, examples, chunk.omitted,
                                 batch_size=batch_size, progress=on_batch)
    if not is_main():
        return
    write_npz(out_dir / CHUNK_DIR / chunk.name, **_chunk_arrays(result, examples, chunk.omitted))
    manifest["chunks"][chunk.name] = {
        "task": chunk.task, "set": chunk.m, "omitted": chunk.omitted, "n": len(examples),
        "acc": result["acc"], "acc_norm": result["acc_norm"],
        "mean_gold_mean_ll": float(np.mean(result["gold_mean_ll"])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    atomic_write_json(out_dir / MANIFEST, manifest)


# -- assembling router_data.npz + router_data.json -------------------------------------------------


def _assemble(out_dir: Path, examples: Dict[str, list], sets, tasks, work: List[_Chunk], settings,
              manifest) -> None:
    """Gather every chunk of `work` into one row per example (task by task, in example order)."""
    rows = [(t, e) for t in tasks for e in examples[t]]
    c_max = max(e.n_choices for _, e in rows)
    columns = _empty_columns(rows, len(sets), c_max)
    starts = np.cumsum([0] + [len(examples[t]) for t in tasks])
    task_rows = {t: slice(int(starts[ti]), int(starts[ti + 1])) for ti, t in enumerate(tasks)}
    for chunk in work:
        ex = examples[chunk.task]
        _fill(columns, task_rows[chunk.task], chunk.m, _finished_chunk(out_dir, chunk, ex), ex, c_max)
    write_npz(
        out_dir / DATA_FILE,
        task=np.array([t for t, _ in rows], dtype=str),
        id=np.array([e.id for _, e in rows], dtype=str),
        **_text_arrays([e.router_text for _, e in rows]),
        **columns,
    )
    atomic_write_json(out_dir / META_FILE, _meta(len(rows), sets, examples, tasks, settings, manifest))


def _empty_columns(rows, n_sets: int, c_max: int) -> Dict[str, np.ndarray]:
    """router_data.npz's score columns (module doc), in file order, before the chunks fill them;
    the per-choice ones are NaN past each example's choices."""
    n = len(rows)
    return {
        "y": np.zeros((n, n_sets), np.float32),
        "dense": np.zeros(n, np.float32),
        "correct": np.zeros((n, n_sets), bool),
        "correct_norm": np.zeros((n, n_sets), bool),
        "dense_correct": np.zeros(n, bool),
        "dense_correct_norm": np.zeros(n, bool),
        "n_choices": np.array([e.n_choices for _, e in rows], dtype=np.int64),
        "gold": np.zeros(n, np.int64),
        "logprob": np.full((n, n_sets, c_max), np.nan, np.float32),
        "mean_ll": np.full((n, n_sets, c_max), np.nan, np.float32),
        "dense_logprob": np.full((n, c_max), np.nan, np.float32),
        "dense_mean_ll": np.full((n, c_max), np.nan, np.float32),
    }


def _finished_chunk(out_dir: Path, chunk: _Chunk, examples: list) -> dict:
    path = out_dir / CHUNK_DIR / chunk.name
    data = _read_chunk(path, examples, chunk.omitted)
    if data is None:
        raise PuddingError(f"{path}: missing or unreadable after scoring; rerun to recompute it")
    return data


def _fill(columns: Dict[str, np.ndarray], rs: slice, m: Optional[int], data: dict, examples: list,
          c_max: int) -> None:
    """Put one chunk into rows `rs`: the dense columns (m None) or set m's column of the others."""
    lp, ml = _per_choice(data, examples, c_max)
    if m is None:
        columns["dense"][rs] = data["gold_mean_ll"]
        columns["dense_correct"][rs] = data["correct"]
        columns["dense_correct_norm"][rs] = data["correct_norm"]
        columns["dense_logprob"][rs], columns["dense_mean_ll"][rs] = lp, ml
    else:
        columns["y"][rs, m] = data["gold_mean_ll"]
        columns["correct"][rs, m] = data["correct"]
        columns["correct_norm"][rs, m] = data["correct_norm"]
        columns["logprob"][rs, m], columns["mean_ll"][rs, m] = lp, ml
    columns["gold"][rs] = data["gold"]


def _per_choice(data: dict, examples: list, c_max: int) -> Tuple[np.ndarray, np.ndarray]:
    """The chunk's flat per-choice (logprob, mean_ll) as [n, c_max] float32 tables, NaN past each
    example's choices."""
    starts = np.concatenate([[0], np.cumsum([e.n_choices for e in examples])])
    lp = np.full((len(examples), c_max), np.nan, np.float32)
    ml = np.full((len(examples), c_max), np.nan, np.float32)
    for i, e in enumerate(examples):
        lp[i, : e.n_choices] = data["logprob"][starts[i]:starts[i + 1]]
        ml[i, : e.n_choices] = data["mean_ll"][starts[i]:starts[i + 1]]
    return lp, ml


def _text_arrays(texts: Sequence[str]) -> Dict[str, np.ndarray]:
    """The texts as one UTF-8 blob and N+1 offsets (numpy's fixed-width str would cost 4 bytes x
    the longest text per row)."""
    blobs = [t.encode("utf-8") for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return {"text_utf8": np.frombuffer(b"".join(blobs), dtype=np.uint8), "text_offsets": offsets}


def _meta(n: int, sets, examples: Dict[str, list], tasks, settings: dict, manifest: dict) -> dict:
    """router_data.json: the sets of the y columns, the settings, the ids and the provenance."""
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "n": n,
        "sets": sets,
        "columns": list(COLUMNS),
        "target": "y = ell-bar(gold | x; S_m): mean log-likelihood per token of the gold "
                  "continuation with the blocks of S_m skipped",
        "text": "Example.router_text: the prompt without answer choices",
        "per_task": {t: len(examples[t]) for t in tasks},
        "settings": {k: v for k, v in settings.items() if k != "ids"},
        "ids": settings["ids"],
        "provenance": dict(manifest.get("provenance", {}),
                           finished=datetime.datetime.now(datetime.timezone.utc).isoformat()),
    }


def run_router_data(model: str, candidates, tasks: Sequence[str], out_dir, max_per_task=None,
                    seed: int = 0, batch_size: int = 64, data_dir=None, device=None, split="train",
                    progress=None, on_batch=None) -> Path:
    """Load MODEL (`train.hf.load_hf`: HF folder, .gguf or hub id; torchrun-aware) and build the
    router data with it."""
    from .distributed import init_from_env
    from .hf import load_hf

    init_from_env()
    lm, tokenizer, _ = load_hf(model, device)
    return build_router_data(lm, tokenizer, candidates, tasks, out_dir, max_per_task, seed,
                             batch_size, data_dir, progress, split=split, model_name=str(model),
                             on_batch=on_batch)


# -- reading and splitting ---------------------------------------------------------------------------


def _data_paths(path) -> Tuple[Path, Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / DATA_FILE
    return p, p.with_name(META_FILE) if p.name == DATA_FILE else p.with_suffix(".json")


def load_router_data(path) -> dict:
    """router_data.npz (or its folder) as a dict of arrays, with `text` (an array of str) rebuilt
    from its UTF-8 blob and the JSON sidecar under "meta" (sets, provenance)."""
    npz, meta_path = _data_paths(path)
    if not npz.is_file():
        raise PuddingError(f"{npz}: no router data; build it first (train.router_data)")
    try:
        with np.load(npz, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise PuddingError(f"{npz}: not a readable router data file ({e})") from None
    for key in ("task", "id", "y", "text_utf8", "text_offsets"):
        if key not in data:
            raise PuddingError(f"{npz}: array {key!r} is missing; rebuild the router data")
    blob, off = data.pop("text_utf8").tobytes(), data.pop("text_offsets")
    data["text"] = np.array([blob[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)],
                            dtype=object)
    meta = {}
    if meta_path.is_file():
        meta = read_json(meta_path, "the router data's sets and settings", "rebuild the data")
    if "sets" not in meta:
        raise PuddingError(f"{meta_path}: missing (the sets of the y columns); rebuild the data")
    if len(meta["sets"]) != data["y"].shape[1]:
        raise PuddingError(f"{meta_path}: {len(meta['sets'])} sets for {data['y'].shape[1]} y columns")
    data["meta"] = meta
    return data


def question_key(task: str, ex_id: str) -> Tuple[str, str]:
    """(task, id without a "#k" repeat suffix): the rows one question may have."""
    return str(task), re.sub(r"#\d+$", "", str(ex_id))


def split_by_question(data: Mapping, val_fraction: float = 0.1, seed: int = 0
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """(train row indices, validation row indices), split by question, never by row.

    Rows are grouped (union-find) when they share (task, id with its "#k" suffix stripped) -- how
    `pudding_mlx.tasks` makes repeated file ids unique -- or when they have the same router text (the
    router sees only the text, so a duplicated text on both sides would leak; PIQA repeats goals
    under different ids). Groups are shuffled with `numpy.random.default_rng(seed)` and taken into
    validation, task by task (a group counts for the task of its first row), until each task has
    round(val_fraction x its rows); with val_fraction > 0 and two or more groups, both sides are
    non-empty. Indices come back sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise PuddingError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tasks, ids = list(data["task"]), list(data["id"])
    texts = list(data["text"]) if "text" in data else [None] * len(ids)
    n = len(ids)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union_by(keys):
        first: Dict[object, int] = {}
        for i, key in enumerate(keys):
            if key is None:
                continue
            if key in first:
                a, b = find(i), find(first[key])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[key] = i

    union_by([question_key(t, i) for t, i in zip(tasks, ids)])
    union_by(texts)
    groups: Dict[int, List[int]] = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    by_task: Dict[str, List[List[int]]] = defaultdict(list)
    for members in groups.values():  # insertion order: by first row, so deterministic
        by_task[tasks[members[0]]].append(members)
    rng = np.random.default_rng(seed)
    val: List[int] = []
    task_names = list(dict.fromkeys(tasks))
    for t in task_names:
        gs = by_task[t]
        want = int(round(val_fraction * sum(len(g) for g in gs)))
        got = 0
        for j in rng.permutation(len(gs)):
            if got >= want:
                break
            val.extend(gs[j])
            got += len(gs[j])
    if val_fraction > 0 and len(groups) >= 2:
        val_set = set(val)
        if not val_set:  # too few rows per task to round up to one: take one group
            all_groups = [g for t in task_names for g in by_task[t]]
            val = list(all_groups[int(rng.integers(len(all_groups)))])
        elif len(val_set) == n:  # everything went to validation: give one group back
            all_groups = [g for t in task_names for g in by_task[t]]
            back = set(all_groups[int(rng.integers(len(all_groups)))])
            val = [i for i in val if i not in back]
    val_idx = np.array(sorted(set(val)), dtype=np.int64)
    train_idx = np.array(sorted(set(range(n)) - set(val_idx.tolist())), dtype=np.int64)
    return train_idx, val_idx
