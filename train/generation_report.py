"""The generation report: HumanEval pass@1 and fidelity to dense beside multiple choice, for dense, every
candidate set (k = 1, 2 from the same searches' first removals; k = 3, 5, 7 the candidate pools), the best
static set, every hidden-state router, random and the best set per problem (oracle).

HumanEval is held out: nothing here is chosen on it. The best static set of a k is chosen twice, both
without HumanEval: on the multiple-choice selection data (the training split, as the main report chooses
it; k = 3, 5, 7) and on the fidelity prompts (the set whose replies keep most of dense's tokens before the
first difference; k <= the largest k with fidelity). A router's row is the set it picks for each problem
(from the problem's message, as `chat` routes a first turn), scored with that set's own result: the
routers are the hidden-state routers of the run (`train router --variant probe`), retrained from the
committed router data and features (seconds on a CPU) and applied to the features of the HumanEval
messages that `train generate --features-after` wrote on the GPU (the dense bf16 model's hidden state:
the router's input as the training side computes it).

Intervals: paired bootstrap over problems (2,000 draws), 95%.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from pudding_mlx.atomic import write_json, write_text
from pudding_mlx.errors import PuddingError

OBJECTIVES = ("task", "accuracy", "mse")


def load_sets(gen_dir) -> Dict[str, dict]:
    """{set name: its sets/<name>.json} of a `train generate` output folder."""
    sets = {}
    for p in sorted((Path(gen_dir) / "sets").glob("*.json")):
        sets[p.stem] = json.loads(p.read_text())
    if "dense" not in sets:
        raise PuddingError(f"{gen_dir}: no sets/dense.json; run `pudding-mlx train generate` first")
    return sets


def passed(result: dict, ids: Sequence[str]) -> np.ndarray:
    by_id = {r["task_id"]: r["passed"] for r in result["humaneval"]["records"]}
    return np.array([by_id[i] for i in ids], dtype=bool)


def bootstrap(a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0) -> List[float]:
    """95% interval of mean(a) - mean(b) in points, resampling problems (paired)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(draws, len(a)))
    d = (a[idx].astype(float).mean(1) - b[idx].astype(float).mean(1)) * 100
    return [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]


def _name(omitted) -> str:
    return "dense" if not omitted else "omit-" + "-".join(str(b) for b in sorted(omitted))


def router_picks(run_dir, features_path, k: int, objective: str, ids: Sequence[str]):
    """(the candidate index a hidden-state router, retrained from RUN_DIR's committed data, picks for each of
    `ids` (rows of FEATURES_PATH), the pool's sets); None when the run lacks the router data."""
    import tempfile

    from .probe import load_probe, predict, train_probe_router
    from .report import split_pool

    run = Path(run_dir)
    if not all((run / f).is_file() for f in ("data-train.npz", "data-train.json", "features-train.npz",
                                                f"cand-k{k}.json")):
        return None
    pool, _ = split_pool(str(run / f"cand-k{k}.json"))
    sets = [sorted(c["omitted"]) for c in pool]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data-train"
        data.mkdir()
        for src, dst in (("data-train.npz", "router_data.npz"), ("data-train.json", "router_data.json"),
                         ("features-train.npz", "features_pca.npz")):
            (data / dst).write_bytes((run / src).read_bytes())
        train_probe_router(data, Path(tmp) / "router", sets, objective=objective)
        probe = load_probe(Path(tmp) / "router")
    with np.load(run / "features-train.npz", allow_pickle=False) as z:
        basis = {key: z[key].astype(np.float64) for key in z.files if key.startswith(("basis_", "center_"))}
    with np.load(features_path, allow_pickle=False) as z:
        rows = {str(i): n for n, i in enumerate(z["id"])}
        order = [rows[i] for i in ids]
        feats = {key: (z[key].astype(np.float64)[order] - basis[f"center_{key}"]) @ basis[f"basis_{key}"].T
                 for key in z.files if f"basis_{key}" in basis}  # the PCA projection the router was trained on
    return predict(probe, feats)["chosen"], sets


