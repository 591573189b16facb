"""`pudding-mlx train ...`: the PyTorch/CUDA side (needs the `train` extra: torch)."""

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

train_app = typer.Typer(help="Offline work on a GPU box with PyTorch: candidate search, router data "
                        "and training, evaluation reports.", no_args_is_help=True)
console = Console(stderr=True, highlight=False)

DEFAULT_TASKS = "arc_challenge,arc_easy,hellaswag,piqa,winogrande"


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _need_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        from pudding_mlx.errors import PuddingError

        raise PuddingError("`pudding-mlx train` needs PyTorch: pip install 'pudding-mlx[train]'")


@train_app.command()
def search(
    model: str = typer.Argument(..., help="Hugging Face model directory, .gguf file, or hub id."),
    tasks: str = typer.Option(DEFAULT_TASKS, help="Calibration tasks, comma-separated; 'mix' adds a "
                              "SLEB-style set drawn evenly from the others."),
    losses: str = typer.Option("likelihood,likelihood_diff", help="Search losses, comma-separated."),
    k: str = typer.Option("7", "--k", help="Blocks to omit; several (3,5,7) write one file each "
                          "from one search, since greedy removal is nested."),
    out: Path = typer.Option(Path("candidates.json"), "--out", help="Candidates file (with several "
                             "k: NAME-k3.json, ...)."),
    state: Optional[Path] = typer.Option(None, help="Resume file (default: OUT's stem + .state.json)."),
    n_calib: int = typer.Option(128, help="Calibration examples per task (seeded sample of train)."),
    seed: int = typer.Option(0, help="Seed of the calibration sample."),
    batch_size: int = typer.Option(64, help="Requests per forward pass."),
    protect: str = typer.Option("first,last", help="Blocks never removed: first, last, or indices."),
    protect_first: int = typer.Option(1, help="Never remove blocks 0..P-1 (with --protect's blocks): "
                                      "their output is then free for a hidden-state router."),
    data_dir: Optional[Path] = typer.Option(None, envvar="PUDDING_MLX_DATA",
                                            help="Benchmark folder (gzip JSONL); "
                                            "none, or 'hub': the Hugging Face hub via `datasets`."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if present)."),
):
    """Greedy search for candidate omission sets, one chain per (task, loss). Resumable: rerun the
    same command after an interruption and it continues from the last completed phase."""
    _need_torch()
    from pudding_mlx.train.search import run_search

    ks = sorted({int(x) for x in _csv(k)})
    task_list, loss_list = _csv(tasks), _csv(losses)
    chains = len(task_list) * len(loss_list)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        phases = progress.add_task("phases", total=chains * max(ks))
        batches = progress.add_task("  scoring", total=1)

        def on_batch(done, total):
            progress.update(batches, completed=done, total=total)

        def on_phase(chain, phase, record):
            progress.advance(phases)
            console.print(f"{chain} phase {phase}: remove block {record['removed']} "
                          f"(loss {record['loss']:.3f}; {len(record['tried'])} tried)")

        def log(msg):
            console.print(msg)

        # a resumed search starts with its finished phases counted
        run_search(model, task_list, loss_list, ks, out, state, n_calib, seed, batch_size,
                   str(data_dir) if data_dir else None, device,
                   _csv(protect) + [str(b) for b in range(protect_first)],
                   on_phase=on_phase, on_batch=on_batch, log=log)
    _finish()


def _finish():
    """Under torchrun: all ranks leave together (train.distributed.finish); else nothing."""
    from pudding_mlx.train.distributed import finish

    finish()


def _union_sets(files: list) -> list:
    """The distinct sets of one or more candidates files, in file order."""
    from pudding_mlx.candidates import read_candidates

    seen, out = set(), []
    for f in files:
        for c in read_candidates(f):
            key = tuple(sorted(c["omitted"]))
            if key not in seen:
                seen.add(key)
                out.append(list(key))
    return out


