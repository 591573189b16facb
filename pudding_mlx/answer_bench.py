"""Timing answers for `pudding-mlx bench MODEL --answers` on the MLX runtime: every configuration answers every
fixed prompt, one request at a time (the measure and its arithmetic: `pudding_mlx.answer_time`)."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .answer_time import ANSWER_MAX_TOKENS, compare, summary
from .errors import PuddingError

WARMUP_TEXT = "Say hello."


def configurations(loaded, sets: Optional[Sequence[Sequence[int]]] = None, routed: bool = True) -> Dict[str, Optional[tuple]]:
    """{name: omitted} with None for routed: dense, each of `sets` (default: the bundle's candidate sets),
    and routed when the bundle has a router."""
    from .omission import check_omitted

    if sets is None:
        sets = [c.omitted for c in loaded.manifest.candidates] if loaded.manifest else []
    out: Dict[str, Optional[tuple]] = {"dense": ()}
    for s in sets:
        s = check_omitted(s, loaded.n_blocks, "--omit")
        if s:
            out[f"omit {','.join(map(str, s))}"] = s
    if routed and loaded.router is not None:
        out["routed"] = None
    return out


def answer(loaded, text: str, omitted: Optional[Sequence[int]], max_tokens: int = ANSWER_MAX_TOKENS) -> dict:
    """One timed answer to `text` (one user message through the chat template). `omitted` None: routed
    as `generate` routes (`routing.choose_and_prefill`, the bundle's default lifted)."""
    import mlx.core as mx

    from .generate import generate, prompt_tokens
    from .routing import choose_and_prefill

    ids = prompt_tokens(loaded.tokenizer, text)
    mx.synchronize()
    t0 = time.perf_counter()
    cache, feed, router_ms = None, ids, None
    if omitted is None:
        default, loaded.dense_by_default = loaded.dense_by_default, None  # routed is asked for: route
        try:
            choice, feed, cache = choose_and_prefill(loaded, text, ids)
        finally:
            loaded.dense_by_default = default
        omitted, router_ms = choice.omitted, choice.router_ms
    r = generate(loaded.model, loaded.tokenizer, feed, omitted, max_tokens=max_tokens, prompt_cache=cache)
    mx.synchronize()
    seconds = time.perf_counter() - t0
    stop = r.finish_reason == "stop"
    toks = r.token_ids[:-1] if stop else r.token_ids  # the stop token is not part of the answer
    return {"seconds": seconds, "token_ids": toks, "finished": stop, "omitted": sorted(int(b) for b in omitted),
            "router_ms": router_ms}


def measure_answers(loaded, configs: Dict[str, Optional[tuple]], prompts: Sequence[dict],
                    max_tokens: int = ANSWER_MAX_TOKENS, rounds: int = 1,
                    progress: Callable[[str], None] = print) -> dict:
    """Time every configuration's answer to every prompt (module doc); the result `pudding-mlx bench
    --answers` prints and writes. Stopped early (Ctrl-C, SIGTERM), it keeps the prompts answered by
    every configuration and says so in `failed`."""
    from .bench import Terminated, _on_sigterm, _raise_terminated
    from .load import backend

    if "dense" not in configs:
        raise PuddingError("the answer benchmark compares with dense: include it")
    if rounds < 1 or max_tokens < 1:
        raise PuddingError("--runs and --max-tokens must be at least 1")
    names = list(configs)
    # warm-up, untimed: every configuration answers the first prompt in full. A backend's first call at a new
    # shape compiles (on CUDA the first real answer once took 40 s where a short warm-up had run:
    # results/bench/answers_qwen_preset_cuda.json, dense on chat-00)
    for name in names:
        answer(loaded, prompts[0]["text"] if prompts else WARMUP_TEXT, configs[name], max_tokens)
    per: Dict[str, List[List[dict]]] = {n: [] for n in names}  # [prompt][round]
    failed: Dict[str, str] = {}
    previous = _on_sigterm(_raise_terminated)
    t_start = time.perf_counter()
    try:
        for r in range(rounds):
            for j, p in enumerate(prompts):
                shift = (r * len(prompts) + j) % len(names)
                got = {n: answer(loaded, p["text"], configs[n], max_tokens) for n in names[shift:] + names[:shift]}
                for n in names:
                    if r == 0:
                        per[n].append([])
                    per[n][j].append(got[n])
                progress(f"round {r + 1}/{rounds}, prompt {j + 1}/{len(prompts)} ({p['id']}): "
                         + ", ".join(f"{n} {got[n]['seconds']:.2f} s/{len(got[n]['token_ids'])} tok" for n in names))
    except Terminated:
        failed["interrupted"] = "stopped by SIGTERM (a time limit?); the prompts answered by every configuration are kept"
    except KeyboardInterrupt:
        failed["interrupted"] = "stopped with Ctrl-C; the prompts answered by every configuration are kept"
    finally:
        _on_sigterm(previous)
    done = len(per[names[0]])  # prompts every configuration answered (a prompt is stored only when all have)
    if done == 0:
        raise PuddingError("no prompt was answered by every configuration; nothing to compare")
    full_rounds = min(len(x) for x in per[names[0]])  # rounds that reached every prompt
    records = {}
    for n in names:
        records[n] = []
        for j in range(done):
            runs = per[n][j][:full_rounds]
            rec = dict(runs[0])
            rec["seconds"] = float(np.median([x["seconds"] for x in runs]))
            rec["seconds_rounds"] = [round(x["seconds"], 4) for x in runs]
            records[n].append(rec)
    rows = compare(records)
    default = "dense" if getattr(loaded, "dense_by_default", None) else ("routed" if "routed" in configs else "dense")
    result = {"backend": backend(), "model": str(loaded.path), "blocks": loaded.n_blocks, "max_tokens": max_tokens,
              "rounds": full_rounds, "prompts": [p["id"] for p in prompts[:done]],
              "default": default, "default_reason": getattr(loaded, "dense_by_default", None),
              "seconds": round(time.perf_counter() - t_start, 1),
              "configs": {n: (list(c) if c is not None else None) for n, c in configs.items()},
              "rows": rows, "failed": failed,
              "answers": {n: [{"id": p["id"], "seconds": round(r["seconds"], 4), "seconds_rounds": r["seconds_rounds"],
                               "tokens": len(r["token_ids"]), "finished": r["finished"], "omitted": r["omitted"],
                               "router_ms": r["router_ms"]}
                              for p, r in zip(prompts, records[n])] for n in names}}
    result["summary"] = summary(result)
    return result


