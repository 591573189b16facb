"""The healing report (issue "Healed omission sets"): what a LoRA adapter trained by self-distillation
(`train heal`, benchmarks/heal_gpu.py) gives back, set by set, against the same sets unhealed.

Reads a heal run's folder (WORK of benchmarks/heal_gpu.py, or the lean copy committed under
results/<model>/heal/) beside the model's run folder (results/<model>/: the unhealed generation run and
multiple-choice data, both made with the same model, prompts and settings):

- HumanEval pass@1 (PyTorch bf16, greedy, 164 problems) of every set run with the pool adapter
  (WORK/gen-pool), against the same set unhealed (RUN/generation, or WORK/gen-unhealed for the sets of the
  generation-aware search) and dense, paired bootstrap 95% intervals.
- The generation-aware search's sets, unhealed: HumanEval (WORK/gen-unhealed) and the multiple-choice average
  (RUN's data, WORK/mc-unhealed-{val,test}, WORK/data-extra-{val,test}) at each k, beside dense.
- Routed: the k = 3 hidden-state routers of RUN (retrained from its committed data, as the generation
  report does) pick a set per problem; healed routed is that set's healed result, where every set picked
  was run healed.
- The six-task multiple-choice average (WORK/mc-pool-{val,test}, and every pool set where WORK/data-healed-{val,test}
  exists) against unhealed (RUN/data-{val,test}, then WORK/mc-unhealed, data-extra), paired per example. Dense comes from RUN's data: the heal run scores its "dense" column with the adapter
  loaded, which is not what the runtime runs (the adapter is on only while blocks are skipped).
- Routers retrained on the healed scores (`train heal-routers`, WORK/routers/): on the generation scores
  (generation.json: reply NLL of the distillation prompts, healed and unhealed, HumanEval of the picks), and on the
  multiple-choice scores where the healed router data was scored (healed_vs_unhealed.json, healed/, unhealed/).
- Per-set adapters (WORK/adapters/set-*/) against the pool adapter on the same set, where trained.
- The val NLL of the dense replies, unhealed -> healed (WORK/heal/val_nll.json): what the adapter was chosen on.
- MLX (the runtime, 4-bit, CUDA) runs of the healed preset, where present (WORK/mlx-out): `eval` HumanEval,
  the adapter's cost (`bench`) and lossless drafting (benchmarks/lossless.py).

HumanEval is held out: nothing here is chosen on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from pudding_mlx.atomic import write_json, write_text
from pudding_mlx.errors import PuddingError
from pudding_mlx.humaneval import FAILURE_KINDS, failure_kind

from .generation import set_name
from .generation_report import OBJECTIVES, bootstrap, load_sets, passed, router_picks
from .report import average, bootstrap_delta, load_eval, per_task


def _k(name: str) -> int:
    return 0 if name == "dense" else len(name.removeprefix("omit-").split("-"))


def _unhealed_sets(work: Path, run: Path) -> Dict[str, dict]:
    sets = load_sets(run / "generation")
    if (work / "gen-unhealed" / "sets").is_dir():
        sets.update({n: r for n, r in load_sets(work / "gen-unhealed").items() if n != "dense"})
    return sets


def humaneval(work: Path, run: Path) -> dict:
    healed, unhealed = load_sets(work / "gen-pool"), _unhealed_sets(work, run)
    ids = [r["task_id"] for r in unhealed["dense"]["humaneval"]["records"]]
    dense = passed(unhealed["dense"], ids)
    hits = {name: passed(res, ids) for name, res in healed.items() if name != "dense"}
    rows = []
    for name, h in sorted(hits.items(), key=lambda kv: -kv[1].mean()):
        row = {"set": name, "k": _k(name), "healed": 100 * float(h.mean()),
               "healed_minus_dense_ci95": bootstrap(h, dense)}
        if name in unhealed:
            u = passed(unhealed[name], ids)
            row.update(unhealed=100 * float(u.mean()), healed_minus_unhealed_ci95=bootstrap(h, u))
        rows.append(row)
    routed = []
    for objective in OBJECTIVES:
        got = router_picks(run, run / "generation" / "features.npz", 3, objective, ids)
        if got is None:
            continue
        chosen, sets = got
        names = [set_name(sets[c]) for c in chosen]
        usage = {n: names.count(n) for n in sorted(set(names))}
        row = {"router": f"hidden-{objective}-k3", "usage": usage}
        if all(n in unhealed for n in usage):
            u = np.array([passed(unhealed[n], [i])[0] for n, i in zip(names, ids)])
            row["unhealed"] = 100 * float(u.mean())
        if all(n in hits for n in usage):
            pos = {i: j for j, i in enumerate(ids)}
            h = np.array([hits[n][pos[i]] for n, i in zip(names, ids)])
            row.update(healed=100 * float(h.mean()), healed_minus_dense_ci95=bootstrap(h, dense))
            if "unhealed" in row:
                row["healed_minus_unhealed_ci95"] = bootstrap(h, u)
        else:
            row["missing"] = sorted(n for n in usage if n not in hits)
        routed.append(row)
    both = [n for n in hits if n in unhealed]
    mean_gain = None
    if both:  # the pool's mean healed - unhealed, over the sets run both ways; bootstrap over problems
        diff = np.mean([hits[n].astype(float) - passed(unhealed[n], ids).astype(float) for n in both], 0)
        rng = np.random.default_rng(0)
        draws = [100 * diff[rng.integers(0, len(ids), len(ids))].mean() for _ in range(4000)]
        mean_gain = {"sets": len(both), "mean": 100 * float(diff.mean()),
                     "ci95": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]}
    return {"dense": 100 * float(dense.mean()), "n": len(ids), "sets": rows, "routed": routed, "mean_gain": mean_gain}


def _aligned(data: dict, keys: List[tuple]) -> np.ndarray:
    pos = {(t, i): j for j, (t, i) in enumerate(zip(data["task"], data["id"]))}
    missing = [k for k in keys if k not in pos]
    if missing:
        raise PuddingError(f"the healed and unhealed multiple-choice data differ (e.g. {missing[0]}); "
                           "score both with the same splits, seeds and sizes")
    return np.array([pos[k] for k in keys])


def _mc_parts(folder: Path, prefix: str) -> Optional[List[Path]]:
    parts = [folder / f"{prefix}-{tag}" for tag in ("val", "test")]
    return parts if all((p / "router_data.npz").is_file() for p in parts) else None


def _one_set_mc(folder: Path, prefix: str) -> Optional[dict]:
    """The multiple-choice data of one adapter's set (FOLDER/PREFIX-{val,test}, one set column), or None."""
    parts = _mc_parts(folder, prefix)
    return load_eval(parts) if parts else None


