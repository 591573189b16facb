"""Where the hidden-state router's routed prefill spends its time on a GPU (LLaMA-3.1-8B shape, k = 7,
bf16, random weights; every candidate is the static set, so routed and static run the same blocks).

Each variant is one whole request (the prompt, then one generated token through mlx-lm's
generate_step), timed over interleaved rounds with the order rotated; the prefill part of a variant
that prefills by itself is also timed up to its end (synchronised), so step = total - prefill.

    static                       generate_step on the whole prompt (what bench's `static` times)
    static, prefill by hand      the view on prompt[:-1], evaluated; then generate_step on the last token
    ... , clear                  the same with mx.clear_cache() after the prefill (as generate_step does)
    split at r                   blocks 0..r on prompt[:-1], the set's other blocks continued from block r's
                                 output (input_embeddings), one graph: the routed prefill's mechanics, no router
    split at r, sync             the same, waiting for block r's output before continuing (the decision's wait)
    static ... from host ids     the same prefill from an array made of a Python list (as mlx-lm's generate
                                 and the routed prefill make theirs)
    routed, routed spec          hidden_router.routed_prefill without / with speculation, as shipped
    ... , no clear               the same without its final mx.clear_cache() (the code before it)
    routed, m fallback blocks    a prototype: only m blocks of the fallback set queued before the decision

and the head on its own: a bare GPU round trip (one add, read back), the head as shipped (float32
pooling + matvec, scores read back), and a bfloat16 variant.

Run it under different MLX settings (MLX_USE_CUDA_GRAPHS=0, MLX_CUDA_GRAPH_CACHE_SIZE=...) to see
what the backend's CUDA graphs do to each path; the settings are recorded in the JSON.

    python benchmarks/routed_prefill_profile.py --tokens 128,512 --rounds 15 --json prof.json
"""
import argparse
import json
import os
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step

from pudding_mlx.bench import interleaved_rounds, shape_hidden_router, spread
from pudding_mlx.hidden_router import block_output, routed_prefill, run_blocks
from pudding_mlx.shapes import random_model
from pudding_mlx.skip import SkipView

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--shape", default="llama-3.1-8b")
p.add_argument("--k", type=int, default=7)
p.add_argument("--tokens", default="128,512")
p.add_argument("--rounds", type=int, default=15)
p.add_argument("--json", default=None)
args = p.parse_args()

model = random_model(args.shape, mx.bfloat16)
static = spread(len(model.layers), args.k)
router = shape_hidden_router(model, static)
sets = [tuple(s) for s in router.sets]
view = SkipView(model, static)
n_lead = router.after + 1


def clock():
    mx.synchronize()
    return time.perf_counter()


def generate_one(prompt, cache):
    for _ in generate_step(prompt[-1:], view, max_tokens=1, prompt_cache=cache):
        pass


def static_whole(prompt, ids):
    cache = view.make_cache()
    t0 = clock()
    for _ in generate_step(prompt, view, max_tokens=1, prompt_cache=cache):
        pass
    return clock() - t0, None


def static_by_hand(clear, host=False):
    def run(prompt, ids):
        cache = view.make_cache()
        t0 = clock()
        view(mx.array([ids[:-1]]) if host else prompt[None, :-1], cache=cache)
        mx.eval([c.state for c in cache])
        if clear:
            mx.clear_cache()
        t1 = clock()
        generate_one(prompt, cache)
        return clock() - t0, t1 - t0
    return run


def split_at_r(sync):
    def run(prompt, ids):
        cache = view.make_cache()
        t0 = clock()
        h = block_output(model, mx.array([ids[:-1]]), router.after, cache[:n_lead])
        if sync:
            mx.eval(h)
        run_blocks(model, view.layers[n_lead:], None, cache[n_lead:], input_embeddings=h)
        mx.eval([c.state for c in cache])
        t1 = clock()
        generate_one(prompt, cache)
        return clock() - t0, t1 - t0
    return run


def routed(speculate, clear):
    """hidden_router.routed_prefill as shipped (it clears the buffer cache at its end), or with
    that clear_cache call disabled (clear=False: the code before it was added)."""
    def run(prompt, ids):
        t0 = clock()
        real = mx.clear_cache
        if not clear:
            mx.clear_cache = lambda: None
        try:
            cache = routed_prefill(model, router, ids, sets, speculate=speculate)[4]
        finally:
            mx.clear_cache = real
        t1 = clock()
        generate_one(prompt, cache)
        return clock() - t0, t1 - t0
    return run


