"""Adaptive depth at runtime (issue #23): the bundle's loss predictor as a router, under a budget.

With `--max-loss B` the bundle's loss predictor (`predictor/`, `pudding_mlx.adaptive` defines the
folder) stands where the router stands: it reads the LLM's residual stream after block `after`
(pooled as the hidden-state router pools it, `hidden_router.pool`), predicts each of its sets' quality
loss against dense (dense's is 0), and `adaptive.choose` picks the set with the most blocks skipped
whose prediction is <= B (dense when none fits). So it has the hidden-state router's interface
(`after`, `max_tokens`, `scores_of`, `decide`, `best_ids`, `best`) and rides the same free routed
prefill (`hidden_router.routed_prefill`: blocks 0..after run once, the chosen set continues, no extra
pass); its "scores" are predicted losses, and its `fallback` is None (no set is guessed before the
decision).

Off unless the user gives a budget: no bundle runs adaptively by default (the predictor trained on
multiple-choice margins is not safe for code, docs/adaptive.md).
"""

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

from .adaptive import choose, read_predictor, reason
from .errors import PuddingError
from .hidden_router import block_output, pool

KIND = "adaptive"


def check_max_loss(max_loss) -> float:
    """A budget is a number (inf allowed: the largest k everywhere; -inf: dense); NaN is not."""
    if max_loss is None or isinstance(max_loss, bool) or not isinstance(max_loss, (int, float)) or math.isnan(max_loss):
        raise PuddingError(f"--max-loss {max_loss!r}: give a number (the predicted loss a set may cost against "
                           "dense; inf: always the most blocks skipped)")
    return float(max_loss)


class AdaptiveRouter:
    """The loss predictor on the LLM's own hidden state, choosing under `max_loss` (module doc)."""

    kind = KIND
    fallback = None  # the routed prefill builds no guess before the decision

    def __init__(self, model, tokenizer, predictor, max_loss: float, path: Optional[Path] = None):
        self.model, self.tokenizer, self.path, self.predictor = model, tokenizer, path, predictor
        self.after, self.pooling, self.max_tokens = predictor.after, predictor.pooling, predictor.max_tokens
        self.sets = [tuple(sorted(s)) for s in predictor.sets]
        self.sizes = [len(s) for s in self.sets]
        self.weight = mx.array(predictor.weight)
        self.bias = mx.array(predictor.bias)
        self.max_loss = check_max_loss(max_loss)

    @property
    def num_outputs(self) -> int:
        return len(self.sets)

    @contextmanager
    def budget(self, max_loss: Optional[float]):
        """Decide under `max_loss` for the duration (a server request's own budget); None: as set."""
        before = self.max_loss
        self.max_loss = before if max_loss is None else check_max_loss(max_loss)
        try:
            yield self
        finally:
            self.max_loss = before

    def prompt_ids(self, text: str) -> List[int]:
        from .generate import prompt_tokens

        return prompt_tokens(self.tokenizer, text)[-self.max_tokens:]

    def scores_of(self, h: mx.array) -> mx.array:
        """The predicted losses of every set for block `after`'s output h [1, T, H]."""
        return mx.addmm(self.bias[:, None], self.weight, pool(h, self.pooling)[:, None])[:, 0]

    def losses(self, values: Sequence[float]) -> List[float]:
        """Predicted losses as the decision reads them: dense's is 0 by definition."""
        return [0.0 if k == 0 else float(v) for v, k in zip(values, self.sizes)]

    def decide(self, values: Sequence[float]) -> int:
        return choose(self.losses(values), self.sizes, self.max_loss)

    def reason(self, values: Sequence[float], chosen: int) -> str:
        return reason(self.losses(values), self.sizes, self.max_loss, chosen)

    def best_ids(self, ids: Sequence[int]) -> Tuple[int, List[float], float]:
        """(chosen set, predicted losses, ms) with a pass of blocks 0..after of its own."""
        start = time.perf_counter()
        values = self.scores_of(block_output(self.model, mx.array([list(ids)[-self.max_tokens:]]), self.after)).tolist()
        return self.decide(values), self.losses(values), (time.perf_counter() - start) * 1000.0

    def best(self, text: str) -> Tuple[int, List[float], float]:
        return self.best_ids(self.prompt_ids(text))

    def __repr__(self) -> str:
        return (f"AdaptiveRouter(path={str(self.path)!r}, after={self.after}, pooling={self.pooling!r}, "
                f"sets={len(self.sets)}, max_loss={self.max_loss})")


def check_predictor(predictor, where, candidates: Sequence[Sequence[int]], n_blocks: int) -> None:
    """The bundle's rules for its predictor (`where` names its folder): every set it predicts for is dense
    or one of the bundle's candidate sets, and its `after` is a block the routed prefill can stop at
    (not the last one; no set omits it or a block before it: `read_predictor` checks that part)."""
    cands = {tuple(sorted(c)) for c in candidates}
    for m, s in enumerate(predictor.sets):
        if s and tuple(sorted(s)) not in cands:
            raise PuddingError(f"{where}: set {m} {sorted(s)} is not one of the bundle's candidate sets (nor dense); "
                               "build the bundle with the candidates the predictor was trained on")
        if any(b >= n_blocks for b in s):
            raise PuddingError(f"{where}: set {m} {sorted(s)} names a block past the model's {n_blocks}")
    if not 0 <= predictor.after < n_blocks - 1:
        raise PuddingError(f"{where}: field 'after' is {predictor.after}; the routed prefill stops at a block in "
                           f"0..{n_blocks - 2} of this model")


def load_adaptive_router(folder, model, tokenizer, candidates, max_loss: float) -> AdaptiveRouter:
    """Read the predictor folder, check it against the model and the bundle's candidates, and make the
    router that decides under `max_loss`."""
    from .skip import decoder

    folder = Path(folder)
    layers = decoder(model).layers
    predictor = read_predictor(folder, hidden_size=model.args.hidden_size)
    check_predictor(predictor, folder / "predictor.json", candidates, len(layers))
    return AdaptiveRouter(model, tokenizer, predictor, max_loss, folder)
