"""Generation measured on the MLX runtime: what skipping blocks does to the answers people get.

Two generative tasks, beside the multiple-choice ones of `pudding_mlx.evaluate`:

  humaneval   execution-scored code generation (`pudding_mlx.humaneval`: data, prompt, extraction and
              sandbox, shared with the PyTorch side). pass@1, greedy.
  fidelity    agreement with the dense model on a fixed set of everyday and coding chat prompts
              (`pudding_mlx/data/chat_prompts.json`, written for this project: no evaluation split).
              Each prompt is answered greedily by the dense model and by the configuration; per prompt:
              whether the two replies are token-identical, and where they first differ. This is what a
              chat user sees change, with no grader in between: a reply that equals dense is as good as
              dense, whatever the task.

Every answer records its generated tokens, whether it stopped on its own (a stop token) or hit the
token limit, and its wall time (a batch's time is shared by its answers: `batch` says how many).

Generation is mlx-lm's: one prompt at a time through `pudding_mlx.generate.generate` (token-identical
to mlx-lm), or `batch_size` prompts at a time through `mlx_lm.batch_generate` on the same `SkipView`
(greedy batched decoding equal to one-at-a-time in float32 on the CPU; on a GPU in bf16 a batch may
round differently, so near-ties can flip). Routed runs route each prompt (`pudding_mlx.routing.choose`,
the message alone, as `chat` routes a first turn) and generate each set's prompts together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from . import humaneval as he
from .errors import PuddingError
from .fidelity import FIDELITY_MAX_TOKENS, agreement, chat_prompts, first_difference  # noqa: F401 (re-exported)

GENERATIVE_TASKS = ("humaneval", "fidelity")

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class Reply:
    text: str
    token_ids: List[int]
    finished: bool          # stopped on a stop token (False: it hit the token limit)
    seconds: float          # wall time of the call that produced it (shared within a batch)
    batch: int              # how many prompts that call generated together
    omitted: List[int]
    candidate: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def to_json(self, with_ids: bool = False) -> dict:
        out = {"tokens": len(self.token_ids), "finished": self.finished, "seconds": round(self.seconds, 3),
               "batch": self.batch, "omitted": self.omitted, "candidate": self.candidate, "text": self.text}
        if with_ids:
            out["token_ids"] = self.token_ids
        return out


def _generate_group(loaded, ids: List[List[int]], omitted, max_tokens: int, batch_size: int,
                    on_done: Callable[[int], None]) -> List[tuple]:
    """(token ids, finished, seconds, batch) for each prompt, with blocks `omitted` skipped."""
    from mlx_lm.generate import batch_generate

    from .generate import generate
    from .skip import SkipView

    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        t0 = time.perf_counter()
        if len(chunk) == 1:
            r = generate(loaded.model, loaded.tokenizer, chunk[0], omitted, max_tokens=max_tokens)
            stop = r.finish_reason == "stop"
            toks = r.token_ids[:-1] if stop and r.token_ids else r.token_ids  # the stop token is not text
            got = [(toks, stop)]
        else:
            r = batch_generate(SkipView(loaded.model, omitted), loaded.tokenizer, chunk, max_tokens=max_tokens,
                               return_token_ids=True)
            # batch_generate drops the stop token: fewer than max_tokens means it stopped on its own
            got = [(list(map(int, t)), len(t) < max_tokens) for t in r.token_ids]
        seconds = time.perf_counter() - t0
        out += [(toks, stop, seconds, len(chunk)) for toks, stop in got]
        on_done(len(chunk))
    return out


def generate_replies(loaded, messages: Sequence[str], omitted: Optional[Sequence[int]] = None,
                     max_tokens: int = he.MAX_TOKENS, batch_size: int = 8, phase: str = "generate",
                     progress: Optional[Progress] = None) -> List[Reply]:
    """Greedy replies to `messages` (each one user message through the chat template). `omitted` None:
    each message routed by the bundle's router; otherwise that fixed set (() = dense)."""
    from .generate import prompt_tokens
    from .routing import choose

    if max_tokens < 1:
        raise PuddingError("--max-tokens must be at least 1")
    report = progress or (lambda phase, done, total: None)
    ids = [prompt_tokens(loaded.tokenizer, m) for m in messages]
    if omitted is None:
        choices = []
        for i, m in enumerate(messages):
            choices.append(choose(loaded, m))
            report(f"{phase}: route", i + 1, len(messages))
        sets = [tuple(c.omitted) for c in choices]
        candidates = [c.candidate for c in choices]
    else:
        sets, candidates = [tuple(sorted(omitted))] * len(messages), [None] * len(messages)
    replies: List[Optional[Reply]] = [None] * len(messages)
    done = [0]

    def on_done(n):
        done[0] += n
        report(phase, done[0], len(messages))

    report(phase, 0, len(messages))
    for s in dict.fromkeys(sets):  # each set's prompts together, in first-seen order
        rows = [i for i, x in enumerate(sets) if x == s]
        for i, (toks, stop, seconds, batch) in zip(rows, _generate_group(loaded, [ids[i] for i in rows], s,
                                                                           max_tokens, batch_size, on_done)):
            replies[i] = Reply(loaded.tokenizer.decode(toks), toks, stop, seconds, batch, list(s), candidates[i])
    return replies