def _mlx_rows(mlx_dir, torch_hits: Dict[str, np.ndarray], ids: Sequence[str]) -> dict:
    """The preset's own `pudding-mlx eval --tasks humaneval,fidelity` runs (MLX, its 4-bit weights): pass@1
    per configuration against MLX dense, and, for every fixed set (dense included) that the PyTorch side ran
    too (`torch_hits`: set name -> per-problem passes), MLX against PyTorch on that set (parity)."""
    runs = {}
    for p in sorted(Path(mlx_dir).glob("eval_*.json")):
        payload = json.loads(p.read_text())
        he = payload["tasks"]["humaneval"]
        by_id = {r["task_id"]: r for r in he["records"]}
        usage: Dict[str, int] = {}
        for r in he["records"]:
            usage[str(r["omitted"])] = usage.get(str(r["omitted"]), 0) + 1
        runs[p.stem] = {"file": str(p), "mode": payload["mode"], "omitted": payload.get("omitted"),
                        "hit": np.array([by_id[i]["passed"] for i in ids], bool), "usage": usage,
                        "tokens_mean": he["tokens_mean"], "hit_limit": he["hit_limit"],
                        "fidelity": payload["tasks"].get("fidelity", {}).get("prefix_kept"),
                        "identical": payload["tasks"].get("fidelity", {}).get("identical")}
    dense = next((r for r in runs.values() if r["mode"] == "dense"), None)
    rows = []
    for name, r in runs.items():
        row = {"run": name, "file": r["file"], "mode": r["mode"], "omitted": r["omitted"], "usage": r["usage"],
               "pass@1": float(r["hit"].mean() * 100), "tokens_mean": r["tokens_mean"], "hit_limit": r["hit_limit"],
               "fidelity": r["fidelity"], "identical": r["identical"]}
        if dense is not None and r is not dense:
            row["minus_dense_ci95"] = bootstrap(r["hit"], dense["hit"])
            row["of_dense"] = float(r["hit"].mean() / max(dense["hit"].mean(), 1e-9))
        rows.append(row)
    parity = []
    for name, r in runs.items():
        torch_hit = torch_hits.get(_name(r["omitted"] or [])) if r["mode"] in ("dense", "omit") else None
        if torch_hit is not None:
            parity.append({"run": name, "set": list(r["omitted"] or []), "mlx": float(r["hit"].mean() * 100),
                           "torch": float(torch_hit.mean() * 100),
                           "mlx_minus_torch_ci95": bootstrap(r["hit"], torch_hit),
                           "same_verdict": float((r["hit"] == torch_hit).mean() * 100)})
    return {"rows": rows, "parity": parity}


def _answer_rows(answers_files: Sequence, hits: Dict[str, np.ndarray], rows: List[dict], mlx: Optional[dict],
                 drop: Sequence[str] = ()) -> List[dict]:
    """The frontier on the time-to-answer axis: each configuration of `pudding-mlx bench --answers` results
    (speedups over dense in time to a complete answer, per token) beside its quality: HumanEval pass@1 on
    PyTorch (a fixed set's row) and on MLX (the preset's eval of the same mode or set), and the MC average.
    `drop`: prompt ids left out (`answer_time.rescore`), e.g. one whose time holds a one-off compile; `ID` for
    every file, `STEM:ID` for the file named STEM.json only."""
    from pudding_mlx.answer_time import rescore

    mc = {_name(r.get("omitted") or []): r.get("mc_average") for r in rows if r["method"] in ("dense", "static")}
    mlx_by = {}
    for r in (mlx or {}).get("rows", []):
        mlx_by["routed" if r["mode"] == "routed" else _name(r["omitted"] or [])] = r["pass@1"]
    out = []
    for f in answers_files:
        result = json.loads(Path(f).read_text())
        dropped = [d.split(":")[-1] for d in drop if (":" not in d or d.split(":")[0] == Path(f).stem)
                   and d.split(":")[-1] in result["prompts"]]
        for name, r in (rescore(result, dropped) if dropped else result["rows"]).items():
            omitted = result["configs"][name]
            key = "routed" if omitted is None else _name(omitted)
            hit = hits.get(key)
            out.append({"file": str(f), "backend": result["backend"], "configuration": name, "set": omitted,
                        "dropped": dropped,
                        "n_prompts": r["n"], "answer_speedup": r["answer_speedup"],
                        "answer_speedup_ci95": r["answer_speedup_ci95"], "total_speedup": r["total_speedup"],
                        "token_speedup": r["token_speedup"], "tokens_vs_dense": r["tokens_vs_dense"],
                        "routed_sets": r["sets"] if omitted is None else None,
                        "pass@1_torch": None if hit is None else float(hit.mean() * 100),
                        "pass@1_mlx": mlx_by.get(key), "mc_average": mc.get(key)})
    return out