def routed_partial(m):
    """A prototype: queue only the first m blocks of the fallback set's remainder before reading the
    decision (here every candidate is the fallback, so it always hits), then the rest."""
    def run(prompt, ids):
        t0 = clock()
        cache = view.make_cache()
        h = block_output(model, mx.array([ids]), router.after, cache[:n_lead])
        scores = router.scores_of(h)
        mx.async_eval(scores)
        x = run_blocks(model, view.layers[n_lead:n_lead + m], None, cache[n_lead:n_lead + m],
                       input_embeddings=h[:, :-1])
        mx.async_eval(x, [c.state for c in cache[n_lead:n_lead + m]])
        router.decide(scores.tolist())
        run_blocks(model, view.layers[n_lead + m:], None, cache[n_lead + m:], input_embeddings=x)
        for c in cache[:n_lead]:
            c.trim(1)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
        t1 = clock()
        generate_one(prompt, cache)
        return clock() - t0, t1 - t0
    return run


REQUESTS = {
    "static": static_whole,
    "static, prefill by hand": static_by_hand(False),
    "static, prefill by hand, clear": static_by_hand(True),
    "static, prefill by hand from host ids": static_by_hand(False, True),
    "static, prefill by hand from host ids, clear": static_by_hand(True, True),
    "split at r": split_at_r(False),
    "split at r, sync": split_at_r(True),
    "routed, no clear": routed(False, False),
    "routed": routed(False, True),
    "routed spec, no clear": routed(True, False),
    "routed spec": routed(True, True),
    "routed, 1 fallback block queued": routed_partial(1),
    "routed, 3 fallback blocks queued": routed_partial(3),
}


def head_timers(ids):
    h = block_output(model, mx.array([ids]), router.after)
    one = mx.array(1.0)
    w16 = router.weight.astype(mx.bfloat16)
    pooled = router.pool(h)
    mx.eval(h, one, w16, pooled)

    def timed(f):
        def run():
            t0 = clock()
            f()
            return time.perf_counter() - t0
        return run

    return {
        "round trip (one add, read back)": timed(lambda: (one + 1).item()),
        "head as shipped (float32 pool + matvec, read back)": timed(lambda: router.scores_of(h).tolist()),
        "head, bfloat16 (mean + matvec, read back)": timed(lambda: (w16 @ mx.mean(h[0], axis=0)).tolist()),
        "mean pooling alone (read back)": timed(lambda: mx.mean(h[0], axis=0)[:4].tolist()),
        "matvec alone on a pooled vector (read back)": timed(lambda: (router.weight @ pooled).tolist()),
        "head on the last token only (read back)": timed(lambda: (w16 @ h[0, -1]).tolist()),
    }


out = {"shape": args.shape, "k": args.k, "static": static, "after": router.after, "rounds": args.rounds,
       "mlx": mx.__version__, "device": str(mx.default_device()),
       "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")}, "tokens": {}}
print("env:", out["env"] or "(defaults)", flush=True)
for T in [int(t) for t in args.tokens.split(",")]:
    prompt = mx.random.randint(0, 1000, (T,), key=mx.random.key(T))
    ids = prompt.tolist()
    heads = head_timers(ids)
    names = list(REQUESTS) + list(heads)
    run = {**{n: (lambda f=f: f(prompt, ids)) for n, f in REQUESTS.items()}, **heads}
    for n in names:  # warm-up: kernels compiled, graphs built
        run[n](); run[n]()
    times = interleaved_rounds(run, args.rounds)  # a timer returns a total, or (total, prefill)
    total = {n: [v[0] if isinstance(v, tuple) else v for v in times[n]] for n in names}
    pre = {n: [v[1] for v in times[n] if isinstance(v, tuple) and v[1] is not None] for n in names}
    rows = {}
    for n in names:
        row = {"total_ms": 1e3 * statistics.median(total[n]), "total_min_ms": 1e3 * min(total[n]),
               "total_max_ms": 1e3 * max(total[n])}
        if pre[n]:
            row["prefill_ms"] = 1e3 * statistics.median(pre[n])
            row["step_ms"] = 1e3 * statistics.median([a - b for a, b in zip(total[n], pre[n])])
        rows[n] = row
        extra = f"  prefill {row['prefill_ms']:7.2f}  step {row['step_ms']:7.2f}" if "prefill_ms" in row else ""
        print(f"T={T:4d} {n:56s} {row['total_ms']:8.2f} ms (min {row['total_min_ms']:.2f}){extra}", flush=True)
    out["tokens"][str(T)] = rows
if args.json:
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
