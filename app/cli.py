"""`pudding-mlx`: prompt-routed depth pruning for LLMs on MLX.

Every command that takes MODEL accepts a pudding-mlx bundle, a plain mlx-lm model directory, or a
hub id. Errors in what the user gave print one line and exit with status 2; `--json` prints one
JSON object on stdout and nothing else there.
"""

import json
import sys
from typing import Optional

import typer
from rich.console import Console

from pudding_mlx import __version__
from pudding_mlx.errors import PuddingError, out_of_memory
from pudding_mlx.app.options import DRAFT, LORA_TERMS, LOSSLESS, MAX_LOSS, ROUTED, UNHEALED

app = typer.Typer(
    name="pudding-mlx",
    pretty_exceptions_enable=False,
    help="Prompt-routed depth pruning (PuDDing) for LLMs on MLX: each prompt runs the model with a "
    "set of transformer blocks skipped, chosen by a small router.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # footer lines are never wrapped
out = Console(highlight=False, soft_wrap=True)


def _version(value: bool):
    if value:
        print(f"pudding-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
):
    pass


MODEL_ARG = typer.Argument(..., help="A pudding-mlx bundle, an mlx-lm model directory, or a hub id.")
DENSE = typer.Option(False, "--dense", help="Run every block (no pruning), ignoring the router.")
OMIT = typer.Option(None, "--omit", help="Skip these 0-based blocks, e.g. 3,5,9 (overrides the router).")
DTYPE = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16. Default: float32 on the "
                     "CPU backend (bf16 is very slow there), the stored dtype on Metal/CUDA.")


@app.command()
def generate(
    model: str = MODEL_ARG,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message."),
    dense: bool = DENSE,
    omit: Optional[str] = OMIT,
    routed: bool = ROUTED,
    max_loss: Optional[float] = MAX_LOSS,
    unhealed: bool = UNHEALED,
    lora_terms: bool = LORA_TERMS,
    max_tokens: int = typer.Option(256, "--max-tokens", "-m", min=1, help="Most tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message for the chat template."),
    ignore_chat_template: bool = typer.Option(False, "--ignore-chat-template",
                                              help="Feed the prompt as raw text."),
    dtype: Optional[str] = DTYPE,
    lossless: bool = LOSSLESS,
    draft_tokens: int = DRAFT,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
):
    """Generate a reply to one prompt, with the router's omission set (or --dense / --omit)."""
    from pudding_mlx.generate import generate as run_generate, prompt_tokens, stream_generate
    from pudding_mlx.load import load
    from pudding_mlx.omission import parse_omit
    from pudding_mlx.routing import check_override, choose_and_prefill

    omit_list = None if omit is None else parse_omit(omit)
    check_override(dense, omit_list, routed, max_loss)
    loaded = load(model, dtype=dtype, routed=routed, healed=not unhealed, max_loss=max_loss, lora_terms=lora_terms)
    ids = prompt_tokens(loaded.tokenizer, prompt, not ignore_chat_template, system)
    n_prompt = len(ids)
    choice, ids, cache = choose_and_prefill(loaded, prompt, ids, dense, omit_list, lossless)
    kwargs = dict(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, prompt_cache=cache)
    if lossless:
        kwargs.update(lossless=True, draft_tokens=draft_tokens)
    if as_json:
        result = run_generate(loaded.model, loaded.tokenizer, ids, choice.omitted, **kwargs)
        payload = result.to_json()
        payload.update({k: v for k, v in choice.to_json().items() if k != "omitted"})
        payload["model"] = str(loaded.path)
        from pudding_mlx.adapters import adapter_for

        payload["adapter"] = adapter_for(loaded.model, choice.omitted)  # the healing adapter that ran, or null
        if cache is not None:  # the routed prefill ran all but the last prompt token before generation
            payload["prompt_tokens"], payload["prefill_tps"] = n_prompt, None
            payload["routed_prefill"] = True
        print(json.dumps(payload))
        return
    last, drafted, n = None, 0, 0
    for response in stream_generate(loaded.model, loaded.tokenizer, ids, choice.omitted, **kwargs):
        out.print(response.text, end="")
        last, drafted, n = response, drafted + bool(response.from_draft), n + 1
    out.print()
    _footer(loaded, choice, last, n_prompt if cache is not None else None)
    if lossless and n:
        err.print(f"Lossless: {drafted}/{n} tokens accepted from the pruned draft ({100 * drafted / n:.0f}%)")