def build(run_dir, gen_dir, model: str, mc_report: Optional[dict] = None, mlx_dir=None,
          answers: Sequence = (), answers_drop: Sequence[str] = ()) -> dict:
    """The report as a dict (module doc). Rows for every k that `train generate` ran; the k = 3, 5, 7 routers'
    picks on the HumanEval messages, scored where the picked sets were run; the MLX preset runs of MLX_DIR."""
    run, gen = Path(run_dir), Path(gen_dir)
    sets = load_sets(gen)
    ids = [r["task_id"] for r in sets["dense"]["humaneval"]["records"]]
    dense = passed(sets["dense"], ids)
    n_blocks = json.loads((run / "cand.state.json").read_text())["settings"]["num_blocks"]
    mc_static = {}
    if mc_report:
        for r in mc_report["rows"]:
            if r["method"] == "static":
                mc_static[_name(r["set"])] = {"average": r["average"], "best": bool(r.get("best"))}
    rows, picks = [], []
    hits = {n: passed(s, ids) for n, s in sets.items()}

    def row(method, k, name, hit, **extra):
        r = {"method": method, "k": k, "name": name, "pass@1": float(hit.mean() * 100), "n": int(len(hit)),
             "minus_dense_ci95": bootstrap(hit, dense) if method != "dense" else None, **extra}
        rows.append(r)
        return r

    def stats(s):
        return {"fidelity": s.get("fidelity", {}).get("prefix_kept"), "identical": s.get("fidelity", {}).get("identical"),
                "mc_average": mc_static.get(s["name"], {}).get("average"),
                "tokens_mean": float(np.mean([x["tokens"] for x in s["humaneval"]["records"]])),
                "hit_limit": sum(not x["finished"] for x in s["humaneval"]["records"])}

    d = sets["dense"]
    dense_stats = stats(d)
    if mc_report:
        dense_stats["mc_average"] = next(r["average"] for r in mc_report["rows"] if r["method"] == "dense")
    row("dense", 0, "dense", dense, **dense_stats)
    for k in sorted({s["k"] for s in sets.values() if s["k"] > 0}):
        names = sorted(n for n, s in sets.items() if s["k"] == k)
        for n in names:
            row("static", k, n, hits[n], omitted=sets[n]["omitted"], sources=sets[n]["sources"], **stats(sets[n]))
        pool = np.stack([hits[n] for n in names], 1)
        row("random", k, f"uniform over the {len(names)} sets run", pool.mean(1))
        row("oracle", k, f"best of the {len(names)} sets run, per problem", pool.any(1))
        chosen = {}
        mc_best = [n for n in names if mc_static.get(n, {}).get("best")]
        if mc_best:
            chosen["best static (MC selection data)"] = mc_best[0]
        fid = {n: sets[n]["fidelity"]["prefix_kept"] for n in names if "fidelity" in sets[n]}
        if fid:
            chosen["best static (fidelity prompts)"] = max(sorted(fid), key=lambda n: fid[n])
        for label, n in chosen.items():
            row("best static", k, label, hits[n], set=sets[n]["omitted"])
    features = gen / "features.npz"
    for k in (3, 5, 7):
        for objective in OBJECTIVES:
            got = router_picks(run, features, k, objective, ids) if features.is_file() else None
            if got is None:
                continue
            chosen_idx, pool_sets = got
            usage = {str(pool_sets[m]): int(c) for m, c in enumerate(np.bincount(chosen_idx, minlength=len(pool_sets))) if c}
            entry = {"k": k, "router": f"hidden, {objective}", "usage": usage}
            if all(_name(pool_sets[c]) in hits for c in set(chosen_idx.tolist())):
                hit = np.array([hits[_name(pool_sets[c])][i] for i, c in enumerate(chosen_idx)])
                entry.update({"pass@1": float(hit.mean() * 100), "minus_dense_ci95": bootstrap(hit, dense)})
            picks.append(entry)
    mlx = _mlx_rows(mlx_dir, hits, ids) if mlx_dir and Path(mlx_dir).is_dir() else None
    from .generation import sets_to_run

    wanted = sets_to_run(sorted(run.glob("cand-k*.json")), run / "cand.state.json", (1, 2))  # what the GPU script runs
    not_run = sorted((n for n in wanted if n not in sets), key=lambda n: (wanted[n]["k"], n))
    mc_points = [{"k": len(r["set"]), "set": r["set"], "average": r["average"]}
                 for r in (mc_report or {"rows": []})["rows"] if r["method"] == "static"]
    return {"model": model, "n_blocks": n_blocks, "n_problems": len(ids), "rows": rows,
            "router_picks": picks, "mlx": mlx, "sets_not_run": not_run, "mc_points": mc_points,
            "answers": _answer_rows(answers, hits, rows, mlx, answers_drop),
            "protocol": {"prompt": "pudding_mlx.humaneval.message, one user message through the chat template",
                         "decoding": "greedy", "max_new_tokens": d.get("max_new_tokens"),
                         "held_out": "HumanEval chose nothing: best static sets on MC selection data or fidelity prompts"}}


