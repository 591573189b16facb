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

OUT is written into a temporary folder next to it and moved into place with os.replace.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pudding_mlx.atomic import install_dir, usual_permissions as _usual_permissions
from pudding_mlx.errors import PuddingError

from .report import router_metrics  # noqa: F401  (also part of this module's API)
from .router_data import load_router_data, split_by_question

VARIANTS = ("light", "full")
DEFAULT_LR = {"full": 1e-5, "light": 1e-3}
TRAIN_INFO = "router_train.json"
HEAD_JSON = "head.json"
HEAD_WEIGHTS = "head.safetensors"
ENCODER_SUBDIR = "encoder"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MAX_LENGTH = 512


# -- metrics ---------------------------------------------------------------------------------------


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
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PuddingError(f"{cfg_path}: not valid JSON ({e})") from None
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
    from transformers import get_linear_schedule_with_warmup

    from .hf import pick_device

    if variant not in VARIANTS:
        raise PuddingError(f"unknown router variant {variant!r}; choose from {', '.join(VARIANTS)}")
    for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("warmup", warmup, 0)):
        if not isinstance(v, int) or v < lo:
            raise PuddingError(f"{name} must be an integer >= {lo}, got {v!r}")
    out = Path(out).expanduser()
    if (out.exists() or out.is_symlink()) and not force:
        raise PuddingError(f"{out}: already exists; pass force=True to replace it")
    lr = DEFAULT_LR[variant] if lr is None else float(lr)
    enc_dir = resolve_encoder(encoder)
    dev = pick_device(device)
    emit = progress or (lambda event: None)

    data = load_router_data(data_path)
    y_all = data["y"].astype(np.float32)
    if sets is None:
        sets = data["meta"]["sets"]
    else:
        column = {tuple(c): i for i, c in enumerate(data["meta"]["sets"])}
        missing = [list(c) for c in sets if tuple(sorted(c)) not in column]
        if missing:
            raise PuddingError(f"{data_path}: no scores for sets {missing[:3]}; build the data with them")
        sets = [sorted(c) for c in sets]
        y_all = y_all[:, [column[tuple(c)] for c in sets]]
    n, m = y_all.shape
    if not np.isfinite(y_all).all():
        raise PuddingError(f"{data_path}: y has non-finite values")
    train_idx, val_idx = split_by_question(data, val_fraction, seed)
    if len(train_idx) == 0:
        raise PuddingError("the training split is empty; lower val_fraction or add data")
    mu = y_all[train_idx].mean(axis=0)
    sd = np.maximum(y_all[train_idx].std(axis=0), 1e-6) if standardize else np.ones(m, np.float32)
    shift = mu if standardize else np.zeros(m, np.float32)
    target = torch.tensor((y_all - shift) / sd, dtype=torch.float32, device=dev)
    sd_t = torch.tensor(sd, dtype=torch.float32, device=dev)
    shift_t = torch.tensor(shift, dtype=torch.float32, device=dev)
    y_t = torch.tensor(y_all, device=dev)

    torch.manual_seed(seed)
    tokenizer = _tokenizer(enc_dir)
    from transformers import BertForSequenceClassification, BertModel

    if variant == "full":
        model, info = BertForSequenceClassification.from_pretrained(
            str(enc_dir), num_labels=m, problem_type="regression",
            id2label={i: _set_label(s) for i, s in enumerate(sets)},
            label2id={_set_label(s): i for i, s in enumerate(sets)},
            use_safetensors=True, output_loading_info=True, dtype=torch.float32)
        model = model.to(dev)
        head = model.classifier
        missing_pooler = any("pooler" in k for k in info.get("missing_keys", []))
        max_len = _max_length(model.config, max_length)
        tokens = _Tokens(tokenizer, data["text"], max_len)

        def forward(idx):
            return model(**tokens.batch(idx, dev)).logits

        trainable = model
    else:
        enc_model, info = BertModel.from_pretrained(
            str(enc_dir), add_pooling_layer=True, use_safetensors=True, output_loading_info=True,
            dtype=torch.float32)
        enc_model = enc_model.to(dev).eval()
        for p in enc_model.parameters():
            p.requires_grad_(False)
        missing_pooler = any("pooler" in k for k in info.get("missing_keys", []))
        max_len = _max_length(enc_model.config, max_length)
        tokens = _Tokens(tokenizer, data["text"], max_len)
        feats = torch.empty((n, enc_model.config.hidden_size), dtype=torch.float32, device=dev)
        done = 0
        t0 = time.perf_counter()
        with torch.no_grad():  # not inference_mode: the features are used under autograd later
            for idx in _by_length(tokens, np.arange(n), max(batch_size, 64)):
                pooled = enc_model(**tokens.batch(idx, dev)).pooler_output
                feats[torch.as_tensor(idx, device=dev)] = pooled.float()
                done += len(idx)
                emit({"event": "features", "done": done, "total": n})
        feature_seconds = time.perf_counter() - t0
        head = nn.Linear(enc_model.config.hidden_size, m).to(dev)
        model = head

        def forward(idx):
            return head(feats[torch.as_tensor(idx, device=dev)])

        trainable = head

    with torch.no_grad():
        if init_bias_to_mean:
            head.bias.copy_(torch.tensor((mu - shift) / sd, dtype=torch.float32))

    params = [(k, p) for k, p in trainable.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)

    def predict_rows(idx) -> np.ndarray:
        """Raw-scale predictions for rows `idx`, in the order of `idx`, eval mode."""
        was = model.training
        model.eval()
        outp = np.zeros((len(idx), m), np.float32)
        pos = {int(r): k for k, r in enumerate(idx)}
        with torch.inference_mode():
            for b in _by_length(tokens, idx, max(batch_size, 64)):
                raw = forward(b).float() * sd_t + shift_t
                outp[[pos[int(r)] for r in b]] = raw.cpu().numpy()
        model.train(was)
        return outp

    y_val = y_all[val_idx]
    history = []
    best = {"val_mse": float("inf"), "epoch": None, "state": None}
    initial = router_metrics(predict_rows(val_idx), y_val) if len(val_idx) else None
    rng = np.random.default_rng(seed)
    step = 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()  # full: dropout on; light: only the head (no dropout), the encoder stays eval
        perm = rng.permutation(train_idx)
        sse, count = 0.0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            if len(idx) == 0:
                continue
            outb = forward(idx).float()
            rows = torch.as_tensor(idx, device=dev)
            loss = nn.functional.mse_loss(outb, target[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            with torch.no_grad():
                raw = outb.detach() * sd_t + shift_t
                sse += float(((raw - y_t[rows]) ** 2).sum())
                count += len(idx) * m
            emit({"event": "step", "epoch": epoch, "step": step, "steps": total_steps,
                  "loss": float(loss.detach())})
        record = {"epoch": epoch, "train_mse": sse / max(count, 1),
                  "lr": float(scheduler.get_last_lr()[0]), "steps": step}
        if len(val_idx):
            vm = router_metrics(predict_rows(val_idx), y_val)
            record.update(val_mse=vm["mse"], val_agreement=vm["agreement"], val_regret=vm["regret"])
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        emit({"event": "epoch", **record})
        score = record.get("val_mse", -epoch)  # no validation: the last epoch wins
        if score < best["val_mse"] or best["state"] is None or not len(val_idx):
            best = {"val_mse": score, "epoch": epoch,
                    "state": {k: v.detach().to("cpu", copy=True)
                              for k, v in trainable.state_dict().items()}}
    trainable.load_state_dict(best["state"])
    model.eval()

    final_val = router_metrics(predict_rows(val_idx), y_val) if len(val_idx) else None
    baseline = router_metrics(np.tile(mu, (len(val_idx), 1)), y_val) if len(val_idx) else None
    static_best = int(np.argmax(mu))

    # fold the target scaling into the head: it then outputs raw-scale y
    with torch.no_grad():
        w = head.weight.detach().float().cpu() * torch.tensor(sd)[:, None]
        bvec = head.bias.detach().float().cpu() * torch.tensor(sd) + torch.tensor(shift)
    metrics = {
        "format": "pudding-mlx-router-train",
        "variant": variant,
        "encoder": str(enc_dir),
        "out": str(out),
        "data": str(Path(data_path).expanduser().resolve()),
        "sets": sets,
        "n": int(n), "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
        "per_task_train": {t: int(c) for t, c in zip(*np.unique(data["task"][train_idx], return_counts=True))},
        "per_task_val": {t: int(c) for t, c in zip(*np.unique(data["task"][val_idx], return_counts=True))},
        "settings": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "warmup": warmup,
                     "weight_decay": weight_decay, "seed": seed, "val_fraction": val_fraction,
                     "standardize": standardize, "init_bias_to_mean": init_bias_to_mean,
                     "max_length": max_len, "device": str(dev), "optimizer": "AdamW",
                     "schedule": "linear warm-up then linear decay",
                     "total_steps": total_steps, "loss": "MSE on y" + (" (standardized)" if standardize else "")},
        "warmup_exceeds_steps": warmup >= total_steps,
        "pooler_initialized_randomly": bool(missing_pooler),
        "initial_val": initial,
        "epochs": history,
        "best_epoch": best["epoch"],
        "best_val": final_val,
        "baseline_val": baseline,
        "static_best_set": static_best,
        "y_train_mean": [float(v) for v in mu],
        "data_provenance": data["meta"].get("provenance"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    if variant == "light":
        metrics["feature_seconds"] = feature_seconds
    from .router_data import _versions

    metrics["versions"] = _versions()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        if variant == "full":
            with torch.no_grad():
                model.classifier.weight.copy_(w.to(dev))
                model.classifier.bias.copy_(bvec.to(dev))
            model.save_pretrained(str(tmp))
            _copy_tokenizer(enc_dir, tmp, tokenizer)
        else:
            from safetensors.torch import save_file

            enc_out = tmp / ENCODER_SUBDIR
            enc_model.save_pretrained(str(enc_out))
            _copy_tokenizer(enc_dir, enc_out, tokenizer)
            save_file({"weight": w.contiguous(), "bias": bvec.contiguous()}, str(tmp / HEAD_WEIGHTS),
                      metadata={"format": "pt"})
            (tmp / HEAD_JSON).write_text(json.dumps(
                {"encoder": ENCODER_SUBDIR, "num_outputs": m, "variant": "light",
                 "pooling": "pooler", "sets": sets, "source_encoder": str(enc_dir)}, indent=1) + "\n")
        (tmp / TRAIN_INFO).write_text(json.dumps(metrics, indent=1) + "\n")
        _usual_permissions(tmp)
        install_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


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
        head_info = json.loads((src / HEAD_JSON).read_text())
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
