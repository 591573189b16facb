"""The hidden-state router: route on the LLM's own residual stream after an early block.

No candidate set omits blocks 0..after (the search protects them: `train search --protect-first`),
so every set runs them, and their output costs nothing extra: the routed prefill runs blocks
0..after on the prompt once, pools their output, scores the candidate sets with one linear map,
then continues from block after+1 under the chosen set, reusing those blocks' KV cache.

A router folder of this kind (written by `pudding-mlx train router --variant probe`):

    router/
      router.json        {"format": "pudding-mlx-router", "kind": "hidden", "after": r,
                          "pooling": "mean" | "last" | "mean+last", "sets": [[...], ...],
                          "fallback": s, "margin": g | null, "margin_is": "finite" | "+inf ..." | "-inf ...",
                          "max_tokens": n, "objective": ..., ...}
      head.safetensors   weight [M, hidden x pools], bias [M] (float32): the head with the training
                         side's standardisation and PCA folded in, applied to the raw pooled state

What it reads (as on the training side, `pudding_mlx.train.features`): the prompt's token ids (a
single message through the chat template, at most max_tokens, the last ones), the output of block
`after` for every prompt token, mean-pooled and/or at the last token, in float32.

Decision rule: the fallback set s (the best static set on the training data) runs unless the best
score beats s's by more than the margin (margin null with margin_is "+inf": always s; "-inf":
always the argmax).
"""

import json
import math
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx

from .errors import PuddingError, first_line
from .jsonio import read_json
from .omission import first_omitted
from .routing import best_index
from .skip import SkipView, decoder, family_forward

ROUTER_FILE = "router.json"
HEAD_FILE = "head.safetensors"
KIND = "hidden"
POOLINGS = ("mean", "last", "mean+last")
# families whose forward takes `input_embeddings` unscaled: the routed prefill can continue from a
# block's output there (gemma3 scales its input embeddings, so it routes with a separate pass)
CONTINUABLE = ("llama", "mistral", "qwen2", "qwen3")


