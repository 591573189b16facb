"""On-device timing and memory of PuDDing: the paper's protocol (Table 7), on any MLX backend.

Prefill phase: prompts of 128, 256 and 512 tokens, 1 generated token. Generation phase: a
128-token prompt with 128, 256 and 512 generated tokens. Each cell times a whole request with
mlx-lm's own generation loop, for

    mlx_lm   stock mlx-lm on the dense model (our dense path must be within 2% of it)
    dense    pudding-mlx with no block omitted
    static   a fixed omission set of k blocks
    unhealed the static set without its healing adapter, when it has one (pudding_mlx.adapters):
             healed_over_unhealed = unhealed / static time, the adapter's cost in speed
    routed   the set the router picks for the prompt; the router's own time is measured apart
             (router_s) and counted in the speedup: dense / (routed + router)

A hidden-state router (`hidden_router`) is not a separate pass: the routed request is the free routed
prefill itself (blocks 0..after once, the head, the chosen set's remaining blocks reusing their KV,
then generation), so its time already holds the routing and speedup = dense / routed. router_s is
then the head alone (pooling + one matmul + reading the scores back) on the prompt's block output,
reported apart and not added again.

With `draft_tokens` (`bench --lossless`), generation cells also time `lossless`: the routed set
drafts that many tokens, the dense model verifies them (the dense model's output), and the share of
tokens taken from the draft is recorded; speedup_lossless = dense / (lossless + router). Prompts are
random token ids, so acceptance here is that of random text: `benchmarks/lossless.py` measures it on
real prompts.

ideal = L / (L - k). Every runner is warmed up first (the router included: its first call compiles).
Then each round times every runner once, interleaved, with their order rotated each round, so drift
hits them alike; every ratio is computed within a round (paired) and reported as the median over
rounds with its min, max and a bootstrap 95% interval of that median (`spread`). Each row keeps the
per-round seconds (`times`). `summary` states only what an interval supports: a speedup above (or
below) 1 when its whole interval is, else "no difference shown".

`measure` is what `pudding-mlx bench` runs: it picks the model and sets (`bench_target`), times every
cell, and runs the memory probe; a part that fails is recorded in `result["failed"]` and the rest is
kept. `check_outputs` refuses unusable output paths before any work; `save` writes the JSON
(atomically) and the plot.

Memory (`memory_probe`): in a fresh process, a model directory is loaded lazily and one request is
run with blocks omitted, then one dense: MLX's active memory after each is the weight bytes that
were actually read, compared with (kept blocks + the rest) / all.
"""

import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models.cache import make_prompt_cache

from .errors import PuddingError
from .omission import ideal_speedup
from .skip import SkipView

PREFILL = [(128, 1), (256, 1), (512, 1)]
GENERATE = [(128, 128), (128, 256), (128, 512)]
# text the router reads when the model is a random-weight shape (it only sets the router's cost)
ROUTER_TEXT = ("A farmer plants corn in a field that gets full sun. Which factor most likely "
               "limits how tall the corn grows during a dry summer? ") * 40


def spread(n_blocks: int, k: int) -> List[int]:
    """k block indices spread over the middle of the stack (first and last block kept)."""
    inner = list(range(1, n_blocks - 1))
    step = len(inner) / k
    return sorted({inner[int(i * step + step / 2)] for i in range(k)})


def time_request(model, prompt: mx.array, n_gen: int, make_cache: Callable) -> float:
    """Seconds for one request: prefill `prompt`, then generate `n_gen` tokens (greedy)."""
    cache = make_cache()
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in generate_step(prompt, model, max_tokens=n_gen, prompt_cache=cache):
        pass
    mx.synchronize()
    return time.perf_counter() - t0


def time_lossless(dense, draft, prompt: mx.array, n_gen: int, draft_tokens: int) -> tuple:
    """(seconds, share of tokens accepted from the draft) for one lossless request: `draft` (a
    SkipView) drafts, `dense` verifies (mlx-lm's speculative decoding)."""
    cache = dense.make_cache() + draft.make_cache()
    mx.synchronize()
    t0 = time.perf_counter()
    accepted = n = 0
    for _, _, from_draft in speculative_generate_step(prompt, dense, draft, num_draft_tokens=draft_tokens,
                                                      max_tokens=n_gen, prompt_cache=cache):
        accepted, n = accepted + bool(from_draft), n + 1
    mx.synchronize()
    return time.perf_counter() - t0, accepted / max(n, 1)


