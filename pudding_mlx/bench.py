"""On-device timing and memory of PuDDing: the paper's protocol (Table 7), on any MLX backend.

Prefill phase: prompts of 128, 256 and 512 tokens, 1 generated token. Generation phase: a
128-token prompt with 128, 256 and 512 generated tokens. Each cell times a whole request with
mlx-lm's own generation loop, for

    mlx_lm   stock mlx-lm on the dense model (our dense path must be within 2% of it)
    dense    pudding-mlx with no block omitted
    static   a fixed omission set of k blocks
    routed   the set the router picks for the prompt; the router's own time is measured apart
             (router_s) and counted in the speedup: dense / (routed + router)

With `draft_tokens` (`bench --lossless`), generation cells also time `lossless`: the routed set
drafts that many tokens, the dense model verifies them (output = dense output), and the share of
tokens taken from the draft is recorded; speedup_lossless = dense / (lossless + router). Prompts are
random token ids, so acceptance here is that of random text: `benchmarks/lossless.py` measures it on
real prompts.

ideal = L / (L - k). Every cell is the median of `runs` after a warm-up, and the four runners are
interleaved, with their order rotated each round, so drift hits them alike.

Memory (`memory_probe`): in a fresh process, a model directory is loaded lazily and one request is
run with blocks omitted, then one dense: MLX's active memory after each is the weight bytes that
were actually read, compared with (kept blocks + the rest) / all.
"""

import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models.cache import make_prompt_cache

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


def run_bench(model, omitted_static: Sequence[int], omitted_routed: Optional[Sequence[int]] = None,
              router=None, cells=PREFILL + GENERATE, runs: int = 5, vocab: Optional[int] = None,
              progress: Callable[[str], None] = None, draft_tokens: Optional[int] = None) -> List[dict]:
    """Time every (prompt_tokens, gen_tokens) cell. `omitted_routed`: the set the router picked
    (default: the static set); `router` (with `.best(text)`) is timed for router_s. `draft_tokens`: also time
    lossless generation with the routed set drafting."""
    n_blocks = len(SkipView(model, ()).layers)
    vocab = vocab or model.args.vocab_size
    static = SkipView(model, omitted_static)
    routed = SkipView(model, omitted_static if omitted_routed is None else omitted_routed)
    dense = SkipView(model, ())
    runners = {"mlx_lm": (model, lambda: make_prompt_cache(model)), "dense": (dense, dense.make_cache),
               "static": (static, static.make_cache), "routed": (routed, routed.make_cache)}
    rows = []
    for n_prompt, n_gen in cells:
        prompt = mx.random.randint(0, vocab, (n_prompt,), key=mx.random.key(n_prompt))
        for m, mk in runners.values():  # warm-up: kernels compiled, weights resident
            time_request(m, prompt[:16], 2, mk)
        if router is not None:
            time_router(router, ROUTER_TEXT, n_prompt)
        lossless = bool(draft_tokens) and n_gen > 1
        if lossless:
            time_lossless(dense, routed, prompt[:16], 4, draft_tokens)
        times: Dict[str, list] = {name: [] for name in list(runners) + ["router", "lossless"]}
        names = list(runners) + (["lossless"] if lossless else [])
        accepted = []
        for r in range(runs):
            for name in names[r % len(names):] + names[:r % len(names)]:
                if name == "lossless":
                    seconds, share = time_lossless(dense, routed, prompt, n_gen, draft_tokens)
                    times[name].append(seconds)
                    accepted.append(share)
                    continue
                m, mk = runners[name]
                times[name].append(time_request(m, prompt, n_gen, mk))
            times["router"].append(time_router(router, ROUTER_TEXT, n_prompt) if router is not None else 0.0)
        med = {name: statistics.median(v) for name, v in times.items() if v}
        row = {"phase": "prefill" if n_gen == 1 else "generate", "prompt_tokens": n_prompt, "gen_tokens": n_gen,
               "dense_s": med["dense"], "routed_s": med["routed"], "router_s": med["router"],
               "static_s": med["static"], "mlx_lm_s": med["mlx_lm"],
               "speedup": med["dense"] / (med["routed"] + med["router"]),
               "speedup_static": med["dense"] / med["static"],
               "ideal": n_blocks / (n_blocks - len(routed.omitted)),
               "dense_over_mlx_lm": med["dense"] / med["mlx_lm"],
               "router_over_dense_prefill": med["router"] / med["dense"]}
        if lossless:
            row.update(lossless_s=med["lossless"], draft_tokens=draft_tokens,
                       lossless_accepted=statistics.mean(accepted),
                       speedup_lossless=med["dense"] / (med["lossless"] + med["router"]))
        rows.append(row)
        if progress:
            progress(f"{row['phase']} {n_prompt}+{n_gen}: speedup {row['speedup']:.3f} (ideal {row['ideal']:.3f})")
    return rows


PROBE = """
import json, sys
import mlx.core as mx
from mlx.utils import tree_flatten
from pudding_mlx.load import load
from pudding_mlx.skip import SkipView
loaded = load(sys.argv[1], with_router=False)
omit = json.loads(sys.argv[2])
model = loaded.model
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
        from .errors import PuddingError

        raise PuddingError(f"memory probe failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['prompt_tokens']}+{r['gen_tokens']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["speedup"] for r in rows], width=0.4, label="routed (router counted)")
    ax.bar([i + 0.2 for i in x], [r["speedup_static"] for r in rows], width=0.4, label="static")
    ax.plot(list(x), [r["ideal"] for r in rows], "k--", label="ideal L/(L-k)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("prompt + generated tokens")
    ax.set_ylabel("speedup over dense")
    ax.set_title(f"{result.get('shape') or result.get('model')}: k={result['k']}, {result['backend']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
