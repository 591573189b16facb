"""The evaluation report: dense vs static depth pruning vs PuDDing routed, at equal k.

Inputs are the per-example, per-set scores of the evaluation splits (`pudding-mlx train data
--split test|validation`), the candidates files of the search (one per k) and each router's scores
on the same texts (`pudding-mlx train predict`). Nothing is re-run here: every row is read off the
same per-example correctness table, so rows differ only in which set each example ran with.

Rows, per k:
  dense    every block (one row, k = 0)
  static   each set of the router pool, for every example; "best static" = highest average
  sleb     the set the "mix" chain found (a SLEB-style static set searched on all calibration tasks
           together), one per search loss
  routed   per router: each example runs the set with the highest router score
  random   a uniformly random pool set per example (its expectation: the mean over the pool)
  oracle   the best pool set per example (correct if any pool set is correct): routing's ceiling

Metrics per task as in `pudding_mlx.tasks` (ARC-C acc_norm, ARC-E acc, BoolQ acc, HellaSwag acc_norm,
PIQA acc, WinoGrande acc; OpenBookQA acc_norm and MMLU acc as unseen tasks), in %. The average is
over the six main tasks. Intervals: paired bootstrap over examples (resampled within each task,
2000 draws) of routed - best static on the six-task average; 95% percentile interval.
"""

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from pudding_mlx.errors import PuddingError

from .router_data import load_router_data
from .search import atomic_write_json, split_pool
from pudding_mlx.tasks import eval_metric

MAIN_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande")
UNSEEN_TASKS = ("openbookqa", "mmlu")
SHORT = {"arc_challenge": "ARC-C", "arc_easy": "ARC-E", "boolq": "BoolQ", "hellaswag": "HellaSwag",
         "piqa": "PIQA", "winogrande": "WinoGr.", "openbookqa": "OBQA", "mmlu": "MMLU"}


def load_eval(paths: Sequence) -> dict:
    """Concatenate evaluation data files (router_data.npz from `train data`) on common sets."""
    parts = [load_router_data(p) for p in paths]
    sets = [tuple(s) for s in parts[0]["meta"]["sets"]]
    for p, part in zip(paths, parts):
        if [tuple(s) for s in part["meta"]["sets"]] != sets:
            raise PuddingError(f"{p}: scored for other candidate sets than {paths[0]}; rebuild with the same --candidates")
    out = {"sets": sets}
    for key in ("task", "id", "text", "gold", "correct", "correct_norm", "dense_correct", "dense_correct_norm", "y"):
        out[key] = np.concatenate([part[key] for part in parts])
    out["dense_y"] = np.concatenate([part["dense"] for part in parts])
    # the gold answer's margin over the best wrong answer (mean log-likelihood per token): NaN where a file lacks
    # the per-choice scores
    n_sets = len(sets)
    out["margin"] = np.concatenate([margin(p["mean_ll"], p["gold"], p["n_choices"]) if "mean_ll" in p
                                    else np.full((len(p["task"]), n_sets), np.nan) for p in parts])
    out["dense_margin"] = np.concatenate([margin(p["dense_mean_ll"][:, None], p["gold"], p["n_choices"])[:, 0]
                                          if "dense_mean_ll" in p else np.full(len(p["task"]), np.nan) for p in parts])
    # the metric each task reports: acc or acc_norm
    norm = np.array([eval_metric(t) == "acc_norm" for t in out["task"]])
    out["hit"] = np.where(norm[:, None], out["correct_norm"], out["correct"])  # [N, sets]
    out["dense_hit"] = np.where(norm, out["dense_correct_norm"], out["dense_correct"])
    return out


def margin(mean_ll: np.ndarray, gold: np.ndarray, n_choices: np.ndarray) -> np.ndarray:
    """[N, S] the gold choice's mean log-likelihood per token minus the best wrong choice's, from the router
    data's per-choice scores mean_ll [N, S, C] (choices past n_choices are padding)."""
    ll = mean_ll.astype(np.float64)
    rows = np.arange(len(gold))
    gold_ll = ll[rows, :, gold]
    wrong = np.arange(ll.shape[2])[None, :] < np.asarray(n_choices)[:, None]
    wrong[rows, gold] = False
    best_wrong = np.where(wrong[:, None, :], ll, -np.inf).max(2)
    return gold_ll - best_wrong


