"""The benchmark tasks read from the Hugging Face hub with `datasets`, mapped to the project's schema.

The local benchmark folder (`<task>.<split>.jsonl.gz`, schema in `../shared/data/benchmarks/README.md`)
is the offline path; this module is the other one, the field's standard: the same datasets that
lm-evaluation-harness reads, through `datasets.load_dataset`, each row mapped from the dataset's own
fields to ours:

    {"task", "split", "id", "query", "choices", "label", "src"}

    task           hub dataset (config)                 query                              label from
    -------------  -----------------------------------  ---------------------------------  -----------------------
    arc_challenge  allenai/ai2_arc (ARC-Challenge)      question                           answerKey in choices.label
    arc_easy       allenai/ai2_arc (ARC-Easy)           question                           answerKey in choices.label
    boolq          aps/super_glue (boolq) for train,    "{passage}\\nQuestion: {question}?"  label / answer (bool)
                   google/boolq for validation
    hellaswag      Rowan/hellaswag                      lm-eval's preprocess of             label ("0".."3")
                                                        "{activity_label}: {ctx_a} {Ctx_b}"
    piqa           ybisk/piqa                           goal; choices sol1, sol2           label
    winogrande     allenai/winogrande (winogrande_xl)   sentence; choices option1, option2 answer ("1"/"2")
    openbookqa     allenai/openbookqa (main)            question_stem                      answerKey in choices.label
    mmlu           cais/mmlu (all)                      question                           answer (index)

BoolQ takes two sources because our files do (the README there): the train split is SuperGLUE's
(the passage starts with "title -- "), the validation split google/boolq's (no title), so a task
reads the same rows from either path. Ids are the dataset's id field where it has one, else the
row number in the split (MMLU: "{subject}-{n}", n counting within the subject).

`PUDDING_MLX_HUB_MIRROR=DIR` reads `DIR/<owner>/<name>` instead of the hub: a local copy of the
dataset repositories in the hub's own layout (e.g. from `hf download --repo-type dataset`), for
machines without a network. `HF_DATASETS_OFFLINE=1` uses `datasets`' cache only.

Imports neither torch nor mlx; `datasets` is imported when a task is read (the `hub` extra).
"""

import os
import re
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from .errors import PuddingError

MIRROR_ENV = "PUDDING_MLX_HUB_MIRROR"
HUB = "hub"  # the --data-dir value that asks for the hub explicitly


class Source(NamedTuple):
    repo: str                 # the hub dataset id
    config: Optional[str]     # its configuration name, if it has several
    split: str                # the hub's name for our split


def wants_hub(data_dir) -> bool:
    """True when `data_dir` (the --data-dir value, else $PUDDING_MLX_DATA) asks for the hub: nothing
    given, or the word `hub`."""
    return data_dir in (None, "") or str(data_dir) == HUB


# -- row mappers: one per dataset layout ------------------------------------------------------------


def _lettered(row: dict, query: str, where: str) -> Tuple[str, List[str], int]:
    """ARC / OpenBookQA: choices {text, label} and answerKey, one of the labels."""
    texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        raise PuddingError(f"{where}: answerKey {row['answerKey']!r} is not one of the choice labels {labels}")
    return query, texts, labels.index(row["answerKey"])


def _arc(row, n, where):
    query, choices, label = _lettered(row, row["question"], where)
    return str(row["id"]), query, choices, label, {"choice_labels": list(row["choices"]["label"]),
                                                    "answerKey": row["answerKey"]}


def _openbookqa(row, n, where):
    query, choices, label = _lettered(row, row["question_stem"], where)
    return str(row["id"]), query, choices, label, {}


def _boolq(row, n, where):
    # SuperGLUE: idx + label (0/1); google/boolq: answer (bool), no id
    label = int(row["label"]) if "label" in row else int(bool(row["answer"]))
    ex_id = str(row["idx"]) if "idx" in row else str(n)
    query = f"{row['passage']}\nQuestion: {row['question']}?"
    return ex_id, query, ["no", "yes"], label, {"passage": row["passage"], "question": row["question"],
                                                "answer": bool(label)}


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: WikiHow's bracketed artefacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row, n, where):
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    src = {k: row[k] for k in ("activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split_type")
           if k in row}
    return str(row["ind"]), query, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]), src