def _unhealed_columns(work: Path, run_data: dict, keys: List[tuple]) -> Dict[tuple, np.ndarray]:
    """{set: its per-example hits, unhealed, in the order of `keys`}: RUN's data (`run_data`), then
    WORK/mc-unhealed, then WORK/data-extra (heal_gpu.py mc-extra: the same rows, more sets)."""
    cols: Dict[tuple, np.ndarray] = {}
    sources = [run_data]
    for prefix in ("mc-unhealed", "data-extra"):
        extra = _mc_parts(work, prefix)
        if extra:
            sources.append(load_eval(extra))
    for data in sources:
        rows = _aligned(data, keys)
        for i, s in enumerate(data["sets"]):
            cols.setdefault(tuple(sorted(s)), data["hit"][rows, i])
    return cols


def multiple_choice(work: Path, run: Path, prefix: str = "mc-pool") -> Optional[dict]:
    """The six-task MC average of the sets in WORK/PREFIX-{val,test} healed, against unhealed and dense (paired
    per example): mc-pool, the pool sets the first pool adapter's run scored; data-healed, every pool set (the
    healed router data of `mc-healed`)."""
    parts = _mc_parts(work, prefix)
    if not parts:
        return None
    healed = load_eval(parts)
    keys = list(zip(healed["task"], healed["id"]))
    unhealed = load_eval([run / "data-val.npz", run / "data-test.npz"])
    ref = {"task": healed["task"]}
    dense = unhealed["dense_hit"][_aligned(unhealed, keys)]
    u_cols = _unhealed_columns(work, unhealed, keys)
    rows = []
    for c, s in enumerate(healed["sets"]):
        h = healed["hit"][:, c]
        name = set_name(s)
        row = {"set": name, "k": len(s), "healed": average(per_task(ref, h)),
               "healed_minus_dense_ci95": bootstrap_delta(ref, h, dense)}
        u = u_cols.get(tuple(sorted(s)))
        if u is not None:
            row.update(unhealed=average(per_task(ref, u)), healed_minus_unhealed_ci95=bootstrap_delta(ref, h, u))
        rows.append(row)
    return {"dense": average(per_task(ref, dense)), "n": len(keys), "tasks": sorted(set(healed["task"])), "sets": rows}


def generation_aware(work: Path, run: Path) -> Optional[dict]:
    """The generation-aware search's sets (WORK/cand-distill-k*.json), unhealed: HumanEval where run, the
    multiple-choice average where scored, each against dense (paired 95% intervals)."""
    from pudding_mlx.candidates import read_candidates

    files = sorted(work.glob("cand-distill-k*.json"), key=lambda p: int(p.stem.rsplit("k", 1)[1]))
    if not files:
        return None
    gen = load_sets(work / "gen-unhealed") if (work / "gen-unhealed" / "sets").is_dir() else {}
    model_run = load_sets(run / "generation")  # the model run's sets, unhealed: dense and today's static sets
    ids = [r["task_id"] for r in model_run["dense"]["humaneval"]["records"]]
    he_dense = passed(model_run["dense"], ids)
    # MC where some run scored the set on the evaluation rows: RUN's data, WORK/mc-unhealed, WORK/data-extra
    unhealed = load_eval([run / "data-val.npz", run / "data-test.npz"])
    ref, mc_dense = {"task": unhealed["task"]}, unhealed["dense_hit"]
    mc_cols = _unhealed_columns(work, unhealed, list(zip(unhealed["task"], unhealed["id"])))
    # against today's best static set of the same k (chosen on the fidelity prompts: RUN/generation.json), the
    # generation-aware set a user would take without looking at code: the chain on all val replies
    today = json.loads((run / "generation.json").read_text())["rows"] if (run / "generation.json").is_file() else []
    rows, against = [], []
    for f in files:
        for c in read_candidates(f):
            s = tuple(sorted(c["omitted"]))
            row = {"set": set_name(s), "k": len(s), "chain": c.get("task")}
            if set_name(s) in gen:
                h = passed(gen[set_name(s)], ids)
                row.update(humaneval=100 * float(h.mean()), humaneval_minus_dense_ci95=bootstrap(h, he_dense))
                base = next((r for r in today if r["method"] == "best static" and r["k"] == len(s)
                             and "fidelity" in r["name"]), None)
                if (["all", "response_nll"] in [list(x) for x in c.get("sources", [])] and base is not None
                        and set_name(base["set"]) in model_run):
                    b = passed(model_run[set_name(base["set"])], ids)
                    against.append({"k": len(s), "set": set_name(s), "humaneval": 100 * float(h.mean()),
                                    "best_static": set_name(base["set"]), "best_static_humaneval": 100 * float(b.mean()),
                                    "minus_best_static_ci95": bootstrap(h, b)})
            if s in mc_cols:
                h = mc_cols[s]
                row.update(mc=average(per_task(ref, h)), mc_minus_dense_ci95=bootstrap_delta(ref, h, mc_dense))
            rows.append(row)
    return {"he_dense": 100 * float(he_dense.mean()),
            "mc_dense": average(per_task(ref, mc_dense)), "sets": rows,
            "against_best_static": against}


def val_nll(work: Path) -> Optional[dict]:
    p = work / "heal" / "val_nll.json"
    if not p.is_file():
        return None
    got = json.loads(p.read_text())
    # the pool adapter trained anew by the same recipe (heal_gpu.py nll-check), where run: does it reproduce?
    again = work / "heal" / "val_nll_retrained.json"
    again = json.loads(again.read_text())["table"] if again.is_file() else None
    rows = [{"set": name, "k": _k(name), "unhealed": v["unhealed"], "healed": v.get("default"),
             **({"retrained": again.get(name, {}).get("default")} if again is not None else {})}
            for name, v in got["table"].items()]
    return {"examples": got["examples"], "retrained": again is not None,
            "sets": sorted(rows, key=lambda r: (r["healed"] is None, r["healed"] or 0))}


def lossless_summary(payload: dict, run: Path) -> dict:
    """benchmarks/lossless.py's summary, with the bound at each measured acceptance (its runs before the bound was
    added lack it: worked out here the same way, the block count from the run's candidates)."""
    from pudding_mlx.omission import lossless_speedup_bound

    n = payload.get("n_blocks") or json.loads((run / "cand-k3.json").read_text())["num_blocks"]
    summary = payload.get("summary") or {}
    for e in summary.values():
        if isinstance(e, dict) and "mean_accepted" in e and "speedup_bound" not in e and e["mean_accepted"] < 1:
            k = float(np.mean([len(r["sets"][e["draft"]]) for r in payload["rows"]]))
            e["speedup_bound"] = lossless_speedup_bound(e["mean_accepted"], e["draft_tokens"], k, n)
    return summary


