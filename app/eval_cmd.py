"""`pudding-mlx eval MODEL --tasks ...`: zero-shot accuracy on the MLX runtime.

    pudding-mlx eval my-bundle --tasks arc_easy,piqa --limit 100            # routed (bundle + router)
    pudding-mlx eval smol-mlx --tasks boolq --omit 3,5 --json out.json     # a fixed omission set
    pudding-mlx eval smol-mlx --tasks hellaswag --dense

Same templates, tokenization and metrics as the training side (`pudding_mlx.tasks`, `pudding_mlx.requests`), so
the figures match `pudding-mlx train` on the same weights. Benchmark files come from --data-dir or
$PUDDING_MLX_DATA; with neither, the tasks are read from the Hugging Face hub (`datasets`). Bad input (unknown task, no data folder, bad --omit, bad MODEL) is one line on
stderr and exit status 2.
"""

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pudding_mlx.app.options import LORA_TERMS, MAX_LOSS, ROUTED, UNHEALED
from pudding_mlx.errors import PuddingError

err = Console(stderr=True, highlight=False)


def _parse_tasks(text: str) -> List[str]:
    tasks = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not tasks:
        raise PuddingError("--tasks: give one or more comma-separated task names, e.g. --tasks arc_easy,piqa")
    return tasks


