"""Greedy search for the candidate omission sets (PuDDing, section 4.1), resumable.

For each (task, loss): start dense; in each of k phases try removing every remaining removable
block and keep the removal whose loss on the task's calibration examples is lowest. The losses:

    likelihood       L(S) = - sum_x ell(gold | x; S)
    likelihood_diff  L(S) = - sum_x sum_{wrong k} (ell(gold | x; S) - ell(k | x; S))
    response_nll     L(S) = the dense model's own replies' mean NLL per token under S (`train.distill`:
                     the generation-aware search; its "tasks" are groups of distillation prompts)

with ell the mean log-likelihood per continuation token (`train.scoring`). The first and last
block are never removed (configurable). Greedy removal is nested, so one search to k_max also
yields the sets for every smaller k (the first k removals).

Scores of one set S are shared by both losses, so each (task, S) is scored once: the two chains
of a task share their whole first phase. The state (every completed phase of every chain, with
all the losses it saw) is written atomically after each phase; a killed search restarts from the
last completed phase and ends with the same result.

The candidates file (`write_candidates`) is what `pudding-mlx convert bundle --candidates` reads;
its format and reader live in the runtime, `pudding_mlx.candidates`.
"""

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from pudding_mlx.atomic import write_json as atomic_write_json
from pudding_mlx.candidates import CANDIDATES_FORMAT, MIX, read_candidates
from pudding_mlx.errors import PuddingError
from pudding_mlx.jsonio import read_json

LOSSES = ("likelihood", "likelihood_diff")
# the generation-aware loss (`train.distill`): the dense model's own replies' mean NLL per token under S
DISTILL_LOSS = "response_nll"


class SearchState:
    """Completed phases per chain, persisted as JSON after each phase.

    chains["task/loss"] = [{"removed": b, "loss": value, "tried": {"b": loss, ...}}, ...]
    """

    def __init__(self, path: Optional[Path], settings: dict, write: bool = True):
        self.path = Path(path) if path else None
        self.write = write  # every rank reads the state; only rank 0 writes it
        self.settings = settings
        self.chains: Dict[str, List[dict]] = {}
        if self.path and self.path.exists():
            saved = read_json(self.path, "the search state", "delete it to start over")
            if saved.get("settings") != settings:
                raise PuddingError(
                    f"{self.path}: this state was written by a search with other settings "
                    f"({_diff(saved.get('settings', {}), settings)}); use another --state file or delete it"
                )
            self.chains = saved["chains"]

    def save(self):
        if self.path and self.write:
            atomic_write_json(self.path, {"settings": self.settings, "chains": self.chains})


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3]) or "unknown"


def greedy_search(
    score_set: Callable[[str, tuple], dict],
    tasks: Sequence[str],
    losses: Sequence[str],
    n_blocks: int,
    k: int,
    protected: Sequence[int] = (),
    state: Optional[SearchState] = None,
    on_phase: Optional[Callable[[str, int, dict], None]] = None,
) -> Dict[str, List[int]]:
    """Run every (task, loss) chain to k removals; returns {"task/loss": greedy order}.

    `score_set(task, omitted)` returns a dict with both losses for that task's calibration
    examples under `omitted` (e.g. `train.scoring.evaluate`). `on_phase(chain, phase, record)` is
    called after each completed phase (logging, progress, tests that interrupt the search).
    """
    for loss in losses:
        if loss not in LOSSES + (DISTILL_LOSS,):
            raise PuddingError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES + (DISTILL_LOSS,))}")
    removable = [b for b in range(n_blocks) if b not in set(protected)]
    if k > len(removable):
        raise PuddingError(f"k={k} but only {len(removable)} blocks may be removed")
    state = state or SearchState(None, {})
    known: Dict[tuple, float] = {}  # (task, omitted, loss) -> value: scored now or saved before

    def value(task, omitted, loss):
        key = (task, tuple(sorted(omitted)))
        if key + (loss,) not in known:
            for name, v in score_set(task, key[1]).items():
                if name in LOSSES + (DISTILL_LOSS,):
                    known[key + (name,)] = float(v)
        return known[key + (loss,)]

    for name, phases in state.chains.items():
        task, loss = name.split("/")
        removed = []
        for record in phases:
            for b, v in record["tried"].items():
                known[(task, tuple(sorted(removed + [int(b)])), loss)] = v
            removed.append(record["removed"])

    for task in tasks:
        for loss in losses:
            name = f"{task}/{loss}"
            phases = state.chains.setdefault(name, [])
            removed = [p["removed"] for p in phases]
            while len(removed) < k:
                tried = {}
                for b in removable:
                    if b in removed:
                        continue
                    tried[str(b)] = value(task, removed + [b], loss)
                best = min(tried, key=lambda b: (tried[b], int(b)))  # ties: the lower block
                record = {"removed": int(best), "loss": tried[best], "tried": tried}
                phases.append(record)
                removed.append(int(best))
                state.save()
                if on_phase is not None:
                    on_phase(name, len(removed), record)
    return {name: [p["removed"] for p in state.chains[name][:k]] for name in
            (f"{t}/{l}" for t in tasks for l in losses)}


