"""Train the router (PuDDing, section 4.2): a BERT-family encoder and a linear head with one output
per candidate set, reading the pooler output (tanh(dense([CLS]))), regressing y[i, m] =
ell-bar(gold | x_i; S_m) from `train.router_data` with an MSE loss. At inference the set with the
highest predicted score is used.

Defaults follow the paper: raw y (no rescaling), MSE, AdamW (lr 1e-5, weight decay 0.01), batch
32, 10 epochs, 500 warm-up steps (linear warm-up, then linear decay to 0:
`transformers.get_linear_schedule_with_warmup`), all-MiniLM-L6-v2 fully fine-tuned.

Choices of ours (not in the paper), all recorded in the output's router_train.json:
  * The head's bias starts at the per-set mean of y on the training split (`init_bias_to_mean`).
    y is a mean log-likelihood (about -1 to -10 nats), far from a fresh head's outputs near 0;
    starting at the mean spends the first epoch on learning the prompt-dependent part instead of
    a constant offset. It changes no optimum of the loss.
  * Weight decay applies to matrices only, not to biases and LayerNorm weights (the convention of
    transformers' Trainer).
  * `standardize=True` (off by default) trains on (y - mean) / std per set, with mean and std from
    the training split, so every set weighs the same in the loss; the saved head has the
    de-standardisation folded in (weight * std, bias * std + mean), so it outputs raw-scale y
    and the converted router needs nothing else.
  * No gradient clipping, float32 throughout, one process (no data parallelism: the router is
    small; run it on one GPU).

Variants:
  full   every weight trained (default lr 1e-5; BertForSequenceClassification, whose dropout
         (hidden_dropout_prob) is on during training). Saved with save_pretrained as a
         BertForSequenceClassification folder (model.safetensors; config num_labels = M,
         problem_type "regression", id2label naming each set) plus the encoder's tokenizer files:
         layout (a) of `pudding_mlx.convert.router`.
  light  the encoder is frozen and only the head trains (default lr 1e-3: a single linear layer on
         fixed features needs a much larger step than fine-tuning does). The pooler outputs are
         computed once, with the encoder in eval mode, then the head trains on them. Saved as
         layout (b): head.json ({"encoder": "encoder", "num_outputs": M, ...}) +
         head.safetensors (weight [M, hidden], bias [M], float32) + the encoder folder itself,
         copied into OUT/encoder (save_pretrained of the exact BertModel used, pooler included,
         plus its tokenizer files), so the router folder moves as one piece.
  --encoder DIR: any HF BERT folder (model_type "bert", absolute positions, model.safetensors:
         weights are read from safetensors only), e.g. bert-base-uncased; default all-MiniLM-L6-v2
         (`pudding_mlx.assets.minilm_dir`).

Texts: the data's `text` (the prompt without answer choices), tokenized by the encoder's own
tokenizer (it lowercases when its config says so), truncated to 512 tokens (at most the encoder's
max_position_embeddings), padded on the right per batch.

Model selection: the epoch with the lowest validation MSE (`train.router_data.split_by_question`,
by question, never by row); without a validation split, the last epoch. Per epoch the report has
the training MSE (mean over the epoch's batches, in raw y units), and on validation the MSE, the
agreement with the oracle (the chosen set has the highest y; ties count as agreement) and the mean
regret y[oracle] - y[chosen]. `baseline` is the same on validation for the constant predictor
(the training mean of y per set, i.e. always the best static set).

OUT is built in a folder beside it and published only when complete (`pudding_mlx.atomic.building`).
"""

from __future__ import annotations

import datetime
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from pudding_mlx.atomic import building, write_json
from pudding_mlx.errors import PuddingError
from pudding_mlx.jsonio import read_json

from .report import router_metrics  # also part of this module's API
from .router_data import load_router_data, split_by_question

VARIANTS = ("light", "full")
DEFAULT_LR = {"full": 1e-5, "light": 1e-3}
TRAIN_INFO = "router_train.json"
HEAD_JSON = "head.json"
HEAD_WEIGHTS = "head.safetensors"
ENCODER_SUBDIR = "encoder"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MAX_LENGTH = 512


# -- encoder and tokens ----------------------------------------------------------------------------