def eval_command(
    model: str = typer.Argument(..., help="A pudding-mlx bundle, an mlx-lm model directory, or a hub id."),
    tasks: str = typer.Option(..., "--tasks", "-t", help="Comma-separated tasks. Multiple choice: arc_challenge, "
                              "arc_easy, boolq, hellaswag, piqa, winogrande, openbookqa, mmlu, or a .jsonl/.jsonl.gz "
                              "file in the benchmark schema. Generation: humaneval (pass@1, code run in a "
                              "sandbox), fidelity (agreement with the dense model's replies on fixed chat prompts)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Only the first N examples (file "
                                        "order) of each task's standard evaluation split."),
    json_file: Optional[str] = typer.Option(None, "--json", metavar="FILE", help="Write the results as one "
                                            "JSON object to FILE ('-': to stdout, instead of the table)."),
    dense: bool = typer.Option(False, "--dense", help="Run every block (no pruning), ignoring the router."),
    routed: bool = ROUTED,
    max_loss: Optional[float] = MAX_LOSS,
    unhealed: bool = UNHEALED,
    lora_terms: bool = LORA_TERMS,
    omit: Optional[str] = typer.Option(None, "--omit", help="Skip these 0-based blocks, e.g. 3,5 "
                                       "(overrides the router)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="The benchmark folder "
                                            "(<task>.<split>.jsonl.gz); default $PUDDING_MLX_DATA, else "
                                            "(or 'hub') the Hugging Face hub via `datasets`."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Most requests per forward pass."),
    batch_tokens: int = typer.Option(2048, "--batch-tokens", min=1, help="Most padded tokens per forward "
                                     "pass (the logits of a batch are tokens x vocab floats)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16. Default: "
                                        "float32 on the CPU backend, the stored dtype on Metal/CUDA."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-m", min=1, help="Generation tasks: most "
                                             "new tokens per reply (default: humaneval 512, fidelity 256)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="humaneval: sandboxes run at once "
                                          "(default: the CPU count)."),
):
    """Zero-shot accuracy (acc, acc_norm) per multiple-choice task, pass@1 on HumanEval and agreement with
    dense on chat prompts; routed by the bundle's router or with --dense / --omit. For generation tasks
    --batch-size is the number of prompts generated together."""
    try:
        _run(model, tasks, limit, json_file, dense, omit, data_dir, batch_size, batch_tokens, dtype,
             max_tokens, workers, routed, unhealed, max_loss, lora_terms)
    except PuddingError as e:
        err.print(f"[bold red]error:[/bold red] {e}", soft_wrap=True)
        raise typer.Exit(2)


def _run(model, tasks, limit, json_file, dense, omit, data_dir, batch_size, batch_tokens, dtype, max_tokens=None,
         workers=None, routed=False, unhealed=False, max_loss=None, lora_terms=False):
    from pudding_mlx.fidelity import chat_prompts
    from pudding_mlx.generation_eval import GENERATIVE_TASKS
    from pudding_mlx.humaneval import load_problems
    from pudding_mlx.omission import parse_omit
    from pudding_mlx.routing import check_override, fixed_choice
    from pudding_mlx.tasks import load_task

    omit_list = None if omit is None else parse_omit(omit)
    check_override(dense, omit_list, routed, max_loss)
    names = _parse_tasks(tasks)
    # the data first: a wrong task name or data folder fails before the model is loaded
    examples = {t: load_task(t, None, data_dir, limit=limit) for t in names if t not in GENERATIVE_TASKS}
    generative = {}
    if "humaneval" in names:
        generative["humaneval"] = load_problems(data_dir if str(data_dir) == "hub" else None, limit=limit)
    if "fidelity" in names:
        generative["fidelity"] = chat_prompts()[:limit] if limit else chat_prompts()
    if json_file not in (None, "-"):
        parent = Path(json_file).expanduser().parent
        if not parent.is_dir():
            raise PuddingError(f"--json {json_file}: the folder {str(parent)!r} does not exist")

    from pudding_mlx.evaluate import evaluate
    from pudding_mlx.load import load

    loaded = load(model, dtype=dtype, with_router=not dense and omit_list is None, routed=routed,
                  healed=not unhealed, max_loss=max_loss, lora_terms=lora_terms)
    choice = fixed_choice(loaded.n_blocks, loaded.router is not None, dense, omit_list, loaded.dense_by_default)
    omitted, mode = (None, "routed" if max_loss is None else "adaptive") if choice is None else (choice.omitted, choice.how)
    if mode == "no-router":
        err.print(f"{loaded.path}: this model has no router; evaluating dense", soft_wrap=True)
    elif mode == "dense-default":
        from pudding_mlx.routing import default_note

        err.print(f"{loaded.path}: {default_note(loaded)}", soft_wrap=True)

    start = time.perf_counter()
    with Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as bar:
        ids = {}

        def progress(phase, done, total):
            if phase not in ids:
                ids[phase] = bar.add_task(phase, total=total)
            bar.update(ids[phase], completed=done, total=total)

        result = evaluate(loaded, examples, omitted, batch_size=batch_size, batch_tokens=batch_tokens,
                          progress=progress) if examples else {"tasks": {}}
        if omitted is not None:
            result["omitted"] = sorted(omitted)
        result["tasks"].update(_generative(loaded, generative, omitted, max_tokens, batch_size, workers, progress))
    seconds = time.perf_counter() - start
    payload = {"model": str(loaded.path), "mode": mode, "limit": limit, "n_blocks": loaded.n_blocks}
    payload.update(result)
    if mode == "adaptive":  # the budget, and the depth it chose on average (multiple choice and generation)
        from pudding_mlx.routing import json_number

        payload["max_loss"] = json_number(max_loss)
        ks = [len(c) for c, u in zip(result["routing"]["candidates"], result["routing"]["usage"]) for _ in range(u)] \
            if "routing" in result else []
        ks += [len(rec["omitted"]) for r in result["tasks"].values() for rec in r.get("records", [])]
        payload["mean_k"] = sum(ks) / len(ks) if ks else None
    payload["seconds"] = round(seconds, 3)

    if json_file == "-":
        print(json.dumps(payload))
        return
    _table(payload)
    if json_file is not None:
        path = Path(json_file).expanduser()
        try:
            path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            raise PuddingError(f"--json {json_file}: cannot write it ({e.strerror or e})") from None
        err.print(f"wrote {path}")


def _generative(loaded, data: dict, omitted, max_tokens, batch_size, workers, progress) -> dict:
    from pudding_mlx import generation_eval as G

    out = {}
    if "humaneval" in data:
        out["humaneval"] = G.humaneval(loaded, data["humaneval"], omitted, max_tokens or G.he.MAX_TOKENS,
                                       batch_size, workers, progress)
    if "fidelity" in data:
        out["fidelity"] = G.fidelity(loaded, data["fidelity"], omitted, max_tokens or G.FIDELITY_MAX_TOKENS,
                                     batch_size, progress)
    return out


def _table(payload: dict):
    out = Console(highlight=False, file=sys.stdout)
    routed = payload["mode"] in ("routed", "adaptive")
    table = Table(show_edge=False)
    for col in ("task", "metric", "acc %", "acc_norm %", "n") + (("usage",) if routed else ()):
        table.add_column(col, justify="left" if col in ("task", "metric", "usage") else "right")
    generated = {}
    for task, r in payload["tasks"].items():
        if "records" in r:
            generated[task] = r
            continue
        row = [task, r.get("metric", ""), f"{r['acc']:.2f}", f"{r['acc_norm']:.2f}", str(r["n"])]
        if routed:
            row.append(" ".join(str(u) for u in r.get("usage", [])))
        table.add_row(*row)
    if table.rows:
        out.print(table)
    for task, r in generated.items():
        usage = {}
        for rec in r["records"]:
            usage[str(rec["omitted"])] = usage.get(str(rec["omitted"]), 0) + 1
        what = (f"pass@1 {r['pass@1']:.2f}% ({r['outcomes']})" if task == "humaneval" else
                f"identical to dense {r['identical']:.2f}%, dense tokens kept before the first difference "
                f"{r['prefix_kept']:.2f}%")
        out.print(f"{task}: {what}; n {r['n']}; {r['tokens_mean']:.1f} tokens per reply, {r['hit_limit']} hit "
                  f"the {r['max_tokens']}-token limit; sets {usage}")
    n = payload["n_blocks"]
    if payload["mode"] == "adaptive":
        mean_k = payload["mean_k"]
        err.print(f"Route: adaptive depth under --max-loss {payload['max_loss']}: per example the set with the most "
                  "blocks skipped whose predicted loss fits; mean k "
                  + (f"{mean_k:.2f} ({n - mean_k:.2f}/{n} blocks)" if mean_k is not None else "-")
                  + (f"; usage {payload['routing']['usage']} over sets {payload['routing']['candidates']}"
                     if "routing" in payload else ""), markup=False)
    elif routed and "routing" in payload:
        rt = payload["routing"]
        kept = sum(u * (n - len(c)) for u, c in zip(rt["usage"], rt["candidates"])) / max(1, sum(rt["usage"]))
        err.print(f"Route: per example by the router ({len(rt['candidates'])} candidates; usage "
                  f"{rt['usage']}; mean {kept:.2f}/{n} blocks), router {rt['router_ms_mean']:.1f} ms mean")
    elif routed:
        err.print("Route: per prompt by the router (the sets each reply ran are listed above)")
    else:
        om = payload["omitted"]
        err.print(f"Route: {payload['mode']}, omitted {om} ({n - len(om)}/{n} blocks)")
    err.print(f"Time: {payload['seconds']:.1f} s")


def register(app):
    """Add `eval` to the top-level Typer app."""
    app.command(name="eval", no_args_is_help=True)(eval_command)