def _answers(replies: Sequence[Reply]) -> dict:
    """What every generative task reports about its answers: tokens, stops, time."""
    n = len(replies)
    return {"tokens_mean": sum(len(r.token_ids) for r in replies) / n,
            "finished": sum(r.finished for r in replies), "hit_limit": sum(not r.finished for r in replies)}


def humaneval(loaded, problems: Sequence[he.Problem], omitted: Optional[Sequence[int]] = None,
              max_tokens: int = he.MAX_TOKENS, batch_size: int = 8, workers: Optional[int] = None,
              progress: Optional[Progress] = None) -> dict:
    """pass@1 of the replies to `problems`, with one record per problem."""
    report = progress or (lambda phase, done, total: None)
    replies = generate_replies(loaded, [p.message for p in problems], omitted, max_tokens, batch_size,
                               "humaneval", progress)
    outcomes = he.check_all(problems, [r.text for r in replies], workers=workers,
                            progress=lambda d, t: report("run tests", d, t))
    records = [dict(task_id=p.task_id, **o.to_json(), **r.to_json()) for p, o, r in zip(problems, outcomes, replies)]
    return {"metric": "pass@1", "pass@1": he.pass_at_1(outcomes), "n": len(problems),
            "outcomes": he.summary(outcomes), "max_tokens": max_tokens, **_answers(replies), "records": records}


def fidelity(loaded, prompts: Sequence[dict], omitted: Optional[Sequence[int]] = None,
             max_tokens: int = FIDELITY_MAX_TOKENS, batch_size: int = 8, progress: Optional[Progress] = None) -> dict:
    """Agreement with dense on `prompts` (dense replies generated in the same run)."""
    messages = [p["text"] for p in prompts]
    dense = generate_replies(loaded, messages, (), max_tokens, batch_size, "fidelity: dense", progress)
    mine = dense if omitted is not None and not list(omitted) else \
        generate_replies(loaded, messages, omitted, max_tokens, batch_size, "fidelity", progress)
    agree = agreement([d.token_ids for d in dense], [m.token_ids for m in mine])
    records = [dict(id=p["id"], kind=p["kind"], prefix_kept=k, **r.to_json(), dense_tokens=len(d.token_ids),
                    dense_finished=d.finished, dense_seconds=round(d.seconds, 3))
               for p, k, r, d in zip(prompts, agree.pop("per_prompt"), mine, dense)]
    by_kind = {}
    for kind in sorted({p["kind"] for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if p["kind"] == kind]
        sub = agreement([dense[i].token_ids for i in rows], [mine[i].token_ids for i in rows])
        sub.pop("per_prompt")
        by_kind[kind] = sub
    return {"metric": "identical", **agree, "n": len(prompts), "by_kind": by_kind, "max_tokens": max_tokens,
            **_answers(mine), "dense_tokens_mean": sum(len(d.token_ids) for d in dense) / len(dense),
            "records": records}
