"""The routing decision: which blocks to omit for one prompt. The user's override (--dense or
--omit), else the bundle's default when it is dense ("dense-default": a bundle whose measured quality
says so, e.g. the Qwen coder preset; --routed lifts it at load), else the bundle's router, else none
("no-router": dense). Every command decides here."""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .errors import PuddingError
from .omission import check_omitted


@dataclass
class Choice:
    omitted: tuple
    how: str  # "dense" | "omit" | "routed" | "no-router" | "dense-default"
    candidate: Optional[int] = None
    scores: Optional[List[float]] = None  # the router's, only when routed
    router_ms: Optional[float] = None

    def to_json(self) -> dict:
        return {"omitted": list(self.omitted), "routing": self.how, "candidate": self.candidate,
                "scores": self.scores, "router_ms": self.router_ms}


def best_index(scores: Sequence[float]) -> int:
    """The highest score's index: the first maximum on ties, like argmax; NaN never wins."""
    return max(range(len(scores)), key=lambda i: (not math.isnan(scores[i]), scores[i], -i))


def check_override(dense: bool, omit: Optional[Sequence[int]], routed: bool = False) -> None:
    """--dense, --omit and --routed are answers to one question."""
    if dense and omit is not None:
        raise PuddingError("--dense and --omit contradict each other; give one")
    if routed and (dense or omit is not None):
        raise PuddingError(f"--routed and {'--dense' if dense else '--omit'} contradict each other; give one")


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
    omitted = loaded.manifest.candidates[index].omitted
    return Choice(tuple(omitted), "routed", index, [float(s) for s in scores], ms)


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
    from .hidden_router import CONTINUABLE, HiddenRouter, routed_prefill

    router = loaded.router
    if (dense or omit is not None or lossless or not isinstance(router, HiddenRouter)
            or getattr(loaded, "dense_by_default", None)
            or getattr(loaded.model, "model_type", None) not in CONTINUABLE or len(ids) < 2):
        return choose(loaded, text, dense, omit), list(ids), None
    sets = [c.omitted for c in loaded.manifest.candidates]
    candidate, scores, ms, omitted, cache = routed_prefill(loaded.model, router, list(ids), sets)
    return Choice(tuple(omitted), "routed", candidate, [float(x) for x in scores], ms), list(ids)[-1:], cache
