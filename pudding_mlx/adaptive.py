"""Adaptive depth (issue #23): per prompt, the fastest candidate whose predicted quality loss against
dense fits the user's budget. The one owner of the decision rule and of the loss predictor's file.
numpy only (no MLX, no torch): the training side and the runtime share it.

The decision rule. Candidates are omission sets of several sizes k (blocks skipped), dense (k = 0)
among them; a predictor gives each a predicted loss against dense for this prompt. With budget
`max_loss`:

    allowed   dense (k = 0: its loss is 0 by definition, whatever the predictor says), and every
              candidate whose predicted loss <= max_loss (equal is allowed; NaN never is)
    chosen    the allowed candidate with the largest k; among those of that k, the lower predicted
              loss; then the lower index

So a budget of +inf picks the largest k everywhere, and a budget below every prediction (0 or
negative included) runs dense, unless some candidate predicts a loss at or below it.

The loss predictor: a ridge head on the hidden-state router's features (the LLM's residual stream
after block `after`, mean- and/or last-token pooled, `hidden_router` and `train.features`),
predicting one loss per candidate. Its folder:

    predictor/
      predictor.json     {"format": "pudding-mlx-loss-predictor", "schema_version": 1, "after": r,
                          "pooling": "mean" | "last" | "mean+last", "max_tokens": n,
                          "sets": [[], [...], ...]  (dense is the empty set),
                          "loss": what the loss is (its unit), "default_max_loss": b,
                          "ridge": a, "trained_on": {...}}
      predictor.safetensors   weight [M, hidden x pools], bias [M] (float32): standardisation and
                              the PCA basis folded in, applied to the raw pooled state (as the
                              hidden-state router's head.safetensors)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .errors import PuddingError, first_line
from .jsonio import field_checker, read_json

FORMAT = "pudding-mlx-loss-predictor"
SETTINGS_FILE = "predictor.json"
WEIGHTS_FILE = "predictor.safetensors"
POOLINGS = ("mean", "last", "mean+last")
FIX = "write it again (`pudding-mlx train adaptive-report --predictor-out`)"


# -- the decision rule ------------------------------------------------------------------------------


def _sizes(sizes: Sequence[int], m: int) -> np.ndarray:
    sizes = np.asarray(sizes)
    if sizes.shape != (m,) or (m and (sizes.dtype.kind not in "iu" or sizes.min() < 0)):
        raise PuddingError(f"candidate sizes {sizes.tolist()}: give {m} block counts >= 0, one per candidate")
    if not (sizes == 0).any():
        raise PuddingError("the candidates have no dense one (size 0); dense is the choice when nothing fits")
    return sizes


def choose_many(predicted_loss, sizes: Sequence[int], max_loss) -> np.ndarray:
    """The decision rule (module doc) for N prompts: predicted_loss [N, M], sizes [M], max_loss a
    number or [N]. Returns [N] candidate indices."""
    pred = np.asarray(predicted_loss, dtype=np.float64)
    if pred.ndim != 2:
        raise PuddingError(f"predicted losses of shape {pred.shape}: give [prompts, candidates]")
    sizes = _sizes(sizes, pred.shape[1])
    budget = np.broadcast_to(np.asarray(max_loss, dtype=np.float64), (len(pred),))[:, None]
    if np.isnan(budget).any():
        raise PuddingError("the loss budget is NaN; give a number (inf: the largest k everywhere)")
    dense = sizes[None, :] == 0
    loss = np.where(dense, 0.0, pred)  # dense's loss is 0 by definition
    allowed = dense | (loss <= budget)  # NaN <= b is False: a NaN prediction is never allowed
    biggest = np.where(allowed, sizes[None, :], -1).max(1, keepdims=True)
    # among the allowed of the largest k: the lowest loss, then the lowest index (nanargmin's first)
    return np.nanargmin(np.where(allowed & (sizes[None, :] == biggest), loss, np.nan), axis=1)


def choose(predicted_loss: Sequence[float], sizes: Sequence[int], max_loss: float) -> int:
    """The decision rule (module doc) for one prompt: the chosen candidate's index."""
    return int(choose_many(np.asarray(predicted_loss, dtype=np.float64)[None, :], sizes, max_loss)[0])


def reason(predicted_loss: Sequence[float], sizes: Sequence[int], max_loss: float, chosen: int) -> str:
    """Why `chosen` ran, in one line (for route, info and the status line): its predicted loss against
    the budget, and the best prediction of the next larger k that did not fit."""
    pred, sizes = np.asarray(predicted_loss, dtype=np.float64), np.asarray(sizes)
    k = int(sizes[chosen])
    said = "dense" if k == 0 else f"k = {k}, predicted loss {pred[chosen]:.3g} <= budget {max_loss:.3g}"
    larger = sorted({int(s) for s in sizes if s > k})
    if not larger:
        return said + ("" if k == 0 else " (the largest k)")
    nxt = larger[0]
    best = np.nanmin(np.where(sizes == nxt, pred, np.nan)) if (~np.isnan(pred[sizes == nxt])).any() else math.nan
    return f"{said}; k = {nxt} predicted {best:.3g} > {max_loss:.3g}"