def resolve_encoder(encoder=None) -> Path:
    """The encoder folder (default: all-MiniLM-L6-v2), checked to be a BERT the MLX router reads."""
    if encoder is None:
        from pudding_mlx.assets import minilm_dir

        return minilm_dir()
    path = Path(encoder).expanduser()
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise PuddingError(f"{path}: no config.json; --encoder must be a Hugging Face BERT folder")
    cfg = read_json(cfg_path, "the encoder's config", "--encoder must be a Hugging Face BERT folder")
    if cfg.get("model_type", "bert") != "bert":
        raise PuddingError(f"{cfg_path}: model_type {cfg.get('model_type')!r}; the MLX router "
                           "reads BERT encoders only (model_type 'bert')")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise PuddingError(f"{cfg_path}: position_embedding_type must be 'absolute'")
    if not (path / "model.safetensors").is_file():
        raise PuddingError(f"{path}: no model.safetensors (weights are read from safetensors only; "
                           "re-save the encoder with save_pretrained)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        raise PuddingError(f"{path}: no tokenizer files (tokenizer.json or vocab.txt)")
    return path


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    tok.padding_side = "right"  # the pooler reads position 0
    return tok


def _max_length(config, max_length: Optional[int]) -> int:
    limit = int(getattr(config, "max_position_embeddings", MAX_LENGTH))
    return min(max_length or MAX_LENGTH, limit)


class _Tokens:
    """Texts tokenized once (truncated, unpadded); batches are padded on the right on demand."""

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int):
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.ids: List[List[int]] = [list(x) for x in enc["input_ids"]]
        self.lengths = np.array([len(x) for x in self.ids])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batch(self, idx, device) -> Dict[str, torch.Tensor]:
        T = max(int(self.lengths[i]) for i in idx)
        ids = torch.full((len(idx), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : self.lengths[i]] = torch.tensor(self.ids[i], dtype=torch.long)
            mask[r, : self.lengths[i]] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "token_type_ids": torch.zeros_like(ids).to(device)}


def _by_length(tokens: _Tokens, idx, batch_size: int):
    """`idx` in batches of similar length (longest first), for inference."""
    idx = np.asarray(idx)
    order = idx[np.argsort(-tokens.lengths[idx], kind="stable")]
    for b in range(0, len(order), batch_size):
        yield order[b:b + batch_size]


def _copy_tokenizer(src: Path, dst: Path, tokenizer) -> None:
    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied = True
    if not copied:
        tokenizer.save_pretrained(str(dst))


def _set_label(s: Sequence[int]) -> str:
    return "omit:" + ",".join(str(b) for b in s)


# -- training --------------------------------------------------------------------------------------


def train_router(
    data_path,
    out,
    variant: str = "light",
    encoder=None,
    epochs: int = 10,
    lr: Optional[float] = None,
    batch_size: int = 32,
    warmup: int = 500,
    weight_decay: float = 0.01,
    seed: int = 0,
    device=None,
    val_fraction: float = 0.1,
    progress: Optional[Callable[[dict], None]] = None,
    standardize: bool = False,
    init_bias_to_mean: bool = True,
    max_length: Optional[int] = None,
    force: bool = False,
    sets: Optional[Sequence[Sequence[int]]] = None,
) -> dict:
    """Train a router on DATA_PATH (router_data.npz or its folder) and save it to OUT (module doc).

    `progress(event)` gets dicts: {"event": "features", "done", "total"} (light),
    {"event": "step", "epoch", "step", "steps", "loss"} and {"event": "epoch", ...the epoch's
    record}. `sets`: train on these candidate sets only (a subset of the data's columns, in this
    order), e.g. one k's pool out of data scored for several. Returns the metrics (also written to
    OUT/router_train.json)."""
    from .hf import pick_device

    _check_settings(variant, epochs, batch_size, warmup)
    out = _check_out(out, force)
    lr = DEFAULT_LR[variant] if lr is None else float(lr)
    enc_dir = resolve_encoder(encoder)
    dev = pick_device(device)
    emit = progress or (lambda event: None)

    data = load_router_data(data_path)
    sets, y = _select_sets(data, data_path, sets)
    train_idx, val_idx = _split(data, val_fraction, seed)
    targets = _Targets(y, train_idx, standardize, dev)

    torch.manual_seed(seed)
    tokenizer = _tokenizer(enc_dir)
    setup = _setup_full if variant == "full" else _setup_light
    router = setup(enc_dir, tokenizer, data["text"], sets, max_length, dev, batch_size, emit)
    if init_bias_to_mean:
        with torch.no_grad():
            router.head.bias.copy_(targets.mean_on_training_scale())
    fit = _fit(router, targets, train_idx, val_idx, epochs, lr, batch_size, warmup, weight_decay,
               seed, emit)

    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "warmup": warmup,
                "weight_decay": weight_decay, "seed": seed, "val_fraction": val_fraction,
                "standardize": standardize, "init_bias_to_mean": init_bias_to_mean}
    metrics = _report(variant, enc_dir, out, data_path, data, sets, train_idx, val_idx, targets,
                      settings, router, fit)
    weight, bias = targets.fold_into(router.head)  # the saved head outputs raw-scale y
    with building(out, force) as folder:
        router.save(folder, weight, bias)
        write_json(folder / TRAIN_INFO, metrics)
    return metrics


