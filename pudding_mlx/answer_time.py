"""Time to a complete answer: speed as a user feels it (`pudding-mlx bench MODEL --answers`).

Tokens per second cannot show what a chat user waits for. A pruned model that follows an instruction
less well may say more (a test line, a paragraph of explanation) and finish later than dense, though
each of its tokens is cheaper. So this times whole answers: each fixed chat prompt
(`pudding_mlx.fidelity.chat_prompts`, written for this project, no evaluation split; chat and code
requests interleaved so that any first N of them hold both kinds) is answered greedily, one request at
a time as `generate` and `chat` answer, until the model stops on its own or reaches `max_tokens`, by

    dense        every block
    omit a,b,c   a fixed omission set (one row per set)
    routed       the bundle's router picks the set for this prompt (the routing is timed: a separate
                 router's call, or a hidden-state router's routed prefill, as `generate` runs it)

Per answer: wall seconds from the prompt's token ids to the last token (routing, prefill, decoding),
the tokens generated, whether it stopped on its own. Every configuration answers a prompt before the
next prompt, in an order rotated per prompt, so drift hits them alike; with `rounds` > 1 the whole set
is answered again and each prompt's time is its median over rounds. Each configuration is compared
with dense on the same prompts:

    answer_speedup    median over prompts of dense's time / this configuration's time, with a bootstrap
                      95% interval (prompts resampled); above 1: the user has the answer sooner
    total_speedup     all prompts' dense time / all prompts' time (long answers weigh more)
    token_speedup     tokens per second / dense's tokens per second (what every cell of `bench` reports)
    identical         share of answers token-identical to dense's (the same greedy run)

`summary` states a speedup above or below 1 only when its whole interval is.

This module is the measure's arithmetic and presentation, free of MLX (the report on the PyTorch side reads it);
`pudding_mlx.answer_bench` times the answers.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import PuddingError
from .fidelity import FIDELITY_MAX_TOKENS, chat_prompts, first_difference

ANSWER_MAX_TOKENS = FIDELITY_MAX_TOKENS


def answer_prompts(limit: Optional[int] = None) -> List[dict]:
    """The fixed chat prompts, chat and code alternating (the first N hold both kinds)."""
    rows = chat_prompts()
    kinds = [[r for r in rows if r["kind"] == k] for k in dict.fromkeys(r["kind"] for r in rows)]
    mixed = [r for group in zip(*kinds) for r in group]
    mixed += [r for group in kinds for r in group[len(mixed) // len(kinds):]]  # unequal kinds: the rest
    if limit is not None:
        if limit < 1:
            raise PuddingError("--limit must be at least 1")
        mixed = mixed[:limit]
    return mixed


def _boot(values_fn, n: int, n_boot: int = 2000, seed: int = 0) -> List[float]:
    """Bootstrap 95% interval of a statistic over n prompts (`values_fn(indices)`)."""
    rng = np.random.default_rng(seed)
    stats = [values_fn(rng.integers(0, n, n)) for _ in range(n_boot)]
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def compare(records: Dict[str, List[dict]]) -> Dict[str, dict]:
    """Per configuration, against "dense" on the same prompts (module doc)."""
    dense = records["dense"]
    t_dense = np.array([r["seconds"] for r in dense])
    tok_dense = np.array([_tokens(r) for r in dense])
    rows = {}
    for name, recs in records.items():
        t = np.array([r["seconds"] for r in recs])
        tok = np.array([_tokens(r) for r in recs])
        n = len(recs)
        ratio = t_dense / t
        tps = tok.sum() / t.sum()
        tps_dense = tok_dense.sum() / t_dense.sum()
        same = [first_difference(d["token_ids"], r["token_ids"]) is None for d, r in zip(dense, recs)
                if "token_ids" in d and "token_ids" in r]
        sets = [tuple(r["omitted"]) for r in recs]
        rows[name] = {
            "n": n,
            "seconds_median": float(np.median(t)), "seconds_total": float(t.sum()),
            "answer_speedup": float(np.median(ratio)),
            "answer_speedup_ci95": _boot(lambda i: np.median(ratio[i]), n),
            "total_speedup": float(t_dense.sum() / t.sum()),
            "total_speedup_ci95": _boot(lambda i: t_dense[i].sum() / t[i].sum(), n),
            "tokens_per_s": float(tps), "token_speedup": float(tps / tps_dense),
            "token_speedup_ci95": _boot(lambda i: (tok[i].sum() / t[i].sum()) / (tok_dense[i].sum() / t_dense[i].sum()), n),
            "tokens_mean": float(tok.mean()), "tokens_vs_dense": float(tok.sum() / max(1, tok_dense.sum())),
            "hit_limit": int(sum(not r["finished"] for r in recs)),
            "identical": 100.0 * sum(same) / len(same) if same else None,
            "sets": {",".join(map(str, s)) or "dense": c for s, c in _counts(sets).items()},
        }
    return rows


def _tokens(record: dict) -> int:
    return len(record["token_ids"]) if "token_ids" in record else record["tokens"]


def rescore(result: dict, drop: Sequence[str] = ()) -> Dict[str, dict]:
    """The comparison of a written result recomputed from its stored answers, without the prompts `drop`
    (e.g. one whose time holds a one-off outlier). Token identity is not stored: `identical` is None."""
    keep = [i for i, pid in enumerate(result["prompts"]) if pid not in set(drop)]
    if not keep:
        raise PuddingError("every prompt was dropped; nothing to compare")
    return compare({n: [answers[i] for i in keep] for n, answers in result["answers"].items()})


def _counts(items):
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


MIN_CLAIM_PROMPTS = 8  # fewer paired prompts than this: the interval is printed, no verdict is drawn


def summary(result: dict) -> List[str]:
    """One line per configuration, claiming only what the intervals support."""
    lines = []
    for name, row in result["rows"].items():
        if name == "dense":
            continue
        lines.append(f"{name}: " + row_summary(row))
    return lines


def row_summary(row: dict) -> str:
    lo, hi = row["answer_speedup_ci95"]
    verdict = (f"too few prompts for a verdict ({row['n']} < {MIN_CLAIM_PROMPTS})" if row["n"] < MIN_CLAIM_PROMPTS
               else "answers sooner than dense" if lo > 1 else "answers later than dense" if hi < 1
               else "no difference in time to answer from dense shown")
    same = "" if row["identical"] is None else f"; {row['identical']:.0f}% of answers identical to dense"
    return (f"time to answer {row['answer_speedup']:.3f}x dense's speed [{lo:.3f}, {hi:.3f}] ({verdict}); "
            f"per token {row['token_speedup']:.3f}x; {row['tokens_vs_dense']:.2f}x dense's tokens{same}")


def plot(result: dict, path) -> None:
    """Per configuration: time-to-answer speedup (median, 95% interval) beside the per-token speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import os

    rows = result["rows"]
    names = [n for n in rows if n != "dense"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.6))
    y = np.arange(len(names))
    med = [rows[n]["answer_speedup"] for n in names]
    err = np.array([[m - rows[n]["answer_speedup_ci95"][0], rows[n]["answer_speedup_ci95"][1] - m]
                    for n, m in zip(names, med)]).T
    ax.errorbar(med, y, xerr=err, fmt="o", color="C0", label="time to a complete answer (median, 95% CI)")
    ax.plot([rows[n]["token_speedup"] for n in names], y, "x", color="C3", label="per token")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yticks(y, names)
    ax.set_xlabel("speedup over dense (above 1: faster)")
    ax.set_title(f"{len(result['prompts'])} chat and code prompts, greedy, {result['max_tokens']} tokens at most, "
                 f"{result['backend']}", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = f"{path}.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