# -- the loss predictor -----------------------------------------------------------------------------


@dataclass
class LossPredictor:
    """One linear head per candidate on the raw pooled hidden state (module doc)."""

    sets: List[List[int]]
    after: int
    pooling: str
    max_tokens: int
    weight: np.ndarray  # [M, hidden x pools] float32
    bias: np.ndarray  # [M] float32
    default_max_loss: float
    settings: dict = field(default_factory=dict)  # loss, ridge, trained_on, ...: carried as written

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(s) for s in self.sets], dtype=np.int64)

    def predict(self, pooled) -> np.ndarray:
        """[N, M] predicted losses of pooled states [N, hidden x pools] (dense's column is 0)."""
        pooled = np.asarray(pooled, dtype=np.float64)
        if pooled.ndim != 2 or pooled.shape[1] != self.weight.shape[1]:
            raise PuddingError(f"pooled hidden states of shape {pooled.shape}: the predictor reads "
                               f"[prompts, {self.weight.shape[1]}] ({self.pooling} after block {self.after})")
        out = pooled @ self.weight.astype(np.float64).T + self.bias.astype(np.float64)
        out[:, self.sizes == 0] = 0.0
        return out

    def choose(self, pooled, max_loss: Optional[float] = None) -> np.ndarray:
        """[N] chosen candidates under `max_loss` (default: the predictor's documented default)."""
        return choose_many(self.predict(pooled), self.sizes, self.default_max_loss if max_loss is None else max_loss)


def write_predictor(folder, predictor: LossPredictor, force: bool = False) -> Path:
    """Write FOLDER (module doc) atomically: it appears whole or not at all."""
    from safetensors.numpy import save_file

    from .atomic import building, write_json

    settings = {**predictor.settings, "format": FORMAT, "schema_version": 1, "after": int(predictor.after),
                "pooling": predictor.pooling, "max_tokens": int(predictor.max_tokens),
                "sets": [sorted(int(b) for b in s) for s in predictor.sets],
                "default_max_loss": float(predictor.default_max_loss)}
    # C order: safetensors' numpy writer stores the buffer as it lies in memory (train.probe.export)
    tensors = {"weight": np.ascontiguousarray(predictor.weight, dtype=np.float32),
               "bias": np.ascontiguousarray(predictor.bias, dtype=np.float32)}
    with building(folder, force=force) as tmp:
        write_json(tmp / SETTINGS_FILE, settings)
        save_file(tensors, str(tmp / WEIGHTS_FILE))
    return Path(folder)


def read_predictor(folder, hidden_size: Optional[int] = None) -> LossPredictor:
    """Read a predictor folder; each bad field or tensor is one line naming it. `hidden_size`: the
    LLM's width, checked against the weight."""
    folder = Path(folder)
    where = folder / SETTINGS_FILE
    s = read_json(where, "the loss predictor's settings", FIX)

    need = field_checker(s, where, FIX)

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    need("format", lambda v: v == FORMAT, repr(FORMAT))
    need("schema_version", lambda v: v == 1, "1 (the version this reader knows)")
    need("after", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a block index")
    need("pooling", lambda v: v in POOLINGS, f"one of {', '.join(POOLINGS)}")
    need("max_tokens", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
    sets = need("sets", lambda v: isinstance(v, list) and v and all(
        isinstance(x, list) and all(isinstance(b, int) and not isinstance(b, bool) and b > s["after"] for b in x)
        for x in v) and any(not x for x in v),
        f"a list of omission sets (block indices above 'after'), dense ([]) among them")
    need("default_max_loss", lambda v: number(v) and not math.isnan(v), "a number")
    path = folder / WEIGHTS_FILE
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
    except Exception as e:  # a missing file, a truncated header, not safetensors at all
        raise PuddingError(f"{path}: not a readable safetensors file ({first_line(e)}); {FIX}") from None
    weight, bias = tensors.get("weight"), tensors.get("bias")
    pools = len(s["pooling"].split("+"))
    width = weight.shape[1] // pools if weight is not None and weight.ndim == 2 else None
    ok = weight is not None and bias is not None and weight.ndim == 2 and weight.shape[0] == len(sets) \
        and weight.shape[1] % pools == 0 and bias.shape == (len(sets),) \
        and (hidden_size is None or width == hidden_size)
    if not ok:
        want = f"[{len(sets)}, {'hidden' if hidden_size is None else hidden_size} x {pools}]"
        raise PuddingError(f"{path}: tensors 'weight' {want} and 'bias' [{len(sets)}] expected (got "
                           f"{None if weight is None else list(weight.shape)}, {None if bias is None else list(bias.shape)}); "
                           "the predictor was written for another model or other sets")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise PuddingError(f"{path}: the weights hold NaN or infinite values; {FIX}")
    rest = {k: v for k, v in s.items() if k not in ("format", "schema_version", "after", "pooling", "max_tokens",
                                                     "sets", "default_max_loss")}
    return LossPredictor([list(x) for x in sets], s["after"], s["pooling"], s["max_tokens"],
                         weight.astype(np.float32), bias.astype(np.float32), float(s["default_max_loss"]), rest)