def _footer(loaded, choice, last, routed_prefill_tokens=None):
    n = loaded.n_blocks
    if choice.how == "adaptive":
        from pudding_mlx.routing import depth_line

        what = depth_line(choice, n) + (", chosen inside the prefill" if routed_prefill_tokens
                                        else f", predictor {choice.router_ms:.1f} ms")
    elif choice.how == "routed" and routed_prefill_tokens:  # the decision was part of the prompt's prefill
        what = (f"candidate {choice.candidate}: omitted {list(choice.omitted)} "
                f"({n - len(choice.omitted)}/{n} blocks), chosen inside the prefill")
    elif choice.how == "routed":
        what = (f"candidate {choice.candidate}: omitted {list(choice.omitted)} "
                f"({n - len(choice.omitted)}/{n} blocks), router {choice.router_ms:.1f} ms")
    elif choice.how == "no-router":
        what = f"dense ({n}/{n} blocks): this model has no router"
    elif choice.how == "dense-default":
        from pudding_mlx.routing import default_note

        what = f"dense ({n}/{n} blocks), {default_note(loaded)}"
    else:
        what = f"omitted {list(choice.omitted)} ({n - len(choice.omitted)}/{n} blocks)"
    if choice.omitted:  # a healing adapter goes with the set (pudding_mlx.adapters); say which, or that none
        from pudding_mlx.adapters import adapter_for

        healer = adapter_for(loaded.model, choice.omitted)
        if healer is not None:
            what += f", healed by adapter {healer!r}"
        elif loaded.manifest is not None and loaded.manifest.adapters:
            what += ", unhealed" + (" (--unhealed)" if not loaded.adapters else " (no adapter names this set)")
    err.print(f"[dim]{'=' * 10}[/dim]")
    err.print(f"Route: {what}")
    if last is not None:
        if routed_prefill_tokens:  # blocks 0..after ran once for routing and prefill (hidden-state router)
            after = loaded.router.after
            head = "loss predictor" if choice.how == "adaptive" else "router's head"
            err.print(f"Prompt: {routed_prefill_tokens} tokens, routed prefill: blocks 0-{after} ran the prompt and "
                      f"the {head} read their output in {choice.router_ms:.1f} ms, part of this prefill "
                      f"(not an extra pass); the chosen set's other blocks then ran it")
        else:
            err.print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        err.print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
        err.print(f"Peak memory: {last.peak_memory:.3f} GB")


# the other command groups; each imports its heavy modules (mlx, torch) only when a command runs
from pudding_mlx.app.bench_cmd import register as register_bench  # noqa: E402
from pudding_mlx.app.convert_cmd import convert_app  # noqa: E402
from pudding_mlx.app.eval_cmd import register as register_eval  # noqa: E402
from pudding_mlx.app.serve_cmd import register as register_serve  # noqa: E402
from pudding_mlx.app.session_cmd import register as register_session  # noqa: E402
from pudding_mlx.app.train_cmd import train_app  # noqa: E402

register_session(app)
register_serve(app)
register_bench(app)
register_eval(app)
app.add_typer(convert_app, name="convert")
app.add_typer(train_app, name="train")


def main():
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        app()  # standalone: usage errors, --help and typer.Exit are handled by click
    except PuddingError as e:
        err.print(f"[bold red]error:[/bold red] {e}", soft_wrap=True)
        sys.exit(2)
    except (RuntimeError, MemoryError) as e:
        line = out_of_memory(e)
        if line is None:
            raise
        err.print(f"[bold red]error:[/bold red] {line}", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
