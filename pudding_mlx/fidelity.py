"""Fidelity to the dense model: the one owner of the fixed chat prompts and of how two replies are compared.
Shared by the MLX side (`pudding_mlx.generation_eval`) and the PyTorch side (`train.generation`); imports
neither mlx nor torch.

The prompts (`pudding_mlx/data/chat_prompts.json`): 24 everyday chat requests and 24 coding requests, written
for this project, not taken from any evaluation split. Each is answered greedily by the dense model and by
the configuration; per prompt: whether the two replies are token-identical, and how much of dense's reply
the other reproduces before the first difference. A reply equal to dense's is as good as dense's, whatever
the task, which is what a chat user sees change, with no grader in between.
"""

import json
from importlib import resources
from typing import List, Optional, Sequence

FIDELITY_MAX_TOKENS = 256


def chat_prompts() -> List[dict]:
    """The fixed chat prompt set: [{"id", "kind" ("chat" | "code"), "text"}]."""
    rows = json.loads(resources.files("pudding_mlx").joinpath("data/chat_prompts.json").read_text("utf-8"))
    return rows["prompts"]


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """The first position where two token sequences differ (a shorter one differs where it ends);
    None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(dense: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict:
    """How far `other`'s replies (token ids) follow dense's: identical share, first difference, and the
    share of dense's tokens reproduced before it."""
    same, firsts, kept = 0, [], []
    for d, o in zip(dense, other):
        f = first_difference(d, o)
        if f is None:
            same += 1
            kept.append(1.0)
        else:
            firsts.append(f)
            kept.append(f / max(1, len(d)))
    n = len(dense)
    return {"identical": 100.0 * same / n, "first_difference_median": sorted(firsts)[len(firsts) // 2] if firsts else None,
            "prefix_kept": 100.0 * sum(kept) / n, "per_prompt": kept}
