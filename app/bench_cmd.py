"""`pudding-mlx bench`: the paper's on-device timing protocol, and memory, on this machine."""

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pudding_mlx.app.options import DRAFT, LORA_TERMS, MAX_LOSS

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
    runs: Optional[int] = typer.Option(None, min=1, help="Timed rounds per cell (default 10), after a warm-up; "
                                       "ratios are the median over rounds with a bootstrap 95% interval (claims need "
                                       "5 or more). With --answers: times the prompt set is answered (default 1)."),
    cells: Optional[str] = typer.Option(None, help="Override the protocol: PROMPT+GEN cells, e.g. 32+1,64+1,32+16."),
    memory: bool = typer.Option(True, help="Also measure weight bytes read and peak memory, routed vs dense."),
    dtype: Optional[str] = typer.Option(None, help="Default: float32 on CPU, bfloat16 (shapes) / stored elsewhere."),
    lossless: bool = typer.Option(False, "--lossless", help="Also time lossless generation: the routed set "
                                  "drafts, the dense model verifies (generation cells; random-token prompts)."),
    draft_tokens: int = DRAFT,
    speculate: bool = typer.Option(False, "--speculate/--no-speculate", help="A hidden-state router's "
                                   "routed prefill queues its fallback set before the decision is known: faster "
                                   "on a GPU when the router picks the fallback, slower when it does not."),
    answers: bool = typer.Option(False, "--answers", help="Time to a complete answer instead of fixed-length "
                                 "cells: the fixed chat and code prompts answered greedily one at a time by dense, each "
                                 "set (--omit 'a,b;c'; default: the bundle's candidates) and routed, until each stops "
                                 "or reaches --max-tokens; speedups over dense per prompt with 95% intervals."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="With --answers: the first N prompts "
                                        "(chat and code alternate)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-m", min=1, help="With --answers: the most tokens an answer may have."),
    max_loss: Optional[float] = MAX_LOSS,
    lora_terms: bool = LORA_TERMS,
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
    if answers:
        return _answers(model, shape, omit, runs or 1, limit, max_tokens, dtype, json_out, plot_out, max_loss, lora_terms)
    result = B.measure(model, shape, k, omit, router_dir, cells, runs or 10, memory, dtype,
                       draft_tokens if lossless else None,
                       progress=lambda line: console.print(line, markup=False, soft_wrap=True),
                       router_kind=router_kind, speculate=speculate, max_loss=max_loss, lora_terms=lora_terms)
    _print(result)
    B.save(result, json_out, plot_out)
    for part, why in result["failed"].items():
        console.print(f"{part}: {why}", style="yellow", markup=False, soft_wrap=True)
    if result["failed"]:
        console.print(f"failed: {', '.join(result['failed'])}; everything else was measured"
                      + (f" and written to {json_out}" if json_out else ""), style="yellow", markup=False)
        interrupted = result["failed"].get("interrupted", "")
        raise typer.Exit(143 if "SIGTERM" in interrupted else 130 if interrupted else 1)


def _answers(model, shape, omit, rounds, limit, max_tokens, dtype, json_out, plot_out, max_loss=None, lora_terms=False):
    """`bench --answers`: time to a complete answer (pudding_mlx.answer_bench, answer_time)."""
    from pudding_mlx import answer_bench as AB
    from pudding_mlx import answer_time as A
    from pudding_mlx import bench as B
    from pudding_mlx.errors import PuddingError
    from pudding_mlx.load import load
    from pudding_mlx.omission import parse_omit_sets

    if shape is not None or model is None:
        raise PuddingError("--answers needs MODEL (a bundle or model directory): a random-weight --shape has no answers")
    # the routed row routes whatever the bundle's default (answer_bench.answer); --max-loss: adaptive depth
    loaded = load(model, dtype=dtype, max_loss=max_loss, lora_terms=lora_terms)
    configs = AB.configurations(loaded, parse_omit_sets(omit) if omit is not None else None)
    prompts = A.answer_prompts(limit)
    console.print(f"{len(prompts)} prompts x {len(configs)} configurations ({', '.join(configs)}), "
                  f"{rounds} round(s), {max_tokens} tokens at most", markup=False, soft_wrap=True)
    result = AB.measure_answers(loaded, configs, prompts, max_tokens, rounds,
                               progress=lambda line: console.print(line, markup=False, soft_wrap=True))
    if max_loss is not None:  # the routed row ran adaptive depth: each answer's "omitted" is the set chosen
        from pudding_mlx.routing import json_number

        result["max_loss"] = json_number(max_loss)
    _print_answers(result)
    B.save(result, json_out, plot_out, plot_fn=A.plot)
    for part, why in result["failed"].items():
        console.print(f"{part}: {why}", style="yellow", markup=False, soft_wrap=True)
    if result["failed"]:
        interrupted = result["failed"].get("interrupted", "")
        raise typer.Exit(143 if "SIGTERM" in interrupted else 130 if interrupted else 1)


def _print_answers(result):
    wide = Console(highlight=False, width=200)
    table = Table(title=f"{result['model']}: time to a complete answer, {len(result['prompts'])} chat and code "
                        f"prompts, {result['max_tokens']} tokens at most, {result['backend']}, {result['rounds']} "
                        "round(s) [bootstrap 95% interval over prompts]")
    for col in ("configuration", "median s", "answer speedup", "total speedup", "tok/s", "per-token speedup",
                "tokens vs dense", "hit limit", "identical %", "sets"):
        table.add_column(col, justify="right")

    def ci(row, name):
        lo, hi = row[f"{name}_ci95"]
        return f"{row[name]:.3f} [{lo:.3f}, {hi:.3f}]"

    for name, r in result["rows"].items():
        sets = ", ".join(f"{s} x{n}" for s, n in r["sets"].items()) if name == "routed" else ""
        table.add_row(name + (" (default)" if name == result["default"] else ""), f"{r['seconds_median']:.3f}",
                      ci(r, "answer_speedup"), ci(r, "total_speedup"), f"{r['tokens_per_s']:.1f}",
                      ci(r, "token_speedup"), f"{r['tokens_vs_dense']:.2f}", f"{r['hit_limit']}/{r['n']}",
                      "" if r["identical"] is None else f"{r['identical']:.0f}", sets)
    wide.print(table)
    if result.get("default_reason"):
        wide.print(f"The bundle runs dense by default: {result['default_reason']}", markup=False, soft_wrap=True)
    for line in result["summary"]:
        wide.print(f"Summary {line}", markup=False, soft_wrap=True)


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
        if result.get("max_loss") is not None:
            wide.print(f"Adaptive depth under --max-loss {result['max_loss']}: the loss predictor chose the routed "
                       f"set of each request (k = {result['routed_k']} for the router text, ideal as that set's).")
        for r in rows:
            wide.print(f"{r['prompt_tokens']}+{r['gen_tokens']}: sets chosen in the timed requests: "
                       + ", ".join(f"{s} (k = {len(s)}) x{n}" for s, n in r.get("routed_sets", [])))
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
