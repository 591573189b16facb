"""The router: a BERT encoder plus a linear head giving one score per candidate omission set.

As in the paper, the head reads the BERT pooler output (tanh(dense([CLS]))):
scores = Linear(hidden, M)(pooler_output). The highest score picks the candidate.

An MLX router folder (written by `pudding_mlx.convert.router.convert_router`):

    router/
      router.json          settings (below)
      config.json          the HF BERT config of the encoder, as in the source checkpoint
      model.safetensors    MLX weights (mx.save_safetensors): `encoder.*` (names as in
                           pudding_mlx.bert) and `head.weight` [M, hidden], `head.bias` [M]
      tokenizer.json, tokenizer_config.json, vocab.txt, special_tokens_map.json
                           the source's tokenizer files, those it had (tokenizer.json or vocab.txt
                           at least)

router.json, schema version 1:

    {"format": "pudding-mlx-router", "schema_version": 1, "num_outputs": M, "max_length": 512,
     "lowercase": true, "pooling": "pooler", "encoder": "<source name>"}

`max_length`: prompts are truncated to this many tokens ([CLS] and [SEP] included); at most the
encoder's max_position_embeddings. `lowercase` records whether the tokenizer lowercases (its
`do_lower_case`); the HF tokenizer does the lowercasing, the router never changes the text itself.
`pooling` is "pooler" (the only one so far). `encoder` names the source encoder, for provenance.

Tokenization is the HF tokenizer itself (`transformers.AutoTokenizer`, fast, from the folder's
files), never a re-implementation: batches are padded on the right to their longest prompt.
"""

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .bert import BertConfig, BertModel, hf_name, load_config
from .errors import PuddingError, first_line
from .jsonio import read_json
from .routing import best_index

FORMAT = "pudding-mlx-router"
SCHEMA_VERSION = 1
SETTINGS = "router.json"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
POOLINGS = ("pooler",)
RECONVERT = "reconvert the router (pudding_mlx.convert.router)"


