"""The hidden-state router's head (issue: a router that costs nothing and ranks sets), trained in
seconds on a CPU from `train data` + `train features` (numpy only).

Input: the PCA-projected pooled residual stream after block `after` (`train.features`), pooling
"mean", "last" or "mean+last" (both, concatenated). Head: a linear map to one score per candidate
set, fitted in closed form (ridge regression on standardised features).

Objectives (what the scores mean):
  mse        y[i, m] = ell-bar(gold | x_i; S_m), the paper's regression target. Raw log-likelihoods
             mostly say how hard a prompt is (every set moves together), not which set is best.
  centered   y[i, m] - mean_m y[i, m]: the same target relative to the prompt's own scores, so the
             head only has to learn how the sets differ for this prompt.
  accuracy   hit[i, m] - mean_m hit[i, m], hit = the example is answered correctly under S_m (the
             task's own metric, acc or acc_norm): the head predicts which sets answer this prompt
             better than its average set -- the quantity the evaluation counts.
  task       the same, averaged over the rows of the prompt's task (on the rows the head is fitted
             on): a single example's hits are 0/1 and mostly noise, its task's hit rates per set
             are not, so the head learns which task a prompt looks like and that task's profile
             over the sets. A prompt of an unseen task gets the profile of the tasks it resembles.

Decision rule: the best static set s* (the pool set with the highest average accuracy over the
tasks of the TRAINING data) runs unless the head predicts a gain over it larger than a margin:
    chosen = argmax_m score[m]  if  max_m score[m] - score[s*] > margin  else  s*
margin = +inf is the static set, margin = -inf the plain argmax router.

Model selection, never on evaluation data: the training rows are split by question
(`train.router_data.split_by_question`); the ridge strength, the pooling and the margin are chosen
to maximise the validation rows' accuracy under the decision rule (ties: the larger ridge strength,
then the larger margin, i.e. the simpler and the more static choice). The head is then refitted
on all training rows with those settings.

A router on PCA features is a linear map of the raw hidden state: `export` folds standardisation
and the PCA basis into one weight [M, hidden x pools] and bias [M], which is what the runtime applies.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from pudding_mlx.errors import PuddingError

OBJECTIVES = ("mse", "centered", "accuracy", "task")
POOLINGS = ("mean", "last", "mean+last")
RIDGE = (0.1, 1.0, 10.0, 100.0, 1000.0)


def hits(data: dict) -> np.ndarray:
    """[N, M] bool: example i answered correctly under set m, by its task's reported metric."""
    from pudding_mlx.tasks import eval_metric

    norm = np.array([eval_metric(str(t)) == "acc_norm" for t in data["task"]])
    return np.where(norm[:, None], data["correct_norm"], data["correct"])


def targets(data: dict, objective: str, fit_rows: Optional[np.ndarray] = None) -> np.ndarray:
    """[N, M] regression targets; `fit_rows`: the rows the head is fitted on (objective "task"
    averages over those only, so that validation rows never shape the targets)."""
    if objective == "task":
        h = hits(data).astype(np.float64)
        tasks = np.asarray(data["task"])
        rows = np.arange(len(h)) if fit_rows is None else np.asarray(fit_rows)
        profile = {t: h[rows[tasks[rows] == t]].mean(0) for t in dict.fromkeys(tasks[rows])}
        fallback = h[rows].mean(0)  # a task with no fitted rows (not used by the fit)
        t = np.stack([profile.get(x, fallback) for x in tasks])
        return t - t.mean(1, keepdims=True)
    if objective == "mse":
        return np.asarray(data["y"], np.float64)
    if objective == "centered":
        y = np.asarray(data["y"], np.float64)
        return y - y.mean(1, keepdims=True)
    if objective == "accuracy":
        h = hits(data).astype(np.float64)
        return h - h.mean(1, keepdims=True)
    raise PuddingError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")


def features(feats: dict, after: int, pooling: str) -> np.ndarray:
    if pooling not in POOLINGS:
        raise PuddingError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
    keys = [f"{p}_{after}" for p in pooling.split("+")]
    missing = [k for k in keys if k not in feats]
    if missing:
        raise PuddingError(f"the features have no {missing[0]!r}; compute them with `train features --after {after}`")
    return np.concatenate([feats[k].astype(np.float64) for k in keys], axis=1)


def best_static(hit: np.ndarray, tasks: np.ndarray) -> int:
    """The set with the highest average over tasks of per-task accuracy (ties: the lower index)."""
    per_task = np.stack([hit[tasks == t].mean(0) for t in dict.fromkeys(tasks)])  # [T, M]
    return int(np.argmax(per_task.mean(0)))