def _piqa(row, n, where):
    return str(n), row["goal"], [row["sol1"], row["sol2"]], int(row["label"]), \
        {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"]}


def _winogrande(row, n, where):
    src = {k: row[k] for k in ("sentence", "option1", "option2", "answer")}
    return str(n), row["sentence"], [row["option1"], row["option2"]], int(row["answer"]) - 1, src


def _mmlu(row, n, where):
    return None, row["question"], list(row["choices"]), int(row["answer"]), {"subject": row["subject"]}


Mapper = Callable[[dict, int, str], tuple]
_SAME = {"train": "train", "validation": "validation", "test": "test"}
SOURCES: Dict[str, Tuple[Mapper, Dict[str, Source]]] = {
    "arc_challenge": (_arc, {s: Source("allenai/ai2_arc", "ARC-Challenge", h) for s, h in _SAME.items()}),
    "arc_easy": (_arc, {s: Source("allenai/ai2_arc", "ARC-Easy", h) for s, h in _SAME.items()}),
    "boolq": (_boolq, {"train": Source("aps/super_glue", "boolq", "train"),
                       "validation": Source("google/boolq", None, "validation")}),
    "hellaswag": (_hellaswag, {s: Source("Rowan/hellaswag", None, s) for s in ("train", "validation")}),
    "piqa": (_piqa, {s: Source("ybisk/piqa", None, s) for s in ("train", "validation")}),
    "winogrande": (_winogrande, {s: Source("allenai/winogrande", "winogrande_xl", s) for s in ("train", "validation")}),
    "openbookqa": (_openbookqa, {s: Source("allenai/openbookqa", "main", h) for s, h in _SAME.items()}),
    "mmlu": (_mmlu, {s: Source("cais/mmlu", "all", s) for s in ("dev", "validation", "test")}),
}


def source(task: str, split: str) -> Source:
    """Where `task`'s `split` lives on the hub."""
    if task not in SOURCES:
        raise PuddingError(f"task {task!r} has no hub source; hub tasks: {', '.join(SOURCES)}")
    splits = SOURCES[task][1]
    if split not in splits:
        raise PuddingError(f"task {task!r} has no split {split!r} on the hub; it has {', '.join(splits)}")
    return splits[split]


def describe(task: str, split: str) -> str:
    """A short name for messages: `allenai/ai2_arc[ARC-Easy]:test`."""
    s = source(task, split)
    return f"{s.repo}{f'[{s.config}]' if s.config else ''}:{s.split}"


def load_source(src: Source):
    """`datasets.load_dataset` of `src` (from `PUDDING_MLX_HUB_MIRROR` when set), errors as one line."""
    try:
        import datasets
    except ImportError:
        raise PuddingError("reading tasks from the Hugging Face hub needs the `datasets` library: "
                           "pip install 'pudding-mlx[hub]' (or pass --data-dir DIR for local files)") from None
    mirror = os.environ.get(MIRROR_ENV)
    path = os.path.join(mirror, src.repo) if mirror else src.repo
    if mirror and not os.path.isdir(path):
        raise PuddingError(f"{MIRROR_ENV}={mirror}: no folder {src.repo} there (a copy of the hub's dataset repo)")
    try:
        return datasets.load_dataset(path, src.config, split=src.split)
    except Exception as e:  # network, offline cache miss, missing split: one line, with the way out
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PuddingError(f"cannot read {src.repo}{f' ({src.config})' if src.config else ''} split "
                           f"{src.split!r} from the Hugging Face hub ({first}); pass --data-dir DIR or set "
                           "PUDDING_MLX_DATA=DIR for the local benchmark files") from None


def rows(task: str, split: str) -> Iterator[Tuple[int, dict]]:
    """(row number, row in our schema) for every row of `task`'s `split` on the hub, in its order."""
    mapper, _ = SOURCES[task] if task in SOURCES else (None, None)
    src = source(task, split)
    per_subject: Dict[str, int] = {}
    for n, raw in enumerate(load_source(src)):
        where = f"{describe(task, split)} row {n}"
        try:
            ex_id, query, choices, label, extra = mapper(raw, n, where)
        except (KeyError, TypeError, ValueError) as e:
            raise PuddingError(f"{where}: unexpected fields for {task} ({type(e).__name__}: {e}); "
                               "the dataset's layout may have changed") from None
        if ex_id is None:  # MMLU: the subject and the row's place within it
            k = per_subject.get(extra["subject"], 0)
            per_subject[extra["subject"]] = k + 1
            ex_id = f"{extra['subject']}-{k}"
        yield n + 1, {"task": task, "split": split, "id": ex_id, "query": query, "choices": choices,
                      "label": label, "src": extra}
