"""`pudding-mlx bench`: the paper's on-device timing protocol, and memory, on this machine."""

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
                                              "(default: MODEL's router; for shapes, the smollm2-135m preset's MiniLM router if built)."),
    router_kind: str = typer.Option("bert", "--router-kind", help="For --shape: 'bert' times the smollm2-135m "
                                    "preset's MiniLM router (or --router); 'hidden' a hidden-state router with a "
                                    "random head, inside the routed prefill (its cost is the head alone), whose "
                                    "candidates are all the static set; 'hidden-miss' the same, but its fallback "
                                    "set is another one that it never picks (the prefill's guess always misses)."),
    runs: int = typer.Option(10, min=1, help="Timed rounds per cell, after a warm-up; ratios are the "
                             "median over rounds with a bootstrap 95% interval (claims need 5 or more)."),
    cells: Optional[str] = typer.Option(None, help="Override the protocol: PROMPT+GEN cells, e.g. 32+1,64+1,32+16."),
    memory: bool = typer.Option(True, help="Also measure weight bytes read and peak memory, routed vs dense."),
    dtype: Optional[str] = typer.Option(None, help="Default: float32 on CPU, bfloat16 (shapes) / stored elsewhere."),
    lossless: bool = typer.Option(False, "--lossless", help="Also time lossless generation: the routed set "
                                  "drafts, the dense model verifies (generation cells; random-token prompts)."),
    draft_tokens: int = DRAFT,
    speculate: bool = typer.Option(False, "--speculate/--no-speculate", help="A hidden-state router's "
                                   "routed prefill queues its fallback set before the decision is known: faster "
                                   "on a GPU when the router picks the fallback, slower when it does not."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG plot here (needs matplotlib)."),
):
    """Time dense, static, routed (router counted) and stock mlx-lm requests: prompts of 128/256/512
    tokens with 1 generated (prefill) and a 128-token prompt with 128/256/512 generated (generation);
    speedup = dense / (routed + router) (a hidden-state router runs inside the routed prefill:
    dense / routed), ideal = L / (L - k). Runners are interleaved per round; every
    ratio is the median over rounds with a bootstrap 95% interval. A part that fails (a cell, the
    memory probe, the plot) is marked in the JSON, the rest is written, and the exit status is 1."""
    from pudding_mlx import bench as B

    B.check_outputs(json_out, plot_out)  # before any work: an output that cannot be written
    result = B.measure(model, shape, k, omit, router_dir, cells, runs, memory, dtype,
                       draft_tokens if lossless else None,
                       progress=lambda line: console.print(line, markup=False, soft_wrap=True),
                       router_kind=router_kind, speculate=speculate)
    _print(result)
    B.save(result, json_out, plot_out)
    for part, why in result["failed"].items():
        console.print(f"{part}: {why}", style="yellow", markup=False, soft_wrap=True)
    if result["failed"]:
        console.print(f"failed: {', '.join(result['failed'])}; everything else was measured"
                      + (f" and written to {json_out}" if json_out else ""), style="yellow", markup=False)
        interrupted = result["failed"].get("interrupted", "")
        raise typer.Exit(143 if "SIGTERM" in interrupted else 130 if interrupted else 1)


def _ratio(row, name) -> str:
    """median [95% interval] of a per-round ratio."""
    lo, hi = row[f"{name}_spread"]["ci95"]
    return f"{row[name]:.3f} [{lo:.3f}, {hi:.3f}]"


def _print(result):
    wide = Console(highlight=False, width=200)
    rows = [r for r in result["rows"] if "error" not in r]
    table = Table(title=f"{result.get('shape') or result.get('model')}: k={result['k']} of {result['blocks']} "
                        f"blocks, {result['backend']}, median of {result['runs']} interleaved rounds "
                        "[bootstrap 95% interval]")
    for col in ("phase", "prompt+gen", "mlx_lm s", "dense s", "static s", "routed s", "router ms",
                "speedup", "static speedup", "ideal", "routed/static", "dense/mlx_lm"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["phase"], f"{r['prompt_tokens']}+{r['gen_tokens']}", f"{r['mlx_lm_s']:.4f}",
                      f"{r['dense_s']:.4f}", f"{r['static_s']:.4f}", f"{r['routed_s']:.4f}",
                      f"{1e3 * r['router_s']:.1f}", _ratio(r, "speedup"), _ratio(r, "speedup_static"),
                      f"{r['ideal']:.3f}", _ratio(r, "routed_over_static"), _ratio(r, "dense_over_mlx_lm"))
    wide.print(table)
    if rows and rows[0].get("router_inline"):
        wide.print("The hidden-state router runs inside the routed request (routed s includes it); "
                   "router ms is its head alone, not added again"
                   + (" (the fallback set was queued before the decision: --speculate)." if result.get("speculate") else "."))
        for r in rows:
            wide.print(f"{r['prompt_tokens']}+{r['gen_tokens']}: sets chosen in the timed requests: "
                       + ", ".join(f"{s} x{n}" for s, n in r.get("routed_sets", [])))
    lossless = [r for r in rows if "lossless_s" in r]
    if lossless:
        table = Table(title=f"lossless: the routed set drafts {lossless[0]['draft_tokens']} tokens, the dense "
                            "model verifies (output: the dense model's)")
        for col in ("prompt+gen", "dense s", "lossless s", "accepted from draft", "speedup (router counted)"):
            table.add_column(col, justify="right")
        for r in lossless:
            table.add_row(f"{r['prompt_tokens']}+{r['gen_tokens']}", f"{r['dense_s']:.4f}", f"{r['lossless_s']:.4f}",
                          f"{r['lossless_accepted']:.3f}", _ratio(r, "speedup_lossless"))
        wide.print(table)
    m = result.get("memory")
    if m and "error" not in m:
        wide.print(
            f"Memory: weights read routed {m['routed']['active'] / 2**20:.1f} MiB vs dense {m['dense']['active'] / 2**20:.1f} MiB "
            f"(ratio {m['materialised_ratio']:.3f}; (kept + rest) / all = {m['expected_ratio']:.3f}); "
            f"peak routed {m['routed']['peak'] / 2**20:.1f} MiB, dense {m['dense']['peak'] / 2**20:.1f} MiB")
    for line in result["summary"]:
        wide.print(f"Summary {line}", markup=False)


def register(app):
    app.command(name="bench")(bench)
