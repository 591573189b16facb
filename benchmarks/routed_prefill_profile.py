"""Where the hidden-state router's routed prefill spends its time on a GPU (LLaMA-3.1-8B shape, k=7):
static prefill (mlx-lm generate_step, 1 token) vs routed_prefill + 1 token, with and without
speculation, and with the routed prefill run on mlx-lm's generation stream. Prints median ms of N rounds."""
import statistics, sys, time
import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream
from pudding_mlx.bench import shape_hidden_router, spread
from pudding_mlx.hidden_router import routed_prefill
from pudding_mlx.shapes import random_model
from pudding_mlx.skip import SkipView

T = int(sys.argv[1]) if len(sys.argv) > 1 else 128
N = int(sys.argv[2]) if len(sys.argv) > 2 else 15
model = random_model("llama-3.1-8b", mx.bfloat16)
static = spread(len(model.layers), 7)
router = shape_hidden_router(model, static)
sets = [tuple(s) for s in router.sets]
view = SkipView(model, static)
prompt = mx.random.randint(0, 1000, (T,))
ids = prompt.tolist()

def t_static():
    c = view.make_cache(); mx.synchronize(); t = time.perf_counter()
    for _ in generate_step(prompt, view, max_tokens=1, prompt_cache=c): pass
    mx.synchronize(); return time.perf_counter() - t

def t_routed(spec, stream=False, gen=True):
    mx.synchronize(); t = time.perf_counter()
    if stream:
        with mx.stream(generation_stream):
            _, _, _, om, c = routed_prefill(model, router, ids, sets, speculate=spec)
    else:
        _, _, _, om, c = routed_prefill(model, router, ids, sets, speculate=spec)
    t1 = time.perf_counter()
    if gen:
        for _ in generate_step(prompt[-1:], view, max_tokens=1, prompt_cache=c): pass
    mx.synchronize(); return time.perf_counter() - t, t1 - t

def t_plain_split():  # static view, prompt[:-1] prefill by hand with model call (default stream), then 1 token
    c = view.make_cache(); mx.synchronize(); t = time.perf_counter()
    view(prompt[None, :-1], cache=c); mx.eval([x.state for x in c])
    for _ in generate_step(prompt[-1:], view, max_tokens=1, prompt_cache=c): pass
    mx.synchronize(); return time.perf_counter() - t

runs = {"static generate_step": t_static, "prefill by hand + step": t_plain_split,
        "routed spec": lambda: t_routed(True), "routed nospec": lambda: t_routed(False),
        "routed spec on generation_stream": lambda: t_routed(True, True),
        "routed spec, no generation": lambda: t_routed(True, False, False)}
for f in runs.values():
    f(); f()
res = {k: [] for k in runs}
for _ in range(N):
    for k, f in runs.items():
        v = f(); res[k].append(v if isinstance(v, float) else v[0])
for k, v in res.items():
    print(f"T={T} {k:40s} {1e3 * statistics.median(v):8.2f} ms  (min {1e3 * min(v):.2f})")
