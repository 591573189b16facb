"""Adaptive depth, the offline part (issue #23): fit the loss predictor, and the frontier report
(`pudding-mlx train adaptive-report`). numpy only; the decision rule is `pudding_mlx.adaptive`'s.

The loss. For a prompt and a candidate set, what skipping the set costs against dense, in nats per token:
  multiple choice (the router data, `train data`), one of MC_LOSSES:
      margin: the gold answer's margin over the best wrong answer (mean log-likelihood per token), under
          dense minus under the set: the multiple-choice margin the issue names, tied to correctness;
      gold: the gold answer's mean log-likelihood under dense minus under the set (`dense - y`);
  generation (`nll.npz`, a later GPU run: `benchmarks/heal_gpu.py`, phase adaptive-data; optional):
      the set's NLL per token of the dense model's own reply minus dense's.
One head predicts them all. The MC loss is chosen on the held-out training rows (below) by the MC average
along the budget frontier, averaged over mean k (`frontier_area`).

The predictor: ridge heads (`train.probe.fit`) on the hidden-state router's features (PCA-64 of the
mean- and last-token residual stream after block 3; `train.features`), one output per candidate.
Fitted on the router data's training split; the ridge strength and the pooling are chosen by the
mean squared error on a by-question held-out part of it (`router_data.split_by_question`; the
generation source's own val split), then refitted on all of it. The budget grid and the default
budget come from the same held-out rows: the default is the largest budget whose MC average there
keeps at least 95% of dense's (the issue's 95% rule, applied to data we may choose on).

Never chosen on: the MC evaluation data (data-val and data-test: the tasks' own validation and test
splits, the main report's evaluation rows) and HumanEval (held out: report only).

The menu: dense and the omission sets that have both MC scores and HumanEval results (`train
generate`'s sets/). The healed menu (`build(healed=HEAL_DIR)`): the sets a heal run's pool adapter heals
take their healed MC columns (data-healed-*), HumanEval (gen-pool) and reply NLL (nll.npz's healed columns;
so "nll" is the only generation loss), as a bundle with that adapter runs them; the rest stay unhealed.
Speed: the ideal L / (L - mean k) (the blocks run; equal reply lengths assumed), labelled "ideal"; the one
measured decode figure for this model (k = 3, results/bench) is quoted beside it. Intervals: paired bootstrap, 95% (MC: within tasks, `train.report.bootstrap_delta`;
HumanEval: over problems, `train.generation_report.bootstrap`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from pudding_mlx.adaptive import LossPredictor, choose_many, write_predictor
from pudding_mlx.atomic import write_json, write_text
from pudding_mlx.errors import PuddingError, first_line
from pudding_mlx.jsonio import read_json
from pudding_mlx.omission import ideal_speedup

from . import generation_report as G
from . import probe as P
from . import report as R

AFTER = 3
POOLINGS = ("mean", "last", "mean+last")
KEEP = 0.95  # the default budget keeps this share of dense's MC average on the held-out training rows
SELECT_FRACTION = 0.2
RIDGE = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)  # x rows, on standardised features (train.probe.fit)
OBJECTIVES = ("task", "accuracy")  # the fixed-k hidden routers shown beside (train router --variant probe)
MC_LOSSES = ("margin", "gold")  # the MC loss (module doc), chosen by frontier_area on the held-out training rows
# the generation loss (nll_source), when the generation source has agreement columns: chosen by the share of its
# held-out replies decoded word for word along the budget frontier (`verbatim_frontier`, `frontier_area`)
GEN_LOSSES = ("nll", "agree")
GEN_LOSS_TEXT = {"nll": "the NLL per token of the dense model's replies, set minus dense",
                 "agree": "the share of the dense model's greedy reply the set would not decode word for word, "
                          "set minus dense"}
MC_LOSS_TEXT = {"margin": "the gold answer's margin over the best wrong answer (mean log-likelihood per token), "
                          "dense minus set",
                "gold": "the gold answer's mean log-likelihood per token, dense minus set (dense - y)"}


def _key(s) -> tuple:
    return tuple(sorted(int(b) for b in s))


# -- training sources: x (PCA features), loss [n, sets] on the source's own sets ----------------------


def basis_of(run_dir) -> Dict[str, np.ndarray]:
    """The PCA basis the router data's features were projected with (features-train.npz)."""
    with np.load(Path(run_dir) / "features-train.npz", allow_pickle=False) as z:
        return {k: z[k].astype(np.float64) for k in z.files if k.startswith(("basis_", "center_"))}


