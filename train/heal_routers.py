"""Routers retrained on the healed sets' scores (issue "Healed omission sets", item 5), and the same routers
on the same pool unhealed, so that routing healed and unhealed compare on equal terms.

A heal run (benchmarks/heal_gpu.py, phases mc-healed and mc-extra) scores the k = 3 pool on exactly the rows of
the model's run folder (RUN/data-{train,val,test}: same tasks, splits, seeds and sizes):
  WORK/data-healed-{split}/  every pool set with the pool adapter on;
  WORK/data-extra-{split}/   unhealed sets the run's data lacks (the generation-aware pool sets among them).
This module joins those columns into run folders laid out as results/<model>/pipeline.sh leaves them
(data-{split}.npz/.json, features-{split}.npz, cand-k3.json), in a temporary folder:
  healed:   the pool's columns from data-healed, the `dense` columns from RUN (the heal run scores its dense
            column with the adapter loaded, which the runtime never runs: the adapter is on only while blocks
            are skipped);
  unhealed: the pool's columns from RUN's data, or data-extra where RUN lacks the set.
Where the heal run scored only the evaluation splits healed (data-healed-{val,test}: the healed train split costs
more than half of mc-healed, ~940 s on an H100), the healed run's training rows are the pool's unhealed columns:
its routers and its best static set are then chosen on the unhealed training rows, the same as the unhealed run's
(same picks), and only the evaluation rows are healed (healed_vs_unhealed.json `train_rows`: "unhealed").
Then, for each, the hidden-state routers of every objective (`train router --variant probe`, as
benchmarks/hidden_routers.sh trains them), their scores on val and test, and the run report
(`train.report.report_run_dir`: the best static set chosen on the training rows, routed vs static with paired
intervals), and each router's pick for every HumanEval problem (RUN/generation/features.npz).
Written to OUT/{healed,unhealed}/: report.md, report.json, report.png and he_picks.json. Nothing here is chosen on
HumanEval (held out) or on the evaluation rows.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from pudding_mlx.atomic import write_json, write_npz, write_text
from pudding_mlx.errors import PuddingError
from pudding_mlx.jsonio import read_json

from .adaptive import _key
from .generation import set_name

SPLITS = ("train", "val", "test")
PER_SET = ("y", "correct", "correct_norm", "logprob", "mean_ll")  # one column per set
OBJECTIVES = ("mse", "centered", "accuracy", "task")


def _load(npz: Path, meta: Path) -> tuple:
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, read_json(meta, "router data", "rebuild it")


def _source(folder: Path) -> tuple:
    return _load(folder / "router_data.npz", folder / "router_data.json")


def joined_split(run: Path, split: str, sources: Sequence[Path], sets: Sequence[Sequence[int]],
                 from_run: bool = True) -> tuple:
    """(arrays, meta) of RUN/data-SPLIT with its per-set columns replaced by SETS' columns, each taken from the
    first of RUN's data (unless not FROM_RUN: healed columns must never be RUN's unhealed ones) and then SOURCES
    (router data folders) that has it; rows must be RUN's, in its order. The dense columns stay RUN's."""
    base, meta = _load(run / f"data-{split}.npz", run / f"data-{split}.json")
    frames = [(str(run / f"data-{split}.npz"), base, meta)] if from_run else []
    for folder in sources:
        if (folder / "router_data.npz").is_file():
            frames.append((str(folder), *_source(folder)))
    cols: Dict[str, List[np.ndarray]] = {k: [] for k in PER_SET}
    taken = {}
    for s in sets:
        for name, arrays, m in frames:
            have = [_key(x) for x in m["sets"]]
            if _key(s) not in have:
                continue
            if not (np.array_equal(arrays["task"], base["task"]) and np.array_equal(arrays["id"], base["id"])):
                raise PuddingError(f"{name}: other rows than {run}/data-{split}.npz; score it with the run's "
                                   "tasks, split, seed and size (benchmarks/heal_gpu.py router_data_like_run)")
            j = have.index(_key(s))
            for k in PER_SET:
                col = arrays[k][:, j]
                width = base[k].shape[2] if base[k].ndim == 3 else None
                if width is not None and col.shape[1] != width:
                    raise PuddingError(f"{name}: {k} has {col.shape[1]} choices a row, {run} {width}")
                cols[k].append(col.astype(base[k].dtype))
            taken[set_name(s)] = name
            break
        else:
            raise PuddingError(f"set {sorted(s)}: in none of " + (f"{run}/data-{split}.npz, " if from_run else "")
                               + ", ".join(str(f) for f in sources) + "; score it first (heal_gpu.py mc-healed, mc-extra)")
    out = dict(base)
    for k in PER_SET:
        out[k] = np.stack(cols[k], 1)
    meta = {**meta, "n": int(len(base["id"])), "sets": [sorted(int(b) for b in s) for s in sets],
            "joined_from": taken}
    return out, meta


def write_joined_run(run: Path, out: Path, sources: Dict[str, List[Path]], sets: Sequence[Sequence[int]],
                     from_run: Sequence[str] = SPLITS) -> Path:
    """A run folder OUT (module doc) for SETS: data-{split}.npz/.json joined (`joined_split`), RUN's features,
    cand-k3.json. FROM_RUN: the splits whose columns may come from RUN's data (none: only SOURCES')."""
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        arrays, meta = joined_split(run, split, sources.get(split, []), sets, split in from_run)
        write_npz(out / f"data-{split}.npz", **arrays)
        write_json(out / f"data-{split}.json", meta)
        shutil.copy(run / f"features-{split}.npz", out / f"features-{split}.npz")
    write_json(out / "cand-k3.json", [sorted(int(b) for b in s) for s in sets])
    return out


def train_routers(run: Path) -> None:
    """benchmarks/hidden_routers.sh for k = 3, in-process: a probe router per objective, scored on val and test."""
    from .features import load_features
    from .probe import load_probe, predict, train_probe_router

    sets = read_json(run / "cand-k3.json", "candidates", "rebuild the joined run", want=list)
    with tempfile.TemporaryDirectory() as tmp:
        for split in SPLITS:
            d = Path(tmp) / f"data-{split}"
            d.mkdir()
            for src, dst in ((f"data-{split}.npz", "router_data.npz"), (f"data-{split}.json", "router_data.json"),
                             (f"features-{split}.npz", "features_pca.npz")):
                (d / dst).symlink_to((run / src).resolve())
        (run / "routers" / "preds").mkdir(parents=True, exist_ok=True)
        (run / "routers" / "hidden").mkdir(parents=True, exist_ok=True)
        feats = {split: load_features(Path(tmp) / f"data-{split}") for split in ("val", "test")}
        rows = {}
        for split in ("val", "test"):
            with np.load(run / f"data-{split}.npz", allow_pickle=False) as z:
                rows[split] = (z["id"], z["task"])
        for objective in OBJECTIVES:
            r = Path(tmp) / f"router-hidden-{objective}-k3"
            train_probe_router(Path(tmp) / "data-train", r, sets, objective=objective)
            shutil.copy(r / "router.json", run / "routers" / "hidden" / f"hidden-{objective}-k3.json")
            probe = load_probe(r)
            for split in ("val", "test"):
                pred = predict(probe, feats[split])
                ids, tasks = rows[split]
                write_npz(run / "routers" / "preds" / f"hidden-{objective}-k3-{split}.npz", scores=pred["scores"],
                          id=ids, task=tasks, chosen=pred["chosen"], objective=np.array(objective))


def he_picks(run: Path, model_run: Path) -> dict:
    """{objective: {HumanEval task id: the set name it picks}} from RUN's routers, retrained the way the
    generation report retrains them (`generation_report.router_picks`)."""
    from .generation_report import load_sets, router_picks

    dense = load_sets(model_run / "generation")["dense"]
    ids = [r["task_id"] for r in dense["humaneval"]["records"]]
    out = {}
    for objective in ("task", "accuracy", "mse"):
        got = router_picks(run, model_run / "generation" / "features.npz", 3, objective, ids)
        if got is None:
            raise PuddingError(f"{run}: no router data to retrain the routers from")
        chosen, sets = got
        out[objective] = {i: set_name(sets[c]) for i, c in zip(ids, chosen)}
    return out


def routed_hits(run: Path, objective: str) -> tuple:
    """(evaluation data of RUN (val + test), each row's hit with the set the router picks)."""
    from .report import load_eval

    data = load_eval([run / "data-val.npz", run / "data-test.npz"])
    chosen = []
    for split in ("val", "test"):
        with np.load(run / "routers" / "preds" / f"hidden-{objective}-k3-{split}.npz", allow_pickle=False) as z:
            chosen.append(z["chosen"])
    chosen = np.concatenate(chosen)
    return data, data["hit"][np.arange(len(chosen)), chosen]


def healed_splits(work) -> List[str]:
    """The splits of WORK's healed router data (data-healed-{split}/router_data.npz), in SPLITS' order."""
    return [s for s in SPLITS if (Path(work) / f"data-healed-{s}" / "router_data.npz").is_file()]


def build(work, run_dir, out_dir, model: str) -> Dict[str, Path]:
    """Both joined runs, their routers, reports and HumanEval picks, into OUT/{healed,unhealed}/, and
    OUT/healed_vs_unhealed.json: per objective, the routed MC average healed minus unhealed (paired, 95%). Without
    a healed train split, the healed run trains on the unhealed training rows (module doc)."""
    from .report import average, bootstrap_delta, per_task, report_run_dir

    work, run, out = Path(work), Path(run_dir), Path(out_dir)
    healed = healed_splits(work)
    if healed not in (list(SPLITS), ["val", "test"]):
        missing = ", ".join(f"data-healed-{s}" for s in SPLITS if s not in healed and s != "train")
        raise PuddingError(f"{work}: {missing} missing; run benchmarks/heal_gpu.py mc-healed first "
                           "(MC_SPLITS=test,val for the evaluation rows alone)")
    train_rows = "healed" if "train" in healed else "unhealed"
    pool = read_json(work / f"data-healed-{healed[-1]}" / "router_data.json", "router data", "rebuild it")["sets"]
    healed_sources = {s: [work / (f"data-healed-{s}" if s in healed else f"data-extra-{s}")] for s in SPLITS}
    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        joined = {"healed": write_joined_run(run, Path(tmp) / "healed", healed_sources, pool,
                                             from_run=[s for s in SPLITS if s not in healed]),
                  "unhealed": write_joined_run(run, Path(tmp) / "unhealed",
                                               {s: [work / f"data-extra-{s}"] for s in SPLITS}, pool)}
        for name, j in joined.items():
            train_routers(j)
            report_run_dir(j, model=model)
            dest = out / name
            dest.mkdir(parents=True, exist_ok=True)
            rows = train_rows if name == "healed" else "unhealed"
            for f in ("report.md", "report.json"):  # named for what they are, not for the temporary folder
                text = (j / f).read_text().replace(f"{j}/data-train.npz", f"the training rows ({rows} scores)")
                write_text(dest / f, text.replace(str(j), f"the joined {name} run"))
            if (j / "report.png").is_file():
                shutil.copy(j / "report.png", dest / "report.png")
            write_json(dest / "he_picks.json", he_picks(j, run))
            written[name] = dest
        compare = {}
        for objective in OBJECTIVES:
            data, h = routed_hits(joined["healed"], objective)
            _, u = routed_hits(joined["unhealed"], objective)
            ref = {"task": data["task"]}
            compare[f"hidden-{objective}"] = {"healed": average(per_task(ref, h)), "unhealed": average(per_task(ref, u)),
                                              "healed_minus_unhealed_ci95": list(bootstrap_delta(ref, h, u))}
        write_json(out / "healed_vs_unhealed.json", {"pool": pool, "rows": int(len(data["task"])), "train_rows": train_rows,
                                                     "mc": compare})
    return written


# -- routers on the generation scores: the reply NLL of the distillation prompts, healed and unhealed -------------


def generation_routers(nll_path, run_dir, work) -> dict:
    """Routers retrained on per-prompt generation scores (issue "Healed omission sets", item 5, generation side):
    for the k = 3 pool, the NLL per token of the dense model's own replies to the distillation prompts under each
    set minus dense's (nll.npz, benchmarks/heal_gpu.py adaptive-data: `healed` with the pool adapter on,
    `unhealed` without), one ridge head per set on the hidden-state features after block 3 (the adaptive
    predictor's fit: pooling and ridge by held-out MSE on the val prompts, then refitted on all), the router
    picking the set of lowest predicted loss. Its static rival: the set of lowest mean loss on the same train
    prompts. Both are run on HumanEval (held out: never chosen on), healed from WORK/gen-pool and unhealed from
    RUN/generation and WORK/gen-unhealed; paired bootstrap 95% intervals over problems."""
    from . import adaptive as A
    from .generation_report import bootstrap, load_sets, passed

    run, work = Path(run_dir), Path(work)
    with np.load(nll_path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    if "healed" not in d or "pool" not in d:
        raise PuddingError(f"{nll_path}: no healed scores ('healed', 'pool'); rerun the GPU phase adaptive-data")
    sets = [str(s) for s in d["sets"]]
    pool = [str(s) for s in d["pool"]]
    per_token = {"unhealed": A.per_token(d["unhealed"]), "healed": A.per_token(d["healed"])}
    dense = per_token["unhealed"][:, sets.index("")]
    loss = {"unhealed": per_token["unhealed"][:, [sets.index(p) for p in pool]] - dense[:, None],
            "healed": per_token["healed"] - dense[:, None]}
    feats = A.project({k: d[k] for k in ("mean_3", "last_3")}, A.basis_of(run))
    keys = [_key(p.split(",")) for p in pool]
    menu = [()] + keys
    train = d["split"].astype(str) == "train"
    results = {"healed": load_sets(work / "gen-pool"), "unhealed": load_sets(run / "generation")}
    if (work / "gen-unhealed" / "sets").is_dir():
        results["unhealed"].update({n: r for n, r in load_sets(work / "gen-unhealed").items() if n != "dense"})
    ids = [r["task_id"] for r in results["unhealed"]["dense"]["humaneval"]["records"]]
    he_feats = A._he_features(run, run / "generation", ids)
    he_dense = passed(results["unhealed"]["dense"], ids)
    out = {"prompts": {"train": int(train.sum()), "val": int((~train).sum())}, "pool": [set_name(k) for k in keys],
           "dense_humaneval": 100 * float(he_dense.mean()), "runs": {}}
    hits = {}
    for name in ("unhealed", "healed"):
        source = {"sets": menu, "loss": np.concatenate([np.zeros((len(dense), 1)), loss[name]], 1), "feats": feats}
        fitted = A.fit_and_select([source], menu, [~train])
        val_pred = A.predict(fitted["head_fit"], {k: v[~train] for k, v in feats.items()}, fitted["pooling"])
        val_pick = 1 + val_pred[:, 1:].argmin(1)
        static = 1 + int(loss[name][train].mean(0).argmin())
        val_loss = source["loss"][~train]
        pred = A.predict(fitted["head"], he_feats, fitted["pooling"])
        picks = [set_name(menu[1 + c]) for c in pred[:, 1:].argmin(1)]
        usage = {n: picks.count(n) for n in sorted(set(picks))}
        row = {"pooling": fitted["pooling"], "ridge": fitted["ridge"], "static": set_name(menu[static]),
               "val_loss_routed": float(val_loss[np.arange(len(val_pick)), val_pick].mean()),
               "val_loss_static": float(val_loss[:, static].mean()), "usage": usage, "picks": dict(zip(ids, picks))}
        have = results[name]
        missing = sorted(n for n in set(picks) | {row["static"]} if n not in have)
        if missing:
            row["missing"] = missing
        else:
            routed = np.array([passed(have[n], [i])[0] for n, i in zip(picks, ids)])
            stat = passed(have[row["static"]], ids)
            row.update(routed_humaneval=100 * float(routed.mean()), static_humaneval=100 * float(stat.mean()),
                       routed_minus_static_ci95=bootstrap(routed, stat), routed_minus_dense_ci95=bootstrap(routed, he_dense))
            hits[name] = routed
        out["runs"][name] = row
    if len(hits) == 2:
        out["healed_minus_unhealed_routed_ci95"] = bootstrap(hits["healed"], hits["unhealed"])
    return out


def write_generation_routers(nll_path, run_dir, work, out_file) -> Path:
    write_json(Path(out_file), generation_routers(nll_path, run_dir, work))
    return Path(out_file)