def time_router(router, text: str, n_tokens: int) -> float:
    """Seconds the router takes on the first `n_tokens` words of `text` (tokenization included)."""
    words = " ".join(text.split()[:n_tokens])
    t0 = time.perf_counter()
    router.best(words)
    return time.perf_counter() - t0


def time_routed_request(model, router, sets, prompt: mx.array, n_gen: int, speculate: bool = False,
                        chosen: Optional[list] = None) -> float:
    """Seconds for one request with a hidden-state router, routing included: the free routed prefill
    (`hidden_router.routed_prefill`, `speculate` as there), then generation from its cache under the
    chosen set (appended to `chosen`)."""
    from .hidden_router import routed_prefill

    ids = prompt.tolist()
    mx.synchronize()
    t0 = time.perf_counter()
    _, _, _, omitted, cache = routed_prefill(model, router, ids, sets, speculate=speculate)
    if chosen is not None:
        chosen.append(list(omitted))
    for _ in generate_step(prompt[-1:], SkipView(model, omitted), max_tokens=n_gen, prompt_cache=cache):
        pass
    mx.synchronize()
    return time.perf_counter() - t0


def time_hidden_head(router, h: mx.array) -> float:
    """Seconds the hidden-state router's head takes on a block output (pooling, matmul, scores read)."""
    mx.synchronize()
    t0 = time.perf_counter()
    router.decide(router.scores_of(h).tolist())
    return time.perf_counter() - t0


def is_inline(router) -> bool:
    """A router whose cost is inside the routed request (the hidden-state router, the loss predictor)."""
    from .routing import reads_hidden_state

    return reads_hidden_state(router)


# every ratio, computed per round (paired): name -> (runners summed above, runners summed below)
RATIOS = {
    "speedup": (("dense",), ("routed", "router")),
    "speedup_static": (("dense",), ("static",)),
    "routed_over_static": (("routed",), ("static",)),
    "dense_over_mlx_lm": (("dense",), ("mlx_lm",)),
    "router_over_dense_prefill": (("router",), ("dense",)),
    "speedup_lossless": (("dense",), ("lossless", "router")),
    # the healing adapter's cost: the static set unhealed / healed (1 = free; 0.98 = healed 2% slower)
    "healed_over_unhealed": (("unhealed",), ("static",)),
}
# with an inline router the routed request already holds the routing
RATIOS_INLINE = {**RATIOS, "speedup": (("dense",), ("routed",))}
MIN_ROUNDS_FOR_CLAIMS = 5


def interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """min, median and max of per-round values, and a bootstrap 95% interval of the median."""
    v = np.asarray(values, dtype=float)
    medians = np.median(v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))], axis=1)
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max()),
            "ci95": [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]}


def interleaved_rounds(timers: Dict[str, Callable[[], float]], runs: int,
                       on_round: Optional[Callable[[int, Dict[str, list]], None]] = None) -> Dict[str, list]:
    """`runs` rounds, each calling every timer once, in an order rotated each round so that no runner always
    goes first (drift hits them alike); per timer the values it returned, a round per entry. `on_round(r,
    times)` after each round (progress)."""
    names = list(timers)
    times: Dict[str, list] = {name: [] for name in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timers[name]())
        if on_round is not None:
            on_round(r, times)
    return times


def _runners(model, omitted_static, omitted_routed) -> Dict[str, tuple]:
    static = SkipView(model, omitted_static)
    routed = SkipView(model, omitted_static if omitted_routed is None else omitted_routed)
    dense = SkipView(model, ())
    runners = {"mlx_lm": (model, lambda: make_prompt_cache(model)), "dense": (dense, dense.make_cache),
               "static": (static, static.make_cache), "routed": (routed, routed.make_cache)}
    if static.adapter is not None:  # a healed static set: also time it unhealed, in the same rounds
        unhealed = SkipView(model, omitted_static, healed=False)
        runners["unhealed"] = (unhealed, unhealed.make_cache)
    return runners


