"""`pudding-mlx bench`: the paper's on-device timing protocol, and memory, on this machine."""

import json
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pudding_mlx.app.options import DRAFT

console = Console(stderr=True, highlight=False)


def bench(
    model: Optional[str] = typer.Argument(None, help="A bundle or mlx-lm model directory (else --shape)."),
    shape: Optional[str] = typer.Option(None, help="A random-weight shape instead of MODEL: llama-3.1-8b, "
                                        "llama-3.2-1b, smollm2-135m, small."),
    k: int = typer.Option(7, "--k", help="Blocks omitted (shapes: as a static and as a routed set)."),
    omit: Optional[str] = typer.Option(None, "--omit", help="The static set for a bundle (default: its candidate 0)."),
    router_dir: Optional[Path] = typer.Option(None, "--router", help="An MLX router folder to time "
                                              "(default: MODEL's router; for shapes, the default bundle's if built)."),
    runs: int = typer.Option(5, help="Timed rounds per cell (median), after a warm-up."),
    cells: Optional[str] = typer.Option(None, help="Override the protocol: PROMPT+GEN cells, e.g. 32+1,64+1,32+16."),
    memory: bool = typer.Option(True, help="Also measure weight bytes read and peak memory, routed vs dense."),
    dtype: Optional[str] = typer.Option(None, help="Default: float32 on CPU, bfloat16 (shapes) / stored elsewhere."),
    lossless: bool = typer.Option(False, "--lossless", help="Also time lossless generation: the routed set "
                                  "drafts, the dense model verifies (generation cells; random-token prompts)."),
    draft_tokens: int = DRAFT,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG plot here (needs matplotlib)."),
):
    """Time dense, static, routed (router counted) and stock mlx-lm requests: prompts of 128/256/512
    tokens with 1 generated (prefill) and a 128-token prompt with 128/256/512 generated (generation);
    speedup = dense / (routed + router), ideal = L / (L - k)."""
    import mlx.core as mx

    from pudding_mlx import bench as B
    from pudding_mlx.errors import PuddingError
    from pudding_mlx.load import DTYPES, backend, load
    from pudding_mlx.omission import check_omitted, parse_omit
    from pudding_mlx.routing import route

    if (model is None) == (shape is None):
        raise PuddingError("give either MODEL or --shape")
    grid = B.PREFILL + B.GENERATE
    if cells:
        try:
            grid = [tuple(int(x) for x in c.split("+")) for c in cells.split(",")]
        except ValueError:
            raise PuddingError(f"--cells {cells!r}: give PROMPT+GEN pairs, e.g. 128+1,128+128")
    router, by_bundle = None, False
    if router_dir is not None:
        from pudding_mlx.router import load_router

        router = load_router(router_dir)
    if shape:
        from pudding_mlx.shapes import random_model

        mdtype = DTYPES[dtype] if dtype else (mx.float32 if backend() == "cpu" else mx.bfloat16)
        lm = random_model(shape, mdtype)
        n_blocks = len(lm.layers)
        static = B.spread(n_blocks, k)
        if router is None:
            from pudding_mlx.assets import cache_dir

            default = cache_dir() / "default-bundle" / "router"
            if default.is_dir():
                from pudding_mlx.router import load_router

                router = load_router(default)
        source = {"shape": shape}
    else:
        loaded = load(model, dtype=dtype)
        lm, n_blocks = loaded.model, loaded.n_blocks
        router = router or loaded.router
        cands = loaded.manifest.candidates if loaded.manifest else []
        if omit is not None:
            static = list(check_omitted(parse_omit(omit), n_blocks, "--omit"))
        elif cands:
            static = list(cands[0].omitted)
        else:
            static = B.spread(n_blocks, k)
        by_bundle = loaded.router is not None and router is loaded.router
        source = {"model": str(loaded.path)}
    if router is None:
        console.print("[yellow]no router to time: router_s is 0 (pass --router or build the default bundle)[/yellow]")
    # the bundle's router picks the routed set for the benchmark's text; shapes route to the static set
    routed_set = list(route(loaded, B.ROUTER_TEXT).omitted) if by_bundle else static
    rows = B.run_bench(lm, static, routed_set, router, grid, runs, progress=console.print,
                       draft_tokens=draft_tokens if lossless else None)
    result = {"backend": backend(), **source, "k": len(static), "blocks": n_blocks, "static": static,
              "routed": routed_set,
              "runs": runs, "router": str(router_dir) if router_dir else ("bundle" if by_bundle else None), "rows": rows}
    if memory:
        with tempfile.TemporaryDirectory() as tmp:
            target = source.get("model")
            if shape:
                from mlx_lm.utils import save_config, save_model

                from pudding_mlx.shapes import SHAPES

                save_model(tmp, lm)
                save_config(SHAPES[shape], Path(tmp) / "config.json")
                _copy_any_tokenizer(Path(tmp))
                target = tmp
            result["memory"] = B.memory_probe(target, static)
    _print(result)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    if plot_out:
        B.plot(result, plot_out)


def _copy_any_tokenizer(dest: Path):
    """mlx-lm's loader wants tokenizer files; a random shape borrows the default bundle's, if any."""
    import shutil

    from pudding_mlx.assets import cache_dir

    src = cache_dir() / "default-bundle"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)


def _print(result):
    table = Table(title=f"{result.get('shape') or result.get('model')}: k={result['k']} of {result['blocks']} "
                        f"blocks, {result['backend']}, median of {result['runs']}")
    for col in ("phase", "prompt+gen", "mlx_lm s", "dense s", "static s", "routed s", "router ms",
                "speedup", "static speedup", "ideal", "speedup/ideal", "dense/mlx_lm"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(r["phase"], f"{r['prompt_tokens']}+{r['gen_tokens']}", f"{r['mlx_lm_s']:.4f}",
                      f"{r['dense_s']:.4f}", f"{r['static_s']:.4f}", f"{r['routed_s']:.4f}",
                      f"{1e3 * r['router_s']:.1f}", f"{r['speedup']:.3f}", f"{r['speedup_static']:.3f}",
                      f"{r['ideal']:.3f}", f"{r['speedup'] / r['ideal']:.3f}", f"{r['dense_over_mlx_lm']:.3f}")
    Console(highlight=False, width=170).print(table)
    lossless = [r for r in result["rows"] if "lossless_s" in r]
    if lossless:
        table = Table(title=f"lossless: the routed set drafts {lossless[0]['draft_tokens']} tokens, the dense "
                            "model verifies (output = dense)")
        for col in ("prompt+gen", "dense s", "lossless s", "accepted from draft", "speedup (router counted)"):
            table.add_column(col, justify="right")
        for r in lossless:
            table.add_row(f"{r['prompt_tokens']}+{r['gen_tokens']}", f"{r['dense_s']:.4f}", f"{r['lossless_s']:.4f}",
                          f"{r['lossless_accepted']:.3f}", f"{r['speedup_lossless']:.3f}")
        Console(highlight=False, width=170).print(table)
    if "memory" in result:
        m = result["memory"]
        Console(highlight=False, width=170).print(
            f"Memory: weights read routed {m['routed']['active'] / 2**20:.1f} MiB vs dense {m['dense']['active'] / 2**20:.1f} MiB "
            f"(ratio {m['materialised_ratio']:.3f}; (kept + rest) / all = {m['expected_ratio']:.3f}); "
            f"peak routed {m['routed']['peak'] / 2**20:.1f} MiB, dense {m['dense']['peak'] / 2**20:.1f} MiB")


def register(app):
    app.command(name="bench")(bench)