class RouterModel(nn.Module):
    """Encoder + head, the part that holds weights (names: `encoder.*`, `head.*`)."""

    def __init__(self, config: BertConfig, num_outputs: int):
        super().__init__()
        self.encoder = BertModel(config)
        self.head = nn.Linear(config.hidden_size, num_outputs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> mx.array:
        _, pooled = self.encoder(input_ids, attention_mask, token_type_ids)
        return self.head(pooled)


def expected_shapes(config: BertConfig, num_outputs: int) -> Dict[str, tuple]:
    """Every tensor a router with this config must have, with its shape.

    Built from an (unevaluated, so free) RouterModel: the module is the one source of truth.
    """
    model = RouterModel(config, num_outputs)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def _describe(key: str) -> str:
    """'encoder.layers.0.mlp_norm.weight' -> the same, plus its HF checkpoint name for the user."""
    hf = hf_name(key[len("encoder."):]) if key.startswith("encoder.") else None
    return f"'{key}' (HF: {hf})" if hf else f"'{key}'"


def check_weights(shapes: Dict[str, tuple], config: BertConfig, num_outputs: int, where: str, fix: str = RECONVERT) -> None:
    """Raise a one-line PuddingError for the first missing, unexpected or misshapen tensor."""
    expected = expected_shapes(config, num_outputs)
    for key, shape in expected.items():
        if key not in shapes:
            raise PuddingError(f"{where}: tensor {_describe(key)} is missing; the checkpoint is incomplete, {fix}")
        if tuple(shapes[key]) != shape:
            raise PuddingError(
                f"{where}: tensor {_describe(key)} has shape {list(shapes[key])}, expected {list(shape)} "
                f"from config.json; the weights and the config do not belong together"
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise PuddingError(f"{where}: unexpected tensor '{extra[0]}' ({len(extra)} in all); {fix}")


def read_settings(folder: Path) -> dict:
    path = Path(folder) / SETTINGS
    data = read_json(path, "the router settings", RECONVERT)

    def fail(field, msg):
        raise PuddingError(f"{path}: field '{field}' {msg}; {RECONVERT}")

    if data.get("format") != FORMAT:
        fail("format", f"is {data.get('format')!r}, expected {FORMAT!r}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        fail("schema_version", f"is {version!r}; this pudding-mlx reads version {SCHEMA_VERSION}")
    for field, low in (("num_outputs", 1), ("max_length", 2)):
        value = data.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            fail(field, f"must be an integer >= {low}, got {value!r}")
    if data.get("pooling", "pooler") not in POOLINGS:
        fail("pooling", f"is {data.get('pooling')!r}; supported: {', '.join(POOLINGS)}")
    if not isinstance(data.get("lowercase", True), bool):
        fail("lowercase", "must be true or false")
    return data


def load_tokenizer(folder: Path):
    """The HF tokenizer from the folder's own files (fast; no remote code, no network)."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise PuddingError(f"{folder}: no tokenizer files (tokenizer.json or vocab.txt); copy the encoder's tokenizer files there")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except Exception as e:  # transformers raises many types; the user needs one line
        raise PuddingError(f"{folder}: the tokenizer files could not be loaded ({first_line(e, 300)}); copy them again from the encoder") from None
    # The pooler reads position 0, which must be [CLS]: pad on the right whatever the files say.
    tokenizer.padding_side = "right"
    return tokenizer


class Router:
    """Scores prompts: `scores(texts)` -> [B, M] float32; `best(text)` -> the top candidate."""

    def __init__(self, model: RouterModel, tokenizer, settings: dict, path: Optional[Path] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_length = settings["max_length"]
        self.path = path

    @property
    def num_outputs(self) -> int:
        return self.model.head.weight.shape[0]

    def tokenize(self, texts: Sequence[str]) -> Dict[str, mx.array]:
        enc = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        out = {"input_ids": mx.array(enc["input_ids"], dtype=mx.int32),
               "attention_mask": mx.array(enc["attention_mask"], dtype=mx.int32)}
        if "token_type_ids" in enc:
            out["token_type_ids"] = mx.array(enc["token_type_ids"], dtype=mx.int32)
        return out

    def scores(self, texts: List[str]) -> mx.array:
        """One row of M scores per text, float32 (computed in the stored dtype)."""
        if isinstance(texts, str):
            raise PuddingError("Router.scores takes a list of prompts, got one string; use Router.best(text) or [text]")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise PuddingError(f"Router.scores: prompt {i} is a {type(t).__name__}, not a string")
        if not texts:
            return mx.zeros((0, self.num_outputs), dtype=mx.float32)
        return self.model(**self.tokenize(texts)).astype(mx.float32)

    def best(self, text: str) -> Tuple[int, List[float], float]:
        """(index of the top-scoring candidate, all M scores, router time in ms incl. tokenization)."""
        start = time.perf_counter()
        s = self.scores([text])[0]
        mx.eval(s)
        ms = (time.perf_counter() - start) * 1000.0
        values = s.tolist()
        return best_index(values), values, ms

    def __repr__(self) -> str:
        return f"Router(path={str(self.path)!r}, num_outputs={self.num_outputs}, max_length={self.max_length})"


def load_router(path, num_outputs: Optional[int] = None, dtype: Optional[mx.Dtype] = None) -> Router:
    """Load an MLX router folder. `num_outputs`, when given, must equal the head's output size
    (one output per candidate of the bundle). `dtype` casts floating weights (default: as stored)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PuddingError(f"{folder}: the router folder does not exist; convert one with pudding_mlx.convert.router")
    settings = read_settings(folder)
    config = load_config(folder)
    if settings["max_length"] > config.max_position_embeddings:
        raise PuddingError(
            f"{folder / SETTINGS}: field 'max_length' is {settings['max_length']}, more than the encoder's "
            f"max_position_embeddings {config.max_position_embeddings}; lower it"
        )

    wpath = folder / WEIGHTS
    if not wpath.is_file():
        raise PuddingError(f"{wpath}: missing (the router weights); {RECONVERT}")
    try:
        weights = mx.load(str(wpath))
        if not isinstance(weights, dict):
            raise ValueError("no named tensors")
        # Read the data now: MLX loads lazily, and a truncated file would otherwise fail later,
        # somewhere in the first forward pass.
        mx.eval(weights)
    except Exception as e:
        raise PuddingError(f"{wpath}: not a readable safetensors file ({first_line(e, 300)}); it may be truncated, {RECONVERT}") from None

    head = weights.get("head.weight")
    if head is None or head.ndim != 2:
        raise PuddingError(f"{wpath}: tensor 'head.weight' is missing or not 2-D; {RECONVERT}")
    m = head.shape[0]
    if num_outputs is not None and m != num_outputs:
        raise PuddingError(
            f"{wpath}: the router head has {m} outputs but {num_outputs} were expected "
            f"(one per candidate set); use the router trained for these candidates"
        )
    if m != settings["num_outputs"]:
        raise PuddingError(f"{folder / SETTINGS}: field 'num_outputs' is {settings['num_outputs']} but {wpath.name} has a {m}-output head; {RECONVERT}")
    check_weights({k: tuple(v.shape) for k, v in weights.items()}, config, m, str(wpath))

    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model = RouterModel(config, m)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return Router(model, load_tokenizer(folder), settings, folder)