def cell_prompt(n_prompt: int, vocab: int) -> mx.array:
    """The prompt a cell times: random token ids, the same for every run with this length and vocab
    (its first 16 tokens are the warm-up's prompt)."""
    return mx.random.randint(0, vocab, (n_prompt,), key=mx.random.key(n_prompt))


def time_cell(runners: Dict[str, tuple], router, n_prompt: int, n_gen: int, runs: int, vocab: int,
              draft_tokens: Optional[int] = None, speculate: bool = False) -> dict:
    """One (prompt_tokens, gen_tokens) cell: every runner warmed up, then `runs` interleaved rounds."""
    prompt = cell_prompt(n_prompt, vocab)
    dense, routed = runners["dense"][0], runners["routed"][0]
    lossless = bool(draft_tokens) and n_gen > 1
    accepted = []

    def run_lossless(p, n):
        seconds, share = time_lossless(dense, routed, p, n, draft_tokens)
        accepted.append(share)
        return seconds

    timers = {name: (lambda p, n, m=m, mk=mk: time_request(m, p, n, mk)) for name, (m, mk) in runners.items()}
    inline = is_inline(router)
    if inline:
        from .hidden_router import block_output

        model = runners["mlx_lm"][0]
        sets = [tuple(s) for s in router.sets]
        chosen: list = []
        timers["routed"] = lambda p, n: time_routed_request(model, router, sets, p, n, speculate, chosen)
        h = block_output(model, prompt[None][:, -router.max_tokens:], router.after)
        mx.eval(h)
        timers["router"] = lambda p, n: time_hidden_head(router, h)
    elif router is not None:
        timers["router"] = lambda p, n: time_router(router, ROUTER_TEXT, n_prompt)
    if lossless:
        timers["lossless"] = run_lossless
    for timer in timers.values():  # warm-up: kernels compiled (the router's too), weights resident
        timer(prompt[:16], 2)
    accepted.clear()
    times = interleaved_rounds({name: (lambda t=t: t(prompt, n_gen)) for name, t in timers.items()}, runs)
    times.setdefault("router", [0.0] * runs)
    n_blocks = len(runners["dense"][0].layers)
    row = {"phase": "prefill" if n_gen == 1 else "generate", "prompt_tokens": n_prompt, "gen_tokens": n_gen,
           **{f"{name}_s": statistics.median(v) for name, v in times.items()},
           "ideal": ideal_speedup(n_blocks, len(routed.omitted))}
    if inline:  # the sets the router chose for the timed requests (it routes every request anew)
        row["router_inline"] = True
        row["routed_sets"] = [[list(s), n] for s, n in Counter(tuple(c) for c in chosen[-runs:]).most_common()]
    for name, (above, below) in (RATIOS_INLINE if inline else RATIOS).items():
        if all(x in times for x in above + below):
            per_round = [sum(times[x][i] for x in above) / sum(times[x][i] for x in below) for i in range(runs)]
            row[f"{name}_spread"] = interval(per_round)
            row[name] = row[f"{name}_spread"]["median"]
    if lossless:
        row.update(draft_tokens=draft_tokens, lossless_accepted=statistics.mean(accepted))
    row["times"] = times
    return row


def time_cells(model, omitted_static: Sequence[int], omitted_routed: Optional[Sequence[int]] = None,
               router=None, cells=PREFILL + GENERATE, runs: int = 10, vocab: Optional[int] = None,
               draft_tokens: Optional[int] = None, speculate: bool = False) -> Iterator[dict]:
    """A row per cell, as each is timed. A cell that fails (out of memory, ...) gives a row with its
    `error` instead of the timings, and the next cells still run."""
    runners = _runners(model, omitted_static, omitted_routed)
    vocab = vocab or model.args.vocab_size
    for n_prompt, n_gen in cells:
        try:
            yield time_cell(runners, router, n_prompt, n_gen, runs, vocab, draft_tokens, speculate)
        except Exception as e:  # noqa: BLE001 -- recorded in the row; the measured cells are kept
            yield {"phase": "prefill" if n_gen == 1 else "generate", "prompt_tokens": n_prompt,
                   "gen_tokens": n_gen, "error": _one_line(e)}