def is_hidden_router(folder) -> bool:
    path = Path(folder) / ROUTER_FILE
    try:
        return json.loads(path.read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def pool(h: mx.array, pooling: str) -> mx.array:
    """[1, T, H] block output -> [H x pools] float32: mean over the tokens and/or the last token, in
    the order `pooling` names them ("mean", "last", "mean+last"). The one pooling of the LLM's hidden
    state at runtime: the hidden-state router and the loss predictor (`adaptive_router`) read it."""
    def one(p):  # only what a pooling reads is cast (last: one row)
        return mx.mean(h[0].astype(mx.float32), axis=0) if p == "mean" else h[0, -1].astype(mx.float32)

    pools = pooling.split("+")
    return one(pools[0]) if len(pools) == 1 else mx.concatenate([one(p) for p in pools])


class _StopAfter:
    """Stands in for block `after` in the layer list: runs it, keeps its output, stops the forward
    (the blocks after it, the final norm and the LM head are never built)."""

    class Reached(Exception):
        pass

    def __init__(self, layer):
        self.layer = layer
        self.output = None

    def __call__(self, *args, **kwargs):
        self.output = self.layer(*args, **kwargs)
        raise _StopAfter.Reached

    def __getattr__(self, name):  # attention type, sliding flags: as the block's own
        return getattr(self.layer, name)


def run_blocks(model, layers: list, inputs, cache: Optional[list] = None, **kwargs) -> mx.array:
    """The output of the last of `layers` (blocks of `model`, in order), running only those: the
    model's own forward with the last block standing in as `_StopAfter`, so no final norm and no
    LM head are built. `cache`: one entry per layer (filled); kwargs go to the forward
    (`input_embeddings` to start from a block's output instead of token ids)."""
    layers = list(layers)
    stop = _StopAfter(layers[-1])
    layers[-1] = stop
    try:
        family_forward(model)(model, decoder(model), layers, inputs, cache, **kwargs)
    except _StopAfter.Reached:
        return stop.output
    raise PuddingError("the model's forward did not reach its last block")  # pragma: no cover


def block_output(model, inputs: mx.array, after: int, cache: Optional[list] = None) -> mx.array:
    """The output of block `after` (the residual stream entering block after+1) for `inputs`
    [1, T], running blocks 0..after only; `cache` (one entry per block 0..after) is filled."""
    return run_blocks(model, decoder(model).layers[:after + 1], inputs, cache)


class HiddenRouter:
    """Scores the candidate sets from the LLM's own hidden state (module doc)."""

    kind = KIND

    def __init__(self, model, tokenizer, settings: dict, weight: mx.array, bias: mx.array, path: Path):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.after = settings["after"]
        self.pooling = settings["pooling"]
        self.fallback = settings["fallback"]
        # the decision rule's margin as a number: +inf always runs the fallback, -inf the argmax
        margin_is = settings.get("margin_is", "finite")
        self.margin = math.inf if margin_is.startswith("+inf") else -math.inf if margin_is.startswith("-inf") \
            else float(settings["margin"])
        self.max_tokens = settings["max_tokens"]
        self.sets = [tuple(s) for s in settings["sets"]]
        self.weight, self.bias = weight, bias

    @property
    def num_outputs(self) -> int:
        return self.weight.shape[0]

    def prompt_ids(self, text: str) -> List[int]:
        from .generate import prompt_tokens

        return prompt_tokens(self.tokenizer, text)[-self.max_tokens:]

    def pool(self, h: mx.array) -> mx.array:
        """[1, T, H] block output -> [H x pools] float32."""
        return pool(h, self.pooling)

    def scores_of(self, h: mx.array) -> mx.array:
        # one fused kernel for weight @ pooled + bias: on a GPU every kernel of the head adds to the
        # wait for the routing decision (benchmarks/routed_prefill_profile.py)
        return mx.addmm(self.bias[:, None], self.weight, self.pool(h)[:, None])[:, 0]

    def decide(self, scores: Sequence[float]) -> int:
        top = best_index(scores)
        always = self.margin == -math.inf  # also when the fallback's score is NaN
        return top if always or scores[top] - scores[self.fallback] > self.margin else self.fallback

    def best_ids(self, ids: Sequence[int]) -> Tuple[int, List[float], float]:
        """(chosen candidate, all scores, router ms) for a prompt given as token ids, with a pass
        of blocks 0..after of its own (what `route`, `eval` and `chat` use)."""
        start = time.perf_counter()
        scores = self.scores_of(block_output(self.model, mx.array([list(ids)[-self.max_tokens:]]), self.after))
        values = scores.tolist()
        return self.decide(values), values, (time.perf_counter() - start) * 1000.0

    def best(self, text: str) -> Tuple[int, List[float], float]:
        """The same interface as the BERT router: route `text` sent as one chat message."""
        return self.best_ids(self.prompt_ids(text))

    def __repr__(self) -> str:
        return f"HiddenRouter(path={str(self.path)!r}, after={self.after}, pooling={self.pooling!r}, num_outputs={self.num_outputs})"


def _continue(model, router: HiddenRouter, omitted: tuple, leading: list, h: mx.array,
              step: Optional[int] = None, between: Optional[Callable] = None) -> list:
    """A cache for the set `omitted` whose first entries are `leading` (blocks 0..after) and whose
    remaining kept blocks are filled from block after's output `h` for every prompt token but the
    last: in one lazy graph (nothing evaluated), or `step` tokens at a time, each chunk evaluated
    after `between("prefill", done, total)`."""
    view = SkipView(model, omitted)
    cache = view.make_cache()
    n_lead = router.after + 1  # the kept blocks 0..after come first in the view's cache
    cache[:n_lead] = leading
    n = h.shape[1] - 1
    if len(view.kept) > n_lead and n > 0:
        for lo in range(0, n, step or n):
            if between is not None:
                between("prefill", lo, n)
            hi = n if step is None else min(n, lo + step)
            with view.active():  # the set's healing adapter, if it has one (never on blocks 0..after)
                run_blocks(model, view.layers[n_lead:], None, cache[n_lead:], input_embeddings=h[:, lo:hi])
            if step is not None:
                mx.eval([c.state for c in cache[n_lead:]])
    return cache


def _check_set(router: HiddenRouter, candidate, omitted: tuple) -> None:
    if omitted and min(omitted) <= router.after:
        raise PuddingError(f"candidate {candidate} omits block {min(omitted)}, which the router reads "
                           f"after (block {router.after}); the bundle's router does not match its sets")


def routed_prefill(model, router: HiddenRouter, prompt: Sequence[int], sets: Sequence[Sequence[int]],
                   speculate: bool = False, step: Optional[int] = None, between: Optional[Callable] = None):
    """The free routed prefill: blocks 0..after run once on the prompt; their pooled output picks
    the set; the chosen view's remaining blocks run from there. Returns (candidate, scores, router
    ms, omitted, cache) where cache (one entry per kept block of the chosen set) holds prompt[:-1]:
    hand prompt[-1:] and the cache to mlx-lm's generation, which runs the last token through every
    kept block as usual.

    The fallback set's remaining blocks are always built as a lazy graph while the GPU runs blocks
    0..after (a prompt of one chunk); it is evaluated only if the router picks the fallback.
    `speculate`: also queue it for the GPU before waiting for the decision, so that the GPU is not
    idle while the host waits. When the router picks the fallback set the queued work is the
    prefill itself; otherwise it is discarded (its cache entries are fresh ones; the shared blocks
    0..after are only read) and the chosen set runs after it: a miss costs the fallback set's
    remaining blocks. Either way the result is the chosen set's prefill. Off by default: on the
    Qwen2.5-Coder preset with random-token prompts (the router then never picked the fallback) the
    routed prefill ran at 0.80x / 0.83x the speed of dense on an H200 (`results/bench/`; `bench
    --router-kind hidden-miss` times misses on a shape). `router ms` is the time until the decision
    was known.

    `step`: run both passes `step` tokens at a time, evaluating each chunk, and call
    `between(phase, done, total)` before each ("route": blocks 0..after; "prefill": the set's
    other blocks), e.g. to show progress or to stop (an exception there leaves no cache behind).
    Speculation applies to a prompt of one chunk only.

    The router's features are exactly what the training side computed only when the prompt is the
    router's own prompt (one chat message, at most max_tokens); a longer prompt is pooled over its
    last max_tokens tokens' states computed with the full prompt in context."""
    result = _routed_prefill(model, router, prompt, sets, speculate, step, between)
    # As mlx-lm's own prefill does, drop the buffers the prefill freed, here once all of its
    # temporaries are gone (the token ids among them: an array made on the host). On an H200
    # (benchmarks/routed_prefill_profile.py, 128 tokens) the first generation steps ran ~2 ms slower
    # while they reused those buffers, also after a static prefill from host-made ids, and as fast
    # as after a static prefill once they were cleared; clearing inside the prefill, before its
    # temporaries were released, did not help.
    mx.clear_cache()
    return result


def _routed_prefill(model, router, prompt, sets, speculate, step, between):
    if len(prompt) < 2:
        raise PuddingError("the routed prefill needs a prompt of at least 2 tokens")
    model_type = getattr(model, "model_type", None)
    if model_type not in CONTINUABLE:
        raise PuddingError(f"the routed prefill cannot continue from a block's output for {model_type!r}; "
                           "route with router.best_ids(prompt) and generate as usual")
    start = time.perf_counter()
    prompt = list(prompt)
    leading = SkipView(model, ()).make_cache()[:router.after + 1]
    chunk = step or len(prompt)
    parts = []
    for lo in range(0, len(prompt), chunk):
        if between is not None:
            between("route", lo, len(prompt))
        parts.append(block_output(model, mx.array([prompt[lo: lo + chunk]]), router.after, leading))
        if step is not None:
            mx.eval(parts[-1], [c.state for c in leading])
    h = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
    scores = router.scores_of(h[:, -router.max_tokens:])
    guess = guess_cache = None
    if len(parts) == 1 and router.fallback is not None:  # (the loss predictor has no fallback to guess)
        mx.async_eval(scores)  # the GPU starts on blocks 0..after and the head...
        # ...while the host builds the fallback set's remaining blocks as a lazy graph: if the router
        # picks the fallback, that graph is the prefill, and building it (Python, about as long as
        # those blocks take on a GPU at 128 tokens) is no longer a wait after the decision; if not,
        # it is dropped unevaluated and only the host's time was spent.
        guess = tuple(sets[router.fallback])
        _check_set(router, router.fallback, guess)
        guess_cache = _continue(model, router, guess, leading, h)
        if speculate:  # queue it too: a miss then costs the GPU those blocks
            mx.async_eval([c.state for c in guess_cache])
    values = scores.tolist()  # waits for blocks 0..after and the head: the routing decision
    ms = (time.perf_counter() - start) * 1000.0
    candidate = router.decide(values)
    omitted = tuple(sets[candidate])
    _check_set(router, candidate, omitted)
    if guess is not None and omitted == guess:
        cache = guess_cache  # one chunk, built before the decision: announced as _continue would
        if step is not None and between is not None:
            between("prefill", 0, len(prompt) - 1)
    else:
        cache = _continue(model, router, omitted, leading, h, step, between)
    for c in leading:  # the last prompt token goes through every kept block in generation
        c.trim(1)
    mx.eval([c.state for c in cache])
    return candidate, values, ms, omitted, cache


def load_hidden_router(folder, model, tokenizer, num_outputs: Optional[int] = None,
                       n_blocks: Optional[int] = None) -> HiddenRouter:
    """Read router.json + head.safetensors (module doc); every bad field is one line naming it."""
    folder = Path(folder)
    where = folder / ROUTER_FILE
    s = read_json(where, "the hidden-state router's settings", "retrain the router or rebuild the bundle")

    def need(key, ok, what):
        if key not in s or not ok(s[key]):
            raise PuddingError(f"{where}: field '{key}' must be {what}, got {s.get(key)!r}")
        return s[key]

    n_blocks = n_blocks or len(decoder(model).layers)
    need("after", lambda v: isinstance(v, int) and 0 <= v < n_blocks - 1, f"a block index in 0..{n_blocks - 2}")
    need("pooling", lambda v: v in POOLINGS, f"one of {', '.join(POOLINGS)}")
    sets = need("sets", lambda v: isinstance(v, list) and v and all(isinstance(x, list) for x in v), "a list of sets")
    need("fallback", lambda v: isinstance(v, int) and 0 <= v < len(sets), f"a candidate index in 0..{len(sets) - 1}")
    need("max_tokens", lambda v: isinstance(v, int) and v >= 1, "a positive integer")
    s.setdefault("margin_is", "finite")
    if s["margin_is"] == "finite":
        need("margin", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
    if num_outputs is not None and len(sets) != num_outputs:
        raise PuddingError(f"{where}: field 'sets' has {len(sets)} sets but the bundle has {num_outputs} candidates")
    first = first_omitted(sets, n_blocks)
    if first <= s["after"]:
        raise PuddingError(f"{where}: field 'after' is {s['after']}, but a set omits block {first}; "
                           "the router may only read blocks that every set runs")
    wpath = folder / HEAD_FILE
    try:
        w = mx.load(str(wpath))
        mx.eval(w)
    except Exception as e:
        raise PuddingError(f"{wpath}: not a readable safetensors file ({first_line(e)}); retrain or recopy the router") from None
    weight, bias = w.get("weight"), w.get("bias")
    pools = len(s["pooling"].split("+"))
    width = model.args.hidden_size
    if weight is None or bias is None or weight.ndim != 2 or weight.shape != (len(sets), width * pools) \
            or bias.shape != (len(sets),):
        raise PuddingError(f"{wpath}: tensors 'weight' [{len(sets)}, {width * pools}] and 'bias' [{len(sets)}] "
                           f"expected (got {None if weight is None else tuple(weight.shape)}); "
                           "the router was trained for another model or other sets")
    return HiddenRouter(model, tokenizer, s, weight.astype(mx.float32), bias.astype(mx.float32), folder)
