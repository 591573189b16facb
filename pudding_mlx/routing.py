"""Which blocks to omit for one prompt: the user's override, else the bundle's router, else none."""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .errors import PuddingError
from .skip import check_omitted


@dataclass
class Choice:
    omitted: tuple
    how: str  # "dense" | "omit" | "routed" | "no-router"
    candidate: Optional[int] = None
    scores: List[float] = field(default_factory=list)
    router_ms: Optional[float] = None

    def to_json(self) -> dict:
        return {"omitted": list(self.omitted), "routing": self.how, "candidate": self.candidate,
                "scores": self.scores, "router_ms": self.router_ms}


def parse_omit(text: str) -> List[int]:
    """'3,5,9' -> [3, 5, 9]; '' -> []."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise PuddingError(f"--omit {text!r}: give comma-separated 0-based block indices, e.g. --omit 3,5,9")


def route(loaded, text: str) -> Choice:
    """Score every candidate set with the bundle's router and take the best."""
    if loaded.router is None:
        raise PuddingError(f"{loaded.path}: this model has no router; use --dense or --omit")
    index, scores, ms = loaded.router.best(text)
    omitted = loaded.manifest.candidates[index].omitted
    return Choice(tuple(omitted), "routed", index, [float(s) for s in scores], ms)


def choose(loaded, text: str, dense: bool = False, omit: Optional[Sequence[int]] = None) -> Choice:
    if dense and omit is not None:
        raise PuddingError("--dense and --omit contradict each other; give one")
    if dense:
        return Choice((), "dense")
    if omit is not None:
        return Choice(check_omitted(omit, loaded.n_blocks, "--omit"), "omit")
    if loaded.router is not None:
        return route(loaded, text)
    return Choice((), "no-router")


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
            or getattr(loaded.model, "model_type", None) not in CONTINUABLE or len(ids) < 2):
        return choose(loaded, text, dense, omit), list(ids), None
    sets = [c.omitted for c in loaded.manifest.candidates]
    candidate, scores, ms, omitted, cache = routed_prefill(loaded.model, router, list(ids), sets)
    return Choice(tuple(omitted), "routed", candidate, [float(x) for x in scores], ms), list(ids)[-1:], cache