def cell_line(row: dict) -> str:
    head = f"{row['phase']} {row['prompt_tokens']}+{row['gen_tokens']}"
    if "error" in row:
        return f"{head}: failed ({row['error']})"
    lo, hi = row["speedup_spread"]["ci95"]
    line = f"{head}: speedup {row['speedup']:.3f} [{lo:.3f}, {hi:.3f}] (ideal {row['ideal']:.3f})"
    if "healed_over_unhealed_spread" in row:
        a, b = row["healed_over_unhealed_spread"]["ci95"]
        line += f"; healed/unhealed {row['healed_over_unhealed']:.3f} [{a:.3f}, {b:.3f}]"
    return line


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def summary(result: dict) -> List[str]:
    """What the intervals support, one line per timed cell (nothing is claimed from too few rounds)."""
    if result["runs"] < MIN_ROUNDS_FOR_CLAIMS:
        return [f"{result['runs']} round(s): too few for intervals (at least {MIN_ROUNDS_FOR_CLAIMS}); "
                "no speedup is claimed"]
    lines = []
    for row in result["rows"]:
        if "error" in row:
            continue
        same = all(s == result["static"] for s, _ in row.get("routed_sets", [[result["routed"], 1]]))
        parts = [_versus(row, "speedup", 1.0, "routed (router counted)", "dense")]
        parts.append(_versus(row, "speedup_static", row["ideal"], "static", f"the ideal {row['ideal']:.3f}"))
        if same:
            parts.append(_versus(row, "routed_over_static", 1.0, "routed/static (the same set)", "1"))
        if "healed_over_unhealed_spread" in row:
            parts.append(_versus(row, "healed_over_unhealed", 1.0, "static healed/unhealed speed (the adapter's cost)",
                                 "1"))
        lines.append(f"{row['prompt_tokens']}+{row['gen_tokens']}: " + "; ".join(parts))
    return lines


def _versus(row: dict, name: str, reference: float, what: str, against: str) -> str:
    s = row[f"{name}_spread"]
    lo, hi = s["ci95"]
    figure = f"{s['median']:.3f} [{lo:.3f}, {hi:.3f}]"
    if lo > reference:
        return f"{what} {figure}: above {against}"
    if hi < reference:
        return f"{what} {figure}: below {against}"
    return f"{what} {figure}: no difference from {against} shown"


# -- the `pudding-mlx bench` run: target, timings, memory, outputs ----------------------------------


@dataclass
class Target:
    """What a bench run times: the model, its static and routed sets, the router (and its name)."""

    model: object
    static: List[int]
    routed: List[int]
    router: object
    router_name: Optional[str]       # the JSON's "router": a path, "bundle", or None when none was timed
    source: dict                     # {"shape": name} or {"model": path}


def parse_cells(cells: Optional[str]) -> List[tuple]:
    if not cells:
        return PREFILL + GENERATE
    try:
        return [tuple(int(x) for x in c.split("+")) for c in cells.split(",")]
    except ValueError:
        raise PuddingError(f"--cells {cells!r}: give PROMPT+GEN pairs, e.g. 128+1,128+128") from None


ROUTER_KINDS = ("bert", "hidden", "hidden-miss")
SHAPE_CANDIDATES = 10  # a shape's hidden-state router scores this many sets (the paper's candidate count)