# -- inputs: settings, output folder, targets, split -----------------------------------------------


def _check_settings(variant: str, epochs, batch_size, warmup) -> None:
    if variant not in VARIANTS:
        raise PuddingError(f"unknown router variant {variant!r}; choose from {', '.join(VARIANTS)}")
    for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("warmup", warmup, 0)):
        if not isinstance(v, int) or v < lo:
            raise PuddingError(f"{name} must be an integer >= {lo}, got {v!r}")


def _check_out(out, force: bool) -> Path:
    """OUT as a path, refused before any work when it exists and `force` is not given."""
    out = Path(out).expanduser()
    if (out.exists() or out.is_symlink()) and not force:
        raise PuddingError(f"{out}: already exists; pass force=True to replace it")
    return out


def _select_sets(data: dict, data_path, sets) -> Tuple[list, np.ndarray]:
    """(the sets the router scores, y [N, M] float32 with one column per set): every set of the
    data, or `sets` (a subset of its columns, in this order)."""
    y = data["y"].astype(np.float32)
    if sets is None:
        sets = data["meta"]["sets"]
    else:
        column = {tuple(c): i for i, c in enumerate(data["meta"]["sets"])}
        missing = [list(c) for c in sets if tuple(sorted(c)) not in column]
        if missing:
            raise PuddingError(f"{data_path}: no scores for sets {missing[:3]}; build the data with them")
        sets = [sorted(c) for c in sets]
        y = y[:, [column[tuple(c)] for c in sets]]
    if not np.isfinite(y).all():
        raise PuddingError(f"{data_path}: y has non-finite values")
    return sets, y


def _split(data: dict, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows), by question (`split_by_question`); the training side is
    never empty."""
    train_idx, val_idx = split_by_question(data, val_fraction, seed)
    if len(train_idx) == 0:
        raise PuddingError("the training split is empty; lower val_fraction or add data")
    return train_idx, val_idx


class _Targets:
    """y on the device, and what the loss reads: raw y, or with `standardize` (y - mean) / std per
    set, both taken on the training split. `raw` maps outputs back to raw y; `fold_into` puts that
    map into a head's weights."""

    def __init__(self, y: np.ndarray, train_idx, standardize: bool, device):
        self.m = y.shape[1]
        self.y, self.device = y, device
        self.mean = y[train_idx].mean(axis=0)
        ones, zeros = np.ones(self.m, np.float32), np.zeros(self.m, np.float32)
        self.sd = np.maximum(y[train_idx].std(axis=0), 1e-6) if standardize else ones
        self.shift = self.mean if standardize else zeros
        self.y_t = torch.tensor(y, device=device)
        self.target = torch.tensor((y - self.shift) / self.sd, dtype=torch.float32, device=device)
        self._sd = torch.tensor(self.sd, dtype=torch.float32, device=device)
        self._shift = torch.tensor(self.shift, dtype=torch.float32, device=device)

    def raw(self, out: torch.Tensor) -> torch.Tensor:
        return out * self._sd + self._shift

    def mean_on_training_scale(self) -> torch.Tensor:
        """The per-set training mean in the units the head is trained in (its starting bias)."""
        return torch.tensor((self.mean - self.shift) / self.sd, dtype=torch.float32)

    def fold_into(self, head: nn.Linear) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) on the CPU of `head` with the scaling folded in: it then outputs raw y."""
        with torch.no_grad():
            weight = head.weight.detach().float().cpu() * torch.tensor(self.sd)[:, None]
            bias = head.bias.detach().float().cpu() * torch.tensor(self.sd) + torch.tensor(self.shift)
        return weight, bias


# -- the variants: setup, forward, save -----------------------------------------------------------


@dataclass
class _Router:
    """A variant ready to train. `module` is what trains (the whole model, or the light head alone)
    and `head` its last linear layer; `forward(rows)` gives the outputs for data rows on the training
    scale; `save(folder, weight, bias)` writes the variant's layout with the head set to these."""

    module: nn.Module
    head: nn.Linear
    forward: Callable[[np.ndarray], torch.Tensor]
    tokens: _Tokens
    max_length: int
    pooler_initialized_randomly: bool
    save: Callable[[Path, torch.Tensor, torch.Tensor], None]
    variant_report: Dict[str, float] = field(default_factory=dict)  # its own router_train.json entries