def _f(x, nd=1):
    return "" if x is None else f"{x:.{nd}f}"


def to_markdown(rep: dict) -> str:
    L = rep["n_blocks"]
    out = [f"# Generation: {rep['model']} ({rep['n_problems']} HumanEval problems, greedy, "
           f"{rep['protocol']['max_new_tokens']} new tokens at most)", "",
           "pass@1 (%) with its paired-bootstrap 95% interval against dense; `fidelity` = share of dense's reply tokens "
           "reproduced before the first difference on the 48 fixed chat prompts, `identical` = replies token-identical "
           "to dense (%); `MC` = six-task multiple-choice average (report.md). HumanEval chose nothing here.", ""]
    out += ["| k | kept | row | set | pass@1 | − dense [95%] | fidelity | identical | MC | tokens |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        ci = r["minus_dense_ci95"]
        delta = "" if ci is None else f"{r['pass@1'] - rep['rows'][0]['pass@1']:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]"
        what = r["method"] if r["method"] in ("dense", "static") else r["name"]
        s = r.get("omitted", r.get("set", ""))
        out.append(f"| {r['k']} | {L - r['k']}/{L} | {what} | {s} | {r['pass@1']:.1f} | {delta} | {_f(r.get('fidelity'))} "
                   f"| {_f(r.get('identical'))} | {_f(r.get('mc_average'), 2)} | {_f(r.get('tokens_mean'), 0)} |")
    if rep.get("router_picks"):
        out += ["", "The hidden-state routers' picks for the 164 HumanEval messages (retrained from the committed "
                "router data; the dense bf16 model's hidden state after block 3, from `train generate --features-after 3`):", ""]
        for p in rep["router_picks"]:
            score = (f": pass@1 {p['pass@1']:.1f} [{p['minus_dense_ci95'][0]:+.1f}, {p['minus_dense_ci95'][1]:+.1f} vs dense]"
                     if "pass@1" in p else " (those sets were not run on the PyTorch side)")
            out.append(f"- k = {p['k']}, {p['router']}: {p['usage']}{score}")
    if rep.get("mlx"):
        m = rep["mlx"]
        out += ["", "## The preset on MLX (CUDA, its 4-bit weights): `pudding-mlx eval PRESET --tasks humaneval,fidelity`", "",
                "| run | mode | sets used (problems) | pass@1 | − MLX dense [95%] | of dense | fidelity | identical | tokens | hit limit |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            ci = r.get("minus_dense_ci95")
            delta = "" if ci is None else f"{r['pass@1'] - next(x['pass@1'] for x in m['rows'] if x['mode'] == 'dense'):+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]"
            of = "" if "of_dense" not in r else f"{100 * r['of_dense']:.0f}%"
            out.append(f"| {r['run']} | {r['mode']} | {r['usage']} | {r['pass@1']:.1f} | {delta} | {of} | {_f(r['fidelity'])} "
                       f"| {_f(r['identical'])} | {r['tokens_mean']:.0f} | {r['hit_limit']} |")
        if m.get("parity"):
            out += ["", "Parity, MLX (4-bit, CUDA) against PyTorch (bf16, the dequantized GGUF) on the same set "
                    "(paired-bootstrap 95%):", "", "| set | MLX | PyTorch | MLX − PyTorch [95%] | same verdict |",
                    "|---|---|---|---|---|"]
            for p in m["parity"]:
                lo, hi = p["mlx_minus_torch_ci95"]
                out.append(f"| {p['set'] or 'dense'} | {p['mlx']:.1f} | {p['torch']:.1f} | {p['mlx'] - p['torch']:+.1f} "
                           f"[{lo:+.1f}, {hi:+.1f}] | {p['same_verdict']:.1f}% |")
    if rep.get("answers"):
        out += ["", "## Time to a complete answer beside quality (`pudding-mlx bench PRESET --answers`)"]
        for f in dict.fromkeys(r["file"] for r in rep["answers"]):  # one table per timed run (device, prompts)
            a = [r for r in rep["answers"] if r["file"] == f]
            out += ["", f"Speedups over dense in time to a complete answer (median over {a[0]['n_prompts']} fixed chat and code "
                    f"prompts{' (without ' + ', '.join(a[0]['dropped']) + ', given with --answers-drop)' if a[0]['dropped'] else ''}, "
                    f"bootstrap 95%), in total time and per token, on {a[0]['backend']} ({f}); quality of "
                    "the same configuration: HumanEval pass@1 on PyTorch (bf16) and on MLX (the preset's 4-bit eval), MC average.", "",
                    "| configuration | answer speedup [95%] | total | per token | tokens vs dense | pass@1 PyTorch | pass@1 MLX | MC |",
                    "|---|---|---|---|---|---|---|---|"]
            for r in a:
                lo, hi = r["answer_speedup_ci95"]
                what = r["configuration"] + (f" ({', '.join(f'{k} x{v}' for k, v in r['routed_sets'].items())})" if r["routed_sets"] else "")
                out.append(f"| {what} | {r['answer_speedup']:.3f} [{lo:.3f}, {hi:.3f}] | {r['total_speedup']:.3f} | "
                           f"{r['token_speedup']:.3f} | {r['tokens_vs_dense']:.2f} | {_f(r['pass@1_torch'])} | "
                           f"{_f(r['pass@1_mlx'])} | {_f(r['mc_average'], 2)} |")
    if rep.get("sets_not_run"):
        out += ["", f"Not run on the PyTorch side (the GPU run's time ran out): {len(rep['sets_not_run'])} of the sets "
                f"`benchmarks/generation_gpu.sh torch` runs: {', '.join(rep['sets_not_run'])}."]
    return "\n".join(out) + "\n"


def plot(rep: dict, path) -> None:
    """The speed-quality frontier: kept blocks against HumanEval pass@1 and the MC average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = rep["n_blocks"]
    answers = rep.get("answers") or []
    fig, axes = plt.subplots(1, 2 if answers else 1, figsize=(13 if answers else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    static = [r for r in rep["rows"] if r["method"] in ("dense", "static")]
    x = [(L - r["k"]) / L for r in static]
    ax.scatter(x, [r["pass@1"] for r in static], s=12, c="tab:blue", label="HumanEval pass@1, each set")
    mc = [(xx, r["mc_average"]) for xx, r in zip(x, static) if r.get("mc_average") is not None]
    mc += [((L - p["k"]) / L, p["average"]) for p in rep.get("mc_points", [])]
    if mc:
        ax.scatter(*zip(*mc), s=12, c="tab:orange", marker="s", label="MC average, each set (report.md)")
    if rep.get("mlx"):
        pts = [((L - (0 if r["mode"] == "dense" else 3)) / L, r["pass@1"]) for r in rep["mlx"]["rows"]
               if r["mode"] in ("dense", "omit", "routed")]
        ax.scatter(*zip(*pts), marker="v", c="tab:purple", s=30, label="HumanEval, the preset on MLX (k = 3)")
    for method, marker, color in (("routed", "^", "tab:green"), ("oracle", "x", "tab:gray"), ("best static", "D", "tab:red")):
        pts = [((L - r["k"]) / L, r["pass@1"]) for r in rep["rows"] if r["method"] == method]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, c=color, s=30, label=f"HumanEval, {method}")
    ax.set_xlabel(f"kept blocks (of {L}); decode cost scales with it")
    ax.set_ylabel("%")
    ax.set_title(f"{rep['model']}: quality against depth")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    if answers:  # the same frontier with measured time to a complete answer as its speed axis
        ax = axes[0][1]
        files = list(dict.fromkeys(r["file"] for r in answers))
        for n_file, f in enumerate(files):  # filled markers for the first timed run, hollow for the next
            run_rows = [r for r in answers if r["file"] == f]
            for key, marker, color, label in (("pass@1_torch", "o", "tab:blue", "HumanEval pass@1, PyTorch"),
                                              ("pass@1_mlx", "v", "tab:purple", "HumanEval pass@1, MLX preset"),
                                              ("mc_average", "s", "tab:orange", "MC average")):
                pts = [r for r in run_rows if r[key] is not None]
                if pts:
                    xs = [r["answer_speedup"] for r in pts]
                    err = [[x - r["answer_speedup_ci95"][0] for x, r in zip(xs, pts)],
                           [r["answer_speedup_ci95"][1] - x for x, r in zip(xs, pts)]]
                    ax.errorbar(xs, [r[key] for r in pts], xerr=err, fmt=marker, color=color, ms=5, capsize=2,
                                elinewidth=0.7, mfc=color if n_file == 0 else "none",
                                label=f"{label} ({run_rows[0]['backend']})" if len(files) > 1 else label)
        for r in answers:
            if r["configuration"] in ("dense", "routed"):
                y = r["pass@1_mlx"] if r["pass@1_mlx"] is not None else r["pass@1_torch"]
                if y is not None:
                    ax.annotate(r["configuration"], (r["answer_speedup"], y), fontsize=7, xytext=(4, 4),
                                textcoords="offset points")
        ax.axvline(1.0, color="grey", lw=0.8)
        backends = ", ".join(dict.fromkeys(r["backend"] for r in answers))
        ax.set_xlabel(f"time to a complete answer: speedup over dense (median, 95% CI; {backends})")
        ax.set_ylabel("%")
        ax.set_title("quality against time to answer")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(run_dir, gen_dir, model: str, mlx_dir=None, answers: Sequence = (), answers_drop: Sequence[str] = ()) -> Path:
    """RUN_DIR/generation.{md,json,png} from GEN_DIR (a `train generate` output), MLX_DIR (eval JSONs) and
    `answers` (`bench --answers` JSONs)."""
    run = Path(run_dir)
    mc = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else None
    rep = build(run, gen_dir, model, mc, mlx_dir, answers, answers_drop)
    write_json(run / "generation.json", rep)
    write_text(run / "generation.md", to_markdown(rep))
    try:
        plot(rep, run / "generation.png")
    except ImportError:
        pass
    return run / "generation.md"