def mlx_runs(work: Path, run: Path) -> Optional[dict]:
    out = work / "mlx-out"
    if not out.is_dir():
        return None
    runs = {}
    for p in sorted(out.glob("mlx_eval_healed_*.json")):
        payload = json.loads(p.read_text())
        he = payload["tasks"]["humaneval"]
        usage: Dict[str, int] = {}
        for r in he["records"]:
            usage[str(r.get("omitted"))] = usage.get(str(r.get("omitted")), 0) + 1
        runs[p.stem.removeprefix("mlx_eval_healed_")] = {"pass@1": he["pass@1"], "n": he["n"], "usage": usage,
                                                         "tokens_mean": he["tokens_mean"], "hit_limit": he["hit_limit"]}
    cost = None
    if (out / "mlx_adapter_cost_cuda.json").is_file():
        cost = json.loads((out / "mlx_adapter_cost_cuda.json").read_text()).get("summary")
    lossless, drafts = {}, {}
    for p in sorted(out.glob("mlx_lossless_*.json")):
        payload, name = json.loads(p.read_text()), p.stem.removeprefix("mlx_lossless_")
        lossless[name] = lossless_summary(payload, run)
        drafts[name] = lossless_draft(payload, name)
    return {"eval": runs, "adapter_cost": cost, "lossless": lossless, "lossless_drafts": drafts,
            "lossless_needed": lossless_needed(run)}


# How each committed lossless run shared the GPU (benchmarks/heal_gpu.sh): `mlx` ran the healed and unhealed k = 3
# drafts beside multiple-choice scoring, so their speeds are low bounds; `mlx-speed` ran the k = 7 draft alone
LOSSLESS_ALONE = {"k7"}


def lossless_draft(payload: dict, name: str) -> dict:
    """What a lossless run drafted with, from its own payload: the static draft's blocks skipped, the adapter
    (the healed preset or not), whether MLX had the GPU to itself (LOSSLESS_ALONE), and the label the report's
    rows give it."""
    static = payload.get("static") or (payload.get("rows") or [{}])[0].get("sets", {}).get("static") or []
    draft = {"static_k": len(static), "healed": Path(str(payload.get("bundle", ""))).name.startswith("healed"),
             "alone": name in LOSSLESS_ALONE}
    draft["label"] = (f"{'healed' if draft['healed'] else 'unhealed'} k = {draft['static_k']} static draft"
                      + ("" if draft["alone"] else ", GPU shared"))
    return draft


def lossless_needed(run: Path, speedup: float = 1.10, drafts=(3, 7, 9, 14), sizes=(2, 4, 8)) -> dict:
    """Where lossless could pay: the share of output tokens a draft skipping k blocks must supply, at each draft
    size, for the bound to reach `speedup` (the issue's speed target); None where no draft of that size can."""
    from pudding_mlx.omission import lossless_share_needed

    n = json.loads((run / "cand-k3.json").read_text())["num_blocks"]
    rows = {}
    for k in drafts:
        need = {g: lossless_share_needed(speedup, g, k, n) for g in sizes}
        rows[k] = {g: (v if v <= g / (g + 1) else None) for g, v in need.items()}
    return {"speedup": speedup, "n_blocks": n, "rows": rows}


def fused(work: Path) -> Optional[dict]:
    """The fused adapter (WORK/fuse, benchmarks/fuse_gpu.sh): what the merged copy keeps of the adapter's NLL
    gain (benchmarks/adapter_fuse.py) and its decode cost (`bench` summaries), per set and backend."""
    out = work / "fuse"
    if not out.is_dir():
        return None
    keeps = {p.stem.removeprefix("fuse_"): json.loads(p.read_text()) for p in sorted(out.glob("fuse_*.json"))}
    costs = {p.stem.removeprefix("cost_"): json.loads(p.read_text()).get("summary") for p in sorted(out.glob("cost_*.json"))}
    return {"keeps": {k: {"set": v["set"], "replies": v["replies"], "nll_per_token": v["nll_per_token"], "kept": v["kept"]}
                      for k, v in keeps.items()}, "cost": costs}


def per_set(work: Path, run: Path) -> Optional[dict]:
    """Per-set adapters (WORK/adapters/set-<set>/, benchmarks/heal_gpu.py per-set: trained the same way and as
    long as the pool adapter, on one set): val NLL (what chooses between them and the pool adapter), HumanEval
    (WORK/gen-set-<set>) and the multiple-choice average (WORK/mc-set-<set>-{val,test}), against the pool adapter
    on the same set (paired 95% intervals)."""
    folders = sorted(p for p in (work / "adapters").glob("set-*") if (p / "heal.json").is_file())
    if not folders:
        return None
    nll_file = work / "heal" / "val_nll_per_set.json"
    nll = json.loads(nll_file.read_text()) if nll_file.is_file() else {}
    pool_he = load_sets(work / "gen-pool")
    ids = [r["task_id"] for r in pool_he["dense"]["humaneval"]["records"]]
    pool_mc = _mc_parts(work, "mc-pool")
    pool_mc = load_eval(pool_mc) if pool_mc else None
    rows = []
    for f in folders:
        name = f.name.removeprefix("set-")
        row = {"set": name, "k": _k(name), "val_nll": nll.get(name, {}).get(f"set-{name}"),
               "pool_val_nll": nll.get(name, {}).get("default"), "unhealed_val_nll": nll.get(name, {}).get("unhealed"),
               "steps": json.loads((f / "heal.json").read_text()).get("steps")}
        gen = work / f"gen-set-{name}"
        if (gen / "sets" / f"{name}.json").is_file():
            h = passed(load_sets(gen)[name], ids)
            row["humaneval"] = 100 * float(h.mean())
            if name in pool_he:
                p = passed(pool_he[name], ids)
                row.update(pool_humaneval=100 * float(p.mean()), minus_pool_ci95=bootstrap(h, p))
        mc = _one_set_mc(work, f"mc-set-{name}")
        if mc is not None:
            ref, h = {"task": mc["task"]}, mc["hit"][:, 0]
            row["mc"] = average(per_task(ref, h))
            if pool_mc is not None:
                col = [tuple(sorted(s)) for s in pool_mc["sets"]]
                key = tuple(int(b) for b in name.removeprefix("omit-").split("-"))
                if key in col:
                    p = pool_mc["hit"][_aligned(pool_mc, list(zip(mc["task"], mc["id"]))), col.index(key)]
                    row.update(pool_mc=average(per_task(ref, p)), mc_minus_pool_ci95=bootstrap_delta(ref, h, p))
        rows.append(row)
    return {"sets": rows}


