"""`pudding-mlx train ...`: the PyTorch/CUDA side (needs the `train` extra: torch)."""

from pathlib import Path
from typing import Optional

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
    data_dir: Optional[Path] = typer.Option(None, envvar="PUDDING_MLX_DATA",
                                            help="Benchmark folder (gzip JSONL)."),
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
                   str(data_dir) if data_dir else None, device, _csv(protect),
                   on_phase=on_phase, on_batch=on_batch, log=log)
