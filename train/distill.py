"""Self-distillation (issue "Healed omission sets", items 1-2): the dense model's own answers to the distillation
prompts (`train.distill_prompts`), how far a pruned model is from them, and the generation-aware search.

answers   `answer_prompts` asks the dense model every prompt of results/distill/prompts.json (greedy, one chat
          message each, `train.generation.generate`), CHUNK prompts at a time, each chunk written when it is done
          (a killed run resumes at the first missing chunk); then one gzip JSONL file: a header line, then per
          prompt its id, kind, split, the reply's text, its token count, whether it stopped on its own and its
          stop token. Text, not logits: a logit term is recomputed from the dense model when it is needed.
splits    by a hash of the prompt id, VAL_FRACTION of the prompts are "val" (the generation-aware search and
          the choice between adapters read them), the rest "train" (the adapters learn from them). Neither
          is evaluation data: the prompts come from the tasks' train splits and the standard library.
examples  a prompt's chat-template ids followed by the reply's ids and its stop token (when it stopped): the
          reply's tokens are the targets. A code prompt's standard-library source is a second example,
          "code-text" (the text alone, every token after the first a target), for the logit-distillation term.
losses    `target_nll`: per example, the summed negative log-likelihood of its targets and their count, with a
          set of blocks skipped. `search` is `train.search.greedy_search` with the loss "response_nll" (the
          dense replies' mean NLL per token) on three groups of val examples (code, task, all): one greedy
          chain each, so up to three sets per k.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from pudding_mlx.atomic import write_json, write_jsonl_gz
from pudding_mlx.errors import PuddingError
from pudding_mlx.jsonio import read_json

from .features import prompt_ids
from .generation import generate
from .scoring import find_decoder, num_blocks, skip_blocks

PROMPTS_FORMAT = "pudding-mlx-distill-prompts"
ANSWERS_FORMAT = "pudding-mlx-distill-answers"
VAL_FRACTION = 0.12
MAX_NEW_TOKENS = 512
MAX_EXAMPLE_TOKENS = 1024
CHUNK = 256
KINDS = ("code", "task", "code-text")
SEARCH_GROUPS = ("code", "task", "all")

Log = Callable[[str], None]


# -- prompts and answers --------------------------------------------------------------------------------


def read_prompts(path) -> dict:
    data = read_json(Path(path), "the distillation prompts", "rebuild it with `pudding-mlx train distill-prompts`")
    if data.get("format") != PROMPTS_FORMAT or not isinstance(data.get("prompts"), list):
        raise PuddingError(f"{path}: field 'format' must be {PROMPTS_FORMAT!r} with a 'prompts' list; "
                           "rebuild it with `pudding-mlx train distill-prompts`")
    return data


def split_of(prompt_id: str) -> str:
    """"val" for VAL_FRACTION of the ids (a fixed hash: the same everywhere), "train" for the rest."""
    h = int(hashlib.sha256(prompt_id.encode("utf-8")).hexdigest()[:8], 16) / 2 ** 32
    return "val" if h < VAL_FRACTION else "train"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def answer_prompts(model, tokenizer, prompts_path, out, model_name: str = "", max_new_tokens: int = MAX_NEW_TOKENS,
                   batch_size: int = 256, limit: Optional[int] = None, log: Log = print,
                   shard: tuple = (0, 1)) -> Optional[Path]:
    """The dense model's greedy replies to the prompts (module doc), written to `out` (.jsonl.gz); resumable.
    `shard` (i, n): this process answers chunks i, i + n, ... only (n processes can share one GPU: generation
    is bound by the host's work per step); the one that finds every chunk on disk writes `out`, the others
    return None."""
    index, count = shard
    if not 0 <= index < count:
        raise PuddingError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
    out = Path(out)
    prompts = read_prompts(prompts_path)["prompts"]
    prompts = prompts[:limit] if limit else prompts
    settings = {"prompts_sha256": _sha256(prompts_path), "n": len(prompts), "max_new_tokens": max_new_tokens,
                "chunk": CHUNK, "model": model_name}
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    if (parts / "settings.json").is_file():
        if read_json(parts / "settings.json", "the answers' settings") != settings:
            raise PuddingError(f"{parts}: chunks written with other settings; delete the folder to start over")
    else:
        write_json(parts / "settings.json", settings)
    rows: List[dict] = []
    starts = list(range(0, len(prompts), CHUNK))
    for i, start in enumerate(starts):
        part = parts / f"{i:04d}.jsonl.gz"
        chunk = prompts[start:start + CHUNK]
        if not part.is_file() and i % count == index:
            replies = generate(model, tokenizer, [p["text"] for p in chunk], (), max_new_tokens, batch_size)
            write_jsonl_gz(part, [{"id": p["id"], "kind": p["kind"], "split": split_of(p["id"]), "text": r["text"],
                                   "tokens": len(r["token_ids"]), "finished": r["finished"], "stop": r["stop"]}
                                  for p, r in zip(chunk, replies)])
            log(f"answers: chunk {i + 1}/{len(starts)} written")
    if not all((parts / f"{i:04d}.jsonl.gz").is_file() for i in range(len(starts))):
        return None  # the other shards' chunks are still to come; the last shard to finish writes `out`
    for i in range(len(starts)):
        part = parts / f"{i:04d}.jsonl.gz"
        with gzip.open(part, "rt", encoding="utf-8") as f:
            rows.extend(map(json.loads, f))
    header = {"format": ANSWERS_FORMAT, "schema_version": 1, "prompts": Path(prompts_path).name, **settings,
              "greedy": True, "val_fraction": VAL_FRACTION,
              "counts": {s: sum(r["split"] == s for r in rows) for s in ("train", "val")},
              "hit_limit": sum(not r["finished"] for r in rows)}
    write_jsonl_gz(out, [header] + rows)
    shutil.rmtree(parts, ignore_errors=True)  # (two shards finishing together both write the same `out`)
    return out


def read_answers(path) -> tuple:
    """(header, rows) of an answers file."""
    path = Path(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
    except (OSError, EOFError, json.JSONDecodeError) as e:
        raise PuddingError(f"{path}: not a gzip JSONL answers file ({e}); make it with `pudding-mlx train distill-answers`")
    if not lines or lines[0].get("format") != ANSWERS_FORMAT:
        raise PuddingError(f"{path}: the first line must be a header with format {ANSWERS_FORMAT!r}")
    return lines[0], lines[1:]


# -- examples and their losses --------------------------------------------------------------------------


class Example(NamedTuple):
    id: str
    kind: str  # code, task or code-text
    split: str
    ids: List[int]
    start: int  # ids[start:] are the targets


def build_examples(tokenizer, prompts_path, answers_path, split: Optional[str] = None, kinds: Sequence[str] = KINDS,
                   max_tokens: int = MAX_EXAMPLE_TOKENS) -> List[Example]:
    """The examples of `split` (all when None) of the given kinds, in the answers file's order."""
    data = read_prompts(prompts_path)
    header, rows = read_answers(answers_path)
    if header.get("prompts_sha256") != _sha256(prompts_path):
        raise PuddingError(f"{answers_path}: answers to another prompts file than {prompts_path}; rebuild them "
                           "with `pudding-mlx train distill-answers`")
    prompts = {p["id"]: p for p in data["prompts"]}
    out = []
    for r in rows:
        if split is not None and r["split"] != split:
            continue
        p = prompts[r["id"]]
        if r["kind"] in kinds:
            prompt = prompt_ids(tokenizer, p["text"], 1 << 30)
            reply = tokenizer.encode(r["text"], add_special_tokens=False)
            ids = (prompt + reply + ([int(r["stop"])] if r.get("stop") is not None else []))[:max_tokens]
            if len(ids) > len(prompt):
                out.append(Example(r["id"], r["kind"], r["split"], ids, len(prompt)))
        if "code-text" in kinds and p.get("code"):
            ids = tokenizer.encode(p["code"], add_special_tokens=False)[:max_tokens]
            if len(ids) > 1:
                out.append(Example(r["id"] + "#source", "code-text", r["split"], ids, 1))
    return out


def build_examples_of(tokenizer, pairs: Sequence[tuple], split: Optional[str] = None,
                      kinds: Sequence[str] = KINDS) -> List[Example]:
    """`build_examples` of each (prompts, answers) pair, in the order given: one training set from several answer
    files (`train heal --answers A --answers B`, heal_gpu.py wide: the first file's examples, then the next's)."""
    return [e for prompts, answers in pairs for e in build_examples(tokenizer, prompts, answers, split, kinds)]


def pad_batch(examples: Sequence[Example], pad: int, device) -> tuple:
    """(ids, attention mask, target mask), right-padded [n, width]."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    target = torch.zeros((len(examples), width), dtype=torch.bool)
    for j, e in enumerate(examples):
        ids[j, :len(e.ids)] = torch.tensor(e.ids)
        mask[j, :len(e.ids)] = 1
        target[j, e.start:len(e.ids)] = True
    return ids.to(device), mask.to(device), target.to(device)


def target_logits(model, ids, mask, target) -> tuple:
    """(logits [n_targets, vocab], labels [n_targets], row of each target): the logits at the positions that
    predict the targets only (the lm head never sees the prompt's positions: the memory of a long batch)."""
    hidden = find_decoder(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    predicts = target[:, 1:]  # the token at t is predicted at t - 1
    logits = model.get_output_embeddings()(hidden[:, :-1][predicts])
    return logits, ids[:, 1:][predicts], torch.nonzero(predicts)[:, 0]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def target_nll(model, tokenizer, examples: Sequence[Example], omitted: Sequence[int] = (), batch_size: int = 32,
               rows_at_once: int = 4096, agreement: bool = False) -> np.ndarray:
    """[n, 2]: per example, the summed NLL of its targets and their count, with `omitted` skipped. With
    `agreement`, [n, 4]: two more columns, the targets that are the model's own top choice (argmax) and the index
    of the first that is not (the count when none): on a greedy reply, how far the same model, skipping `omitted`,
    would have decoded it word for word (teacher forced: an exact statement of greedy decoding up to that token,
    up to the numerics of a full-sequence pass against cached decoding)."""
    device = next(model.parameters()).device
    out = np.zeros((len(examples), 4 if agreement else 2))
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    with torch.inference_mode(), skip_blocks(model, omitted):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask, target = pad_batch([examples[i] for i in rows], _pad_id(tokenizer), device)
            logits, labels, which = target_logits(model, ids, mask, target)
            nll, top = [], []
            for a in range(0, len(labels), rows_at_once):  # float32 a slice at a time: the memory of a long batch
                x = logits[a:a + rows_at_once].float()
                nll.append(torch.nn.functional.cross_entropy(x, labels[a:a + rows_at_once], reduction="none"))
                top.append(x.argmax(-1) if agreement else None)
            nll = torch.cat(nll)
            sums = torch.zeros(len(rows), device=device).index_add_(0, which, nll)
            counts = torch.bincount(which, minlength=len(rows))
            out[rows, 0] = sums.double().cpu().numpy()
            out[rows, 1] = counts.cpu().numpy()
            if agreement:
                hit = torch.cat(top) == labels
                # a target's place in its reply: targets come row by row, in order (target_logits)
                place = torch.arange(len(labels), device=device) - (torch.cumsum(counts, 0) - counts)[which]
                first = counts.clone().scatter_reduce_(0, which[~hit], place[~hit], reduce="amin")
                out[rows, 2] = torch.bincount(which, weights=hit.double(), minlength=len(rows)).cpu().numpy()
                out[rows, 3] = first.cpu().numpy()
    return out


def nll_matrix(model, tokenizer, examples: Sequence[Example], sets: Sequence[Sequence[int]],
               batch_size: int = 32, progress: Optional[Callable[[int, int], None]] = None,
               agreement: bool = False) -> np.ndarray:
    """[n examples, n sets, 2] (4 with `agreement`): `target_nll` of every example under every set (dense is the
    set ()): the per-prompt quality of each candidate, e.g. for a router that predicts each one's loss against
    dense."""
    out = np.zeros((len(examples), len(sets), 4 if agreement else 2))
    for j, s in enumerate(sets):
        out[:, j] = target_nll(model, tokenizer, examples, s, batch_size, agreement=agreement)
        if progress is not None:
            progress(j + 1, len(sets))
    return out


def mean_nll(scores: np.ndarray) -> float:
    """Mean NLL per target token of `target_nll` rows."""
    return float(scores[:, 0].sum() / max(1.0, scores[:, 1].sum()))


# -- the generation-aware search ------------------------------------------------------------------------


def search_examples(examples: Sequence[Example], per_kind: int) -> Dict[str, List[int]]:
    """{group: indices into `examples`}: the first `per_kind` code and task examples (their replies, not the
    code texts) and both together."""
    code = [i for i, e in enumerate(examples) if e.kind == "code"][:per_kind]
    task = [i for i, e in enumerate(examples) if e.kind == "task"][:per_kind]
    return {"code": code, "task": task, "all": code + task}


def run_distill_search(model, tokenizer, examples: Sequence[Example], ks: Sequence[int], out, model_identity: str,
                       protected: Sequence[int], per_kind: int = 64, batch_size: int = 32, state_path=None,
                       log: Log = print) -> dict:
    """Greedy search with the response_nll loss on each group (module doc); one candidates file per k
    (`train.search.candidates_path`). Resumable from the state file. Returns {k: candidates data}."""
    from .search import DISTILL_LOSS, SearchState, candidates_path, greedy_search, write_candidates

    groups = search_examples(examples, per_kind)
    used = sorted(set(groups["all"]))
    if not groups["code"] or not groups["task"]:
        raise PuddingError("the generation-aware search needs code and task examples in the val split")
    chosen = [examples[i] for i in used]
    where = {i: j for j, i in enumerate(used)}
    n_blocks = num_blocks(model)
    settings = {"model": model_identity, "loss": DISTILL_LOSS, "k": max(ks), "per_kind": per_kind,
                "protected": sorted(protected), "num_blocks": n_blocks, "ids": [e.id for e in chosen]}
    state_path = Path(state_path or Path(out).with_name(Path(out).stem + ".state.json"))
    state = SearchState(state_path, settings)
    scored: Dict[tuple, np.ndarray] = {}

    def score_set(group, omitted):
        key = tuple(sorted(omitted))
        if key not in scored:  # one pass per set serves all three groups
            scored[key] = target_nll(model, tokenizer, chosen, key, batch_size)
        return {DISTILL_LOSS: mean_nll(scored[key][[where[i] for i in groups[group]]])}

    def on_phase(chain, phase, record):
        log(f"{chain}: phase {phase}, removed block {record['removed']} (mean NLL {record['loss']:.4f})")

    orders = greedy_search(score_set, list(SEARCH_GROUPS), [DISTILL_LOSS], n_blocks, max(ks), protected, state,
                           on_phase)
    dense = mean_nll(target_nll(model, tokenizer, chosen, (), batch_size))
    meta = {"model": model_identity, "num_blocks": n_blocks, "protected": sorted(protected), "dense_nll": dense,
            "calibration": {"split": "val", "source": "distillation answers", "per_kind": per_kind,
                            "ids": {g: [examples[i].id for i in idx] for g, idx in groups.items()}}}
    return {k: write_candidates(candidates_path(out, k, ks), orders, k, state, meta) for k in sorted(ks)}