def wide_data(work: Path, run: Path) -> Optional[dict]:
    """Per-set adapters trained on more code (WORK/adapters/wide<S>-<set>/, benchmarks/heal_gpu.py wide: the first
    answers file and the wide code prompts' answers, S steps) against the per-set adapter of the same set trained on
    the first file alone (set-<set>): val NLL on the first file's val replies (both) and on the wide code val
    replies, HumanEval and the multiple-choice average with paired 95% intervals, and HumanEval against dense."""
    folders = sorted((p for p in (work / "adapters").glob("wide*-*") if (p / "heal.json").is_file()),
                     key=lambda p: (p.name.split("-", 1)[1], int(p.name.split("-", 1)[0].removeprefix("wide"))))
    if not folders:
        return None
    nll: Dict[str, dict] = {}  # heal/val_nll_wide-<steps>.json: one file per training process
    for f in sorted((work / "heal").glob("val_nll_wide*.json")):
        for name, cols in json.loads(f.read_text()).items():
            nll.setdefault(name, {}).update(cols)
    first = _read(work / "heal" / "val_nll_per_set.json") or {}
    dense_he = load_sets(run / "generation")["dense"]
    ids = [r["task_id"] for r in dense_he["humaneval"]["records"]]
    dense = passed(dense_he, ids)
    rows = []
    for f in folders:
        tag = f.name
        name = tag.split("-", 1)[1]
        info = json.loads((f / "heal.json").read_text())
        data = info["data"] if isinstance(info["data"], list) else [info["data"]]
        row = {"adapter": tag, "set": name, "steps": info["steps"],
               "recipe": {k: info.get(k) for k in ("rank", "batch", "lr")}, "code_prompts": data[-1].get("n"),
               "train_prompts": sum(d["counts"]["train"] for d in data),
               "val_nll": nll.get(name, {}).get(tag), "unhealed_val_nll": nll.get(name, {}).get("unhealed"),
               "dense_val_nll": nll.get("dense", {}).get("unhealed"),
               "per_set_val_nll": first.get(name, {}).get(f"set-{name}")}
        gen = work / f"gen-{tag}"
        if (gen / "sets" / f"{name}.json").is_file():
            h = passed(load_sets(gen)[name], ids)
            row.update(humaneval=100 * float(h.mean()), minus_dense_ci95=bootstrap(h, dense))
            if (work / f"gen-set-{name}" / "sets" / f"{name}.json").is_file():
                p = passed(load_sets(work / f"gen-set-{name}")[name], ids)
                row.update(per_set_humaneval=100 * float(p.mean()), minus_per_set_ci95=bootstrap(h, p))
        mc = _one_set_mc(work, f"mc-{tag}")
        if mc is not None:
            ref, h = {"task": mc["task"]}, mc["hit"][:, 0]
            row["mc"] = average(per_task(ref, h))
            other = _one_set_mc(work, f"mc-set-{name}")
            if other is not None:
                p = other["hit"][_aligned(other, list(zip(mc["task"], mc["id"]))), 0]
                row.update(per_set_mc=average(per_task(ref, p)), mc_minus_per_set_ci95=bootstrap_delta(ref, h, p))
        rows.append(row)
    return {"rows": rows, "he_dense": 100 * float(dense.mean())}


def retrained_routers(work: Path, run: Path) -> Optional[dict]:
    """Routers retrained on the healed pool's scores and on the same pool unhealed (`train heal-routers`,
    WORK/routers/): their multiple-choice rows (each run's report: routed vs its best static set, chosen on the
    training rows), healed routed minus unhealed routed, and HumanEval of each router's picks."""
    folder = work / "routers"
    if not (folder / "healed_vs_unhealed.json").is_file():
        return None
    compare = json.loads((folder / "healed_vs_unhealed.json").read_text())
    healed_he, unhealed_he = load_sets(work / "gen-pool"), _unhealed_sets(work, run)
    ids = [r["task_id"] for r in unhealed_he["dense"]["humaneval"]["records"]]
    dense = passed(unhealed_he["dense"], ids)
    out = {"mc": compare["mc"], "rows": compare["rows"], "pool": compare["pool"],
           "train_rows": compare.get("train_rows", "healed"), "runs": {}}
    for name, results in (("healed", healed_he), ("unhealed", unhealed_he)):
        rep = json.loads((folder / name / "report.json").read_text())
        statics = [r for r in rep["rows"] if r["method"] == "static" and r["k"] == 3]
        best = next((d for d in rep["deltas"] if d["k"] == 3), None)
        picks = json.loads((folder / name / "he_picks.json").read_text())
        routers = {}
        for r in rep["rows"]:
            if r["method"] != "routed" or not str(r.get("router", "")).startswith("hidden-"):
                continue
            d = next((x for x in rep["deltas"] if x["router"] == r["router"] and x["k"] == 3), {})
            row = {"mc": r["average"], "mc_minus_best_static_ci95": d.get("ci95")}
            objective = r["router"].removeprefix("hidden-")
            if objective in picks:
                names = [picks[objective][i] for i in ids]
                usage = {n: names.count(n) for n in sorted(set(names))}
                row["he_usage"] = usage
                if all(n in results for n in usage):
                    h = np.array([passed(results[n], [i])[0] for n, i in zip(names, ids)])
                    row.update(humaneval=100 * float(h.mean()), humaneval_minus_dense_ci95=bootstrap(h, dense))
                else:
                    row["he_missing"] = sorted(n for n in usage if n not in results)
            routers[r["router"]] = row
        best_set = best["best_static_set"] if best else None
        best_row = {"set": set_name(best_set) if best_set else None,
                    "mc": next((s["average"] for s in statics if s["set"] == best_set), None)}
        if best_set and set_name(best_set) in results:
            best_row["humaneval"] = 100 * float(passed(results[set_name(best_set)], ids).mean())
        out["runs"][name] = {"best_static": best_row, "routers": routers}
    return out