@train_app.command()
def data(
    model: str = typer.Argument(..., help="Hugging Face model directory, .gguf file, or hub id."),
    candidates: str = typer.Option(..., help="Candidates file(s), comma-separated; their distinct "
                                   "sets are all scored."),
    tasks: str = typer.Option(DEFAULT_TASKS, help="Tasks, comma-separated."),
    split: str = typer.Option("train", help="Which split of every task (train for the router; "
                              "test / validation for evaluation)."),
    max_per_task: Optional[int] = typer.Option(None, help="A seeded sample of at most N examples per task."),
    seed: int = typer.Option(0, help="Seed of that sample."),
    batch_size: int = typer.Option(64, help="Requests per forward pass."),
    out: Path = typer.Option(..., "--out", help="Output folder (router_data.npz + .json); rerun to resume."),
    data_dir: Optional[Path] = typer.Option(None, envvar="PUDDING_MLX_DATA", help="Benchmark folder "
                                            "(none, or 'hub': the Hugging Face hub via `datasets`)."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if present)."),
):
    """Score every example of the tasks under every candidate set (and dense): the router's
    regression targets (mean gold log-likelihood per set) and per-set correctness, stored columnar
    with provenance. Resumable per (task, set) chunk."""
    _need_torch()
    from pudding_mlx.train.router_data import run_router_data

    sets = _union_sets(_csv(candidates))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        chunks = progress.add_task("chunks", total=1)
        batches = progress.add_task("  scoring", total=1)
        path = run_router_data(
            model, sets, _csv(tasks), out, max_per_task, seed, batch_size,
            str(data_dir) if data_dir else None, device, split,
            progress=lambda done, total, name: progress.update(chunks, completed=done, total=total,
                                                               description=f"chunks ({name})"),
            on_batch=lambda done, total: progress.update(batches, completed=done, total=total))
    console.print(f"{len(sets)} sets x {len(_csv(tasks))} tasks -> {path}")
    _finish()


@train_app.command()
def features(
    model: str = typer.Argument(..., help="Hugging Face model directory, .gguf file, or hub id."),
    data: str = typer.Option(..., help="Router data folder(s) from `train data`, comma-separated."),
    after: str = typer.Option("auto", help="Blocks whose output to pool, comma-separated; 'auto': the "
                              "block before the first block any --candidates set omits."),
    candidates: Optional[str] = typer.Option(None, help="Candidates file(s), for --after auto."),
    batch_size: int = typer.Option(32, help="Prompts per forward pass."),
    max_tokens: int = typer.Option(1024, help="Prompt tokens kept (the last ones)."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if present)."),
):
    """The hidden-state router's inputs: each router text as one chat message through the dense
    model's first blocks, mean- and last-token-pooled (DATA/features.npz)."""
    _need_torch()
    from pudding_mlx.train.features import write_features
    from pudding_mlx.train.hf import load_hf

    blocks = {int(b) for b in _csv(after) if b != "auto"}
    if "auto" in _csv(after):
        if not candidates:
            from pudding_mlx.errors import PuddingError

            raise PuddingError("--after auto needs --candidates (the sets whose first omitted block bounds it)")
        from pudding_mlx.omission import first_omitted

        blocks.add(first_omitted(_union_sets(_csv(candidates))) - 1)
    blocks = sorted(blocks)
    lm, tokenizer, _ = load_hf(model, device)
    for folder in _csv(data):
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            bar = progress.add_task(f"features {folder}", total=1)
            path = write_features(lm, tokenizer, folder, blocks, batch_size, max_tokens,
                                  progress=lambda done, total: progress.update(bar, completed=done, total=total))
        console.print(f"blocks {blocks} -> {path}")


@train_app.command()
def pca(
    fit: Path = typer.Option(..., help="Router data folder whose features.npz the PCA is fitted on."),
    apply: str = typer.Option("", help="Further folders to project with the same PCA, comma-separated."),
    dim: int = typer.Option(64, help="Components kept per (pooling, block)."),
):
    """Project features.npz onto a PCA fitted on one folder (features_pca.npz in each folder)."""
    import numpy as np

    from pudding_mlx.train.features import project_features

    for path in project_features(fit, _csv(apply), dim):
        with np.load(path) as z:
            explained = {k[len("explained_"):]: float(z[k]) for k in z.files if k.startswith("explained_")}
        console.print(f"-> {path}" + (f" (variance kept: {explained})" if explained else ""))