def fit(x: np.ndarray, t: np.ndarray, ridge: float) -> dict:
    """Ridge regression of t [N, M] on standardised x [N, d]: {mu, sd, w [d, M], b [M]}."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    b = t.mean(0)
    w = np.linalg.solve(z.T @ z + ridge * len(z) * np.eye(z.shape[1]), z.T @ (t - b))
    return {"mu": mu, "sd": sd, "w": w, "b": b}


def scores(head: dict, x: np.ndarray) -> np.ndarray:
    return ((x - head["mu"]) / head["sd"]) @ head["w"] + head["b"]


def decide(score: np.ndarray, static: int, margin: float) -> np.ndarray:
    """The decision rule (module doc): per row, argmax unless its gain over `static` <= margin."""
    top = score.argmax(1)
    gain = score[np.arange(len(score)), top] - score[:, static]
    return np.where(gain > margin, top, static)


def accuracy(hit: np.ndarray, tasks: np.ndarray, chosen: np.ndarray) -> float:
    got = hit[np.arange(len(chosen)), chosen]
    return float(np.mean([got[tasks == t].mean() for t in dict.fromkeys(tasks)]))


def _margins(score: np.ndarray, static: int) -> List[float]:
    gain = score.max(1) - score[:, static]
    return sorted({-np.inf, np.inf, *np.quantile(gain, np.linspace(0, 1, 41)).tolist()})


def train_probe(data: dict, feats: dict, after: int, objective: str, val_fraction: float = 0.2,
                seed: int = 0, poolings: Sequence[str] = POOLINGS, ridges: Sequence[float] = RIDGE) -> dict:
    """Select ridge, pooling and margin on a by-question validation split of the training data,
    refit on all of it; returns {"head", "pooling", "ridge", "margin", "static", "validation": [...]}."""
    from .router_data import split_by_question

    if list(feats["id"]) != list(data["id"]):
        raise PuddingError("the features and the router data hold different rows; recompute the features")
    tasks = np.asarray(data["task"])
    hit = hits(data)
    tr, va = split_by_question(data, val_fraction, seed)
    t_tr = targets(data, objective, fit_rows=tr)
    static = best_static(hit[tr], tasks[tr])
    tried, best = [], None
    for pooling in poolings:
        x = features(feats, after, pooling)
        for ridge in ridges:
            head = fit(x[tr], t_tr[tr], ridge)
            s = scores(head, x[va])
            for margin in _margins(s, static):
                acc = accuracy(hit[va], tasks[va], decide(s, static, margin))
                tried.append({"pooling": pooling, "ridge": ridge, "margin": margin, "val_accuracy": acc})
                key = (acc, ridge, margin)
                if best is None or key > best[0]:
                    best = (key, pooling, ridge, margin)
    _, pooling, ridge, margin = best
    static_all = best_static(hit, tasks)
    head = fit(features(feats, after, pooling), targets(data, objective), ridge)
    val_static = accuracy(hit[va], tasks[va], np.full(len(va), static))
    return {"head": head, "after": after, "pooling": pooling, "ridge": ridge, "margin": margin,
            "objective": objective, "static": static_all, "val_accuracy": best[0][0],
            "val_static_accuracy": val_static, "n_train": int(len(tr)), "n_val": int(len(va)),
            "tried": tried}


def predict(probe: dict, feats: dict) -> Dict[str, np.ndarray]:
    s = scores(probe["head"], features(feats, probe["after"], probe["pooling"]))
    return {"scores": s, "chosen": decide(s, probe["static"], probe["margin"])}


def export(probe: dict, basis: dict) -> Dict[str, np.ndarray]:
    """The head as one linear map of the raw pooled hidden state(s): weight [M, hidden * pools],
    bias [M] (float32), from the PCA `basis` (features_pca.npz of the fitted folder)."""
    head, after = probe["head"], probe["after"]
    w_z = head["w"] / head["sd"][:, None]  # [d, M] on PCA features
    bias = head["b"] - head["mu"] @ w_z
    weights, start = [], 0
    for p in probe["pooling"].split("+"):
        v = basis[f"basis_{p}_{after}"].astype(np.float64)  # [dim, hidden]
        c = basis[f"center_{p}_{after}"].astype(np.float64)
        part = w_z[start:start + len(v)]  # [dim, M]
        weights.append((v.T @ part).T)  # [M, hidden]
        bias = bias - c @ (v.T @ part)
        start += len(v)
    # C order: safetensors' numpy writer stores an array's buffer as it lies in memory, so a
    # Fortran-ordered weight (one pooling: the transpose of a product) would be saved scrambled
    return {"weight": np.ascontiguousarray(np.concatenate(weights, axis=1), dtype=np.float32),
            "bias": np.ascontiguousarray(bias, dtype=np.float32)}


ROUTER_FILE = "router.json"
HEAD_FILE = "head.safetensors"
PROBE_FILE = "probe.npz"


def restrict(data: dict, cols: Sequence[int]) -> dict:
    """The router data with only the given set columns."""
    out = dict(data)
    for key in ("y", "correct", "correct_norm"):
        out[key] = np.asarray(data[key])[:, cols]
    return out


def rows_with_features(data: dict, feats: dict) -> dict:
    """The router data's rows that have features, in the features' order (features computed for a
    seeded subset of the training rows train on that subset; the best static set is still chosen on
    all of them by the report)."""
    if list(feats["id"]) == list(data["id"]) and list(feats["task"]) == list(data["task"]):
        return data
    where = {(str(t), str(i)): r for r, (t, i) in enumerate(zip(data["task"], data["id"]))}
    try:
        rows = np.array([where[(str(t), str(i))] for t, i in zip(feats["task"], feats["id"])], dtype=np.int64)
    except KeyError as e:
        raise PuddingError(f"the features have a row the router data lacks ({e.args[0]}); recompute the features") from None
    n = len(data["id"])
    return {k: (v[rows] if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == n else v)
            for k, v in data.items()}


def train_probe_router(data_dir, out, sets: Sequence[Sequence[int]], objective: str = "accuracy",
                       after: Optional[int] = None, val_fraction: float = 0.2, seed: int = 0,
                       force: bool = False) -> dict:
    """`pudding-mlx train router --variant probe`: fit on DATA_DIR (router_data.npz + features_pca.npz)
    and write OUT: router.json (kind "hidden": block, pooling, sets, fallback, margin), head.safetensors
    (the folded linear map of the raw hidden state) and probe.npz (the head on PCA features)."""
    from pathlib import Path

    from safetensors.numpy import save_file

    from pudding_mlx.atomic import building, write_json
    from pudding_mlx.omission import first_omitted

    from .features import load_features
    from .report import columns
    from .router_data import load_router_data

    feats = load_features(data_dir)
    data = rows_with_features(load_router_data(data_dir), feats)
    cols = columns({"sets": data["meta"]["sets"]}, sets, "the router data")
    first = first_omitted(sets)  # every set runs blocks 0..first-1
    if after is None:  # the deepest block with features that every set runs
        usable = [int(b) for b in np.atleast_1d(feats["after"]) if int(b) < first]
        if not usable:
            raise PuddingError(f"{data_dir}: no features after a block every set runs (0..{first - 1}); "
                               f"compute them with `train features --after {first - 1}`")
        after = max(usable)
    if not 0 <= after < first:
        raise PuddingError(f"--after {after}: the router may only read a block every set runs (0..{first - 1})")
    if f"mean_{after}" not in feats:
        raise PuddingError(f"{data_dir}: no features after block {after}; compute them with `train features --after {after}`")
    probe = train_probe(restrict(data, cols), feats, after, objective, val_fraction, seed)
    folded = export(probe, feats)
    out = Path(out)
    if out.exists() and not force:  # checked before any work is lost
        raise PuddingError(f"{out}: already exists; pass --force to replace it")
    meta = {"format": "pudding-mlx-router", "kind": "hidden", "after": after, "pooling": probe["pooling"],
            "prompt": "the text as one user message through the LLM's chat template (generation prompt added)",
            "max_tokens": int(feats["max_tokens"]), "objective": objective,
            "sets": [list(map(int, s)) for s in sets], "fallback": int(probe["static"]),
            "margin": None if not np.isfinite(probe["margin"]) else float(probe["margin"]),
            "margin_is": "+inf (always static)" if probe["margin"] == np.inf else
                         "-inf (always argmax)" if probe["margin"] == -np.inf else "finite",
            "ridge": probe["ridge"], "pca_dim": int(feats["dim"]),
            "validation": {"accuracy": probe["val_accuracy"], "static_accuracy": probe["val_static_accuracy"],
                           "n_train": probe["n_train"], "n_val": probe["n_val"]},
            "tried": probe["tried"]}
    head = probe["head"]
    with building(out, force=force) as tmp:
        write_json(tmp / ROUTER_FILE, meta)
        save_file(folded, str(tmp / HEAD_FILE))
        np.savez(tmp / PROBE_FILE, mu=head["mu"], sd=head["sd"], w=head["w"], b=head["b"],
                 margin=np.float64(probe["margin"]), static=np.int64(probe["static"]), after=np.int64(after))
    return meta


def load_probe(router_dir) -> dict:
    from pathlib import Path

    from pudding_mlx.jsonio import read_json

    router_dir = Path(router_dir)
    meta = read_json(router_dir / ROUTER_FILE, "the router settings", "retrain the router")
    with np.load(router_dir / PROBE_FILE) as z:
        head = {k: z[k] for k in ("mu", "sd", "w", "b")}
        return {"head": head, "after": int(z["after"]), "pooling": meta["pooling"],
                "static": int(z["static"]), "margin": float(z["margin"]), "meta": meta}


def is_probe_router(router_dir) -> bool:
    from pathlib import Path

    return (Path(router_dir) / PROBE_FILE).is_file()