def _same_adapter_check(work: Path) -> Optional[dict]:
    """The healed router data (data-healed-{val,test}) against the pool sets' healed multiple choice of the run
    that made the committed HumanEval replies (mc-pool-{val,test}), on the sets both scored: whether the adapter
    behind the routers' MC rows behaves as the one behind their HumanEval rows (a later heal run trains it again)."""
    rows = differing = 0
    gaps = []
    for split in ("val", "test"):
        a, b = work / f"data-healed-{split}", work / f"mc-pool-{split}"
        if not ((a / "router_data.npz").is_file() and (b / "router_data.npz").is_file()):
            return None
        sa = [tuple(x) for x in json.loads((a / "router_data.json").read_text())["sets"]]
        sb = [tuple(x) for x in json.loads((b / "router_data.json").read_text())["sets"]]
        with np.load(a / "router_data.npz", allow_pickle=False) as za, np.load(b / "router_data.npz", allow_pickle=False) as zb:
            if not np.array_equal(za["id"], zb["id"]):
                return None
            for j, s in enumerate(sb):
                if s in sa:
                    x, y = za["correct"][:, sa.index(s)], zb["correct"][:, j]
                    rows += len(x)
                    differing += int((x != y).sum())
                    gaps.append(100 * abs(float(x.mean()) - float(y.mean())))
    return {"sets": len(gaps) // 2, "rows": rows, "differing": differing, "max_gap": max(gaps)} if gaps else None


def failures(work: Path, run: Path) -> Optional[dict]:
    """How the HumanEval replies of each set that has per-set or wide-data adapters end (pudding_mlx.humaneval.
    failure_kind), dense, unhealed and under each adapter: whether healing turns broken code into running code, and
    running code into right code."""
    names = sorted({p.name.split("-", 1)[1] for p in (work / "adapters").glob("*-omit-*") if (p / "heal.json").is_file()
                    and p.name.startswith(("set-", "wide"))})
    if not names:
        return None
    unhealed, pool = _unhealed_sets(work, run), load_sets(work / "gen-pool")

    def kinds(result: dict) -> dict:
        records = result["humaneval"]["records"]
        counts = {k: 0 for k in FAILURE_KINDS}
        for r in records:
            counts[failure_kind(r)] += 1
        return {"n": len(records), "counts": counts}

    rows = [{"set": "dense", "model": "dense", **kinds(unhealed["dense"])}]
    both = sorted(n for n in pool if n != "dense" and n in unhealed)
    for model, source in (("unhealed", unhealed), ("pool adapter", pool)):  # the pool's sets run both ways, averaged
        if both:
            each = [kinds(source[n]) for n in both]
            rows.append({"set": f"mean of {len(both)} pool sets", "model": model, "n": each[0]["n"],
                         "counts": {k: round(float(np.mean([c["counts"][k] for c in each])), 1) for k in FAILURE_KINDS}})
    for name in names:
        sources = [("unhealed", unhealed.get(name)), ("pool adapter", pool.get(name))]
        for folder in sorted(work.glob(f"gen-*-{name}"), key=lambda p: (not p.name.startswith("gen-set-"), p.name)):
            tag = folder.name.removeprefix("gen-")
            sources.append((f"{tag.split('-', 1)[0]} adapter", load_sets(folder).get(name)))
        rows += [{"set": name, "model": model, **kinds(res)} for model, res in sources if res is not None]
    return {"kinds": list(FAILURE_KINDS), "rows": rows}


def targets(rep: dict) -> dict:
    """The issue's targets against every healed figure the records hold (k = 3: the pool adapter on each set and
    routed, the per-set and the wide-data adapters), with the margin by which each is missed and what was tried."""
    he, mc = rep["humaneval"], rep["mc"]
    per_set = (rep.get("per_set") or {}).get("sets", [])
    wide = (rep.get("wide") or {}).get("rows", [])
    he_static = [(f"{r['set']}, pool adapter", r["healed"]) for r in he["sets"] if r["k"] == 3]
    he_static += [(f"{r['set']}, per-set adapter", r["humaneval"]) for r in per_set if _k(r["set"]) == 3 and r.get("humaneval") is not None]
    he_static += [(f"{r['set']}, {r['adapter']} adapter", r["humaneval"]) for r in wide if _k(r["set"]) == 3 and r.get("humaneval") is not None]
    he_routed = [(f"routed ({r['router']}), pool adapter", r["healed"]) for r in he["routed"] if "healed" in r]
    gr = ((rep.get("generation_routers") or {}).get("runs") or {}).get("healed") or {}
    if gr.get("routed_humaneval") is not None:
        he_routed.append(("routed (generation scores), pool adapter", gr["routed_humaneval"]))
    mc_static = [(f"{r['set']}, pool adapter", r["healed"]) for r in (mc or {}).get("sets", []) if _k(r["set"]) == 3 and r.get("healed") is not None]
    mc_static += [(f"{r['set']}, pool adapter trained again", r["healed"]) for r in (rep.get("mc_pool_all") or {}).get("sets", [])
                  if _k(r["set"]) == 3]
    mc_static += [(f"{r['set']}, per-set adapter", r["mc"]) for r in per_set if _k(r["set"]) == 3 and r.get("mc") is not None]
    mc_static += [(f"{r['set']}, {r['adapter']} adapter", r["mc"]) for r in wide if _k(r["set"]) == 3 and r.get("mc") is not None]
    rr = (((rep.get("routers") or {}).get("runs") or {}).get("healed") or {}).get("routers") or {}
    trained = "healed scores" if (rep.get("routers") or {}).get("train_rows", "healed") == "healed" else "unhealed train rows"
    mc_routed = [(f"routed ({name}, {trained}), pool adapter", r["mc"]) for name, r in rr.items() if r.get("mc") is not None]
    he_routed += [(f"routed ({name}, {trained}), pool adapter", r["humaneval"]) for name, r in rr.items()
                  if r.get("humaneval") is not None]

    def best(rows):
        return None if not rows else dict(zip(("what", "value"), max(rows, key=lambda x: x[1])))

    dense_he, dense_mc = he["dense"], (mc or {}).get("dense")
    lossless = {}
    for run, summary in ((rep.get("mlx") or {}).get("lossless") or {}).items():
        rows = [e for e in summary.values() if isinstance(e, dict) and "mean_speedup" in e]
        if rows:
            top = max(rows, key=lambda e: e["mean_speedup"])
            lossless[run] = {"draft": top["draft"], "draft_tokens": top["draft_tokens"], "speedup": top["mean_speedup"],
                             "accepted": top["mean_accepted"], "bound": top.get("speedup_bound"),
                             "label": rep["mlx"]["lossless_drafts"][run]["label"]}
    return {"humaneval_routed": {"target": 0.9 * dense_he, "best": best(he_routed)},
            "humaneval_static": {"best": best(he_static)},
            "mc": {"target": None if dense_mc is None else dense_mc - 2, "best_routed": best(mc_routed), "best_static": best(mc_static)},
            "humaneval_95_at_1.10": {"target": 0.95 * dense_he, "best": best(he_static + he_routed)},
            "lossless_fastest": lossless,
            "tried": {"pool_sets": len(he["sets"]), "pool_steps": rep["adapter"].get("steps"), "per_set": len(per_set),
                      "wide": [r["steps"] for r in wide], "routed_humaneval": len(he_routed), "routed_mc": len(mc_routed)}}


def build(work, run_dir, model: str) -> dict:
    work, run = Path(work), Path(run_dir)
    heal = work / "adapters" / "pool-k3" / "heal.json"
    if not heal.is_file():
        raise PuddingError(f"{work}: no adapters/pool-k3/heal.json; run benchmarks/heal_gpu.py first")
    info = json.loads(heal.read_text())
    settings = {k: info.get(k) for k in ("steps", "batch", "lr", "rank", "alpha", "kl_weight", "layers", "sets", "data")}
    rep = {"model": model, "adapter": settings, "humaneval": humaneval(work, run), "mc": multiple_choice(work, run),
           "mc_pool_all": multiple_choice(work, run, "data-healed"),
            "generation_aware": generation_aware(work, run), "val_nll": val_nll(work), "mlx": mlx_runs(work, run),
            "fused": fused(work), "per_set": per_set(work, run), "wide": wide_data(work, run),
            "failures": failures(work, run),
            "routers": retrained_routers(work, run),
            "generation_routers": _read(work / "routers" / "generation.json")}
    if rep["mc_pool_all"]:
        rep["mc_pool_all"]["same_adapter"] = _same_adapter_check(work)
    rep["targets"] = targets(rep)
    return rep


def _read(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _ci(ci) -> str:
    return f"[{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""


def _f(x, nd=1) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def _targets_markdown(t: dict, dense_he: float, dense_mc: Optional[float]) -> List[str]:
    """The issue's targets: each with the best healed figure the records hold and the margin of a miss."""
    def verdict(best, target) -> str:
        if best is None:
            return "not run"
        gap = best["value"] - target
        return (f"{best['value']:.1f} ({best['what']}): " + ("met" if gap >= 0 else f"**missed by {-gap:.1f}**"))

    he_r, he_s, m = t["humaneval_routed"], t["humaneval_static"], t["mc"]
    out = ["## The issue's targets (k = 3 healed; every healed figure below, the best of each kind)", "",
           "| target | best healed | static, for comparison |", "|---|---|---|",
           f"| routed HumanEval pass@1 ≥ 90% of dense ({he_r['target']:.1f}; dense {dense_he:.1f}) | "
           f"{verdict(he_r['best'], he_r['target'])} | "
           + (f"{he_s['best']['value']:.1f} ({he_s['best']['what']}) |" if he_s["best"] else "|")]
    if m["target"] is not None:
        out.append(f"| routed six-task MC ≥ dense − 2 ({m['target']:.1f}; dense {dense_mc:.1f}) | "
                   f"{verdict(m['best_routed'], m['target'])} | "
                   + (f"{verdict(m['best_static'], m['target'])} |" if m["best_static"] else "|"))
    h95 = t["humaneval_95_at_1.10"]
    out.append(f"| HumanEval ≥ 95% of dense ({h95['target']:.1f}) at decode ≥ 1.10x (k = 3: ideal 1.12x) | "
               f"{verdict(h95['best'], h95['target'])} | |")
    for run, r in t["lossless_fastest"].items():
        out.append(f"| lossless ({r.get('label', run)}): speedup vs dense, the fastest draft | {r['speedup']:.3f} ({r['draft']}, "
                   f"{r['draft_tokens']} draft tokens, acceptance {r['accepted']:.3f}"
                   + (f", bound {r['bound']:.3f}" if r.get("bound") is not None else "") + "): "
                   + ("pays" if r["speedup"] > 1 else "does not pay") + " | |")
    if t["lossless_fastest"]:
        out += ["", "Lossless rows: the MLX runs on CUDA below (\"GPU shared\": beside multiple-choice scoring, so speeds are "
                "low bounds; the others had the GPU to themselves; the routed draft is always the preset's router among its "
                "k = 3 sets; the bound is the speedup at that acceptance with a verify as cheap as one dense step). The "
                "adapter's decode cost (≤ 2%): \"The adapter fused\" below."]
    tr = t["tried"]
    no_mc = " (routers on the healed pool's MC scores need its MC router data, `mc-healed`: not run)" if not tr["routed_mc"] else ""
    out += ["", f"Tried: one pool adapter ({tr['pool_steps']} steps) on {tr['pool_sets']} sets; {tr['per_set']} per-set "
            f"adapter(s); {len(tr['wide'])} adapter(s) on the wide code data ({', '.join(map(str, tr['wide'])) or '-'} steps); "
            f"{tr['routed_humaneval']} routed HumanEval run(s) and {tr['routed_mc']} routed MC run(s) healed{no_mc}.", ""]
    return out


def _mc_row(r: dict) -> str:
    """One set's row of a multiple-choice table (multiple_choice's rows)."""
    return (f"| {r['set']} | {_f(r.get('unhealed'))} | {r['healed']:.1f} | "
            f"{_ci(r.get('healed_minus_unhealed_ci95'))} | {_ci(r['healed_minus_dense_ci95'])} |")


def to_markdown(rep: dict) -> str:
    he, mc, nll = rep["humaneval"], rep["mc"], rep["val_nll"]
    a = rep["adapter"]
    out = [f"# Healing: {rep['model']}", "",
           f"One LoRA adapter (rank {a['rank']}, blocks {a['layers'][0]}-{a['layers'][-1]}, {a['steps']} steps of "
           f"{a['batch']}) for the k = 3 pool ({len(a['sets'] or [])} sets), trained on the dense model's own replies; "
           "the skipped set drawn per step. HumanEval is held out (reported, never used to choose).", "",
           *_targets_markdown(rep["targets"], he["dense"], (mc or {}).get("dense")),
           f"## HumanEval pass@1 (PyTorch bf16, greedy, {he['n']} problems; dense {he['dense']:.1f})", "",
           "| set | k | unhealed | healed | healed - unhealed [95%] | healed - dense [95%] |", "|---|---|---|---|---|---|"]
    for r in he["sets"]:
        out.append(f"| {r['set']} | {r['k']} | {_f(r.get('unhealed'))} | {r['healed']:.1f} | "
                   f"{_ci(r.get('healed_minus_unhealed_ci95'))} | {_ci(r['healed_minus_dense_ci95'])} |")
    for r in he["routed"]:
        usage = ", ".join(f"{n} x{c}" for n, c in r["usage"].items())
        if "healed" in r:
            out.append(f"| routed ({r['router']}: {usage}) | 3 | {_f(r.get('unhealed'))} | {r['healed']:.1f} | "
                       f"{_ci(r.get('healed_minus_unhealed_ci95'))} | {_ci(r['healed_minus_dense_ci95'])} |")
        else:
            out.append(f"| routed ({r['router']}: {usage}) | 3 | {_f(r.get('unhealed'))} | not run healed: "
                       f"{', '.join(r['missing'])} | | |")
    if he.get("mean_gain"):
        g = he["mean_gain"]
        out += ["", f"Mean healed - unhealed over the {g['sets']} sets run both ways: {g['mean']:+.1f} points {_ci(g['ci95'])} "
                "(bootstrap over problems)."]
    if mc:
        out += ["", f"## Multiple choice, six-task average ({mc['n']} examples; dense {mc['dense']:.1f})", "",
                "| set | unhealed | healed | healed - unhealed [95%] | healed - dense [95%] |", "|---|---|---|---|---|"]
        out += [_mc_row(r) for r in mc["sets"]]
    every = rep.get("mc_pool_all")
    if every:
        gains = [r["healed"] - r["unhealed"] for r in every["sets"] if r.get("unhealed") is not None]
        out += ["", f"### Every pool set ({len(every['sets'])}), the same rows, healed by the adapter trained again "
                "(`mc-healed`: heal/data-healed-{val,test}; \"Same adapter?\" below the table)", "",
                "| set | unhealed | healed | healed - unhealed [95%] | healed - dense [95%] |", "|---|---|---|---|---|"]
        out += [_mc_row(r) for r in sorted(every["sets"], key=lambda r: -r["healed"])]
        if gains:
            out += ["", f"Healed - unhealed, mean over the {len(gains)} sets: {np.mean(gains):+.2f} points "
                    f"(from {min(gains):+.2f} to {max(gains):+.2f})."]
        c = every.get("same_adapter")
        if c:
            out += ["", f"Same adapter? These healed rows and the pool sets' healed MC above (the run whose HumanEval "
                    f"replies the routers' picks use) on the {c['sets']} sets both scored: {c['differing']} of {c['rows']} "
                    f"row-set answers differ ({100 * c['differing'] / c['rows']:.1f}%), per-split accuracy within "
                    f"{c['max_gap']:.2f} points."]
    rr = rep.get("routers")
    if rr:
        if rr.get("train_rows", "healed") == "unhealed":
            title, intro = "Routers on the healed multiple-choice scores", (
                "The healed router data covers the evaluation rows only (data-healed-val, -test; the healed train split "
                "was not scored): hidden-state routers of each objective are trained on the pool's unhealed "
                "multiple-choice scores of the training rows, and the best static set is chosen on those rows, so the "
                "healed and unhealed rows below make the same picks and differ only in the pool adapter being on.")
        else:
            title, intro = "Routers retrained on the healed scores", (
                "Hidden-state routers of each objective trained on the pool's multiple-choice scores of the training "
                "rows, healed (the pool adapter on) and unhealed (the same pool, the same rows); the best static set of "
                "each is chosen on those training rows.")
        out += ["", f"## {title} (k = 3 pool of {len(rr['pool'])} sets)", "",
                f"{intro} MC: the six-task average on the evaluation rows ({rr['rows']}); HumanEval: the router's pick "
                "per problem, run healed or unhealed.", "",
                "| | router | MC | - its best static [95%] | HumanEval | - dense [95%] | HumanEval picks |",
                "|---|---|---|---|---|---|---|"]
        for name in ("unhealed", "healed"):
            run = rr["runs"].get(name)
            if not run:
                continue
            b = run["best_static"]
            out.append(f"| {name} | best static ({b['set']}) | {_f(b['mc'])} | | {_f(b.get('humaneval'))} | | |")
            for router, r in run["routers"].items():
                picks = ", ".join(f"{n} x{c}" for n, c in r.get("he_usage", {}).items())
                if r.get("he_missing"):
                    picks += "; not run: " + ", ".join(r["he_missing"])
                out.append(f"| {name} | {router} | {_f(r['mc'])} | {_ci(r.get('mc_minus_best_static_ci95'))} | "
                           f"{_f(r.get('humaneval'))} | {_ci(r.get('humaneval_minus_dense_ci95'))} | {picks} |")
        out += ["", "Routed MC, healed minus unhealed (paired, 95%): " + "; ".join(
            f"{k} {v['healed']:.1f} vs {v['unhealed']:.1f}, {_ci(v['healed_minus_unhealed_ci95'])}" for k, v in rr["mc"].items())]
    gr = rep.get("generation_routers")
    if gr:
        out += ["", f"## Routers retrained on the generation scores (k = 3 pool of {len(gr['pool'])} sets; `train heal-routers`)", "",
                "A ridge head per set on the hidden state after block 3 predicts the reply NLL increase over dense "
                f"(the dense model's own replies to {gr['prompts']['train']} train distillation prompts; pooling and "
                f"ridge on {gr['prompts']['val']} val prompts), healed (pool adapter on) or unhealed; the router takes "
                "the lowest prediction. Its static rival: the set of lowest mean loss on the same train prompts. "
                f"HumanEval (held out; dense {gr['dense_humaneval']:.1f}):", "",
                "| | static (chosen on train prompts) | HumanEval | routed | HumanEval | routed - static [95%] | "
                "routed - dense [95%] | val NLL loss static / routed | picks |", "|---|---|---|---|---|---|---|---|---|"]
        for name in ("unhealed", "healed"):
            r = gr["runs"].get(name)
            if not r:
                continue
            picks = ", ".join(f"{n} x{c}" for n, c in r["usage"].items())
            he_r = _f(r.get("routed_humaneval")) if "missing" not in r else "not run: " + ", ".join(r["missing"])
            out.append(f"| {name} | {r['static']} | {_f(r.get('static_humaneval'))} | hidden ({r['pooling']}) | {he_r} | "
                       f"{_ci(r.get('routed_minus_static_ci95'))} | {_ci(r.get('routed_minus_dense_ci95'))} | "
                       f"{r['val_loss_static']:.4f} / {r['val_loss_routed']:.4f} | {picks} |")
        if gr.get("healed_minus_unhealed_routed_ci95"):
            out += ["", f"Routed healed minus routed unhealed: {_ci(gr['healed_minus_unhealed_routed_ci95'])}."]
    ps = rep.get("per_set")
    if ps:
        out += ["", "## Per-set adapters (one adapter per set, trained as long as the pool adapter) against the pool "
                "adapter on the same set", "",
                "| set | steps | val NLL unhealed | pool | per-set | HumanEval pool | per-set | per-set - pool [95%] | "
                "MC pool | per-set | per-set - pool [95%] |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ps["sets"]:
            out.append(f"| {r['set']} | {r['steps']} | {_f(r['unhealed_val_nll'], 3)} | {_f(r['pool_val_nll'], 3)} | "
                       f"{_f(r['val_nll'], 3)} | {_f(r.get('pool_humaneval'))} | {_f(r.get('humaneval'))} | "
                       f"{_ci(r.get('minus_pool_ci95'))} | {_f(r.get('pool_mc'))} | {_f(r.get('mc'))} | "
                       f"{_ci(r.get('mc_minus_pool_ci95'))} |")
    wd = rep.get("wide")
    if wd:
        first, recipe = wd["rows"][0], wd["rows"][0]["recipe"]
        out += ["", "## More code to learn from: per-set adapters on the wide code prompts too", "",
                f"The same recipe (rank {recipe['rank']}, batch {recipe['batch']}, lr {recipe['lr']:g}) on the first "
                f"answers file and the dense replies to {first['code_prompts']:,} more code prompts (every "
                "standard-library module and class: `train distill-prompts --wide`), "
                "against the per-set adapter trained on the first file alone. Val NLL: the first file's val replies "
                "(what the first adapters were chosen on) / the wide code val replies (dense "
                f"{_f((first.get('dense_val_nll') or {}).get('code_val'), 3)}). HumanEval dense "
                f"{wd['he_dense']:.1f}; held out, it chose nothing.", "",
                "| adapter | set | steps | train prompts | val NLL unhealed | first-file adapter | this | code val NLL "
                "unhealed | this | HumanEval first-file | this | this - first-file [95%] | this - dense [95%] | "
                "MC first-file | this | this - first-file [95%] |", "|" + "---|" * 16]
        for r in wd["rows"]:
            u, v = r.get("unhealed_val_nll") or {}, r.get("val_nll") or {}
            out.append(f"| {r['adapter']} | {r['set']} | {r['steps']} | {r['train_prompts']} | {_f(u.get('val'), 3)} | "
                       f"{_f(r.get('per_set_val_nll'), 3)} | {_f(v.get('val'), 3)} | {_f(u.get('code_val'), 3)} | "
                       f"{_f(v.get('code_val'), 3)} | {_f(r.get('per_set_humaneval'))} | {_f(r.get('humaneval'))} | "
                       f"{_ci(r.get('minus_per_set_ci95'))} | {_ci(r.get('minus_dense_ci95'))} | "
                       f"{_f(r.get('per_set_mc'))} | {_f(r.get('mc'))} | {_ci(r.get('mc_minus_per_set_ci95'))} |")
    fl = rep.get("failures")
    if fl:
        out += ["", "## How the HumanEval replies end", "",
                f"Per problem ({fl['rows'][0]['n']}): passed; a wrong answer (a test's assertion failed: the code ran, its logic was "
                "wrong); a runtime error (any other exception); a syntax error; cut off (the reply hit the token "
                "limit); timed out; killed.", "",
                "| set | model | " + " | ".join(fl["kinds"]) + " |", "|" + "---|" * (2 + len(fl["kinds"]))]
        for r in fl["rows"]:
            out.append(f"| {r['set']} | {r['model']} | " + " | ".join(str(r["counts"][k]) for k in fl["kinds"]) + " |")
    ga = rep.get("generation_aware")
    if ga:
        mc_dense = f"; MC dense {ga['mc_dense']:.1f}" if ga["mc_dense"] is not None else ""
        out += ["", f"## The generation-aware search's sets, unhealed (HumanEval dense {ga['he_dense']:.1f}{mc_dense})", "",
                "Chosen on the val split of the distillation replies (their NLL), never on HumanEval or the tasks' scores.", "",
                "| set | k | HumanEval | - dense [95%] | MC average | - dense [95%] |", "|---|---|---|---|---|---|"]
        for r in ga["sets"]:
            out.append(f"| {r['set']} | {r['k']} | {_f(r.get('humaneval'))} | {_ci(r.get('humaneval_minus_dense_ci95'))} | "
                       f"{_f(r.get('mc'))} | {_ci(r.get('mc_minus_dense_ci95'))} |")
        if ga.get("against_best_static"):
            out += ["", "Against today's best static set of the same k (chosen on the fidelity prompts), the "
                    "generation-aware chain on all val replies, HumanEval pass@1:", "",
                    "| k | generation-aware | HumanEval | best static | HumanEval | difference [95%] |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['k']} | {r['set']} | {r['humaneval']:.1f} | {r['best_static']} | {r['best_static_humaneval']:.1f} | "
                    f"{_ci(r['minus_best_static_ci95'])} |" for r in ga["against_best_static"]]
    if nll:
        again = nll.get("retrained")  # a column for the pool adapter trained again, where run
        out += ["", f"## Val NLL of the dense replies ({nll['examples']} replies; what the adapter is chosen on)", ""]
        if again:
            out += ["The last column: the pool adapter trained again by the same recipe and seed on another lease "
                    "(`heal_gpu.py` nll-check), against the committed one.", ""]
        out += ["| set | unhealed | healed |" + (" healed, retrained |" if again else ""), "|---|---|---|" + ("---|" if again else "")]
        out += [f"| {r['set']} | {r['unhealed']:.3f} | {_f(r['healed'], 3)} |" + (f" {_f(r['retrained'], 3)} |" if again else "")
                for r in nll["sets"]]
    mlx = rep.get("mlx")
    if mlx:
        out += ["", "## The runtime (MLX 4-bit, CUDA): the preset with the adapter", "",
                "| run | pass@1 | sets used | tokens | hit limit |", "|---|---|---|---|---|"]
        for name, r in mlx["eval"].items():
            usage = ", ".join(f"{n} x{c}" for n, c in r["usage"].items())
            out.append(f"| {name} | {r['pass@1']:.1f} | {usage} | {r['tokens_mean']:.0f} | {r['hit_limit']} |")
        if mlx["adapter_cost"]:
            out += ["", f"Adapter cost, as LoRA terms: `{json.dumps(mlx['adapter_cost'])[:600]}`"]
        if mlx["lossless"]:
            out += ["", "Lossless drafting (benchmarks/lossless.py; \"GPU shared\": beside multiple-choice scoring, so the "
                    "speeds are low bounds; acceptance is unaffected). The bound is the speedup if the verify cost one "
                    "dense step and a pruned step (n - k) / n of one (`pudding_mlx.omission.lossless_speedup_bound`): "
                    "under 1, lossless cannot pay at that acceptance on any hardware:", "",
                    "| run | draft | draft tokens | mean accepted from draft | mean speedup vs dense | bound |",
                    "|---|---|---|---|---|---|"]
            for name, summary in mlx["lossless"].items():
                label = mlx["lossless_drafts"][name]["label"]
                for r in (summary or {}).values():
                    if isinstance(r, dict) and "mean_accepted" in r:
                        bound = f"{r['speedup_bound']:.3f}" if "speedup_bound" in r else "-"
                        out.append(f"| {label} | {r['draft']} | {r['draft_tokens']} | {r['mean_accepted']:.3f} | "
                                   f"{r['mean_speedup']:.3f} | {bound} |")
            need = mlx.get("lossless_needed")
            if need:
                sizes = list(next(iter(need["rows"].values())))
                out += ["", f"Where lossless could pay: the share of output tokens the draft must supply for the bound "
                        f"to reach {need['speedup']:.2f}x, by blocks skipped (of {need['n_blocks']}) and draft tokens "
                        "(- : out of reach, since a round gives at most draft tokens + 1):", "",
                        "| blocks skipped | " + " | ".join(f"{g} draft tokens" for g in sizes) + " |",
                        "|---" * (len(sizes) + 1) + "|"]
                for k, by in need["rows"].items():
                    out.append(f"| {k} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in by.values()) + " |")
    fu = rep.get("fused")
    if fu:
        out += ["", "## The adapter fused (the runtime's default: an 8-bit merged copy of each adapted linear)", "",
                "| run | set | replies | NLL dense | unhealed | LoRA terms | fused | share of the gain kept |",
                "|---|---|---|---|---|---|---|---|"]
        for name, r in fu["keeps"].items():
            n = r["nll_per_token"]
            out.append(f"| {name} | {r['set']} | {r['replies']} | {n['dense']:.4f} | {n['unhealed']:.4f} | {n['lora']:.4f} | "
                       f"{n['fused']:.4f} | {_f(100 * r['kept'] if r['kept'] is not None else None)}% |")
        for name, summary in fu["cost"].items():
            out += ["", f"Decode cost ({name}): " + "; ".join(summary or [])]
    return "\n".join(out) + "\n"


def write(work, run_dir, out_dir, model: str) -> Path:
    rep = build(work, run_dir, model)
    out = Path(out_dir)
    write_json(out / "heal_report.json", rep)
    write_text(out / "heal_report.md", to_markdown(rep))
    return out / "heal_report.md"