def join_sets(data: dict, more: dict, what: str, replace: bool = False) -> dict:
    """`data` (load_eval) with the columns of `more`, evaluation data scored on the same rows for other sets (e.g.
    benchmarks/heal_gpu.py mc-extra beside a run's data-*.npz); sets both hold keep `data`'s column, or with
    `replace` take `more`'s (e.g. the same sets healed: benchmarks/heal_gpu.py mc-healed). The dense columns stay
    `data`'s."""
    if list(more["task"]) != list(data["task"]) or list(more["id"]) != list(data["id"]):
        raise PuddingError(f"{what}: other rows than the data it joins; score it on the same rows (the run's "
                           "tasks, split, seed and size)")
    have = {s: i for i, s in enumerate(data["sets"])}
    new = [i for i, s in enumerate(more["sets"]) if s not in have]
    out = dict(data, sets=list(data["sets"]) + [more["sets"][i] for i in new])
    for key in ("correct", "correct_norm", "y", "hit", "margin"):
        out[key] = np.concatenate([data[key], more[key][:, new]], 1)
        if replace:
            for i, s in enumerate(more["sets"]):
                if s in have:
                    out[key][:, have[s]] = more[key][:, i]
    return out


def columns(data: dict, omitted_sets: Sequence[Sequence[int]], what: str = "the evaluation data") -> List[int]:
    """The columns of `data` (its "sets") holding each of `omitted_sets`."""
    index = {tuple(sorted(s)): i for i, s in enumerate(data["sets"])}
    missing = [list(s) for s in omitted_sets if tuple(sorted(s)) not in index]
    if missing:
        raise PuddingError(f"{what} has no scores for sets {missing[:2]}; rebuild it with these candidates")
    return [index[tuple(sorted(s))] for s in omitted_sets]


def per_task(data: dict, hits: np.ndarray) -> Dict[str, float]:
    """Accuracy (%) per task of a per-example hit vector (bool or expected value)."""
    return {t: 100.0 * float(hits[data["task"] == t].mean()) for t in MAIN_TASKS + UNSEEN_TASKS
            if (data["task"] == t).any()}


def average(tasks: Dict[str, float]) -> float:
    present = [tasks[t] for t in MAIN_TASKS if t in tasks]
    return float(np.mean(present)) if present else float("nan")


def bootstrap_delta(data: dict, a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0):
    """Paired bootstrap of average(a) - average(b) over the main tasks: 95% interval."""
    rng = np.random.default_rng(seed)
    diffs = np.zeros(draws)
    for t in MAIN_TASKS:
        idx = np.flatnonzero(data["task"] == t)
        if len(idx) == 0:
            continue
        d = (a[idx].astype(float) - b[idx].astype(float))
        picks = rng.integers(0, len(idx), size=(draws, len(idx)))
        diffs += 100.0 * d[picks].mean(axis=1)
    diffs /= sum((data["task"] == t).any() for t in MAIN_TASKS)
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