def bench_target(model: Optional[str], shape: Optional[str], k: int, omit: Optional[str] = None,
                 router_dir=None, dtype: Optional[str] = None, router_kind: str = "bert",
                 max_loss: Optional[float] = None, lora_terms: bool = False) -> Target:
    """MODEL (a bundle: its candidate 0 or --omit is static, its router's pick is routed) or a random
    SHAPE (the spread set is both). The router: --router, else the bundle's, else (shapes) the
    smollm2-135m preset's BERT router when it is built, or with router_kind "hidden" a hidden-state
    router with a random head (`shape_hidden_router`)."""
    if (model is None) == (shape is None):
        raise PuddingError("give either MODEL or --shape")
    if router_kind not in ROUTER_KINDS:
        raise PuddingError(f"--router-kind {router_kind!r}: choose one of {', '.join(ROUTER_KINDS)}")
    if router_kind.startswith("hidden") and (model is not None or router_dir is not None):
        raise PuddingError(f"--router-kind {router_kind} is for --shape (a bundle times its own router); leave out --router")
    if max_loss is not None and (shape is not None or router_dir is not None):
        raise PuddingError("--max-loss times a bundle's loss predictor: give MODEL (a bundle with one), not "
                           + ("--shape" if shape is not None else "--router"))
    from .router import load_router

    router = load_router(router_dir) if router_dir is not None else None
    name = str(router_dir) if router_dir is not None else None
    if shape:
        return _shape_target(shape, k, router, name, dtype, router_kind)
    return _model_target(model, k, omit, router, name, dtype, max_loss, lora_terms)


def shape_hidden_router(model, static: Sequence[int], n_candidates: int = SHAPE_CANDIDATES, seed: int = 0,
                        miss: bool = False):
    """A hidden-state router for a random-weight shape: it reads after the block before the first
    omitted one (mean pooling) and scores n_candidates sets with a random head. Every candidate is the
    static set, so routed and static run the same blocks and differ only by the routing, and the
    routed prefill's guess (the fallback) always hits. `miss`: the fallback is instead another set
    of k blocks that the head never picks (its bias is -1e9), so every guess misses."""
    from pathlib import Path

    from .hidden_router import HiddenRouter

    hidden = model.args.hidden_size
    sets = [list(static)] * n_candidates
    bias = mx.zeros((n_candidates,))
    if miss:
        if max(static) + 1 >= len(model.layers):  # the other set: the static one moved one block later
            raise PuddingError("--router-kind hidden-miss: the static set omits the last block; choose a smaller --k")
        sets = sets[:-1] + [[b + 1 for b in static]]
        bias = mx.concatenate([mx.zeros((n_candidates - 1,)), mx.array([-1e9])])
    settings = {"after": min(static) - 1, "pooling": "mean", "fallback": n_candidates - 1 if miss else 0,
                "margin_is": "-inf (always the argmax)", "max_tokens": 1 << 20, "sets": sets}
    weight = mx.random.normal((n_candidates, hidden), key=mx.random.key(seed)) / hidden ** 0.5
    return HiddenRouter(model, None, settings, weight, bias, Path("random-head"))


def _shape_target(shape, k, router, name, dtype, router_kind="bert") -> Target:
    from .assets import cache_dir
    from .load import DTYPES, backend
    from .router import load_router
    from .shapes import random_model

    mdtype = DTYPES[dtype] if dtype else (mx.float32 if backend() == "cpu" else mx.bfloat16)
    lm = random_model(shape, mdtype)
    static = spread(len(lm.layers), k)
    if router_kind.startswith("hidden"):
        if min(static) < 1:
            raise PuddingError(f"--k {k}: the set omits block 0, so a hidden-state router has nothing to read")
        miss = router_kind == "hidden-miss"
        return Target(lm, static, static, shape_hidden_router(lm, static, miss=miss),
                      f"hidden (random head after block {min(static) - 1}"
                      + ("; its fallback is another set, never picked)" if miss else ")"), {"shape": shape})
    default = cache_dir() / "default-bundle" / "router"
    if router is None and default.is_dir():
        router, name = load_router(default), str(default)
    return Target(lm, static, static, router, name, {"shape": shape})