def _pooler_missing(loading_info: dict) -> bool:
    return any("pooler" in k for k in loading_info.get("missing_keys", []))


def _setup_full(enc_dir: Path, tokenizer, texts, sets, max_length, dev, batch_size, emit) -> _Router:
    """Every weight trains: a BertForSequenceClassification with one regression output per set
    (labelled "omit:..."), its dropout on in training; saved with save_pretrained plus the
    encoder's tokenizer files (layout (a))."""
    from transformers import BertForSequenceClassification

    model, info = BertForSequenceClassification.from_pretrained(
        str(enc_dir), num_labels=len(sets), problem_type="regression",
        id2label={i: _set_label(s) for i, s in enumerate(sets)},
        label2id={_set_label(s): i for i, s in enumerate(sets)},
        use_safetensors=True, output_loading_info=True, dtype=torch.float32)
    model = model.to(dev)
    max_len = _max_length(model.config, max_length)
    tokens = _Tokens(tokenizer, texts, max_len)

    def forward(rows):
        return model(**tokens.batch(rows, dev)).logits

    def save(folder: Path, weight, bias) -> None:
        with torch.no_grad():
            model.classifier.weight.copy_(weight.to(dev))
            model.classifier.bias.copy_(bias.to(dev))
        model.save_pretrained(str(folder))
        _copy_tokenizer(enc_dir, folder, tokenizer)

    return _Router(model, model.classifier, forward, tokens, max_len, _pooler_missing(info), save)


def _setup_light(enc_dir: Path, tokenizer, texts, sets, max_length, dev, batch_size, emit) -> _Router:
    """The encoder is frozen and only a linear head trains, on the pooler outputs computed once;
    saved as head.json + head.safetensors + the encoder folder (layout (b))."""
    from transformers import BertModel

    encoder, info = BertModel.from_pretrained(
        str(enc_dir), add_pooling_layer=True, use_safetensors=True, output_loading_info=True,
        dtype=torch.float32)
    encoder = encoder.to(dev).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    max_len = _max_length(encoder.config, max_length)
    tokens = _Tokens(tokenizer, texts, max_len)
    t0 = time.perf_counter()
    feats = _pooler_outputs(encoder, tokens, dev, max(batch_size, 64), emit)
    feature_seconds = time.perf_counter() - t0
    head = nn.Linear(encoder.config.hidden_size, len(sets)).to(dev)

    def forward(rows):
        return head(feats[torch.as_tensor(rows, device=dev)])

    def save(folder: Path, weight, bias) -> None:
        from safetensors.torch import save_file

        enc_out = folder / ENCODER_SUBDIR
        encoder.save_pretrained(str(enc_out))
        _copy_tokenizer(enc_dir, enc_out, tokenizer)
        save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(folder / HEAD_WEIGHTS),
                  metadata={"format": "pt"})
        write_json(folder / HEAD_JSON, {"encoder": ENCODER_SUBDIR, "num_outputs": len(sets),
                                        "variant": "light", "pooling": "pooler", "sets": sets,
                                        "source_encoder": str(enc_dir)})

    return _Router(head, head, forward, tokens, max_len, _pooler_missing(info), save,
                   {"feature_seconds": feature_seconds})


