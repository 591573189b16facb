"""The routing decision: which blocks to omit for one prompt. The user's override (--dense or
--omit), else the bundle's default when it is dense ("dense-default": a bundle whose measured quality
says so, e.g. the Qwen coder preset; --routed lifts it at load), else the bundle's router, else none
("no-router": dense). With --max-loss the bundle's loss predictor is the router (`adaptive_router`,
set at load): "adaptive", the depth chosen per prompt under the budget, with the predicted losses and
the reason. Every command decides here."""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .errors import PuddingError
from .omission import check_omitted


@dataclass
class Choice:
    omitted: tuple
    how: str  # "dense" | "omit" | "routed" | "no-router" | "dense-default" | "adaptive"
    candidate: Optional[int] = None  # adaptive: the index into `sets` (the predictor's)
    scores: Optional[List[float]] = None  # the router's, only when routed; adaptive: the predicted losses
    router_ms: Optional[float] = None
    max_loss: Optional[float] = None  # adaptive only: the budget, every set's, and why this one ran
    sets: Optional[List[tuple]] = None
    reason: Optional[str] = None

    @property
    def k(self) -> int:
        """The depth chosen: blocks skipped."""
        return len(self.omitted)

    def to_json(self) -> dict:
        out = {"omitted": list(self.omitted), "routing": self.how, "candidate": self.candidate,
               "scores": self.scores, "router_ms": self.router_ms, "k": self.k}
        if self.how == "adaptive":
            out.update(max_loss=json_number(self.max_loss), predicted_losses=self.scores,
                       sets=[list(s) for s in self.sets], reason=self.reason)
        return out


def json_number(x: Optional[float]):
    """A float for JSON: +-inf as the strings "inf" / "-inf" (JSON has no infinity)."""
    return x if x is None or math.isfinite(x) else ("inf" if x > 0 else "-inf")


def candidate_sets(loaded) -> List[tuple]:
    """The sets the router's outputs index: the loss predictor's under --max-loss, else the bundle's
    candidates."""
    router = loaded.router
    if getattr(router, "kind", None) == "adaptive":
        return list(router.sets)
    return [tuple(c.omitted) for c in loaded.manifest.candidates]


def routed_choice(loaded, index: int, scores: Sequence[float], ms: float) -> Choice:
    """The Choice for the router's pick `index` (with its scores, or predicted losses)."""
    router, scores = loaded.router, [float(s) for s in scores]
    sets = candidate_sets(loaded)
    if getattr(router, "kind", None) == "adaptive":
        return Choice(tuple(sets[index]), "adaptive", index, router.losses(scores), ms, router.max_loss, sets,
                      router.reason(scores, index))
    return Choice(tuple(sets[index]), "routed", index, scores, ms)


def depth_line(choice: Choice, n_blocks: int) -> str:
    """What an adaptive choice says on a footer or status line: the depth, the set, the budget's reason."""
    what = "dense" if not choice.omitted else f"k = {choice.k}, omitted {list(choice.omitted)}"
    return (f"adaptive depth: {what} ({n_blocks - choice.k}/{n_blocks} blocks) under --max-loss "
            f"{choice.max_loss:g}: {choice.reason}")


def best_index(scores: Sequence[float]) -> int:
    """The highest score's index: the first maximum on ties, like argmax; NaN never wins."""
    return max(range(len(scores)), key=lambda i: (not math.isnan(scores[i]), scores[i], -i))


def check_override(dense: bool, omit: Optional[Sequence[int]], routed: bool = False,
                   max_loss: Optional[float] = None) -> None:
    """--dense, --omit, --routed and --max-loss are answers to one question."""
    if dense and omit is not None:
        raise PuddingError("--dense and --omit contradict each other; give one")
    if routed and (dense or omit is not None):
        raise PuddingError(f"--routed and {'--dense' if dense else '--omit'} contradict each other; give one")
    if max_loss is not None:
        from .adaptive_router import check_max_loss

        check_max_loss(max_loss)
        if dense or omit is not None:
            raise PuddingError(f"--max-loss and {'--dense' if dense else '--omit'} contradict each other; give one")


def fixed_choice(n_blocks: int, has_router: bool, dense: bool = False,
                 omit: Optional[Sequence[int]] = None, dense_by_default: Optional[str] = None) -> Optional[Choice]:
    """The set when it does not depend on the prompt: --dense, --omit (checked against the model),
    dense for a model without a router or for a bundle whose default is dense (`dense_by_default`, its
    reason: `load.Loaded.dense_by_default`). None: the router must score each prompt (`route`)."""
    check_override(dense, omit)
    if dense:
        return Choice((), "dense")
    if omit is not None:
        return Choice(check_omitted(omit, n_blocks, "--omit"), "omit")
    if not has_router:
        return Choice((), "no-router")
    if dense_by_default:
        return Choice((), "dense-default")
    return None


def default_note(loaded) -> Optional[str]:
    """What a command says when the bundle's default (dense) decides: the reason and the way out."""
    reason = getattr(loaded, "dense_by_default", None)
    return f"running dense by default: {reason} (--routed to route)" if reason else None


def route(loaded, text: str) -> Choice:
    """Score every candidate set with the bundle's router and take the best."""
    if loaded.router is None:
        raise PuddingError(f"{loaded.path}: this model has no router; use --dense or --omit")
    index, scores, ms = loaded.router.best(text)
    return routed_choice(loaded, index, scores, ms)


def choose(loaded, text: str, dense: bool = False, omit: Optional[Sequence[int]] = None) -> Choice:
    """This prompt's set: `fixed_choice`, else the router's pick for `text`."""
    return fixed_choice(loaded.n_blocks, loaded.router is not None, dense, omit,
                        getattr(loaded, "dense_by_default", None)) or route(loaded, text)


def choose_and_prefill(loaded, text: str, ids, dense: bool = False, omit: Optional[Sequence[int]] = None,
                       lossless: bool = False):
    """(Choice, ids to feed generation, prompt cache or None). With a hidden-state router on a
    model whose forward can continue from a block's output, routing is free: blocks 0..after run
    once on the real prompt `ids`, route, and the chosen set continues from there
    (`hidden_router.routed_prefill`); generation then gets the last prompt token and the filled
    cache. Otherwise the usual `choose` on `text`, the whole prompt and no cache."""
    from .hidden_router import CONTINUABLE, routed_prefill

    if (dense or omit is not None or lossless or not reads_hidden_state(loaded.router)
            or getattr(loaded, "dense_by_default", None)
            or getattr(loaded.model, "model_type", None) not in CONTINUABLE or len(ids) < 2):
        return choose(loaded, text, dense, omit), list(ids), None
    candidate, scores, ms, omitted, cache = routed_prefill(loaded.model, loaded.router, list(ids),
                                                           candidate_sets(loaded))
    return routed_choice(loaded, candidate, scores, ms), list(ids)[-1:], cache


def reads_hidden_state(router) -> bool:
    """A router that reads the LLM's own state after block `after` (the hidden-state router, the loss
    predictor): it can route inside the prompt's prefill (`hidden_router.routed_prefill`)."""
    return getattr(router, "kind", None) in ("hidden", "adaptive")