@train_app.command()
def router(
    data: Path = typer.Argument(..., help="Router data (folder or router_data.npz) from `train data`."),
    out: Path = typer.Option(..., "--out", help="Output router folder (what `convert router` reads)."),
    candidates: Path = typer.Option(..., help="Candidates file: its router pool (sets found by the "
                                    "task chains, not by 'mix') become the outputs, in file order."),
    variant: str = typer.Option("light", help="light: frozen encoder + trained head; full: fine-tune all; "
                                "probe: a linear head on the LLM's own hidden state (`train features`)."),
    objective: str = typer.Option("accuracy", help="probe only: mse (the paper's y), centered (y minus its "
                                  "row mean), accuracy (which sets answer this prompt better than its average set) or task (the "
                                  "same averaged over the prompt's task: which task it looks like, and that task's best sets)."),
    after: Optional[int] = typer.Option(None, help="probe only: the block whose output it reads (default: the "
                                        "block before the first block any set omits)."),
    encoder: Optional[Path] = typer.Option(None, help="HF BERT folder (default: all-MiniLM-L6-v2 from its wheel)."),
    epochs: int = typer.Option(10), lr: Optional[float] = typer.Option(None, help="Default: 1e-5 full, 1e-3 light."),
    batch_size: int = typer.Option(32), warmup: int = typer.Option(500), weight_decay: float = typer.Option(0.01),
    seed: int = typer.Option(0), device: Optional[str] = typer.Option(None),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """Train a router: BERT encoder + linear head, one output per candidate set, MSE on each set's
    mean gold log-likelihood (the paper's defaults: AdamW, lr 1e-5, wd 0.01, batch 32, 10 epochs,
    500 warm-up steps). Model selection on a by-question validation split."""
    _need_torch()
    from pudding_mlx.train.router_train import train_router
    from pudding_mlx.train.search import split_pool

    pool_sets, _ = split_pool(candidates)
    if variant == "probe":
        from pudding_mlx.train.probe import train_probe_router

        meta = train_probe_router(data, out, [c["omitted"] for c in pool_sets], objective, after,
                                  seed=seed, force=force)
        v = meta["validation"]
        console.print(f"hidden-state router ({objective}, after block {meta['after']}, {meta['pooling']}, "
                      f"margin {meta['margin_is'] if meta['margin'] is None else round(meta['margin'], 4)}): "
                      f"validation accuracy {100 * v['accuracy']:.2f} vs static {100 * v['static_accuracy']:.2f} -> {out}")
        return meta
    metrics = train_router(data, out, variant, str(encoder) if encoder else None, epochs, lr, batch_size,
                           warmup, weight_decay, seed, device, force=force,
                           sets=[c["omitted"] for c in pool_sets],
                           progress=lambda e: e.get("event") == "epoch" and console.print(
                               f"epoch {e.get('epoch')}: " + ", ".join(
                                   f"{k} {v:.4f}" for k, v in e.items() if isinstance(v, float))))
    best = metrics.get("best", metrics)
    console.print(f"router ({variant}, {len(pool_sets)} outputs) -> {out}")
    return best


@train_app.command()
def predict(
    router_dir: Path = typer.Argument(..., help="A router folder from `train router`."),
    data: Path = typer.Option(..., help="Router data (folder or .npz) whose texts to score."),
    out: Path = typer.Option(..., "--out", help="Where to write the scores (.npz: scores, id, task)."),
    device: Optional[str] = typer.Option(None),
):
    """Score the texts of a router data file with a trained router (PyTorch), for reports."""
    _need_torch()
    import numpy as np

    from pudding_mlx.train.router_data import load_router_data
    from pudding_mlx.train.router_train import predict as predict_scores

    from pudding_mlx.atomic import write_npz
    from pudding_mlx.train.probe import is_probe_router, load_probe
    from pudding_mlx.train.probe import predict as predict_probe

    d = load_router_data(data)
    extra = {}
    if is_probe_router(router_dir):
        from pudding_mlx.train.features import load_features

        feats = load_features(data)
        if list(feats["id"]) != list(d["id"]):
            from pudding_mlx.errors import PuddingError

            raise PuddingError(f"{data}: its features hold other rows than its router data; recompute them")
        probe = load_probe(router_dir)
        pred = predict_probe(probe, feats)
        scores = pred["scores"]
        extra = {"chosen": pred["chosen"], "objective": np.array(probe["meta"]["objective"])}
    else:
        scores = predict_scores(router_dir, list(d["text"]), device=device)
    write_npz(out, scores=scores, id=d["id"], task=d["task"], **extra)
    console.print(f"{len(scores)} texts x {scores.shape[1]} sets -> {out}")


@train_app.command()
def generate(
    model: str = typer.Argument(..., help="Hugging Face model directory, .gguf file, or hub id."),
    out: Path = typer.Option(..., "--out", help="Output folder: sets/<set>.json, replies/, summary.json "
                             "(resumable: sets already written are skipped)."),
    candidates: str = typer.Option("", help="Candidates files, comma-separated: every set in them is run."),
    state: Optional[Path] = typer.Option(None, help="A search state (cand.state.json) for --prefix-k."),
    prefix_k: str = typer.Option("", "--prefix-k", help="Also run the first k removals of every chain of "
                                 "--state (e.g. 1,2: the k = 1 and 2 sets of the same searches)."),
    omit: str = typer.Option("", "--omit", help="Extra sets, ';'-separated, e.g. '3,5;9,13,19'."),
    tasks: str = typer.Option("humaneval,fidelity", help="humaneval and/or fidelity."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Only the first N problems/prompts."),
    max_new_tokens: int = typer.Option(512, "--max-tokens", "-m", min=1, help="HumanEval: most new tokens "
                                       "per reply (fidelity: 256)."),
    batch_size: int = typer.Option(64, help="Prompts per generate() call."),
    workers: Optional[int] = typer.Option(None, help="Sandboxes at once (default: the CPU count)."),
    features_after: str = typer.Option("", help="Also write OUT/features.npz: router features (mean and "
                                       "last hidden state after these blocks) of every prompt."),
    recheck: bool = typer.Option(False, help="Only run the stored replies' tests again here (no model)."),
    shard: str = typer.Option("0/1", help="i/n: run every n-th set from the i-th (dense always), so n "
                              "processes can share one GPU; run dense alone first (no --candidates)."),
    fidelity_max_k: Optional[int] = typer.Option(None, help="Fidelity only for sets of at most this many "
                                                 "blocks (default: every set)."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if present)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: bf16 on GPU)."),
):
    """Greedy generation for many omission sets with the model loaded once: HumanEval pass@1 (code run in
    a sandbox) and agreement with dense on the fixed chat prompts. HumanEval is held out: report only."""
    _need_torch()
    from pudding_mlx.omission import parse_omit_sets
    from pudding_mlx.train import generation as G

    if recheck:
        console.print(f"summary -> {G.recheck(out, workers, log=console.print)}")
        return
    task_list = _csv(tasks)
    bad = [t for t in task_list if t not in ("humaneval", "fidelity")]
    if bad or not task_list:
        from pudding_mlx.errors import PuddingError

        raise PuddingError(f"--tasks: {bad[0] if bad else 'nothing given'}; choose humaneval and/or fidelity")
    sets = G.sets_to_run(_csv(candidates), state, [int(k) for k in _csv(prefix_k)])
    for extra in (parse_omit_sets(omit) if omit.strip() else []):
        sets.setdefault(G.set_name(extra), {"omitted": sorted(extra), "k": len(extra), "sources": ["--omit"]})
    from pudding_mlx.train.hf import load_hf

    try:
        i, n = (int(x) for x in shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        from pudding_mlx.errors import PuddingError

        raise PuddingError(f"--shard {shard!r}: give i/n with 0 <= i < n, e.g. 0/4") from None
    out.mkdir(parents=True, exist_ok=True)  # checked before the model loads
    lm, tokenizer, _ = load_hf(model, device, dtype)
    console.print(f"{len(sets)} sets x {', '.join(task_list)}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task("generate", total=1)
        path = G.run_generation(lm, tokenizer, sets, out, task_list, limit, max_new_tokens, batch_size, workers,
                                [int(b) for b in _csv(features_after)], log=console.print,
                                progress=lambda d, t: progress.update(bar, completed=d, total=t), shard=(i, n),
                                fidelity_max_k=fidelity_max_k)
    console.print(f"summary -> {path}")


@train_app.command("distill-prompts")
def distill_prompts(
    out: Path = typer.Option(..., "--out", help="The prompt file to write (JSON), e.g. results/distill/prompts.json."),
    per_task: int = typer.Option(200, "--per-task", min=0, help="Train-split questions per benchmark task."),
    seed: int = typer.Option(0, help="Seed of the task sample."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="The benchmark files (default: "
                                            "$PUDDING_MLX_DATA, else the hub)."),
    wide: bool = typer.Option(False, "--wide", help="Code prompts from every pure-Python standard-library module "
                              "and the methods of its classes (~2,800 more), not the 35 modules of the first set."),
    exclude: Optional[Path] = typer.Option(None, "--exclude", help="An earlier prompt file: its ids are left out "
                                           "(e.g. --wide --per-task 0 --exclude results/distill/prompts.json: "
                                           "only the new code prompts)."),
):
    """Write the self-distillation prompt set (issue "Healed omission sets"): documented standard-library
    functions as "write this function" messages (with their real source), and train-split questions of the
    benchmark tasks. HumanEval is held out (its entry-point names and any 8-word run of its prompts)."""
    from pudding_mlx.atomic import check_output, write_json
    from pudding_mlx.train.distill_prompts import build

    check_output(out, "--out")  # before any work: an output that cannot be written
    data = build(per_task, seed, data_dir, wide=wide, exclude=exclude)
    write_json(out, data, indent=None)
    console.print(f"{data['counts']['code']} code and {data['counts']['task']} task prompts -> {out} "
                  f"(HumanEval held out: {data['holdout']['dropped_name']} dropped by name, "
                  f"{data['holdout']['dropped_text']} by shared text)")


@train_app.command("generation-report")
def generation_report(
    run_dir: Path = typer.Argument(..., help="A run folder (results/<model>): cand-k*.json, cand.state.json, "
                                   "report.json, the router data and features."),
    gen: Path = typer.Option(..., "--gen", help="A `train generate` output folder (sets/, features.npz)."),
    mlx: Optional[Path] = typer.Option(None, "--mlx", help="A folder of `pudding-mlx eval --tasks humaneval --json` "
                                       "outputs of the model's bundle (MLX rows and parity)."),
    model: str = typer.Option(..., help="Model name for the title."),
    answers: Optional[List[Path]] = typer.Option(None, "--answers", help="A `pudding-mlx bench --answers --json` "
                                                 "output (repeatable): the frontier on the time-to-answer axis."),
    answers_drop: Optional[str] = typer.Option(None, "--answers-drop", help="Prompt ids to leave out of the --answers "
                                               "figures (comma-separated), e.g. one whose time holds a one-off compile; STEM:ID for the file STEM.json only."),
):
    """Write RUN_DIR/generation.md/.json/.png: HumanEval pass@1 and fidelity to dense per set and k, best
    static (chosen without HumanEval), the routers' picks, oracle, with paired-bootstrap intervals; with
    --answers, each timed configuration's time to a complete answer beside its quality (table and plot)."""
    from pudding_mlx.train.generation_report import write

    for f in answers or []:
        if not f.is_file():
            from pudding_mlx.errors import PuddingError

            raise PuddingError(f"--answers {f}: no such file; give a `pudding-mlx bench --answers --json` output")
    console.print(f"report -> {write(run_dir, gen, model, mlx, answers or [], _csv(answers_drop or ''))}")


@train_app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder: data-test/-val.npz, cand-k*.json, routers/ "
                                   "(what results/<model>/pipeline.sh leaves)."),
    model: Optional[str] = typer.Option(None, help="Model name for the report title."),
):
    """Write RUN_DIR/report.md, report.json and report.png: dense vs every static candidate vs
    SLEB-style vs routed (per router) vs random vs oracle, per k, with paired-bootstrap intervals."""
    from pudding_mlx.train.report import report_run_dir

    path = report_run_dir(run_dir, model)
    console.print(f"report -> {path}")


# -- healing (issue "Healed omission sets"): self-distillation answers, generation-aware search, LoRA -------


@train_app.command("heal-report")
def heal_report(
    work: Path = typer.Argument(..., help="A heal run's folder (benchmarks/heal_gpu.py's WORK, or its lean copy "
                                "under results/<model>/heal): adapters/pool-k3/heal.json, gen-pool/, mc-pool-*/, "
                                "heal/val_nll.json, mlx-out/."),
    run_dir: Path = typer.Option(..., "--run", help="The model's run folder (results/<model>): the unhealed "
                                 "generation run and multiple-choice data."),
    out: Path = typer.Option(..., "--out", help="Where heal_report.md/.json go."),
    model: str = typer.Option(..., help="Model name for the title."),
):
    """Write OUT/heal_report.md/.json: HumanEval pass@1 and the six-task multiple-choice average of every set
    healed by the pool adapter against the same set unhealed and dense (paired-bootstrap intervals), routed
    healed, the val NLL the adapter was chosen on, and the runtime's (MLX) healed runs where present."""
    from pudding_mlx.train.heal_report import write

    console.print(f"report -> {write(work, run_dir, out, model)}")


@train_app.command("heal-routers")
def heal_routers(
    work: Path = typer.Argument(..., help="A heal run's folder: adaptive/nll.npz (the reply NLL of the distillation "
                                "prompts, the pool healed and unhealed), gen-pool/, gen-unhealed/, and where scored "
                                "data-healed-{train,val,test}/ and data-extra-*/ (benchmarks/heal_gpu.py mc-healed, "
                                "mc-extra)."),
    run_dir: Path = typer.Option(..., "--run", help="The model's run folder (results/<model>): its router "
                                 "data, features and HumanEval features."),
    out: Path = typer.Option(..., "--out", help="Where generation.json (and, with the MC data, healed/ and "
                             "unhealed/: report.md/.json/.png, he_picks.json) go."),
    model: str = typer.Option(..., help="Model name for the titles."),
):
    """Routers retrained on the k = 3 pool's healed per-prompt scores, beside the same routers unhealed: on the
    generation scores (reply NLL; HumanEval of each router's picks against its static rival, chosen on the same
    train prompts), and, where the healed multiple-choice data exists, hidden-state routers of every objective on
    it (each run's report; without the healed train split, trained on the unhealed training rows and scored on
    the healed evaluation rows). CPU, a minute; `train heal-report` quotes them."""
    from pudding_mlx.train.heal_routers import build, healed_splits, write_generation_routers

    console.print(f"generation routers -> {write_generation_routers(work / 'adaptive' / 'nll.npz', run_dir, work, out / 'generation.json')}")
    healed = healed_splits(work)
    if {"val", "test"} <= set(healed):
        for name, path in build(work, run_dir, out, model).items():
            console.print(f"{name}: {path}/report.md")
        if "train" not in healed:
            console.print(f"{work}/data-healed-train: none: the healed MC routers are trained on the unhealed "
                          "training rows (only the evaluation rows are healed)")
    else:
        console.print(f"{work}/data-healed-val, -test: none (benchmarks/heal_gpu.py mc-healed): the multiple-choice "
                      "routers are not retrained")


def _distill_inputs(prompts: Path, answers: Path) -> dict:
    """The answers file's header, checked against the prompts file (before the model loads)."""
    from pudding_mlx.errors import PuddingError
    from pudding_mlx.train import distill as D

    D.read_prompts(prompts)
    header, _ = D.read_answers(answers)
    if header.get("prompts_sha256") != D._sha256(prompts):
        raise PuddingError(f"--answers {answers}: answers to another prompts file than {prompts}; give the prompts "
                           "they were made from, or make them again with `pudding-mlx train distill-answers`")
    return header


def _protected(text: str, n_blocks: int) -> List[int]:
    from pudding_mlx.errors import PuddingError

    out = set()
    for p in _csv(text):
        if p in ("first", "last"):
            out.add(0 if p == "first" else n_blocks - 1)
        elif p.isdigit() and int(p) < n_blocks:
            out.add(int(p))
        else:
            raise PuddingError(f"--protect {p!r}: give first, last or block indices 0..{n_blocks - 1}")
    return sorted(out)


def _ks(text: str) -> List[int]:
    from pudding_mlx.errors import PuddingError

    try:
        ks = sorted({int(x) for x in _csv(text)})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise PuddingError(f"--k {text!r}: give positive block counts, comma-separated, e.g. 1,2,3,5")
    return ks


@train_app.command("distill-answers")
def distill_answers(
    model: str = typer.Argument(..., help="Hugging Face model directory, .gguf file, or hub id (the dense model)."),
    prompts: Path = typer.Option(Path("results/distill/prompts.json"), help="The prompt set (`train distill-prompts`)."),
    out: Path = typer.Option(..., "--out", help="The answers file to write (.jsonl.gz); an interrupted run resumes "
                             "from OUT.parts/ when given the same settings."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Most new tokens per reply."),
    batch_size: int = typer.Option(256, min=1, help="Prompts per generate() call."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Only the first N prompts (smoke runs)."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if present)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: bf16 on GPU)."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """The dense model's greedy replies to the self-distillation prompts, each prompt's train/val split
    fixed by a hash of its id: the data of the generation-aware search (val) and of healing (train)."""
    _need_torch()
    from pudding_mlx.atomic import check_output
    from pudding_mlx.train import distill as D
    from pudding_mlx.train.hf import load_hf
    from pudding_mlx.train.search import model_identity

    check_output(out, "--out", replace=force)
    D.read_prompts(prompts)
    lm, tokenizer, _ = load_hf(model, device, dtype)
    path = D.answer_prompts(lm, tokenizer, prompts, out, model_identity(model), max_new_tokens, batch_size, limit,
                            log=console.print)
    header = D.read_answers(path)[0]
    console.print(f"{header['n']} replies ({header['counts']['train']} train, {header['counts']['val']} val; "
                  f"{header['hit_limit']} hit the token limit) -> {path}")


@train_app.command("distill-search")
def distill_search(
    model: str = typer.Argument(..., help="Hugging Face model directory, .gguf file, or hub id (the dense model)."),
    answers: Path = typer.Option(..., help="The dense model's replies (`train distill-answers`)."),
    prompts: Path = typer.Option(Path("results/distill/prompts.json"), help="The prompts they answer."),
    out: Path = typer.Option(Path("cand-distill.json"), "--out", help="Candidates file (with several k: "
                             "NAME-k3.json, ...)."),
    k: str = typer.Option("1,2,3,5", "--k", help="Blocks to omit, comma-separated (one search: greedy removal is nested)."),
    per_kind: int = typer.Option(64, "--per-kind", min=1, help="Val code and task replies scored (each)."),
    protect: str = typer.Option("0,1,2,3,last", help="Blocks never removed: first, last, or indices."),
    batch_size: int = typer.Option(32, min=1, help="Examples per forward pass."),
    state: Optional[Path] = typer.Option(None, help="Resume file (default: OUT's stem + .state.json)."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if present)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: bf16 on GPU)."),
    force: bool = typer.Option(False, help="Replace candidates files that exist."),
):
    """Generation-aware search: greedy removal with the loss "the dense replies' mean NLL per token" on the
    val split of the distillation answers (one chain each for code, task and both). Resumable: rerun the
    same command after an interruption and it continues from the last completed phase."""
    _need_torch()
    from pudding_mlx.atomic import check_output
    from pudding_mlx.train import distill as D
    from pudding_mlx.train.hf import load_hf
    from pudding_mlx.train.scoring import num_blocks
    from pudding_mlx.train.search import candidates_path, model_identity

    ks = _ks(k)
    for kk in ks:
        check_output(candidates_path(out, kk, ks), "--out", replace=force)
    _distill_inputs(prompts, answers)
    lm, tokenizer, _ = load_hf(model, device, dtype)
    val = D.build_examples(tokenizer, prompts, answers, split="val", kinds=("code", "task"))
    written = D.run_distill_search(lm, tokenizer, val, ks, out, model_identity(model),
                                   _protected(protect, num_blocks(lm)), per_kind, batch_size, state,
                                   log=console.print)
    for kk, data in written.items():
        sets = "; ".join(",".join(map(str, c["omitted"])) for c in data["candidates"])
        console.print(f"k = {kk}: {len(data['candidates'])} sets ({sets}) -> {candidates_path(out, kk, ks)}")


@train_app.command()
def heal(
    model: str = typer.Argument(..., help="Hugging Face model directory, .gguf file, or hub id (the dense model)."),
    answers: List[Path] = typer.Option(..., help="The dense model's replies (`train distill-answers`): train split. "
                                       "Give it again for more data, each with its --prompts in the same order."),
    prompts: List[Path] = typer.Option([Path("results/distill/prompts.json")], help="The prompts they answer, one "
                                       "per --answers (e.g. results/distill/prompts-code.json, the wide code set)."),
    sets: str = typer.Option("", "--sets", help="Omission sets to heal, ';'-separated, e.g. '15,17,18;13,14,15'."),
    candidates: Optional[Path] = typer.Option(None, help="Or a candidates file: all of its sets."),
    out: Path = typer.Option(..., "--out", help="Adapter folder to write (PEFT's files + heal.json)."),
    steps: int = typer.Option(240, min=1, help="Training steps."),
    batch: int = typer.Option(16, min=1, help="Examples per step."),
    lr: float = typer.Option(2e-4, help="Peak learning rate (AdamW, warm-up then cosine)."),
    rank: int = typer.Option(16, min=1, help="LoRA rank (alpha = 2 x rank)."),
    lora_from: str = typer.Option("auto", "--lora-from", help="LoRA only on blocks B..; auto: the first block any "
                                  "set omits (a hidden-state router reads blocks before it, and a bundle refuses "
                                  "adapters there); 0: every block."),
    kl_weight: float = typer.Option(1.0, help="Weight of KL(dense || pruned) beside the replies' CE."),
    seed: int = typer.Option(0, help="Seed of the batch order and the set drawn per step."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if present)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: bf16 on GPU)."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """Train one LoRA adapter that heals the given omission sets (the set skipped drawn per step from them),
    by distillation from the dense model (the same weights, adapter off) on the train split of the answers;
    then print each set's val NLL of the dense replies, unhealed and healed (also in OUT/heal.json).
    Several GPUs: `torchrun --nproc-per-node N -m pudding_mlx.app.cli train heal ...` (data parallel; --batch is
    the whole step's, split across the GPUs)."""
    _need_torch()
    from pudding_mlx.atomic import check_output
    from pudding_mlx.errors import PuddingError
    from pudding_mlx.omission import check_omitted, parse_omit_sets

    if bool(sets.strip()) == (candidates is not None):
        raise PuddingError("give the sets to heal with --sets '15,17,18;13,14,15' or --candidates FILE (one of them)")
    if candidates is not None:
        from pudding_mlx.candidates import read_candidates

        chosen = [list(c["omitted"]) for c in read_candidates(candidates)]
    else:
        chosen = parse_omit_sets(sets)
    chosen = [list(s) for s in dict.fromkeys(tuple(sorted(s)) for s in chosen)]
    if lora_from != "auto" and not lora_from.isdigit():
        raise PuddingError(f"--lora-from {lora_from}: give auto or a block index")
    if len(prompts) != len(answers):
        raise PuddingError(f"{len(answers)} --answers and {len(prompts)} --prompts: give each answers file the "
                           "prompts file it answers, in the same order")
    check_output(out, "--out", replace=force, folder=True)
    headers = [_distill_inputs(p, a) for p, a in zip(prompts, answers)]
    from pudding_mlx.train import distill as D
    from pudding_mlx.train import heal as H
    from pudding_mlx.train.distributed import init_from_env, is_main, world
    from pudding_mlx.train.generation import set_name
    from pudding_mlx.train.hf import load_hf
    from pudding_mlx.train.scoring import num_blocks

    init_from_env()
    say = console.print if is_main() else (lambda *a, **k: None)
    lm, tokenizer, _ = load_hf(model, device, dtype)
    n_blocks = num_blocks(lm)
    what = f"--candidates {candidates}" if candidates is not None else "--sets"
    chosen = [list(check_omitted(s, n_blocks, what)) for s in chosen]
    first = min(min(s) for s in chosen) if lora_from == "auto" else int(lora_from) if lora_from.isdigit() else -1
    if not 0 <= first < n_blocks:
        raise PuddingError(f"--lora-from {lora_from}: give auto or a block index 0..{n_blocks - 1}")
    layers = list(range(first, n_blocks))
    pairs = list(zip(prompts, answers))
    train = D.build_examples_of(tokenizer, pairs, split="train")
    val = D.build_examples_of(tokenizer, pairs, split="val", kinds=("code", "task"))
    if not train:
        raise PuddingError(f"--answers {' '.join(map(str, answers))}: no train examples; answer more prompts "
                           "(without --limit)")
    processes = world()[1]
    say(f"{len(chosen)} sets, {len(train)} train examples, {len(val)} val replies; {steps} steps, "
        f"LoRA on blocks {first}..{n_blocks - 1}" + (f"; {processes} processes" if processes > 1 else ""))
    import torch

    torch.manual_seed(seed)  # LoRA's A matrices: the same adapter from the same command
    pm = H.add_lora(lm, rank=rank, alpha=2 * rank, layers=layers)
    curve = H.train_adapter(pm, tokenizer, train, chosen, steps, batch, lr, kl_weight, seed, log=console.print)
    table = H.nll_table(pm, tokenizer, val, chosen, ["default"]) if val else {}
    if is_main():  # one writer
        H.save_adapter(pm, out, chosen, {"steps": steps, "batch": batch, "lr": lr, "rank": rank, "alpha": 2 * rank,
                                         "kl_weight": kl_weight, "seed": seed, "layers": layers,
                                         "processes": processes, "data": headers[0] if len(headers) == 1 else headers,
                                         "val_nll": {"examples": len(val), "table": table}, "curve": curve},
                       force=force)
    if not table:
        say("no val replies: no NLL to report")
    else:
        say(f"val NLL per token of the dense replies ({len(val)}): dense {table['dense']['unhealed']:.4f}")
        for s in chosen:
            row = table[set_name(s)]
            say(f"  {set_name(s)}: unhealed {row['unhealed']:.4f} -> healed {row['default']:.4f}")
    say(f"adapter -> {out}")
    _finish()


@train_app.command("adaptive-report")
def adaptive_report(
    run_dir: Path = typer.Argument(..., help="A run folder (results/<model>): data-{train,val,test}.npz + .json, "
                                   "features-*.npz, cand-k*.json, cand.state.json, routers/preds."),
    gen: Path = typer.Option(..., "--gen", help="A `train generate` output folder (sets/, features.npz)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN_DIR/adaptive)."),
    nll: Optional[Path] = typer.Option(None, "--nll", help="A second training source: nll.npz of the GPU run "
                                       "(benchmarks/heal_gpu.py, phase adaptive-data)."),
    bench: Optional[Path] = typer.Option(None, "--bench", help="A `pudding-mlx bench --json` of this model: its "
                                         "measured k = 3 decode speedup is quoted beside the ideal."),
    extra: Optional[Path] = typer.Option(None, "--extra", help="A heal run's folder with data-extra-{train,val,test}/ "
                                         "(benchmarks/heal_gpu.py mc-extra): MC scores of more sets on the run's "
                                         "rows, joined in (the k = 1, 2 menu)."),
    healed: Optional[Path] = typer.Option(None, "--healed", help="A heal run's folder (data-healed-{train,val,test}/, "
                                          "gen-pool/): the healed menu, the sets its pool adapter heals run healed "
                                          "(MC, HumanEval, and with --nll its nll.npz's healed reply NLL)."),
    speed: Optional[List[Path]] = typer.Option(None, "--speed", help="benchmarks/depth_speed.py --json of this "
                                               "model: measured decode time per k, mixed per budget beside the ideal "
                                               "speedup. One per backend (repeat it: CPU and GPU)."),
    model: str = typer.Option(..., help="Model name for the title."),
):
    """Adaptive depth (issue #23): fit the loss predictor (OUT/predictor/) and write OUT/adaptive.md/.json/.png,
    the frontier of budgets against static sets and fixed-k routing. HumanEval is held out: report only."""
    from pudding_mlx.errors import PuddingError
    from pudding_mlx.train.adaptive import write

    for flag, f in (("--nll", nll), ("--bench", bench), *(("--speed", f) for f in speed or ())):
        if f is not None and not f.is_file():
            raise PuddingError(f"{flag} {f}: no such file")
    if extra is not None and not (extra / "data-extra-train" / "router_data.npz").is_file():
        raise PuddingError(f"--extra {extra}: no data-extra-train/router_data.npz; run benchmarks/heal_gpu.py mc-extra")
    if healed is not None:
        for need in [f"data-healed-{s}/router_data.npz" for s in ("train", "val", "test")] + ["gen-pool/sets/dense.json"]:
            if not (healed / need).is_file():
                raise PuddingError(f"--healed {healed}: no {need}; run benchmarks/heal_gpu.py mc-healed and he-pool")
    console.print(f"report -> {write(run_dir, gen, out or run_dir / 'adaptive', model, nll, bench, extra, speed or (), healed)}")