def _pooler_outputs(encoder, tokens: _Tokens, dev, batch_size: int, emit) -> torch.Tensor:
    """The encoder's pooler output for every text, [N, hidden] float32 on `dev`."""
    n = len(tokens.ids)
    feats = torch.empty((n, encoder.config.hidden_size), dtype=torch.float32, device=dev)
    done = 0
    with torch.no_grad():  # not inference_mode: the features are used under autograd later
        for idx in _by_length(tokens, np.arange(n), batch_size):
            pooled = encoder(**tokens.batch(idx, dev)).pooler_output
            feats[torch.as_tensor(idx, device=dev)] = pooled.float()
            done += len(idx)
            emit({"event": "features", "done": done, "total": n})
    return feats


# -- the shared loop: epochs, schedule, validation, model selection --------------------------------


def _fit(router: _Router, targets: _Targets, train_idx, val_idx, epochs: int, lr: float,
         batch_size: int, warmup: int, weight_decay: float, seed: int, emit) -> dict:
    """Train `router` for `epochs` passes over the training rows (a seeded order per epoch; AdamW,
    linear warm-up then linear decay) and load back the epoch with the lowest validation MSE
    (without validation rows, the last epoch). Returns {"history", "best_epoch", "initial_val",
    "best_val", "total_steps"} (validation metrics are None without validation rows)."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = _adamw(router.module, lr, weight_decay)
    total_steps = epochs * math.ceil(len(train_idx) / batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)

    def validate() -> Optional[dict]:
        if not len(val_idx):
            return None
        return router_metrics(_predict_rows(router, targets, val_idx, batch_size), targets.y[val_idx])

    initial = validate()
    rng = np.random.default_rng(seed)
    history: List[dict] = []
    best = {"val_mse": float("inf"), "epoch": None, "state": None}
    step = 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(train_idx)
        train_mse, step = _train_epoch(router, targets, order, optimizer, scheduler, batch_size,
                                       epoch, step, total_steps, emit)
        record = {"epoch": epoch, "train_mse": train_mse, "lr": float(scheduler.get_last_lr()[0]),
                  "steps": step}
        val = validate()
        if val is not None:
            record.update(val_mse=val["mse"], val_agreement=val["agreement"], val_regret=val["regret"])
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        emit({"event": "epoch", **record})
        score = record.get("val_mse", -epoch)  # no validation: the last epoch wins
        if score < best["val_mse"] or best["state"] is None or not len(val_idx):
            best = {"val_mse": score, "epoch": epoch,
                    "state": {k: v.detach().to("cpu", copy=True)
                              for k, v in router.module.state_dict().items()}}
    router.module.load_state_dict(best["state"])
    router.module.eval()
    return {"history": history, "best_epoch": best["epoch"], "initial_val": initial,
            "best_val": validate(), "total_steps": total_steps}


def _adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable weights; decay on matrices only (not biases or LayerNorm weights)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _train_epoch(router: _Router, targets: _Targets, order, optimizer, scheduler, batch_size: int,
                 epoch: int, step: int, total_steps: int, emit) -> Tuple[float, int]:
    """One pass over the rows in `order`, one optimizer step per batch. Returns (the epoch's
    training MSE in raw y units, the step count after it)."""
    router.module.train()  # full: dropout on; light: only the head (no dropout), the encoder stays eval
    sse, count = 0.0, 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        out = router.forward(idx).float()
        rows = torch.as_tensor(idx, device=targets.device)
        loss = nn.functional.mse_loss(out, targets.target[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        with torch.no_grad():
            sse += float(((targets.raw(out.detach()) - targets.y_t[rows]) ** 2).sum())
            count += len(idx) * targets.m
        emit({"event": "step", "epoch": epoch, "step": step, "steps": total_steps,
              "loss": float(loss.detach())})
    return sse / max(count, 1), step


def _predict_rows(router: _Router, targets: _Targets, idx, batch_size: int) -> np.ndarray:
    """Raw-scale predictions for rows `idx`, in the order of `idx`, in eval mode (then restored)."""
    was = router.module.training
    router.module.eval()
    outp = np.zeros((len(idx), targets.m), np.float32)
    pos = {int(r): k for k, r in enumerate(idx)}
    with torch.inference_mode():
        for b in _by_length(router.tokens, idx, max(batch_size, 64)):
            outp[[pos[int(r)] for r in b]] = targets.raw(router.forward(b).float()).cpu().numpy()
    router.module.train(was)
    return outp


# -- the report (router_train.json) ----------------------------------------------------------------


def _report(variant: str, enc_dir: Path, out: Path, data_path, data: dict, sets, train_idx, val_idx,
            targets: _Targets, settings: dict, router: _Router, fit: dict) -> dict:
    """What router_train.json holds: the inputs and settings, the split, every epoch, the chosen
    epoch on validation, and the constant predictor (the training mean per set) as the baseline."""
    from .router_data import _versions

    y_val = targets.y[val_idx]
    baseline = router_metrics(np.tile(targets.mean, (len(val_idx), 1)), y_val) if len(val_idx) else None
    loss = "MSE on y" + (" (standardized)" if settings["standardize"] else "")
    metrics = {
        "format": "pudding-mlx-router-train",
        "variant": variant,
        "encoder": str(enc_dir),
        "out": str(out),
        "data": str(Path(data_path).expanduser().resolve()),
        "sets": sets,
        "n": int(len(targets.y)), "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
        "per_task_train": _per_task(data["task"][train_idx]),
        "per_task_val": _per_task(data["task"][val_idx]),
        "settings": dict(settings, max_length=router.max_length, device=str(targets.device),
                         optimizer="AdamW", schedule="linear warm-up then linear decay",
                         total_steps=fit["total_steps"], loss=loss),
        "warmup_exceeds_steps": settings["warmup"] >= fit["total_steps"],
        "pooler_initialized_randomly": bool(router.pooler_initialized_randomly),
        "initial_val": fit["initial_val"],
        "epochs": fit["history"],
        "best_epoch": fit["best_epoch"],
        "best_val": fit["best_val"],
        "baseline_val": baseline,
        "static_best_set": int(np.argmax(targets.mean)),
        "y_train_mean": [float(v) for v in targets.mean],
        "data_provenance": data["meta"].get("provenance"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    metrics.update(router.variant_report)
    metrics["versions"] = _versions()
    return metrics


def _per_task(tasks: np.ndarray) -> Dict[str, int]:
    return {t: int(c) for t, c in zip(*np.unique(tasks, return_counts=True))}


# -- using a trained router in PyTorch ---------------------------------------------------------------


def predict(router_dir, texts: Sequence[str], device=None, batch_size: int = 64,
            max_length: Optional[int] = None) -> np.ndarray:
    """Scores [len(texts), M] float32 of a router folder that `train_router` wrote (either layout),
    computed in PyTorch: the reference the converted MLX router is checked against."""
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification, BertModel

    from .hf import pick_device

    src = Path(router_dir).expanduser()
    dev = pick_device(device)
    if (src / HEAD_JSON).is_file():
        head_info = read_json(src / HEAD_JSON, "the light router's head description", "retrain the router")
        enc_dir = (src / head_info["encoder"]).resolve()
        enc = BertModel.from_pretrained(str(enc_dir), add_pooling_layer=True, use_safetensors=True,
                                        dtype=torch.float32).to(dev).eval()
        hw = load_file(str(src / HEAD_WEIGHTS))
        head = nn.Linear(hw["weight"].shape[1], hw["weight"].shape[0]).to(dev)
        head.load_state_dict({"weight": hw["weight"], "bias": hw["bias"]})
        tok_dir = src if any((src / f).is_file() for f in ("tokenizer.json", "vocab.txt")) else enc_dir
        config, num_outputs = enc.config, int(hw["weight"].shape[0])

        def run(batch):
            return head(enc(**batch).pooler_output)
    else:
        model = BertForSequenceClassification.from_pretrained(
            str(src), use_safetensors=True, dtype=torch.float32).to(dev).eval()
        tok_dir, config, num_outputs = src, model.config, int(model.config.num_labels)

        def run(batch):
            return model(**batch).logits

    if isinstance(texts, str):
        raise PuddingError("predict takes a list of texts, got one string")
    texts = list(texts)
    if not texts:
        return np.zeros((0, num_outputs), np.float32)
    tokens = _Tokens(_tokenizer(tok_dir), texts, _max_length(config, max_length))
    outp = np.zeros((len(texts), num_outputs), np.float32)
    with torch.inference_mode():
        for b in _by_length(tokens, np.arange(len(texts)), batch_size):
            outp[b] = run(tokens.batch(b, dev)).float().cpu().numpy()
    return outp