def _model_target(model, k, omit, router, name, dtype, max_loss=None, lora_terms=False) -> Target:
    """`max_loss`: the routed requests run adaptive depth (the bundle's loss predictor under this budget)."""
    from .load import load
    from .omission import check_omitted, parse_omit
    from .routing import route

    loaded = load(model, dtype=dtype, max_loss=max_loss, lora_terms=lora_terms)
    n_blocks = loaded.n_blocks
    cands = loaded.manifest.candidates if loaded.manifest else []
    if omit is not None:
        static = list(check_omitted(parse_omit(omit), n_blocks, "--omit"))
    elif cands:
        static = list(cands[0].omitted)
    else:
        static = spread(n_blocks, k)
    routed = static
    if router is None and loaded.router is not None:  # the bundle's router picks the routed set
        router, name = loaded.router, "bundle" if max_loss is None else "bundle's loss predictor"
        routed = sorted(route(loaded, ROUTER_TEXT).omitted)
    from .adapters import adapter_for

    return Target(loaded.model, static, routed, router, name,
                  {"model": str(loaded.path), "static_adapter": adapter_for(loaded.model, static)})


def measure(model: Optional[str] = None, shape: Optional[str] = None, k: int = 7, omit: Optional[str] = None,
            router_dir=None, cells: Optional[str] = None, runs: int = 10, memory: bool = True,
            dtype: Optional[str] = None, draft_tokens: Optional[int] = None,
            progress: Callable[[str], None] = print, router_kind: str = "bert",
            speculate: bool = False, max_loss: Optional[float] = None, lora_terms: bool = False) -> dict:
    """The whole `pudding-mlx bench` run (`speculate`: a hidden-state router's routed prefill, as in
    `hidden_router.routed_prefill`). Failures of a part (a cell, the memory probe, Ctrl-C) are
    recorded in `result["failed"]` (part -> one line) and everything measured is kept."""
    from .load import backend

    grid = parse_cells(cells)
    target = bench_target(model, shape, k, omit, router_dir, dtype, router_kind, max_loss, lora_terms)
    if target.router is None:
        progress("no router to time: router_s is 0 (pass --router, or build the smollm2-135m preset: pudding-mlx chat --preset smollm2-135m)")
    result = {"backend": backend(), **target.source, "k": len(target.static), "blocks": len(target.model.layers),
              "static": target.static, "routed": target.routed, "runs": runs, "router": target.router_name,
              "router_kind": getattr(target.router, "kind", "bert") if target.router is not None else None,
              "speculate": bool(speculate) if is_inline(target.router) else None,
              "rows": [], "failed": {}}
    if max_loss is not None:  # adaptive depth: the budget; each cell's "routed_sets" gives the depths chosen
        from .routing import json_number

        result.update(max_loss=json_number(max_loss), routed_k=len(target.routed))
    previous_sigterm = _on_sigterm(_raise_terminated)
    try:
        for row in time_cells(target.model, target.static, target.routed, target.router, grid, runs,
                              draft_tokens=draft_tokens, speculate=speculate):
            result["rows"].append(row)
            progress(cell_line(row))
            if "error" in row:
                result["failed"][f"{row['prompt_tokens']}+{row['gen_tokens']}"] = row["error"]
        if memory:
            result["memory"] = _memory(target, shape)
            if "error" in result["memory"]:
                result["failed"]["memory"] = result["memory"]["error"]
    except Terminated:
        result["failed"]["interrupted"] = "stopped by SIGTERM (a time limit?); the cells above were measured"
    except KeyboardInterrupt:
        result["failed"]["interrupted"] = "stopped with Ctrl-C; the cells above were measured"
    finally:
        _on_sigterm(previous_sigterm)
    result["summary"] = summary(result)
    return result


class Terminated(KeyboardInterrupt):
    """SIGTERM during a bench run (e.g. `timeout` on a lent GPU): handled like Ctrl-C, so the cells
    measured so far are still written."""


def _raise_terminated(signum, frame):
    raise Terminated


