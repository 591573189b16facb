"""`pudding-mlx convert ...`: an LLM, a router and a bundle of both, to what the MLX runtime loads.

    pudding-mlx convert llm SmolLM2-135M-Instruct.Q4_1.gguf smol-mlx
    pudding-mlx convert router my-router/ router-mlx --expect-outputs 10
    pudding-mlx convert bundle --llm smol-mlx --router my-router/ --candidates cand-k7.json my-bundle
    pudding-mlx convert adapter runs/heal/pool-k3 pool-k3-mlx     (or convert bundle ... --adapter runs/heal/pool-k3)

Each command wraps one library function (`pudding_mlx.convert.llm.convert_llm`, `.router.convert_router`,
`.bundle.build_bundle`, `.adapter.convert_adapter`); those build OUT in a temporary folder beside it and move it into place only when it
is complete and loads back, so OUT is either the finished result or untouched. An existing OUT is refused
without --force. Bad input is one line on stderr and exit status 2 (a `PuddingError`, printed by `cli.main`).
"""

import contextlib
import inspect
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pudding_mlx.errors import PuddingError, first_line
from pudding_mlx.jsonio import read_json

convert_app = typer.Typer(
    help="Convert models to what the MLX runtime loads: an LLM (Hugging Face folder, GGUF file, hub id), a "
    "trained router, and a bundle of both with the candidate omission sets.\n\n"
    "The usual order: [bold]convert llm[/bold] (once per model), then [bold]convert bundle[/bold] with the "
    "search's candidates file and the trained router (it converts the router itself; [bold]convert "
    "router[/bold] is for converting one on its own).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
console = Console(stderr=True, highlight=False)

FORCE = typer.Option(False, "--force", help="Replace OUT if it exists (the old one stays until the new one is "
                     "complete).")


@contextlib.contextmanager
def _user_errors():
    """OS-level failures (permission denied, disk full, a file where a folder should be) as one line."""
    try:
        yield
    except OSError as e:
        where = e.filename if e.filename is not None else "convert"
        raise PuddingError(f"{where}: {e.strerror or e}") from None


def _paragraphs(f):
    """--help shows a docstring's line breaks: rejoin each paragraph so the terminal wraps it."""
    f.__doc__ = "\n\n".join(" ".join(p.split("\n")) for p in inspect.cleandoc(f.__doc__).split("\n\n"))
    return f


def _progress() -> Progress:
    # bars only on a terminal: piped or logged, stderr carries nothing but an error line
    return Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not console.is_terminal)


def _choice(flag: str, value, allowed):
    if value is not None and value not in allowed:
        raise PuddingError(f"{flag} {value}: choose one of {', '.join(map(str, allowed))}")


def _refuse_existing(out: Path, force: bool):
    if (out.exists() or out.is_symlink()) and not force:
        raise PuddingError(f"{out}: already exists; pass --force to replace it, or choose another output path")


# ---------------------------------------------------------------------------------------------------- llm


