"""What the hidden-state router reads: the LLM's own residual stream after an early block, pooled
over the prompt (issue: a router that costs nothing).

No candidate set omits the first P blocks (`train search --protect-first P`), so blocks 0..r with
r < the first block any candidate omits run for every prompt, whatever the set. Their output is
free at inference: the routed prefill runs them once, routes on their output, and continues from
block r+1 under the chosen set. Here, on the training side, the same quantity is computed for the
texts of a router data folder:

    prompt   the router text as ONE user message through the tokenizer's chat template, with the
             generation prompt (what `pudding-mlx generate`/`chat` prefill for that message);
             at most `max_tokens` tokens (the last ones are kept)
    h_r      the output of block r of the dense model (the residual stream entering block r+1),
             float32, for every prompt token
    mean     h_r averaged over the prompt's tokens;  last: h_r at the prompt's last token

`features.npz` in the data folder holds, for every row of `router_data.npz` in the same order,
`mean_<r>` and `last_<r>` ([N, hidden] float16) for each requested block r, plus `id`, `task`.

Hidden states are wide (1,536 for a 1.5B model), so for committing and for a router that trains in
seconds on a CPU, `project_features` fits a PCA on one folder's features (the training split's)
and writes `features_pca.npz` in every folder: the same projection applied to each, float16, and
(in the fitted folder) the basis: `basis_<pool>_<r>` [dim, hidden] and `center_<pool>_<r>` [hidden],
float32, with the explained variance. A router on the projected features is a linear map of the
raw hidden state, so the MLX runtime applies `(h - center) @ basis.T` and the head, nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from pudding_mlx.atomic import write_npz
from pudding_mlx.errors import PuddingError

FEATURES_FILE = "features.npz"
PCA_FILE = "features_pca.npz"
POOLS = ("mean", "last")


def prompt_ids(tokenizer, text: str, max_tokens: int = 1024) -> List[int]:
    """The token ids the LLM prefills for `text` sent as one chat message (last `max_tokens`)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)[-max_tokens:]


def hidden_features(model, tokenizer, texts: Sequence[str], after: Sequence[int],
                    batch_size: int = 32, max_tokens: int = 1024,
                    progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, np.ndarray]:
    """{"mean_<r>", "last_<r>"}: [len(texts), hidden] float32 for each block r in `after`.

    Runs only blocks 0..max(after) (the rest are skipped with `train.scoring.skip_blocks`, the
    decoder's final norm and the LM head never run) and reads block outputs with forward hooks."""
    import torch

    from .scoring import find_decoder, skip_blocks

    after = sorted({int(r) for r in after})
    decoder = find_decoder(model)
    n_blocks = len(decoder.layers)
    if not after or after[0] < 0 or after[-1] >= n_blocks - 1:
        raise PuddingError(f"feature blocks {after}: each must be in 0..{n_blocks - 2}")
    device = next(model.parameters()).device
    encoded = [prompt_ids(tokenizer, t, max_tokens) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    hidden = decoder.config.hidden_size
    out = {f"{p}_{r}": np.zeros((len(texts), hidden), np.float32) for p in POOLS for r in after}
    captured: Dict[int, "torch.Tensor"] = {}
    hooks = [decoder.layers[r].register_forward_hook(
        lambda mod, args, output, r=r: captured.__setitem__(r, output[0] if isinstance(output, tuple) else output))
        for r in after]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        with torch.inference_mode(), skip_blocks(model, range(after[-1] + 1, n_blocks)):
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, i in enumerate(rows):
                    ids[j, :len(encoded[i])] = torch.tensor(encoded[i])
                    mask[j, :len(encoded[i])] = 1
                ids, mask = ids.to(device), mask.to(device)
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                lengths = mask.sum(1)
                weights = (mask.float() / lengths[:, None].float())[:, :, None]
                for r in after:
                    h = captured[r].float()
                    mean = (h * weights).sum(1).cpu().numpy()
                    last = h[torch.arange(len(rows), device=h.device), lengths - 1].cpu().numpy()
                    out[f"mean_{r}"][rows] = mean
                    out[f"last_{r}"][rows] = last
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
    finally:
        for h in hooks:
            h.remove()
    return out


def write_features(model, tokenizer, data_dir, after: Sequence[int], batch_size: int = 32,
                   max_tokens: int = 1024, progress=None) -> Path:
    """Compute the features of every row of DATA_DIR/router_data.npz into DATA_DIR/features.npz
    (skipped when that file already holds the same rows and blocks)."""
    from .router_data import load_router_data

    data_dir = Path(data_dir).expanduser()
    data = load_router_data(data_dir)
    path = data_dir / FEATURES_FILE
    want = {f"{p}_{r}" for p in POOLS for r in after}
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if want <= set(z.files) and list(z["id"]) == list(data["id"]) \
                    and list(z["task"]) == list(data["task"]):
                return path
    feats = hidden_features(model, tokenizer, list(data["text"]), after, batch_size, max_tokens, progress)
    write_npz(path, id=data["id"], task=data["task"], after=np.array(sorted(set(after)), np.int64),
                  max_tokens=np.int64(max_tokens),
                  **{k: v.astype(np.float16) for k, v in feats.items()})
    return path


def load_features(data_dir, name: str = PCA_FILE) -> Dict[str, np.ndarray]:
    path = Path(data_dir).expanduser()
    path = path / name if path.is_dir() else path
    if not path.is_file():
        raise PuddingError(f"{path}: no features; compute them with `pudding-mlx train features`")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def project_features(fit_dir, apply_dirs: Sequence, dim: int = 64) -> List[Path]:
    """Fit a PCA of `dim` components per (pool, block) on FIT_DIR/features.npz and write
    features_pca.npz into FIT_DIR and every APPLY_DIR (projected features, float16); the basis
    is stored in FIT_DIR's file only (the others name it)."""
    fit = load_features(fit_dir, FEATURES_FILE)
    keys = [k for k in fit if k.split("_")[0] in POOLS]
    basis: Dict[str, np.ndarray] = {}
    for k in keys:
        x = fit[k].astype(np.float64)
        center = x.mean(0)
        _, s, vt = np.linalg.svd(x - center, full_matrices=False)
        basis[k] = (center.astype(np.float32), vt[:dim].astype(np.float32),
                    (s[:dim] ** 2).sum() / (s ** 2).sum())
    written = []
    for d in [fit_dir, *apply_dirs]:
        feats = load_features(d, FEATURES_FILE)
        arrays = {"id": feats["id"], "task": feats["task"], "after": feats["after"],
                  "max_tokens": feats["max_tokens"], "dim": np.int64(dim)}
        for k in keys:
            center, vt, _ = basis[k]
            arrays[k] = ((feats[k].astype(np.float32) - center) @ vt.T).astype(np.float16)
        if Path(d) == Path(fit_dir):
            for k in keys:
                center, vt, explained = basis[k]
                arrays[f"center_{k}"], arrays[f"basis_{k}"] = center, vt
                arrays[f"explained_{k}"] = np.float64(explained)
        path = Path(d).expanduser() / PCA_FILE
        write_npz(path, **arrays)
        written.append(path)
    return written