def router_metrics(pred, y) -> dict:
    """MSE, oracle agreement and mean regret of predictions `pred` [N, M] against targets `y`.

    The router picks argmax(pred); the oracle's value is max(y). agreement: the fraction of rows
    where the picked set's y equals the oracle's (ties count); regret: mean of max(y) - y[picked]."""
    pred, y = np.asarray(pred, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if pred.shape != y.shape or pred.ndim != 2:
        raise PuddingError(f"router_metrics: pred {pred.shape} and y {y.shape} must both be [N, M]")
    n = len(y)
    if n == 0:
        return {"n": 0, "mse": float("nan"), "agreement": float("nan"), "regret": float("nan"),
                "oracle_y": float("nan"), "chosen_y": float("nan")}
    picked = pred.argmax(axis=1)
    got = y[np.arange(n), picked]
    best = y.max(axis=1)
    return {"n": int(n), "mse": float(np.mean((pred - y) ** 2)),
            "agreement": float(np.mean(got >= best)), "regret": float(np.mean(best - got)),
            "oracle_y": float(np.mean(best)), "chosen_y": float(np.mean(got))}


def build_report(model: str, eval_paths: Sequence, candidates: Dict[int, str], routers: Dict[str, Dict[int, Sequence]],
                 router_train: Dict[str, Dict[int, str]] = None, seed: int = 0, select_paths: Sequence = ()) -> dict:
    """routers: {variant: {k: [score files (npz from `train predict`), one per eval data file]}}.
    select_paths: data disjoint from the evaluation examples (the router's training data) on which the
    best static set is chosen, as the routers' own choices are; without it the best static set is
    chosen on the evaluation data itself (which flatters it; the report says so)."""
    data = load_eval(eval_paths)
    select = load_eval(select_paths) if select_paths else None
    rows, deltas, router_rows = [], [], []
    dense_tasks = per_task(data, data["dense_hit"])
    rows.append({"method": "dense", "k": 0, "router": None, "set": [], "tasks": dense_tasks, "average": average(dense_tasks)})
    for k, cand_file in sorted(candidates.items()):
        pool, sleb = split_pool(cand_file)
        pool_sets = [c["omitted"] for c in pool]
        cols = columns(data, pool_sets)
        hits = data["hit"][:, cols]  # [N, M]
        statics = []
        for m, (c, s) in enumerate(zip(pool, pool_sets)):
            tasks = per_task(data, hits[:, m])
            statics.append({"method": "static", "k": k, "router": None, "set": s, "source": f"{c.get('task')}/{c.get('loss')}",
                            "tasks": tasks, "average": average(tasks)})
        if select is not None:
            sel_hits = select["hit"][:, columns(select, pool_sets)]
            sel_avg = [average(per_task(select, sel_hits[:, m])) for m in range(len(pool_sets))]
            best = max(range(len(statics)), key=lambda m: (sel_avg[m], -m))
            # reference: the best set of each task (on the selection data), run by the task's label
            task_best = {t: int(np.argmax(sel_hits[select["task"] == t].mean(0))) for t in np.unique(select["task"])}
            per_ex = np.array([task_best.get(t, best) for t in data["task"]])
            tasks = per_task(data, hits[np.arange(len(per_ex)), per_ex])
            task_static = {"method": "task-static", "k": k, "router": "best set per task label", "tasks": tasks,
                           "average": average(tasks), "sets": {t: pool_sets[m] for t, m in task_best.items()}}
        else:
            best = max(range(len(statics)), key=lambda m: statics[m]["average"])
            task_static = None
        statics[best]["best"] = True
        rows += statics
        if task_static:
            rows.append(task_static)
        for loss, s in sorted(sleb.items()):
            tasks = per_task(data, data["hit"][:, columns(data, [s])[0]])
            rows.append({"method": "sleb", "k": k, "router": f"mix/{loss}", "set": s, "tasks": tasks, "average": average(tasks)})
        random_tasks = per_task(data, hits.mean(axis=1))
        rows.append({"method": "random", "k": k, "router": "uniform", "tasks": random_tasks, "average": average(random_tasks)})
        oracle_tasks = per_task(data, hits.any(axis=1))
        rows.append({"method": "oracle", "k": k, "router": None, "tasks": oracle_tasks, "average": average(oracle_tasks)})
        y = data["y"][:, cols]
        for variant, per_k in sorted(routers.items()):
            if k not in per_k:
                continue
            scores, chosen = (np.concatenate(part) for part in zip(*[_scores(p, data, i) for i, p in enumerate(per_k[k])]))
            if scores.shape[1] != len(pool_sets):
                raise PuddingError(f"{per_k[k][0]}: {scores.shape[1]} router outputs for {len(pool_sets)} pool sets (k={k})")
            routed_hit = hits[np.arange(len(chosen)), chosen]
            tasks = per_task(data, routed_hit)
            usage = np.bincount(chosen, minlength=len(pool_sets)) / len(chosen)
            rows.append({"method": "routed", "k": k, "router": variant, "tasks": tasks, "average": average(tasks),
                         "set_usage": [round(float(u), 4) for u in usage], "sets_used": int((usage > 0).sum()),
                         "regret_to_oracle": average(oracle_tasks) - average(tasks)})
            deltas.append({"k": k, "router": variant,
                           "routed_minus_best_static": average(tasks) - statics[best]["average"],
                           "ci95": bootstrap_delta(data, routed_hit, hits[:, best], seed=seed),
                           "best_static_set": pool_sets[best]})
            metrics = {"k": k, "router": variant, "eval": router_metrics(scores, y)}
            if _objective(per_k[k][0]) not in (None, "mse"):  # scores on another scale than y: no MSE
                metrics["eval"]["mse"] = None
            train_json = (router_train or {}).get(variant, {}).get(k)
            if train_json:
                t = json.loads(Path(train_json).read_text())
                metrics["validation"] = {key: t["best_val"].get(key) for key in ("mse", "agreement", "regret") if key in t["best_val"]}
                metrics["validation"]["best_epoch"] = t.get("best_epoch")
            router_rows.append(metrics)
    counts = {t: int((data["task"] == t).sum()) for t in MAIN_TASKS + UNSEEN_TASKS if (data["task"] == t).any()}
    return {"model": model, "n_per_task": counts, "rows": rows, "deltas": deltas, "router_metrics": router_rows,
            "best_static_chosen_on": "selection data: " + ", ".join(map(str, select_paths)) if select_paths
            else "the evaluation data itself (flatters the static baseline)"}


def _objective(path):
    with np.load(path, allow_pickle=False) as z:
        return str(z["objective"]) if "objective" in z.files else None


def _scores(path, data, part: int):
    """(scores [n, M], chosen [n]) of a `train predict` file, in the evaluation data's row order;
    chosen is the file's own decision (a router with a fallback rule) or the argmax."""
    with np.load(path, allow_pickle=False) as z:
        scores, ids, tasks = z["scores"], z["id"], z["task"]
        chosen = z["chosen"] if "chosen" in z.files else scores.argmax(1)
    # align to the evaluation data's row order by (task, id)
    where = {(t, i): r for r, (t, i) in enumerate(zip(tasks, ids))}
    mask = np.isin(data["task"], np.unique(tasks))
    try:
        order = [where[(t, i)] for t, i in zip(data["task"][mask], data["id"][mask])]
    except KeyError as e:
        raise PuddingError(f"{path}: no router score for example {e}; predict on the same data file")
    return scores[order], chosen[order]


def to_markdown(report: dict) -> str:
    tasks = [t for t in MAIN_TASKS + UNSEEN_TASKS if t in report["n_per_task"]]
    n_avg = sum(t in report["n_per_task"] for t in MAIN_TASKS)
    head = "| method | k | router / set | " + " | ".join(SHORT[t] for t in tasks) + f" | avg ({n_avg}) |"
    lines = [f"# PuDDing on {report['model']}", "",
             "Zero-shot accuracy (%), " + ", ".join(f"{SHORT[t]} n={n}" for t, n in report["n_per_task"].items())
             + " (seeded samples of each evaluation split). OBQA and MMLU are unseen tasks (not in the average). "
             + f"Best static set chosen on {report.get('best_static_chosen_on', 'the evaluation data itself')}.", "",
             head, "|" + "---|" * (len(tasks) + 4)]
    for r in report["rows"]:
        label = r["router"] or (("best: " if r.get("best") else "") + str(r.get("set", "")))
        if r["method"] == "static" and not r.get("best"):
            continue  # every static row is in report.json; the table shows the best one
        lines.append(f"| {r['method']} | {r['k']} | {label} | " + " | ".join(f"{r['tasks'].get(t, float('nan')):.1f}" for t in tasks)
                     + f" | **{r['average']:.2f}** |")
    lines += ["", f"## Routed minus best static ({n_avg}-task average, paired bootstrap 95% CI)", "",
              "| k | router | routed - best static | 95% CI |", "|---|---|---|---|"]
    for d in report["deltas"]:
        lines.append(f"| {d['k']} | {d['router']} | {d['routed_minus_best_static']:+.2f} | [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] |")
    lines += ["", "## Router metrics", "",
              "Validation: the by-question held-out part of the router training data (train splits). "
              "Eval: the evaluation texts above. Agreement = the router picks the oracle's set (argmax of the "
              "gold mean log-likelihood); regret = that likelihood's shortfall of the chosen set.", "",
              "| k | router | val MSE | val agreement | val regret | eval MSE | eval agreement | eval regret |",
              "|---|---|---|---|---|---|---|---|"]
    for m in report["router_metrics"]:
        v, e = m.get("validation", {}), m["eval"]
        f = lambda x: f"{x:.3f}" if isinstance(x, (int, float)) else "-"
        lines.append(f"| {m['k']} | {m['router']} | {f(v.get('mse'))} | {f(v.get('agreement'))} | {f(v.get('regret'))} | "
                     f"{f(e['mse'])} | {f(e['agreement'])} | {f(e['regret'])} |")
    if report.get("hidden_routers"):
        lines += ["", "## Hidden-state routers: what validation chose", "",
                  "Chosen on a by-question validation split of the training data (never on the evaluation data): "
                  "pooling, ridge strength and the margin over the fallback (the best static set on the training "
                  "data). Validation accuracy is the mean over the training tasks of the routed choice vs the fallback.", "",
                  "| router | block | pooling | ridge | margin | val routed % | val static % |", "|---|---|---|---|---|---|---|"]
        for name, h in report["hidden_routers"].items():
            v = h.get("validation") or {}
            margin = h["margin_is"] if h.get("margin") is None else f"{h['margin']:.4f}"
            lines.append(f"| {name} | {h['after']} | {h['pooling']} | {h['ridge']} | {margin} | "
                         f"{100 * v.get('accuracy', float('nan')):.2f} | {100 * v.get('static_accuracy', float('nan')):.2f} |")
    lines += ["", "## Every static candidate", "", head, "|" + "---|" * (len(tasks) + 4)]
    for r in report["rows"]:
        if r["method"] == "static":
            lines.append(f"| static | {r['k']} | {r['set']} ({r['source']}) | " + " | ".join(
                f"{r['tasks'].get(t, float('nan')):.1f}" for t in tasks) + f" | {r['average']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next(r["average"] for r in report["rows"] if r["method"] == "dense")
    ks = sorted({r["k"] for r in report["rows"] if r["k"] > 0})
    series = {"best static": [max(r["average"] for r in report["rows"] if r["method"] == "static" and r["k"] == k) for k in ks]}
    for name, method, router in (("SLEB-style (mix/likelihood)", "sleb", "mix/likelihood"), ("random set", "random", None),
                                 ("oracle", "oracle", None)):
        series[name] = [next((r["average"] for r in report["rows"] if r["method"] == method and r["k"] == k
                              and (router is None or r["router"] == router)), np.nan) for k in ks]
    for variant in sorted({r["router"] for r in report["rows"] if r["method"] == "routed"}):
        series[f"PuDDing ({variant} router)"] = [next((r["average"] for r in report["rows"] if r["method"] == "routed"
                                                       and r["k"] == k and r["router"] == variant), np.nan) for k in ks]
    ax.axhline(dense, color="black", linestyle=":", label=f"dense ({dense:.1f})")
    for name, values in series.items():
        ax.plot(ks, values, marker="o", label=name, linestyle="--" if name == "oracle" else "-")
    ax.set_xlabel("omitted blocks k")
    ax.set_ylabel("average zero-shot accuracy, 6 tasks (%)")
    ax.set_title(f"PuDDing on {report['model']}")
    ax.set_xticks(ks)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(report: dict, out_dir) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", report)
    md = out_dir / "report.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(to_markdown(report))
    tmp.replace(md)
    try:
        plot(report, out_dir / "report.png")
    except ImportError:
        pass  # matplotlib is the optional `plot` extra
    return md


def report_run_dir(run_dir, model: str = None) -> Path:
    """Build the report from a run folder laid out as results/<model>/pipeline.sh leaves it:
    data-*.npz (evaluation splits), cand-k*.json, routers/preds/<variant>-k<k>-<data>.npz,
    routers/heads/router_train-<variant>-k<k>.json. Writes report.md/.json/.png there."""
    import re

    run = Path(run_dir)
    evals = sorted(p for p in run.glob("data-*.npz") if p.stem != "data-train")
    if not evals:
        raise PuddingError(f"{run}: no evaluation data (data-test.npz, data-val.npz from `pudding-mlx train data`)")
    candidates = {int(m[1]): str(p) for p in run.glob("cand-k*.json") if (m := re.fullmatch(r"cand-k(\d+)", p.stem))}
    if not candidates:
        raise PuddingError(f"{run}: no candidates files cand-k<k>.json")
    routers, trained = {}, {}
    for p in (run / "routers" / "preds").glob("*-k*-*.npz"):
        m = re.fullmatch(r"(.+)-k(\d+)-(.+)", p.stem)
        if m:
            routers.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = p
    routers = {v: {k: [files[e.stem.removeprefix("data-")] for e in evals] for k, files in per_k.items()
                   if all(e.stem.removeprefix("data-") in files for e in evals)} for v, per_k in routers.items()}
    for v, per_k in routers.items():
        trained[v] = {k: run / "routers" / "heads" / f"router_train-{v}-k{k}.json" for k in per_k
                      if (run / "routers" / "heads" / f"router_train-{v}-k{k}.json").is_file()}
    name = model or json.loads(evals[0].with_suffix(".json").read_text()).get("settings", {}).get("model", run.name)
    select = [run / "data-train.npz"] if (run / "data-train.npz").is_file() else []
    hidden = {}
    for p in sorted((run / "routers" / "hidden").glob("hidden-*-k*.json")):
        r = json.loads(p.read_text())
        hidden[p.stem] = {k: r.get(k) for k in ("after", "pooling", "objective", "fallback", "margin", "margin_is",
                                                 "ridge", "validation")}
    name = Path(str(name)).name.removesuffix(".gguf")  # a path or hub id -> its last part ("1.5B" is no suffix)
    report = build_report(name, evals, candidates, routers, trained, select_paths=select)
    if hidden:
        report["hidden_routers"] = hidden
    return write_report(report, run)