@convert_app.command("llm", no_args_is_help=True)
@_paragraphs
def llm(
    src: str = typer.Argument(..., metavar="SRC",
                              help="A Hugging Face model folder (config.json + *.safetensors), a .gguf file, or "
                              "a hub id owner/name (looked up in the local hub cache first)."),
    out: Path = typer.Argument(..., metavar="OUT", help="The output folder: a standard mlx-lm model directory."),
    quantize: Optional[int] = typer.Option(None, "--quantize", "-q", metavar="BITS",
                                           help="Re-quantize every quantizable layer to 4 or 8 bits (also 2, 3, "
                                           "5, 6), MLX affine. Default: keep what SRC has (a Hugging Face "
                                           "model stays float, a GGUF keeps its Q4_0/Q4_1/Q8_0 tensors "
                                           "quantized, losslessly, group size 32)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", metavar="N",
                                             help="Group size for --quantize: 32, 64 (default) or 128."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="DTYPE",
                                        help="float16 | bfloat16 | float32 for the float weights (and the "
                                        "scales of quantized ones). Default: the Hugging Face config's "
                                        "torch_dtype; float16 for a GGUF (holds its scales exactly)."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write every weight as float (a quantized GGUF "
                                    "or mlx-lm model)."),
    force: bool = FORCE,
):
    """Convert an LLM (Hugging Face folder, GGUF file, hub id) into an mlx-lm model directory.

    The output (config.json, model.safetensors, tokenizer, chat template) is what stock
    [bold]mlx_lm.load[/bold] and [bold]pudding-mlx generate[/bold] load.

    Example: [cyan]pudding-mlx convert llm SmolLM2-135M-Instruct.Q4_1.gguf smol-mlx[/cyan]

    The result is loaded back with mlx-lm before it is moved into place.
    """
    from pudding_mlx.convert.llm import BITS, DTYPE_NAMES, GROUP_SIZES, convert_llm, rich_progress

    _choice("--quantize", quantize, BITS)
    _choice("--group-size", group_size, GROUP_SIZES)
    _choice("--dtype", dtype, DTYPE_NAMES)
    if quantize is not None and dequantize:
        raise PuddingError("--quantize and --dequantize contradict each other; give one")
    if group_size is not None and quantize is None:
        raise PuddingError("--group-size applies only with --quantize (a GGUF's own quantized tensors keep group "
                           "size 32); add --quantize 4 or 8, or drop --group-size")
    out = out.expanduser()
    _refuse_existing(out, force)
    with _user_errors(), _progress() as bar:
        path = convert_llm(src, out, quantize_bits=quantize, group_size=group_size or 64, dtype=dtype,
                           dequantize=dequantize, force=force, progress=rich_progress(bar))
    config = read_json(path / "config.json", "the converted LLM's config")
    q = config.get("quantization")
    how = f"{q.get('bits')}-bit (group {q.get('group_size')})" if isinstance(q, dict) else "float"
    print(f"{path}: mlx-lm model, {config.get('num_hidden_layers')} blocks, {how}, "
          f"dtype {config.get('torch_dtype', 'as stored')}")


# ---------------------------------------------------------------------------------------------------- router


@convert_app.command("router", no_args_is_help=True)
@_paragraphs
def router(
    src: Path = typer.Argument(..., metavar="SRC", help="The trained router: a BertForSequenceClassification folder "
                               "(save_pretrained), or a light router folder (head.json + head.safetensors + "
                               "its encoder folder)."),
    out: Path = typer.Argument(..., metavar="OUT", help="The output folder: an MLX router (router.json, "
                               "model.safetensors, tokenizer files)."),
    expect_outputs: Optional[int] = typer.Option(None, "--expect-outputs", metavar="M", min=1,
                                                 help="Check that the head scores M candidate sets (the "
                                                 "number in your candidates file)."),
    dtype: str = typer.Option("float32", "--dtype", metavar="DTYPE",
                              help="float32 (default) | float16 | bfloat16 for the stored weights."),
    force: bool = FORCE,
):
    """Convert a router trained in PyTorch (BERT encoder + linear head) to an MLX router folder.

    The head has one output per candidate set; output m scores candidate m.

    Example: [cyan]pudding-mlx convert router runs/router-k7 router-mlx --expect-outputs 10[/cyan]

    Usually not needed on its own: [bold]convert bundle --router[/bold] converts the router it is given.
    """
    from pudding_mlx.convert.router import DTYPES, convert_router

    _choice("--dtype", dtype, tuple(DTYPES))
    src, out = src.expanduser(), out.expanduser()
    _refuse_existing(out, force)
    with _user_errors(), console.status(f"converting the router in {src}"):
        path = convert_router(src, out, force=force, dtype=dtype, expect_outputs=expect_outputs)
    settings = read_json(path / "router.json", "the router settings")
    print(f"{path.absolute()}: MLX router, {settings['num_outputs']} outputs, encoder {settings.get('encoder')}, "
          f"max_length {settings['max_length']}, {dtype} weights")


# ---------------------------------------------------------------------------------------------------- bundle


def _check_router_source(router: Path):
    if not router.is_dir():
        raise PuddingError(f"{router}: no such folder (--router: a router from `pudding-mlx convert router`, or "
                           "the trained router it converts)")
    head = router / "head.json"
    if head.is_file():
        data = read_json(head, "the light router's head description", want=None)
        sets = data.get("sets") if isinstance(data, dict) else None
        if sets is not None and not (isinstance(sets, list) and all(
                isinstance(s, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in s)
                for s in sets)):
            raise PuddingError(f"{head}: field 'sets' must be a list of lists of block indices")
    settings = router / "router.json"
    if settings.is_file():
        read_json(settings, "the router settings", want=None)


def _check_llm_loads(llm: Path):
    """Stock mlx-lm must load --llm (lazily: names and shapes, no compute), or the bundle would not serve."""
    import io

    from mlx_lm.utils import load

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            load(str(llm), lazy=True)
    except Exception as e:
        raise PuddingError(f"{llm}: mlx-lm cannot load this LLM ({type(e).__name__}: {first_line(e)}); --llm must be an "
                           "mlx-lm model directory (convert one with `pudding-mlx convert llm`)") from None


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


@convert_app.command("bundle", no_args_is_help=True)
@_paragraphs
def bundle(
    out: Path = typer.Argument(..., metavar="OUT", help="The output folder: the bundle."),
    llm: Path = typer.Option(..., "--llm", metavar="DIR", help="The converted LLM: an mlx-lm model directory "
                             "(from [bold]convert llm[/bold])."),
    router: Optional[Path] = typer.Option(None, "--router", metavar="DIR",
                                          help="The router: an MLX router (from [bold]convert router[/bold]) or "
                                          "the trained PyTorch router, converted here. Its outputs must match "
                                          "the candidate sets, one per set, in order. Optional: without it "
                                          "the bundle serves --dense and --omit."),
    candidates: Optional[Path] = typer.Option(None, "--candidates", metavar="FILE",
                                              help="The candidate omission sets: the search's candidates JSON "
                                              "(`pudding-mlx train search`) or a plain JSON list of lists of "
                                              "0-based block indices, e.g. [[4,9,17],[5,9,21]]. Required "
                                              "with --router. Sets found only by the 'mix' chains are left "
                                              "out (they are baselines, not router outputs)."),
    adapter: Optional[List[Path]] = typer.Option(None, "--adapter", metavar="DIR",
                                                 help="A healing adapter (repeatable): a LoRA folder from "
                                                 "[bold]train heal[/bold] (converted here) or from [bold]convert "
                                                 "adapter[/bold]. It runs only while one of its sets is skipped."),
    predictor: Optional[Path] = typer.Option(None, "--predictor", metavar="DIR",
                                             help="A loss predictor for adaptive depth (`--max-loss`): a folder "
                                             "from [bold]train adaptive-report[/bold] (predictor.json + "
                                             "predictor.safetensors). Its sets must be dense or among the "
                                             "candidates (which may then be of several sizes)."),
    force: bool = FORCE,
):
    """Assemble a bundle from a converted LLM, candidate omission sets and (optionally) a router.

    The bundle is the LLM's mlx-lm directory (copied; stock mlx_lm.load still loads it), a pudding.json
    manifest with the candidate sets, and the converted router in router/. Everything is checked (the sets
    against the LLM's blocks, the router's outputs against the sets) before anything appears at OUT.

    Example: [cyan]pudding-mlx convert bundle --llm smol-mlx --router runs/router-k7
    --candidates cand-k7.json smol-bundle[/cyan]

    Then: [cyan]pudding-mlx generate smol-bundle -p "Why is the sky blue?"[/cyan] routes each prompt.
    """
    from pudding_mlx.bundle import read_manifest
    from pudding_mlx.candidates import read_candidates
    from pudding_mlx.convert.bundle import build_bundle, llm_blocks

    out, llm = out.expanduser(), llm.expanduser()
    router = router.expanduser() if router is not None else None
    candidates = candidates.expanduser() if candidates is not None else None
    _refuse_existing(out, force)
    with _user_errors():
        if not llm.is_dir():
            raise PuddingError(f"{llm}: no such folder (--llm: the converted LLM, an mlx-lm model directory)")
        for folder, flag in ((llm, "--llm"), (router, "--router")):
            if folder is not None and folder.exists() and _inside(out, folder):
                raise PuddingError(f"{out}: the bundle must not be the {flag} folder or lie inside it; choose "
                                   "another output path")
        n_blocks = llm_blocks(llm)
        entries = read_candidates(candidates, n_blocks) if candidates is not None else []
        if router is not None:
            if candidates is None:
                raise PuddingError("--router needs --candidates: the file of candidate sets the router was "
                                   "trained to score")
            _check_router_source(router)
        with console.status("checking the LLM loads with mlx-lm"):
            _check_llm_loads(llm)
        with console.status(f"building the bundle (copying {llm}" + (", converting the router" if router else "")
                            + ")"):
            build_bundle(llm, out, candidates=candidates, router=router, force=force,
                         adapters=[a.expanduser() for a in adapter or []],
                         predictor=predictor.expanduser() if predictor is not None else None)
        manifest = read_manifest(out)
    left_out = len(entries) - len(manifest.candidates)
    print(f"{out.absolute()}: bundle, {manifest.num_blocks} blocks, {len(manifest.candidates)} candidate sets"
          + (f" ({left_out} mix-only left out)" if left_out > 0 else "")
          + f", router: {'yes' if manifest.router is not None else 'no'}"
          + (f", adapters: {', '.join(a['name'] for a in manifest.adapters)}" if manifest.adapters else "")
          + (", loss predictor: yes (adaptive depth with --max-loss)" if manifest.adaptive else ""))


# --------------------------------------------------------------------------------------------------- adapter


@convert_app.command("adapter", no_args_is_help=True)
@_paragraphs
def adapter_cmd(
    src: Path = typer.Argument(..., metavar="SRC", help="A PEFT LoRA folder (adapter_config.json + "
                               "adapter_model.safetensors), as [bold]train heal[/bold] writes it."),
    out: Path = typer.Argument(..., metavar="OUT", help="The output folder: the adapter as the runtime reads it."),
    sets: Optional[str] = typer.Option(None, "--sets", metavar="SETS", help="The omission sets it heals, e.g. "
                                       "'15,17,18;13,14,15'. Default: the sets in SRC/heal.json."),
    force: bool = FORCE,
):
    """Convert a healing adapter (LoRA, trained with PEFT) to the runtime's format.

    The runtime applies it only while one of its sets is skipped; dense stays the original model. Plain
    LoRA on linear layers only (no DoRA, per-module ranks or trained biases). Usually not needed on its
    own: [bold]convert bundle --adapter[/bold] converts the adapters it is given.

    Example: [cyan]pudding-mlx convert adapter runs/heal/pool-k3 pool-k3-mlx[/cyan]
    """
    from pudding_mlx.adapters import SETTINGS_FILE
    from pudding_mlx.convert.adapter import convert_adapter
    from pudding_mlx.omission import parse_omit_sets

    src, out = src.expanduser(), out.expanduser()
    _refuse_existing(out, force)
    with _user_errors():
        parsed = [list(x) for x in parse_omit_sets(sets)] if sets is not None else None
        if not src.is_dir():
            raise PuddingError(f"{src}: no such folder (SRC: a PEFT LoRA folder from `pudding-mlx train heal`)")
        with console.status(f"converting the adapter in {src}"):
            path = convert_adapter(src, out, sets=parsed, force=force)
    settings = read_json(path / SETTINGS_FILE, "the adapter's settings")
    print(f"{path.absolute()}: adapter, rank {settings['rank']}, scale {settings['scale']:g}, blocks "
          f"{settings['blocks'][0]}..{settings['blocks'][-1]}, heals {settings['sets']}")