def _on_sigterm(handler):
    """Install `handler` for SIGTERM and return the previous one (None outside the main thread,
    where signals cannot be handled: nothing changes)."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, handler)
    return signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python


def _memory(target: Target, shape: Optional[str]) -> dict:
    """The memory probe on the model directory (a shape is saved to a temporary one first);
    a failure is returned as {"error": line}."""
    import tempfile
    from pathlib import Path

    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = target.source.get("model")
            if shape:
                from mlx_lm.utils import save_config, save_model

                from .shapes import SHAPES

                save_model(tmp, target.model)
                save_config(SHAPES[shape], Path(tmp) / "config.json")
                folder = tmp
            return memory_probe(folder, target.static)
    except Exception as e:  # noqa: BLE001 -- recorded; the timings are kept
        return {"error": str(e) if isinstance(e, PuddingError) else _one_line(e)}


def check_outputs(json_out=None, plot_out=None) -> None:
    """Refuse, before any work, an output that could not be written: a missing or read-only folder,
    a folder given as the file, --plot without matplotlib."""
    from .atomic import check_output

    for flag, path in (("--json", json_out), ("--plot", plot_out)):
        if path is not None:
            check_output(path, flag)
    if plot_out is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise PuddingError("--plot needs matplotlib: pip install 'pudding-mlx[plot]' "
                               "(or leave out --plot)") from None


def save(result: dict, json_out=None, plot_out=None, plot_fn=None) -> None:
    """The plot (`plot_fn`, default `plot`; a failure is recorded in result["failed"]), then the JSON,
    written atomically."""
    from .atomic import write_json

    if plot_out is not None:
        try:
            (plot_fn or plot)(result, plot_out)
        except Exception as e:  # noqa: BLE001 -- the measurements still get written
            result["failed"]["plot"] = _one_line(e)
    if json_out is not None:
        write_json(json_out, result)


PROBE = """
import json, sys
import mlx.core as mx
from mlx.utils import tree_flatten
from pathlib import Path
from mlx_lm.utils import load_model
from pudding_mlx.skip import SkipView
model, _ = load_model(Path(sys.argv[1]), lazy=True)  # the weights only: no tokenizer needed
omit = json.loads(sys.argv[2])
sizes = {k: v.nbytes for k, v in tree_flatten(model.parameters())}
block = lambda k: int(k.split(".")[2]) if k.startswith("model.layers.") else None
skipped = sum(v for k, v in sizes.items() if block(k) in omit)
prompt = mx.array([[1] * 128])
mx.reset_peak_memory()
base = mx.get_active_memory()
mx.eval(SkipView(model, omit)(prompt, cache=SkipView(model, omit).make_cache()))
routed = dict(active=mx.get_active_memory() - base, peak=mx.get_peak_memory() - base)
mx.eval(SkipView(model, [])(prompt, cache=SkipView(model, []).make_cache()))
dense = dict(active=mx.get_active_memory() - base, peak=mx.get_peak_memory() - base)
total = sum(sizes.values())
print(json.dumps(dict(weights_total=total, weights_omitted=skipped, expected_ratio=(total - skipped) / total,
                      routed=routed, dense=dense, materialised_ratio=routed["active"] / dense["active"])))
"""


def memory_probe(model_dir, omitted: Sequence[int]) -> dict:
    """Weight bytes read and peak memory, routed vs dense, in a fresh process (lazy loading)."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), json.dumps(list(omitted))],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PuddingError(f"memory probe failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(result: dict, path) -> None:
    """Speedups with their 95% intervals per timed cell, against the ideal; written atomically."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['prompt_tokens']}+{r['gen_tokens']}" for r in rows]
    x = range(len(rows))
    for shift, name, label in ((-0.2, "speedup", "routed (router counted)"), (0.2, "speedup_static", "static")):
        ci = [r[f"{name}_spread"]["ci95"] for r in rows]
        errors = [[r[name] - lo for r, (lo, _) in zip(rows, ci)], [hi - r[name] for r, (_, hi) in zip(rows, ci)]]
        ax.bar([i + shift for i in x], [r[name] for r in rows], width=0.4, yerr=errors, capsize=3, label=label)
    ax.plot(list(x), [r["ideal"] for r in rows], "k--", label="ideal L/(L-k)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("prompt + generated tokens")
    ax.set_ylabel("speedup over dense (median, 95% CI)")
    ax.set_title(f"{result.get('shape') or result.get('model')}: k={result['k']}, {result['backend']}, "
                 f"{result['runs']} rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp"
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
