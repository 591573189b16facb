"""`pudding-mlx serve`: an OpenAI-compatible local server (runtime: pudding_mlx.server)."""

from typing import Optional

import typer
from rich.console import Console

from pudding_mlx.app.options import DRAFT, LORA_TERMS, LOSSLESS, MAX_LOSS, MODEL_OR_PRESET, ROUTED, UNHEALED
from pudding_mlx.errors import PuddingError


def register(app):
    """Add `serve` to the top-level Typer app."""
    app.command()(serve)


def serve(
    model: Optional[str] = MODEL_OR_PRESET,
    preset: Optional[str] = typer.Option(None, "--preset", help="Without MODEL: qwen2.5-coder-1.5b (the default) "
                                         "or smollm2-135m (small and fast, weak answers)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; "
                             "there is no authentication)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port to listen on (0: any free port)."),
    dense: bool = typer.Option(False, "--dense", help="Run every block for every request (no routing)."),
    routed: bool = ROUTED,
    max_loss: Optional[float] = MAX_LOSS,
    unhealed: bool = UNHEALED,
    lora_terms: bool = LORA_TERMS,
    omit: Optional[str] = typer.Option(None, "--omit", help="Skip these 0-based blocks for every request, "
                                       "e.g. 3,5,9 (overrides the router)."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-m", min=1, help="Default most tokens per reply "
                                   "(a request's max_tokens overrides it)."),
    temp: float = typer.Option(0.0, "--temp", min=0.0, max=2.0, help="Default sampling temperature (a request's "
                               "temperature overrides it); 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Default nucleus sampling mass."),
    queue_size: int = typer.Option(8, "--queue-size", min=0, help="Requests that may wait while one runs; "
                                   "more are refused with 503."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: "
                                        "float32 on the CPU backend, the stored dtype elsewhere)."),
    lossless: bool = LOSSLESS,
    draft_tokens: int = DRAFT,
):
    """Serve the model over the OpenAI chat-completions API (POST /v1/chat/completions, GET /v1/models,
    GET /health), each request routed as in `chat`. Ctrl-C stops it."""
    from pudding_mlx.convert.default_bundle import ensure_default_bundle
    from pudding_mlx.load import DTYPES, resolve
    from pudding_mlx.omission import parse_omit
    from pudding_mlx.routing import check_override
    from pudding_mlx.server import serve as run_server

    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    base_omit = None if omit is None else parse_omit(omit)
    check_override(dense, base_omit, routed, max_loss)
    if dtype is not None and dtype not in DTYPES:
        raise PuddingError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if model is not None and preset is not None:
        raise PuddingError("give either MODEL or --preset (a preset is a bundle built for you)")
    try:
        path = ensure_default_bundle(console=err, preset=preset) if model is None else resolve(model)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130)
    model_id = (preset or _default_preset()) if model is None else model.rstrip("/").split("/")[-1]

    def ready(url):
        console.print(f"[bold]pudding-mlx serve[/bold] · {model_id} ({path}) · listening on {url}/v1 "
                      f"(POST /v1/chat/completions, GET /v1/models, GET /health) · Ctrl-C to stop")

    err.print(f"[dim]loading {path}[/dim]")  # (inside run_server, once the port is bound)
    counts = run_server(path, model_id=model_id, host=host, port=port, on_ready=ready, dtype=dtype, dense=dense,
                        omit=base_omit, queue_size=queue_size, max_tokens=max_tokens, temperature=temp,
                        top_p=top_p, lossless=lossless, draft_tokens=draft_tokens, routed=routed, healed=not unhealed, max_loss=max_loss,
                        lora_terms=lora_terms, log=lambda line: err.print(line, markup=False))
    console.print("stopped · " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _default_preset() -> str:
    from pudding_mlx.convert.default_bundle import DEFAULT_PRESET

    return DEFAULT_PRESET