def pool(orders: Dict[str, List[int]], k: int) -> List[dict]:
    """The deduplicated pool of k-block sets from the greedy orders, in chain order."""
    out: Dict[tuple, dict] = {}
    for name, order in orders.items():
        task, loss = name.split("/")
        key = tuple(sorted(order[:k]))
        if key in out:
            out[key]["sources"].append([task, loss])
        else:
            out[key] = {"omitted": list(key), "order": order[:k], "task": task, "loss": loss,
                        "sources": [[task, loss]]}
    return list(out.values())


def write_candidates(path, orders, k, state: SearchState, meta: dict) -> dict:
    candidates = pool(orders, k)
    for c in candidates:
        chain = state.chains[f"{c['task']}/{c['loss']}"]
        c["loss_value"] = chain[k - 1]["loss"]
    data = {"format": CANDIDATES_FORMAT, "schema_version": 1, **meta, "k": k, "candidates": candidates}
    atomic_write_json(path, data)
    return data


def calibration_sets(tasks, n, seed, data_dir=None) -> dict:
    """{task: seeded sample of n train examples}; "mix" draws n in all, evenly from the others."""
    from pudding_mlx.tasks import load_task, sample

    real = [t for t in tasks if t != MIX]
    sets = {t: sample(load_task(t, "train", data_dir), n, seed) for t in real}
    if MIX in tasks:
        sources = real or ["arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande"]
        per = max(1, n // len(sources))
        mixed = []
        for t in sources:
            mixed.extend(sets[t][:per] if t in sets else sample(load_task(t, "train", data_dir), per, seed))
        sets[MIX] = mixed
    return sets


def candidates_path(out, k, ks) -> Path:
    out = Path(out)
    return out if len(ks) == 1 else out.with_name(f"{out.stem}-k{k}{out.suffix or '.json'}")


def run_search(model: str, tasks: Sequence[str], losses: Sequence[str], ks: Sequence[int], out,
               state_path=None, n_calib: int = 128, seed: int = 0, batch_size: int = 64,
               data_dir=None, device=None, protect: Sequence[str] = ("first", "last"),
               on_phase=None, on_batch=None, log=print) -> dict:
    """Load MODEL, draw calibration sets, search every (task, loss) chain to max(ks), and write one
    candidates file per k. Returns {k: candidates data}. Resumes from `state_path` if it exists."""
    from .distributed import evaluate_everywhere, init_from_env, is_main
    from .hf import load_hf
    from .scoring import num_blocks

    init_from_env()
    lm, tokenizer, name = load_hf(model, device)
    n_blocks = num_blocks(lm)
    protected = sorted({0 if p == "first" else n_blocks - 1 if p == "last" else int(p) for p in protect})
    calib = calibration_sets(tasks, n_calib, seed, data_dir)
    k_max = max(ks)
    settings = {"model": str(model), "tasks": list(tasks), "losses": list(losses), "k": k_max,
                "n_calib": n_calib, "seed": seed, "protected": protected, "num_blocks": n_blocks}
    state_path = state_path or Path(out).with_name(Path(out).stem + ".state.json")
    state = SearchState(state_path, settings, write=is_main())
    done_before = sum(len(v) for v in state.chains.values())
    if done_before:
        log(f"resuming from {state_path}: {done_before} phases already done")

    def score_set(task, omitted):
        return evaluate_everywhere(lm, tokenizer, calib[task], omitted, batch_size=batch_size,
                                   progress=on_batch)

    orders = greedy_search(score_set, list(tasks), list(losses), n_blocks, k_max, protected, state, on_phase)
    meta = {"model": model_identity(model), "model_name": name, "num_blocks": n_blocks, "protected": protected,
            "calibration": {"split": "train", "n": n_calib, "seed": seed,
                            "ids": {t: [e.id for e in ex] for t, ex in calib.items()}}}
    written = {}
    if is_main():
        for k in sorted(ks):
            path = candidates_path(out, k, ks)
            written[k] = write_candidates(path, orders, k, state, meta)
            log(f"k={k}: {len(written[k]['candidates'])} distinct sets -> {path}")
    return written


def model_identity(model: str) -> str:
    """What a candidates file records as its model: a local file by its name and sha256 (as the preset
    recipe names its GGUF, `name@sha256:...`; the path it had on the machine that ran the search means
    nothing elsewhere), a local folder by its name, a hub id as given."""
    import hashlib

    path = Path(model).expanduser()
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        return f"{path.name}@sha256:{digest.hexdigest()}"
    if path.is_dir():
        return path.resolve().name
    return str(model)


def split_pool(path) -> tuple:
    """(router pool, SLEB-style sets) of a candidates file: sets found only by the "mix" chains are
    the static SLEB-style baselines, not router candidates. SLEB sets as {loss: omitted}."""
    pool_sets, sleb = [], {}
    for c in read_candidates(path):
        sources = c.get("sources") or [[c.get("task"), c.get("loss")]]
        for task, loss in sources:
            if task == MIX:
                sleb[loss] = c["omitted"]
        if any(task != MIX for task, _ in sources):
            pool_sets.append(c)
    return pool_sets, sleb