def project(raw: Dict[str, np.ndarray], basis: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Full-width pooled states ({"mean_3": [n, hidden], ...}) on the training PCA basis."""
    return {k: (raw[k].astype(np.float64) - basis[f"center_{k}"]) @ basis[f"basis_{k}"].T
            for k in raw if f"basis_{k}" in basis}


def eval_data(run_dir, splits: Sequence[str], extra=None, healed=None) -> dict:
    """The run's router data of SPLITS (data-<split>.npz, concatenated), joined with EXTRA/data-extra-<split>/
    (the same rows scored for more sets: benchmarks/heal_gpu.py mc-extra) when EXTRA is given; with HEALED (a heal
    run's folder), the columns of the sets its pool adapter heals replaced by HEALED/data-healed-<split>/ (the same
    rows, the adapter on: benchmarks/heal_gpu.py mc-healed)."""
    run = Path(run_dir)
    data = R.load_eval([run / f"data-{s}.npz" for s in splits])
    if extra is not None:
        parts = [Path(extra) / f"data-extra-{s}" for s in splits]
        data = R.join_sets(data, R.load_eval(parts), ", ".join(map(str, parts)))
    if healed is not None:
        parts = [Path(healed) / f"data-healed-{s}" for s in splits]
        data = R.join_sets(data, R.load_eval(parts), ", ".join(map(str, parts)), replace=True)
    return data


def features_of(run_dir, splits: Sequence[str], data: dict) -> Dict[str, np.ndarray]:
    """The PCA features (mean_*, last_*) of SPLITS (features-<split>.npz, concatenated), checked to hold the
    rows of `data` (eval_data of the same splits)."""
    from .features import load_features

    run = Path(run_dir)
    parts = [load_features(run / f"features-{s}.npz") for s in splits]
    rows = [k for k in parts[0] if k in ("id", "task") or k.startswith(("mean_", "last_"))]  # per-row arrays
    feats = {k: np.concatenate([p[k] for p in parts]) for k in rows}
    if list(feats["id"]) != list(data["id"]) or list(feats["task"]) != list(data["task"]):
        names = ", ".join(f"features-{s}.npz" for s in splits)
        raise PuddingError(f"{run}/{names}: other rows than the router data of {', '.join(splits)}; recompute them")
    return {k: feats[k] for k in feats if k.startswith(("mean_", "last_"))}


def mc_source(run_dir, split: str, extra=None, healed=None) -> dict:
    """The router data of one split (with EXTRA's sets and HEALED's columns: eval_data): its MC losses
    (MC_LOSSES; "loss" is the first), the hits by each task's metric, PCA features."""
    data = eval_data(run_dir, [split], extra, healed)
    losses = {"gold": data["dense_y"].astype(np.float64)[:, None] - data["y"].astype(np.float64),
              "margin": data["dense_margin"][:, None] - data["margin"]}
    return {"name": f"mc-{split}", "data": data, "sets": [_key(s) for s in data["sets"]], "losses": losses,
            "loss": losses[MC_LOSSES[0]], "feats": features_of(run_dir, [split], data)}


NLL_KEYS = ("id", "kind", "split", "sets", "unhealed", "mean_3", "last_3")


def per_token(summed) -> np.ndarray:
    """NLL per token from [..., 2] (summed NLL, token count): the one formula for nll.npz's arrays."""
    return summed[..., 0].astype(np.float64) / np.maximum(summed[..., 1], 1)


def nll_source(path, basis: Dict[str, np.ndarray], healed: bool = False) -> dict:
    """The generation source (module doc): nll.npz (or agree.npz) with id, kind, split [n], sets [S] (comma
    strings, dense ""), unhealed [n, S, 2] (summed NLL, token count) or [n, S, 4] (agree.npz: also the reply's
    tokens that are the set's own greedy choice and the first that is not, `distill.target_nll(agreement=True)`),
    mean_3 / last_3 [n, hidden] (full width, projected here on the router data's basis). Losses: "nll", the NLL
    per token under the set minus dense's; with 4 columns also "agree", the share of the dense model's greedy
    reply that the set, decoding greedily, would not reproduce word for word, minus dense's own share (the
    numerics of a full pass against cached decoding): 0 when the set decodes the whole reply as dense does.
    With `healed`, the sets of its pool (pool [P], healed [n, P, 2 or 4]: the same replies with the pool adapter
    on) take their healed columns; "agree" only where both the unhealed and the healed arrays have agreement."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as e:
        raise PuddingError(f"{path}: not a readable .npz ({first_line(e)}); rerun the GPU phase adaptive-data") from None
    missing = [k for k in NLL_KEYS if k not in d]
    if missing:
        raise PuddingError(f"{path}: array {missing[0]!r} is missing; expected {', '.join(NLL_KEYS)}")
    n, sets = len(d["id"]), [_key(s.split(",")) if s else () for s in map(str, d["sets"])]
    if d["unhealed"].shape not in ((n, len(sets), 2), (n, len(sets), 4)):
        raise PuddingError(f"{path}: 'unhealed' is {list(d['unhealed'].shape)}, expected [{n}, {len(sets)}, 2] "
                           f"(or 4 columns with agreement)")
    if () not in sets:
        raise PuddingError(f"{path}: 'sets' has no dense entry (\"\"); the loss is against dense")
    dense = sets.index(())
    stats, healed_sets = d["unhealed"], []
    if healed:  # the pool's columns (appended where the unhealed ones lack a set) take their healed statistics
        if "healed" not in d or "pool" not in d:
            raise PuddingError(f"{path}: no 'healed' and 'pool' arrays (the pool adapter's NLL); give the heal run's "
                               "nll.npz or agree-healed.npz (benchmarks/heal_gpu.py adaptive-data, agree-healed)")
        healed_sets = [_key(s.split(",")) for s in map(str, d["pool"])]
        if d["healed"].shape not in ((n, len(healed_sets), 2), (n, len(healed_sets), 4)):
            raise PuddingError(f"{path}: 'healed' is {list(d['healed'].shape)}, expected [{n}, {len(healed_sets)}, 2] "
                               "(or 4 columns with agreement)")
        width = min(stats.shape[2], d["healed"].shape[2])  # agreement only where both sides measured it
        more = [s for s in healed_sets if s not in sets]
        sets = sets + more
        stats = np.concatenate([stats[..., :width], np.zeros((n, len(more), width), stats.dtype)], 1)
        for j, s in enumerate(healed_sets):
            stats[:, sets.index(s)] = d["healed"][:, j, :width]
    nll = per_token(stats)
    losses = {"nll": nll - nll[:, [dense]]}
    verbatim, dense_verbatim = None, None
    if stats.shape[2] == 4:
        count = np.maximum(stats[..., 1].astype(np.float64), 1)
        lost = 1 - stats[..., 3] / count  # the share of the reply after the first token it departs at
        losses["agree"] = lost - lost[:, [dense]]
        verbatim = stats[..., 3] >= stats[:, [dense], 3]  # as far as dense itself decodes it
        # dense's own replies decoded word for word by a full-sequence pass: the numerics' share (1.0 in float32)
        dense_verbatim = float((stats[:, dense, 3] >= stats[:, dense, 1]).mean())
    for k in ("mean_3", "last_3"):
        if d[k].shape != (n, len(basis[f"center_{k}"])):
            raise PuddingError(f"{path}: {k!r} is {list(d[k].shape)}, expected [{n}, {len(basis[f'center_{k}'])}] "
                               "(the router data's model); was it made with another model?")
    feats = project({k: d[k] for k in ("mean_3", "last_3")}, basis)
    return {"name": path.stem + ("-healed" if healed else ""), "sets": sets, "healed_sets": healed_sets,
            "losses": losses, "loss": losses["nll"], "verbatim": verbatim,
            "dense_verbatim": dense_verbatim, "feats": feats, "split": d["split"].astype(str),
            "kind": d["kind"].astype(str), "id": d["id"].astype(str)}


# -- the predictor ------------------------------------------------------------------------------------


def targets_on(source: dict, menu: Sequence[tuple]) -> np.ndarray:
    """[n, M] the source's loss on the menu's columns; NaN where the source has no such set."""
    where = {s: i for i, s in enumerate(source["sets"])}
    out = np.full((len(source["loss"]), len(menu)), np.nan)
    for m, s in enumerate(menu):
        if s in where:
            out[:, m] = source["loss"][:, where[s]]
    return out


def fit_masked(x: np.ndarray, t: np.ndarray, ridge: float) -> dict:
    """`train.probe.fit` where targets may be missing (NaN): one standardisation over all rows, each
    column fitted on its own rows (all-NaN columns predict 0). The same {mu, sd, w, b}."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    w, b = np.zeros((x.shape[1], t.shape[1])), np.zeros(t.shape[1])
    known = ~np.isnan(t)
    for mask in {tuple(c) for c in known.T}:  # columns with the same rows share one solve
        cols = [m for m in range(t.shape[1]) if tuple(known[:, m]) == mask]
        rows = np.asarray(mask)
        if not rows.any():
            continue
        zr, tr = z[rows], t[rows][:, cols]
        zc = zr - zr.mean(0)
        w[:, cols] = np.linalg.solve(zc.T @ zc + ridge * len(zr) * np.eye(z.shape[1]), zc.T @ (tr - tr.mean(0)))
        b[cols] = tr.mean(0) - zr.mean(0) @ w[:, cols]
    return {"mu": mu, "sd": sd, "w": w, "b": b}


def fit_and_select(sources: List[dict], menu: Sequence[tuple], held: List[np.ndarray]) -> dict:
    """Pooling and ridge by held-out MSE (module doc); `held[i]`: source i's held-out rows (bool).
    Returns {"pooling", "ridge", "tried", "head_fit" (fitted without the held-out rows), "head"
    (refitted on all rows)}."""
    tried, best = [], None
    for pooling in POOLINGS:
        x = [P.features(s["feats"], AFTER, pooling) for s in sources]
        t = [targets_on(s, menu) for s in sources]
        xf = np.concatenate([xi[~h] for xi, h in zip(x, held)])
        tf = np.concatenate([ti[~h] for ti, h in zip(t, held)])
        xh = np.concatenate([xi[h] for xi, h in zip(x, held)])
        th = np.concatenate([ti[h] for ti, h in zip(t, held)])
        for ridge in RIDGE:
            head = fit_masked(xf, tf, ridge)
            err = (P.scores(head, xh) - th)[:, 1:] ** 2  # dense (column 0) is 0 by definition
            mse = float(np.nanmean(err))
            tried.append({"pooling": pooling, "ridge": ridge, "held_out_mse": mse})
            if best is None or (mse, -ridge) < best[0]:  # ties: the larger ridge
                best = ((mse, -ridge), pooling, ridge, head)
    _, pooling, ridge, head_fit = best
    x = np.concatenate([P.features(s["feats"], AFTER, pooling) for s in sources])
    t = np.concatenate([targets_on(s, menu) for s in sources])
    return {"pooling": pooling, "ridge": ridge, "tried": tried, "head_fit": head_fit, "head": fit_masked(x, t, ridge)}


def predict(head: dict, feats: dict, pooling: str) -> np.ndarray:
    out = P.scores(head, P.features(feats, AFTER, pooling))
    out[:, 0] = 0.0  # the menu's first candidate is dense
    return out


# -- measures on the menu -----------------------------------------------------------------------------


def mc_measure(data: dict, hit: np.ndarray) -> dict:
    tasks = R.per_task(data, hit)
    return {"tasks": tasks, "average": R.average(tasks)}


def budget_for_mean_k(pred: np.ndarray, sizes: np.ndarray, k: float) -> float:
    """The smallest budget whose mean k over these prompts reaches `k` (mean k rises with the budget:
    the chosen size is the largest allowed). Uses no labels, only the predictions."""
    values = np.unique(pred[:, sizes > 0])
    lo, hi = 0, len(values) - 1
    if sizes[choose_many(pred, sizes, values[hi])].mean() < k:
        return float("inf")
    while lo < hi:
        mid = (lo + hi) // 2
        if sizes[choose_many(pred, sizes, values[mid])].mean() >= k:
            hi = mid
        else:
            lo = mid + 1
    return float(values[lo])


def measured_k3(bench_file) -> Optional[dict]:
    """The measured decode speedup of the k = 3 static set of this model (128 + 128 tokens), if benched."""
    p = Path(bench_file)
    if not p.is_file():
        return None
    b = json.loads(p.read_text())
    cell = next((r for r in b["rows"] if r.get("prompt_tokens") == 128 and r.get("gen_tokens") == 128), None)
    if cell is None:
        return None
    return {"file": str(p), "backend": b["backend"], "set": b["static"], "k": b["k"], "cell": "128+128",
            "static_speedup": cell["speedup_static"], "ci95": cell["speedup_static_spread"]["ci95"], "ideal": cell["ideal"]}


def depth_speeds(speed_file, n_blocks: int) -> dict:
    """benchmarks/depth_speed.py's JSON: {"file", "backend", "dense_ms", "ms": {k: ms per token}, "speedup":
    {k: {median, ci95}}} (k = the number of blocks skipped; a k measured with two sets keeps the first)."""

    fix = "make it with benchmarks/depth_speed.py MODEL --omit ... --json FILE"
    d = read_json(speed_file, "a depth_speed.py result", fix)
    try:
        if d["blocks"] != n_blocks:
            raise PuddingError(f"{speed_file}: measured on a model of {d['blocks']} blocks, this run's model has {n_blocks} blocks; {fix}")
        ms, speedup = {0: float(d["dense_ms_per_token"])}, {}
        for r in d["rows"]:
            ms.setdefault(int(r["k"]), float(r["ms_per_token"]))
            speedup.setdefault(int(r["k"]), {"median": r["speedup"]["median"], "ci95": r["speedup"]["ci95"],
                                             "omitted": r["omitted"], "ideal": r["ideal"]})
    except (KeyError, TypeError, ValueError) as e:
        raise PuddingError(f"{speed_file}: not a depth_speed.py result (field {first_line(e)}); {fix}") from None
    return {"file": str(speed_file), "backend": d.get("backend"), "dense_ms": ms[0], "ms": ms, "speedup": speedup,
            "decode": f"{d.get('decode_tokens')} tokens after {d.get('decode_prompt')}", "runs": d.get("runs")}


def depth_speeds_of(speed_files, n_blocks: int) -> list:
    """depth_speeds of each file, one per backend (the CPU run and the GPU run, say): two of one backend would
    give two figures under one name."""
    speeds = [depth_speeds(f, n_blocks) for f in speed_files]
    for i, sp in enumerate(speeds):
        if any(o["backend"] == sp["backend"] for o in speeds[:i]):
            raise PuddingError(f"{sp['file']}: a second depth_speed.py result for backend {sp['backend']}; "
                               "give one --speed per backend")
    return speeds


def measured_mix(sizes_chosen: np.ndarray, speeds: Optional[dict]) -> Optional[float]:
    """Dense's time per token over the mean time per token of the depths chosen (each prompt's k measured
    alone: depth_speeds; equal reply lengths assumed); None without speeds or where a chosen k was not
    measured."""
    if speeds is None or any(int(k) not in speeds["ms"] for k in np.unique(sizes_chosen)):
        return None
    return speeds["dense_ms"] / float(np.mean([speeds["ms"][int(k)] for k in sizes_chosen]))


def measured_mixes(sizes_chosen: np.ndarray, speeds: list) -> dict:
    """measured_mix on each backend measured: {backend: speedup or None}."""
    return {sp["backend"]: measured_mix(sizes_chosen, sp) for sp in speeds}


def build(run_dir, gen_dir, model: str, nll_path=None, bench_file=None, seed: int = 0, extra=None,
          speed_files=(), healed=None) -> dict:
    """The report as a dict, and the fitted predictor (module doc). HEALED (a heal run's folder): the healed
    menu, every set of its pool adapter run healed (module doc)."""
    from .router_data import split_by_question

    run, gen = Path(run_dir), Path(gen_dir)
    n_blocks = json.loads((run / "cand.state.json").read_text())["settings"]["num_blocks"]
    speeds = depth_speeds_of(speed_files, n_blocks)  # checked before the fit
    train = mc_source(run, "train", extra, healed)
    gen_sets = G.load_sets(gen)
    he_pool = set()
    if healed is not None:  # the pool's sets' HumanEval with the adapter on replace the unhealed ones
        healed_he = {name: s for name, s in G.load_sets(Path(healed) / "gen-pool").items() if s["omitted"]}
        gen_sets = {**gen_sets, **healed_he}
        he_pool = {_key(s["omitted"]) for s in healed_he.values()}
    he_by_key = {_key(s["omitted"]): name for name, s in gen_sets.items()}
    menu = [()] + sorted((s for s in train["sets"] if s in he_by_key), key=lambda s: (len(s), train["sets"].index(s)))
    if len(menu) < 2:
        raise PuddingError(f"{gen}: no set with both MC scores and HumanEval results; nothing to adapt over")
    sizes = np.array([len(s) for s in menu])

    # fit on the training split, choose on its held-out questions: the MC loss, the pooling and the ridge; the
    # budget grid and the default (heads fitted without those rows)
    _, held_rows = split_by_question(train["data"], SELECT_FRACTION, seed)
    held = np.zeros(len(train["loss"]), bool)
    held[held_rows] = True
    nll = nll_source(nll_path, basis_of(run), healed is not None) if nll_path is not None else None
    if healed is not None:  # one pool: its MC, its HumanEval and its reply NLL all healed, or the menu would mix
        mc_pool = {_key(x) for x in read_json(Path(healed) / "data-healed-train" / "router_data.json",
                                              "router data", "rebuild it (heal_gpu.py mc-healed)")["sets"]}
        nll_pool = set(nll["healed_sets"]) if nll is not None else he_pool
        if not mc_pool == he_pool == nll_pool:
            raise PuddingError(f"{healed}: data-healed-train heals {len(mc_pool)} sets, gen-pool {len(he_pool)}, "
                               f"the --nll file {len(nll_pool)}, not the same pool; give one heal run's files")
    sel = {k: v[held] for k, v in train["feats"].items()}
    sel_data = {k: (v[held] if isinstance(v, np.ndarray) and len(v) == len(held) else v) for k, v in train["data"].items()}
    sel_hit = _menu_hits(sel_data, menu)
    dense_sel = R.average(R.per_task(sel_data, sel_data["dense_hit"]))
    by_loss = {}
    for kind in MC_LOSSES:
        sources = [{**train, "loss": train["losses"][kind]}] + ([nll] if nll is not None else [])
        helds = [held] + ([nll["split"] != "train"] if nll is not None else [])
        fitted = fit_and_select(sources, menu, helds)
        selection = held_out_frontier(predict(fitted["head_fit"], sel, fitted["pooling"]), sizes, sel_data, sel_hit)
        by_loss[kind] = {"fitted": fitted, "sources": sources, "helds": helds, "selection": selection,
                         "area": frontier_area(selection, int(sizes.max()))}
    mc_loss = max(MC_LOSSES, key=lambda kind: by_loss[kind]["area"])  # ties: the first
    fitted, sources, helds, selection = (by_loss[mc_loss][k] for k in ("fitted", "sources", "helds", "selection"))
    # then the generation loss, where the source has agreement (GEN_LOSSES): by the share of the source's held-out
    # replies decoded word for word along the frontier; the MC loss stays the one chosen above (with "nll")
    gen_loss, gen_area, by_gen = "nll", {}, {}
    if nll is not None and "agree" in nll["losses"]:
        gheld = nll["split"] != "train"
        verbatim = targets_on({**nll, "loss": nll["verbatim"].astype(np.float64)}, menu)[gheld]
        gfeats = {k: v[gheld] for k, v in nll["feats"].items()}
        for g in GEN_LOSSES:
            srcs = [sources[0], {**nll, "loss": nll["losses"][g]}]
            fit_g = fitted if g == "nll" else fit_and_select(srcs, menu, helds)
            curve = verbatim_frontier(predict(fit_g["head_fit"], gfeats, fit_g["pooling"]), sizes, verbatim)
            by_gen[g] = {"fitted": fit_g, "sources": srcs, "area": frontier_area(curve, int(sizes.max()))}
        gen_area = {g: v["area"] for g, v in by_gen.items()}
        gen_loss = max(GEN_LOSSES, key=gen_area.get)  # ties: nll
        if gen_loss != "nll":
            fitted, sources = by_gen[gen_loss]["fitted"], by_gen[gen_loss]["sources"]
            selection = held_out_frontier(predict(fitted["head_fit"], sel, fitted["pooling"]), sizes, sel_data, sel_hit)
    pooling = fitted["pooling"]
    grid = [r["budget"] for r in selection]
    fits = [r for r in selection if r["average"] >= KEEP * dense_sel]
    default = max(fits, key=lambda r: (r["mean_k"], -r["budget"]))["budget"]  # the fastest that keeps 95%

    # evaluation: MC (the tasks' validation + test splits), HumanEval (held out)
    ev_data = eval_data(run, ["val", "test"], extra, healed)
    ev_pred = predict(fitted["head"], features_of(run, ["val", "test"], ev_data), pooling)
    ev_hit = _menu_hits(ev_data, menu)
    ids = [r["task_id"] for r in gen_sets["dense"]["humaneval"]["records"]]
    he_feats = _he_features(run, gen, ids)
    he_pred = predict(fitted["head"], he_feats, pooling)
    he_hit = np.stack([G.passed(gen_sets[he_by_key[s]], ids) for s in menu], 1)
    dense_mc = mc_measure(ev_data, ev_data["dense_hit"])
    dense_he = float(he_hit[:, 0].mean() * 100)

    def adaptive_at(b) -> dict:
        cm, ch = choose_many(ev_pred, sizes, b), choose_many(he_pred, sizes, b)
        mk, hk = float(sizes[cm].mean()), float(sizes[ch].mean())
        return {"budget": b, "mc": {**mc_measure(ev_data, ev_hit[np.arange(len(cm)), cm]), "mean_k": mk,
                                    "speedup_ideal": ideal_speedup(n_blocks, mk),
                                    "speedup_measured_mix": measured_mixes(sizes[cm], speeds), "usage": _usage(cm, menu)},
                "humaneval": {"pass@1": float(he_hit[np.arange(len(ch)), ch].mean() * 100), "mean_k": hk,
                              "speedup_ideal": ideal_speedup(n_blocks, hk),
                              "speedup_measured_mix": measured_mixes(sizes[ch], speeds), "usage": _usage(ch, menu)},
                "_mc_hit": ev_hit[np.arange(len(cm)), cm], "_he_hit": he_hit[np.arange(len(ch)), ch]}

    frontier = [adaptive_at(b) for b in grid]
    statics, best = _statics(run, train, ev_data, gen_sets, ids, n_blocks)
    # the fixed-k routers were trained and their picks scored unhealed; the healed routers are the heal report's
    routers = _routers(run, gen, ev_data, gen_sets, ids, n_blocks) if healed is None else []

    # adaptive against the best static set at the same mean k (budgets matched on each prompt set's own
    # predictions, no labels), with paired intervals. HumanEval also against a static baseline as strong as the
    # predictor's code signal: per k, the set of lowest mean generation loss (the one the predictor uses) on the
    # training split's code replies, among every set with HumanEval results (not only the menu's)
    code_best = _best_static_on_code(nll, gen_loss, he_by_key) if nll is not None else {}
    matched, code_static = [], []
    for k, b_row in sorted(best.items()):
        name = b_row["name"]
        if _key(b_row["set"]) not in menu:
            continue
        col = menu.index(_key(b_row["set"]))
        bm, bh = budget_for_mean_k(ev_pred, sizes, k), budget_for_mean_k(he_pred, sizes, k)
        am, ah = adaptive_at(bm), adaptive_at(bh)
        matched.append({"k": k, "best_static": name, "set": b_row["set"], "chosen_on": b_row["chosen_on"],
                        "mc": {"budget": bm, "adaptive_mean_k": am["mc"]["mean_k"], "adaptive": am["mc"]["average"],
                               "static": b_row["mc_average"],
                               "adaptive_minus_static": am["mc"]["average"] - b_row["mc_average"],
                               "ci95": R.bootstrap_delta(ev_data, am["_mc_hit"], ev_hit[:, col], seed=seed)},
                        "humaneval": {"budget": bh, "adaptive_mean_k": ah["humaneval"]["mean_k"],
                                      "adaptive": ah["humaneval"]["pass@1"], "static": b_row["pass@1"],
                                      "adaptive_minus_static": ah["humaneval"]["pass@1"] - b_row["pass@1"],
                                      "ci95": G.bootstrap(ah["_he_hit"], he_hit[:, col])}})
        if k in code_best:
            c_row = code_best[k]
            hit = G.passed(gen_sets[he_by_key[c_row["set"]]], ids)
            code_static.append({"k": k, "set": list(c_row["set"]), "chosen_on": c_row["chosen_on"],
                                "train_loss": c_row["loss"], "adaptive_mean_k": ah["humaneval"]["mean_k"],
                                "adaptive": ah["humaneval"]["pass@1"], "static": float(hit.mean() * 100),
                                "adaptive_minus_static": ah["humaneval"]["pass@1"] - float(hit.mean() * 100),
                                "ci95": G.bootstrap(ah["_he_hit"], hit)})
    # what the predictor says per prompt set: the mean over prompts of the lowest predicted loss of each k
    predicted = {t: _lowest_by_k(ev_pred[ev_data["task"] == t], sizes) for t in dict.fromkeys(ev_data["task"].tolist())}
    predicted["humaneval"] = _lowest_by_k(he_pred, sizes)
    at_default = adaptive_at(default)
    he_target = [r for r in frontier if r["humaneval"]["pass@1"] >= 0.95 * dense_he and r["humaneval"]["speedup_ideal"] >= 1.10]
    # the fastest budget that keeps 95% of dense's HumanEval (ideal speed; its measured mix beside it)
    kept_95 = [r for r in frontier if r["humaneval"]["pass@1"] >= 0.95 * dense_he]
    fastest_95 = max(kept_95, key=lambda r: (r["humaneval"]["speedup_ideal"], -r["budget"]))
    fastest_95 = {"budget": fastest_95["budget"], **{k: fastest_95["humaneval"][k] for k in
                                                     ("pass@1", "mean_k", "speedup_ideal", "speedup_measured_mix")}}
    for r in frontier + [at_default]:
        r.pop("_mc_hit"), r.pop("_he_hit")
    # how far the predictor is from what the menu allows on HumanEval: the ceiling of a router that knew the
    # results, over the whole menu and over dense + the best static set of each k in it (reported, chooses nothing)
    small = [0] + [menu.index(_key(b["set"])) for b in best.values() if _key(b["set"]) in menu]
    oracle = {name: {f"{keep:.2f}": {"mean_k": mk, "speedup_ideal": ideal_speedup(n_blocks, mk),
                                     "pass@1": 100 * kept_count(he_hit[:, 0], keep) / len(he_hit)}
                     for keep in (KEEP, 1.0) for mk in [oracle_mean_k(he_hit[:, cols], sizes[cols], keep)]}
              for name, cols in (("menu", list(range(len(menu)))), ("best_static_per_k", small))}
    # and how well the predicted loss ranks them: per set, among the problems dense passes, those the set breaks
    # against those it keeps
    kept = he_hit[:, 0].astype(bool)

    def auc_of(pred):
        aucs = {str(list(menu[c])): ranking_auc(pred[kept, c], ~he_hit[kept, c].astype(bool)) for c in range(1, len(menu))}
        return {"per_set": aucs, "mean": float(np.mean([a for a in aucs.values() if a is not None]))}

    oracle["predictor_auc"] = auc_of(he_pred)
    if by_gen:  # each generation loss tried, its fit's ranking on HumanEval: reported, the choice was made above
        oracle["predictor_auc_by_gen_loss"] = {g: auc_of(predict(v["fitted"]["head"], he_feats, v["fitted"]["pooling"]))["mean"]
                                               for g, v in by_gen.items()}
    with np.load(run / "features-train.npz", allow_pickle=False) as z:
        max_tokens = int(z["max_tokens"])  # the router's prompt length: the predictor reads the same prompt
    healed_menu = [list(s) for s in menu if s in he_pool]
    healed_meta = {} if healed is None else {"healed_sets": healed_menu}  # run with the pool adapter on
    predictor = LossPredictor([list(s) for s in menu], AFTER, pooling, max_tokens,
                              *_folded(fitted["head"], pooling, basis_of(run)), float(default),
                              {"loss": _loss_text(mc_loss, gen_loss, nll_path), **healed_meta,
                               "ridge": fitted["ridge"], "trained_on": [s["name"] for s in sources],
                               "default_max_loss_rule": f"largest budget keeping {KEEP:.0%} of dense's MC average "
                                                        "on held-out training questions"})
    rep = {"model": model, "n_blocks": n_blocks, "menu": [list(s) for s in menu], "sizes": sizes.tolist(),
           "predictor": {"pooling": pooling, "ridge": fitted["ridge"], "tried": fitted["tried"], "mc_loss": mc_loss,
                         "mc_loss_area": {k: v["area"] for k, v in by_loss.items()},
                         "gen_loss": gen_loss if nll is not None else None, "gen_loss_area": gen_area,
                         "gen_dense_verbatim": None if nll is None else nll["dense_verbatim"],
                         "sources": [s["name"] for s in sources],
                         "held_out_rows": int(sum(h.sum() for h in helds)), "fit_rows": int(sum((~h).sum() for h in helds))},
           "selection": {"rows": int(held.sum()), "dense_average": dense_sel, "keep": KEEP, "grid": selection,
                         "default_max_loss": default},
           "dense": {"mc": dense_mc, "humaneval": {"pass@1": dense_he}},
           "frontier": frontier, "default": at_default, "statics": statics, "best_static": best,
           "routers": routers, "matched": matched, "matched_code_static": code_static, "predicted_lowest_loss": predicted,
           "targets": {"humaneval_95_speed_1.10_ideal": [r["budget"] for r in he_target], "humaneval_95_fastest": fastest_95},
           "humaneval_oracle": {**oracle, "best_static_per_k_sets": [list(menu[c]) for c in small[1:]]},
           "speed": {"model": "ideal L / (L - mean k), equal reply lengths", "measured": measured_k3(bench_file) if bench_file else None,
                     "depths": speeds},
           "n": {"mc_eval": int(len(ev_data["task"])), "humaneval": len(ids)}, "mc_extra": None if extra is None else str(extra),
           "healed": None if healed is None else {
               "folder": str(healed), "sets": healed_menu,
               "gen": "reply NLL and greedy agreement" if nll is not None and "agree" in nll["losses"] else
                      "reply NLL only: no healed greedy agreement, so the generation loss is nll"},
           "held_out": "HumanEval chose nothing; MC evaluation rows (data-val, data-test) chose nothing"}
    return rep, predictor


def oracle_mean_k(hit: np.ndarray, sizes: np.ndarray, keep: float) -> float:
    """A ceiling, not a method: the most blocks a router that knew each prompt's results (`hit`: prompts x
    candidates, 1 where the candidate's answer is right) could skip on average while keeping `keep` of dense's
    (column 0's: dense itself keeps them all, so some choice always does) right answers. Optimal: every prompt that is to stay right
    takes the largest candidate that is right on it, the rest take the largest candidate; of the prompts some
    candidate gets right, those that lose the least depth stay right. It reads the labels it is scored on (and
    gains from answers that are right by chance on some candidate), so it only says how far a predictor falls
    short of what this menu allows."""
    hit = np.asarray(hit, bool)
    need = kept_count(hit[:, 0], keep)
    right = hit.any(1)
    top = float(sizes.max())
    best_right = np.where(hit, sizes[None, :], -1).max(1)[right]  # the largest candidate right on each prompt
    cost = np.sort(top - best_right)  # the depth a prompt gives up to stay right
    return float((top * len(hit) - cost[:need].sum()) / len(hit))


def kept_count(dense_hit: np.ndarray, keep: float) -> int:
    """How many right answers keeping `keep` of dense's means (rounded up)."""
    return int(np.ceil(keep * np.asarray(dense_hit, bool).sum() - 1e-9))


def ranking_auc(score: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """The chance that a random positive scores above a random negative (ties count half): how well a predicted
    loss tells the prompts a set breaks from those it keeps (0.5: not at all). None without both kinds."""
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return None
    above = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(above / (len(pos) * len(neg)))


def budget_frontier(pred: np.ndarray, sizes: np.ndarray, measure) -> List[dict]:
    """The budget grid (41 quantiles of the predictions, with -inf, 0 and inf) and, per budget, the mean k and,
    as "average", `measure(chosen)` (chosen: each row's menu index under that budget)."""
    grid = sorted({-np.inf, 0.0, np.inf, *np.quantile(pred[:, 1:], np.linspace(0, 1, 41)).round(6).tolist()})
    rows = []
    for b in grid:
        c = choose_many(pred, sizes, b)
        rows.append({"budget": b, "mean_k": float(sizes[c].mean()), "average": measure(c)})
    return rows


def held_out_frontier(pred: np.ndarray, sizes: np.ndarray, data: dict, hit: np.ndarray) -> List[dict]:
    """`budget_frontier` with the MC average on the held-out training rows."""
    return budget_frontier(pred, sizes, lambda c: R.average(R.per_task(data, hit[np.arange(len(c)), c])))


def verbatim_frontier(pred: np.ndarray, sizes: np.ndarray, verbatim: np.ndarray) -> List[dict]:
    """`budget_frontier` on the generation source's held-out replies: the percentage the chosen set decodes word
    for word as dense does (`verbatim` [n, menu], NaN where the source lacks a menu set: counted as not)."""
    same = np.nan_to_num(verbatim, nan=0.0)
    return budget_frontier(pred, sizes, lambda c: float(100 * same[np.arange(len(c)), c].mean()))


def frontier_area(selection: Sequence[dict], max_k: int) -> float:
    """The MC average along a held-out frontier, averaged over mean k from 0 to max_k (linear between the
    budgets' points; budgets of equal mean k averaged): one number to choose the MC loss by."""
    ks = sorted({r["mean_k"] for r in selection})
    avg = [np.mean([r["average"] for r in selection if r["mean_k"] == k]) for k in ks]
    return float(np.interp(np.linspace(0, max_k, 101), ks, avg).mean())


def _menu_hits(data: dict, menu: Sequence[tuple]) -> np.ndarray:
    cols = R.columns(data, [s for s in menu[1:]])
    return np.concatenate([data["dense_hit"][:, None], data["hit"][:, cols]], 1)


def _lowest_by_k(pred: np.ndarray, sizes: np.ndarray) -> Dict[str, float]:
    return {str(k): float(pred[:, sizes == k].min(1).mean()) for k in sorted(set(sizes.tolist())) if k}


def _usage(chosen: np.ndarray, menu: Sequence[tuple]) -> Dict[str, int]:
    return {G._name(menu[m]): int(c) for m, c in enumerate(np.bincount(chosen, minlength=len(menu))) if c}


def _he_features(run: Path, gen: Path, ids: Sequence[str]) -> dict:
    """The HumanEval messages' pooled states (`train generate --features-after 3`) on the training basis."""
    with np.load(gen / "features.npz", allow_pickle=False) as z:
        rows = {str(i): n for n, i in enumerate(z["id"])}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise PuddingError(f"{gen}/features.npz: no features for {missing[0]}; rerun `train generate --features-after 3`")
        order = [rows[i] for i in ids]
        return project({k: z[k][order] for k in z.files if k.startswith(("mean_", "last_"))}, basis_of(run))


def _folded(head: dict, pooling: str, basis: dict):
    f = P.export({"head": head, "after": AFTER, "pooling": pooling}, basis)
    return f["weight"], f["bias"]


def _statics(run, train, ev_data, gen_sets, ids, n_blocks):
    """Every static set with MC and/or HumanEval results; the best per k chosen without evaluation data
    (MC: the training split, as the main report; k without MC: the fidelity prompts, as the generation report)."""
    he = {_key(s["omitted"]): (name, s) for name, s in gen_sets.items() if s["omitted"]}
    ev_sets = [_key(s) for s in ev_data["sets"]]
    keys = sorted(set(ev_sets) | set(he), key=lambda s: (len(s), s))
    rows = []
    for s in keys:
        mc = mc_measure(ev_data, ev_data["hit"][:, ev_sets.index(s)])["average"] if s in ev_sets else None
        hit = G.passed(he[s][1], ids) if s in he else None
        rows.append({"k": len(s), "set": list(s), "name": G._name(s), "mc_average": mc,
                     "pass@1": None if hit is None else float(hit.mean() * 100),
                     "fidelity": he[s][1].get("fidelity", {}).get("prefix_kept") if s in he else None,
                     "speedup_ideal": ideal_speedup(n_blocks, len(s))})
    best = {}
    tr_hit, tr_sets = train["data"]["hit"], train["sets"]
    for k in sorted({r["k"] for r in rows}):
        pool = [s for s in tr_sets if len(s) == k]
        if pool:
            cols = [tr_sets.index(s) for s in pool]
            s, how = pool[P.best_static(tr_hit[:, cols], np.asarray(train["data"]["task"]))], "MC training split"
        else:
            fid = {r["name"]: r for r in rows if r["k"] == k and r["fidelity"] is not None}
            if not fid:
                continue
            s, how = _key(max(sorted(fid), key=lambda n: fid[n]["fidelity"]).removeprefix("omit-").split("-")), "fidelity prompts"
        row = next(r for r in rows if _key(r["set"]) == s)
        best[k] = {**row, "chosen_on": how}
    return rows, best


def _best_static_on_code(nll: dict, gen_loss: str, he_by_key: dict) -> dict:
    """Per k, the static set of lowest mean generation loss (gen_loss) on the source's training-split code
    replies, among its sets with HumanEval results: {k: {"set", "loss", "chosen_on"}}. No evaluation data."""
    rows = (nll["split"] == "train") & (nll["kind"] == "code")
    if not rows.any():
        return {}
    mean = np.nanmean(nll["losses"][gen_loss][rows], axis=0)
    best = {}
    for i, s in enumerate(nll["sets"]):
        if s and s in he_by_key and (len(s) not in best or mean[i] < best[len(s)]["loss"]):
            best[len(s)] = {"set": s, "loss": float(mean[i]),
                            "chosen_on": f"{gen_loss} loss, {int(rows.sum())} training code replies"}
    return best


def _routers(run, gen, ev_data, gen_sets, ids, n_blocks):
    """Fixed-k routing: the committed hidden-state routers' choices on the MC evaluation rows
    (routers/preds) and on the HumanEval messages (retrained from the committed data, as the generation
    report does); HumanEval pass@1 only where every chosen set was run."""
    from .search import split_pool

    rows = []
    hits = {_key(s["omitted"]): G.passed(s, ids) for s in gen_sets.values()}
    for k in (3, 5):
        cand = run / f"cand-k{k}.json"
        if not cand.is_file():
            continue
        pool_sets = [_key(c["omitted"]) for c in split_pool(str(cand))[0]]
        cols = R.columns(ev_data, pool_sets)
        for obj in OBJECTIVES:
            files = [run / "routers" / "preds" / f"hidden-{obj}-k{k}-{s}.npz" for s in ("val", "test")]
            if not all(f.is_file() for f in files):
                continue
            chosen = np.concatenate([R._scores(f, ev_data, i)[1] for i, f in enumerate(files)])
            mc = mc_measure(ev_data, ev_data["hit"][:, cols][np.arange(len(chosen)), chosen])["average"]
            got = G.router_picks(run, gen / "features.npz", k, obj, ids)
            he = None
            if got is not None and all(_key(got[1][c]) in hits for c in set(got[0].tolist())):
                he = float(np.mean([hits[_key(got[1][c])][i] for i, c in enumerate(got[0])]) * 100)
            rows.append({"k": k, "router": f"hidden, {obj}", "mc_average": mc, "pass@1": he,
                         "speedup_ideal": ideal_speedup(n_blocks, k)})
    return rows


# -- output -------------------------------------------------------------------------------------------


def _loss_text(mc_loss: str, gen_loss: str, gen_path) -> str:
    """The predictor's unit (predictor.json "loss", shown by `info`)."""
    if gen_path is None or gen_loss == "nll":
        return ("loss against dense in nats per token: MC, " + MC_LOSS_TEXT[mc_loss]
                + (f"; the NLL per token of the dense model's replies ({Path(gen_path).name}), set minus dense"
                   if gen_path is not None else ""))
    return (f"loss against dense: MC, {MC_LOSS_TEXT[mc_loss]} (nats per token); generation "
            f"({Path(gen_path).name}), {GEN_LOSS_TEXT[gen_loss]} (a share of the reply, 0 to 1)")


def _f(x, nd=2):
    return "–" if x is None else "inf" if x == np.inf else "-inf" if x == -np.inf else f"{x:.{nd}f}"


def _mc_loss_line(pred: dict) -> str:
    kind = pred.get("mc_loss", "gold")
    areas = pred.get("mc_loss_area") or {}
    tried = ", ".join(f"{k} {v:.2f}" for k, v in areas.items())
    return MC_LOSS_TEXT[kind] + (f"; held-out MC average over mean k, by MC loss: {tried}" if tried else "")


def _gen_loss_line(pred: dict) -> str:
    kind = pred.get("gen_loss") or "nll"
    areas = pred.get("gen_loss_area") or {}
    tried = ", ".join(f"{k} {v:.1f}%" for k, v in areas.items())
    return (GEN_LOSS_TEXT[kind] + (" (nats per token)" if kind == "nll" else " (a share of the reply)")
            + (f"; held-out replies decoded word for word, averaged over mean k, by generation loss: {tried}" if tried else "")
            + (f"; dense itself decodes {100 * pred['gen_dense_verbatim']:.1f}% of its replies word for word in a "
               "full-sequence pass (the numerics)" if pred.get("gen_dense_verbatim") is not None else ""))


def to_markdown(rep: dict) -> str:
    d = rep["dense"]
    sel = rep["selection"]
    out = [f"# Adaptive depth: {rep['model']} ({rep['n_blocks']} blocks)", "",
           f"Menu: dense and the {len(rep['menu']) - 1} sets with both MC scores and HumanEval results "
           f"(k = {', '.join(str(k) for k in sorted(set(rep['sizes'])) if k)}). Loss predictor: ridge heads on the "
           f"hidden state after block {AFTER} ({rep['predictor']['pooling']}, ridge {rep['predictor']['ridge']}), "
           f"trained on {', '.join(rep['predictor']['sources'])}; predicts the loss against dense "
           f"(MC: {_mc_loss_line(rep['predictor'])}, nats per token; generation: {_gen_loss_line(rep['predictor'])}). "
           "The MC loss, the generation loss, pooling, ridge, the budget grid and the default budget "
           f"were chosen on {sel['rows']} held-out rows of the training split (whole questions held out); MC evaluation ({rep['n']['mc_eval']} rows: "
           f"the tasks' validation and test splits) and HumanEval ({rep['n']['humaneval']} problems, held out) chose nothing.", "",
           ("**Speed**: the ideal L / (L − mean k), equal reply lengths assumed, and beside it a *measured mix* of "
            "per-depth decode times on each backend measured (below)." if rep["speed"].get("depths") else
            "**Speed is ideal**, not measured: L / (L − mean k), equal reply lengths assumed.")]
    if rep.get("healed"):
        h = rep["healed"]
        out.insert(3, f"**Healed menu**: the {len(h['sets'])} menu sets the pool adapter heals run with it on: their MC "
                      f"columns from `{h['folder']}`/data-healed-{{train,val,test}}, their HumanEval from `{h['folder']}`/"
                      f"gen-pool, their replies' statistics from the --nll file's healed columns ({h.get('gen', 'reply NLL')}). "
                      "Every other set runs unhealed. Best static sets are chosen the "
                      "same way over the same columns, so they are healed where the menu is. The fixed-k routers are "
                      "left out (trained unhealed; the healed ones: heal_report.md). The adapter's cost in speed is not "
                      "in the ideal or measured-mix speedups (it is measured in heal_report.md: adapter cost).")
        out.insert(4, "")
    if rep.get("mc_extra"):
        out.insert(3, f"MC scores of the sets the run's data lacks (the same rows, unhealed): `{rep['mc_extra']}`/"
                      "data-extra-{train,val,test} (benchmarks/heal_gpu.py mc-extra).")
        out.insert(4, "")
    m = rep["speed"].get("measured")
    if m:
        out.append(f"The one measured decode figure for this model: the k = {m['k']} static set {m['set']} at "
                   f"{m['cell']} tokens on {m['backend']}, {m['static_speedup']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] "
                   f"against the ideal {m['ideal']:.3f} (`{m['file']}`).")
    depths = rep["speed"].get("depths") or []
    for sp in depths:
        per_k = "; ".join(f"k = {k} {v['omitted']} {v['median']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] (ideal {v['ideal']:.3f})"
                          for k, v in sorted(sp["speedup"].items(), key=lambda kv: int(kv[0])))
        out.append(f"Measured per depth on {sp['backend']} (`{sp['file']}`, benchmarks/depth_speed.py: decode {sp['decode']}, "
                   f"median of {sp['runs']} interleaved rounds, dense {sp['dense_ms']:.1f} ms per token): {per_k}.")
    if depths:
        out.append("The frontier's *measured mix* on a backend is dense's time per token over the mean of the chosen "
                   "depths' measured times there (each depth timed alone with one set of its k: every block costs "
                   "alike, so the time per token follows k; equal reply lengths assumed; the routing itself is inside "
                   "the prefill).")
    backends = [sp["backend"] for sp in depths]

    def cols(part) -> str:  # the frontier's speed columns of one prompt set
        return f"{part['speedup_ideal']:.3f} | " + "".join(f"{_f(part['speedup_measured_mix'][b], 3)} | " for b in backends)

    def mix_heads(what) -> str:
        return "".join(f"{what} measured mix ({b}) | " for b in backends)

    out += ["", f"Default budget (`--max-loss`): **{_f(sel['default_max_loss'], 4)}**, the largest budget whose MC average on "
            f"those held-out training rows keeps ≥ {sel['keep']:.0%} of dense's ({sel['dense_average']:.2f}, the average over their tasks).", "",
            "## Frontier", "",
            "Per budget: mean blocks skipped and ideal speedup on each prompt set (the predictor routes each prompt), "
            "six-task MC average (%), HumanEval pass@1 (%).", "",
            "| budget | MC mean k | MC ideal speedup | " + mix_heads("MC") + "MC avg | HumanEval mean k | "
            "HE ideal speedup | " + mix_heads("HE") + "HumanEval pass@1 |",
            "|---|---|---|---|---|---|---|" + "---|---|" * len(backends),
            f"| dense | 0 | 1.000 | " + "1.000 | " * len(backends) + f"{d['mc']['average']:.2f} | 0 | 1.000 | "
            + "1.000 | " * len(backends) + f"{d['humaneval']['pass@1']:.1f} |"]
    seen = set()
    for r in rep["frontier"]:
        key = (round(r["mc"]["mean_k"], 3), round(r["humaneval"]["mean_k"], 3))
        if key in seen:
            continue  # budgets that route every prompt alike: one row
        seen.add(key)
        star = " (default)" if r["budget"] == sel["default_max_loss"] else ""
        out.append(f"| {_f(r['budget'], 4)}{star} | {r['mc']['mean_k']:.2f} | {cols(r['mc'])}"
                   f"{r['mc']['average']:.2f} | {r['humaneval']['mean_k']:.2f} | {cols(r['humaneval'])}"
                   f"{r['humaneval']['pass@1']:.1f} |")
    a = rep["default"]

    def speeds_of(part) -> str:
        return f"{part['speedup_ideal']:.3f}x ideal" + "".join(
            f", {_f(part['speedup_measured_mix'][b], 3)}x measured mix on {b}" for b in backends)

    out += ["", f"At the default budget: MC {a['mc']['average']:.2f} at mean k {a['mc']['mean_k']:.2f} "
            f"({speeds_of(a['mc'])}); HumanEval {a['humaneval']['pass@1']:.1f} at mean k "
            f"{a['humaneval']['mean_k']:.2f} ({speeds_of(a['humaneval'])}). HumanEval usage: "
            + ", ".join(f"{n} {c}" for n, c in a["humaneval"]["usage"].items()) + ".", "",
            "## Adaptive against the best static set at the same mean k", "",
            "The budget is the smallest whose mean k on that prompt set reaches the static set's k (matched on the "
            "predictions, no labels). Paired bootstrap 95% intervals of adaptive − static (points).", "",
            "| k | best static (chosen on) | MC: adaptive mean k | adaptive | static | Δ [95%] | HE: adaptive mean k | adaptive | static | Δ [95%] |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["matched"]:
        mc, he = r["mc"], r["humaneval"]
        out.append(f"| {r['k']} | {r['set']} ({r['chosen_on']}) | {mc['adaptive_mean_k']:.2f} | {mc['adaptive']:.2f} | "
                   f"{mc['static']:.2f} | {mc['adaptive_minus_static']:+.2f} [{mc['ci95'][0]:+.2f}, {mc['ci95'][1]:+.2f}] | "
                   f"{he['adaptive_mean_k']:.2f} | {he['adaptive']:.1f} | {he['static']:.1f} | "
                   f"{he['adaptive_minus_static']:+.1f} [{he['ci95'][0]:+.1f}, {he['ci95'][1]:+.1f}] |")
    cs = rep.get("matched_code_static") or []
    if cs:
        out += ["", "HumanEval against a second static baseline, as strong as the predictor's code signal: per k, the set "
                f"of lowest mean generation loss on the training split's code replies ({cs[0]['chosen_on']}), among every "
                "set with HumanEval results; the adaptive side is the row above's.", "",
                "| k | static set (train loss) | adaptive mean k | adaptive | static | Δ [95%] |", "|---|---|---|---|---|---|"]
        for r in cs:
            out.append(f"| {r['k']} | {r['set']} ({r['train_loss']:+.3f}) | {r['adaptive_mean_k']:.2f} | {r['adaptive']:.1f} | "
                       f"{r['static']:.1f} | {r['adaptive_minus_static']:+.1f} [{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}] |")
    ks = sorted(set(rep["sizes"]) - {0})
    out += ["", "## What the predictor predicts per prompt set", "",
            "Mean over the prompts of the lowest predicted loss among the candidates of each k ("
            + ("nats per token" if rep["predictor"].get("gen_loss") in (None, "nll") else
               "one scale for both: the MC targets were in nats per token, the generation targets a share of the reply")
            + ").", "",
            "| prompts | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, by_k in rep["predicted_lowest_loss"].items():
        out.append(f"| {name} | " + " | ".join(f"{by_k[str(k)]:+.3f}" for k in ks) + " |")
    t = rep["targets"]["humaneval_95_speed_1.10_ideal"]
    f95 = rep["targets"].get("humaneval_95_fastest")
    out += ["", "## The issue's targets", "",
            "- At equal mean k, adaptive ≥ the best static set with an interval excluding a loss (lower bound ≥ 0): "
            + "; ".join(f"k = {r['k']}: MC {'met' if r['mc']['ci95'][0] >= 0 else 'not met'}, HumanEval "
                        f"{'met' if r['humaneval']['ci95'][0] >= 0 else 'not met'}" for r in rep["matched"]) + "."
            + (" Against the static set chosen on the training code replies, HumanEval: " + "; ".join(
                f"k = {r['k']} {'met' if r['ci95'][0] >= 0 else 'not met'}" for r in cs) + "." if cs else ""),
            "- A budget with HumanEval pass@1 ≥ 95% of dense and ideal speedup ≥ 1.10: "
            + (f"met at budgets {', '.join(_f(b, 4) for b in t)} (ideal speed)." if t else "**not met** at any budget.")
            + (f" The fastest budget that keeps 95% of dense's HumanEval, {_f(f95['budget'], 4)}: pass@1 "
               f"{f95['pass@1']:.1f} at mean k {f95['mean_k']:.2f}, {speeds_of(f95)}." if f95 else ""),
            ]
    orc = rep.get("humaneval_oracle")
    if orc:
        def cell(v):
            return f"mean k {v['mean_k']:.2f} ({v['speedup_ideal']:.3f}x ideal)"
        keep = f"{KEEP:.2f}"
        out += ["", "## How far the predictor is from what the menu allows (HumanEval)", "",
                "A ceiling, not a method: a router that knew each problem's HumanEval results (the labels it is scored "
                "on) takes, per problem, the largest candidate that is right on it, and gives up as little depth as "
                "keeping the share of dense's passes needs (`oracle_mean_k`). It also gains from answers right by chance "
                "on one of many candidates; the second row, dense and one set per k, gains less that way. It chooses "
                "nothing.", "",
                f"| candidates | keeping {KEEP:.0%} of dense's passes | keeping all of them |", "|---|---|---|",
                f"| the menu ({len(rep['menu'])}, dense included) | {cell(orc['menu'][keep])} | {cell(orc['menu']['1.00'])} |",
                f"| dense + the best static set of each k ({', '.join(str(s) for s in orc['best_static_per_k_sets'])}) | "
                f"{cell(orc['best_static_per_k'][keep])} | {cell(orc['best_static_per_k']['1.00'])} |"]
        auc = orc.get("predictor_auc")
        if auc:
            vals = [a for a in auc["per_set"].values() if a is not None]
            out += ["", f"Why the predictor falls short: per set, among the problems dense passes, its predicted loss "
                        f"ranks those the set breaks above those it keeps with an AUC of {auc['mean']:.2f} on average "
                        f"over the {len(vals)} sets of the menu that break some of them and keep some ({min(vals):.2f} to "
                        f"{max(vals):.2f}; 0.5 is no signal, `ranking_auc`)."
                        + (" Its signals rank code prompts only weakly." if auc["mean"] < 0.75 else "")]
        by_gen = orc.get("predictor_auc_by_gen_loss")
        if by_gen:
            out += ["", "The same mean AUC of the predictor fitted with each generation loss (reported; the choice was "
                        "made on held-out training replies): " + ", ".join(f"{g} {a:.2f}" for g, a in by_gen.items()) + "."]
    out += ["", "## Static sets and fixed-k routing", "",
            "| row | k | set | ideal speedup | MC avg | HumanEval pass@1 |", "|---|---|---|---|---|---|"]
    for k, b in sorted(rep["best_static"].items()):
        out.append(f"| best static ({b['chosen_on']}) | {k} | {b['set']} | {b['speedup_ideal']:.3f} | {_f(b['mc_average'])} | {_f(b['pass@1'], 1)} |")
    for r in rep["routers"]:
        out.append(f"| routed ({r['router']}) | {r['k']} | – | {r['speedup_ideal']:.3f} | {_f(r['mc_average'])} | {_f(r['pass@1'], 1)} |")
    for r in rep["statics"]:
        out.append(f"| static | {r['k']} | {r['set']} | {r['speedup_ideal']:.3f} | {_f(r['mc_average'])} | {_f(r['pass@1'], 1)} |")
    return "\n".join(out) + "\n"


def plot(rep: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    depths = rep["speed"].get("depths") or []  # measured per-depth times: the budgets drawn again at their measured mix
    for ax, key, y, label in ((axes[0], "mc", "average", "MC average, 6 tasks (%)"),
                              (axes[1], "humaneval", "pass@1", "HumanEval pass@1 (%)")):
        st = "mc_average" if key == "mc" else "pass@1"
        pts = [(r["speedup_ideal"], r[st]) for r in rep["statics"] if r[st] is not None]
        ax.scatter(*zip(*pts), s=12, color="0.7", label="static sets")
        best = sorted((b["speedup_ideal"], b[st]) for b in rep["best_static"].values() if b[st] is not None)
        dense = rep["dense"][key][y]
        ax.plot([1.0] + [p[0] for p in best], [dense] + [p[1] for p in best], "s--", color="tab:gray", label="best static per k")
        fr = sorted({(r[key]["speedup_ideal"], r[key][y]) for r in rep["frontier"]})
        ax.plot(*zip(*fr), "o-", ms=3, color="tab:blue", label="adaptive (budgets)")
        for sp, color in zip(depths, ("tab:cyan", "tab:purple", "tab:olive")):
            mixed = sorted({(r[key]["speedup_measured_mix"][sp["backend"]], r[key][y]) for r in rep["frontier"]
                            if r[key]["speedup_measured_mix"].get(sp["backend"]) is not None})
            if mixed:
                ax.plot(*zip(*mixed), "o--", ms=2, color=color, label=f"adaptive, measured mix ({sp['backend']})")
        for r in rep["routers"]:
            if r[st] is not None:
                ax.scatter(r["speedup_ideal"], r[st], marker="^", s=40, label=f"fixed k = {r['k']}, {r['router']}")
        a = rep["default"][key]
        ax.scatter(a["speedup_ideal"], a[y], marker="*", s=180, color="tab:red", zorder=5, label="default budget")
        ax.axhline(dense, color="black", linestyle=":", lw=1)
        ax.set_xlabel("decode speedup: ideal L / (L − mean k)" + ("; dashed: measured mix" if depths else ""))
        ax.set_ylabel(label)
    axes[1].axhline(0.95 * rep["dense"]["humaneval"]["pass@1"], color="tab:red", linestyle=":", lw=1, label="95% of dense")
    orc = rep.get("humaneval_oracle")
    if orc:  # the ceiling of a router that knew the results (it reads the labels: not a method)
        for name, marker, label in (("menu", "D", "ceiling: knew the results, menu"),
                                    ("best_static_per_k", "P", "ceiling: knew the results, best static per k")):
            pts = [(v["speedup_ideal"], v["pass@1"]) for v in orc[name].values()]
            axes[1].scatter(*zip(*pts), marker=marker, s=45, facecolors="none", edgecolors="tab:green", label=label)
    # the markers both panels share are in the first panel's legend
    shown = [(h, t) for h, t in zip(*axes[1].get_legend_handles_labels()) if t.startswith(("ceiling", "95%"))]
    axes[1].legend(*zip(*shown), fontsize=7, loc="center right")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Adaptive depth on {rep['model']} (speed: ideal" + (f"; dashed: the budgets at their measured "
                 f"mix, {', '.join(sp['backend'] for sp in depths)})" if depths else ", not measured)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _strict(value):
    """The report as strict JSON: the open budgets (-inf: dense only; inf: no limit) as the strings "-inf" and
    "inf" (json.dumps would write Infinity, which JSON parsers other than Python's refuse), NaN as null."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write(run_dir, gen_dir, out_dir, model: str, nll_path=None, bench_file=None, extra=None, speed_files=(),
          healed=None) -> Path:
    """Build the report, write OUT_DIR/adaptive.{json,md,png} and the predictor (OUT_DIR/predictor/); a
    rerun replaces them."""
    rep, predictor = build(run_dir, gen_dir, model, nll_path, bench_file, extra=extra, speed_files=speed_files,
                           healed=healed)
    out = Path(out_dir)
    write_json(out / "adaptive.json", _strict(rep))
    write_text(out / "adaptive.md", to_markdown(rep))
    write_predictor(out / "predictor", predictor, force=True)
    try:
        plot(rep, out / "adaptive.png")
    except ImportError:
        pass  # matplotlib is the optional `plot` extra
    return out / "adaptive.md"
