"""Task adapters: benchmark files -> log-likelihood requests, the way lm-evaluation-harness builds them.

Data: one gzip'd JSONL file per task and split, `<task>.<split>.jsonl.gz`, every line
`{"task", "split", "id", "query", "choices", "label", "src"}` (see the README next to the files).
The folder is the `data_dir` argument, else `$PUDDING_MLX_DATA`; with neither (or `data_dir="hub"`)
the tasks are read from the Hugging Face hub with `datasets` (`pudding_mlx.hub_datasets`).

Every task goes through ONE code path (`_build`), driven by the `TASKS` table below. An example
becomes one (context, continuation) request per answer choice; the continuation always starts with
lm-eval's target delimiter, a single space. Templates (`{query}` is the file's `query` field):

  task           context                                     continuation      router text
  -------------  ------------------------------------------  ----------------  ----------------------
  arc_challenge  "Question: {query}\\nAnswer:"                 " {choice}"       "{query}"
  arc_easy       "Question: {query}\\nAnswer:"                 " {choice}"       "{query}"
  piqa           "Question: {query}\\nAnswer:"                 " {choice}"       "{query}"
  openbookqa     "Question: {query}\\nAnswer:"                 " {choice}"       "{query}"
  hellaswag      "{query}"                                    " {choice}"       "{query}"
  boolq          "{query}\\nAnswer:"                           " no" / " yes"    "{query}"
  winogrande     "{sentence up to _}{option}"                 " {rest, stripped}" "{query}" (with _)
  mmlu           "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
                 "{query.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"
                                                              " A" / " B" / ...  "{query.strip()}\\nA. {c0}\\n..."

Notes on fidelity to lm-eval (v0.4 task YAMLs):
  * BoolQ: the file's query already is "{passage}\\nQuestion: {question}?", so the context equals
    lm-eval's "{{passage}}\\nQuestion: {{question}}?\\nAnswer:".
  * HellaSwag: the query/choices are already lm-eval's `preprocess`ed ctx/endings.
  * OpenBookQA: lm-eval's `openbookqa.yaml` has `doc_to_text: question_stem` (the bare stem); we use
    the project's ARC-style "Question: ...\\nAnswer:" template (one template for the QA tasks), so
    OBQA figures are not directly comparable with lm-eval's published ones.
  * MMLU: lm-eval's default (zero-shot) mmlu prepends each subject's `description`
    ("The following are multiple choice questions (with answers) about abstract algebra.\\n\\n",
    subject with `_` -> space) to the `{{question.strip()}}\\nA. ...\\nAnswer:` prompt; we do too.
    The choices are the letters, so acc_norm == acc there.
  * WinoGrande is lm-eval's partial scoring: `doc_to_choice` = sentence[:blank] + option (one
    context per option), `doc_to_target` = sentence[blank+1:].strip(), joined with the " " delimiter.
    The gold index is the option index; both requests share the continuation.
  * `Example.norm_texts` are lm-eval's `doc_to_choice` strings: acc_norm divides each choice's
    summed log-likelihood by `len()` of that string (characters, no delimiter), exactly as lm-eval's
    `process_results` does. For WinoGrande that is the partial context, as in lm-eval.

Router text: what a user would actually send as a prompt -- the question or context WITHOUT the
answer choices (ARC/PIQA/OBQA: the question; HellaSwag: the context to continue; BoolQ: passage +
question; WinoGrande: the sentence with its `_` blank). MMLU is the exception: a multiple-choice
question is naturally asked with its options, so the router text is the question followed by the
"A. ..." option lines (no subject description, no "Answer:").

User data: `load_task("/path/file.jsonl[.gz]", split=None)` reads any file in the same schema. A row
whose `task` names a built-in task uses that task's template; any other row uses the `custom`
template (ARC-style "Question: {query}\\nAnswer:" + " {choice}"). `split` filters on the rows'
`split` field (None keeps every row).

Example ids: the file's `id`, made unique within the file by appending "#<k>" to its k-th repeat
(HellaSwag's `ind` repeats: 10042 rows, 9609 distinct). The suffix depends only on earlier rows, so
an id is the same whatever `limit` is.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from pudding_mlx import hub_datasets
from pudding_mlx.errors import PuddingError

DATA_ENV = "PUDDING_MLX_DATA"


class Request(NamedTuple):
    """One log-likelihood request: score `continuation` given `context`."""

    context: str
    continuation: str


@dataclass(frozen=True)
class TaskSpec:
    name: str
    context: str  # format string over {query}, {question} (= query.strip()), {options}, {subject}
    router: str  # same fields
    answers: str = "choices"  # "choices": continuation " {choice}"; "letters": " A", " B", ...
    partial: bool = False  # WinoGrande-style partial scoring (the blank splits the query)
    description: str = ""  # prepended to the context (lm-eval `description`), same fields
    splits: Tuple[str, ...] = ()
    eval_split: str = ""
    metric: str = "acc"  # the standard metric reported for eval_split: "acc" or "acc_norm"


@dataclass(frozen=True)
class Example:
    task: str
    split: str
    id: str
    requests: Tuple[Request, ...]  # one per choice, in choice order
    gold: int
    router_text: str
    choices: Tuple[str, ...]  # the file's choices
    norm_texts: Tuple[str, ...]  # lm-eval doc_to_choice strings; acc_norm divides by their len()

    @property
    def n_choices(self) -> int:
        return len(self.requests)


_QA = "Question: {query}\nAnswer:"
_MMLU_Q = "{question}{options}\nAnswer:"

TASKS: Dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_challenge", _QA, "{query}", splits=("train", "validation", "test"),
                 eval_split="test", metric="acc_norm"),
        TaskSpec("arc_easy", _QA, "{query}", splits=("train", "validation", "test"),
                 eval_split="test", metric="acc"),
        TaskSpec("boolq", "{query}\nAnswer:", "{query}", splits=("train", "validation"),
                 eval_split="validation", metric="acc"),
        TaskSpec("hellaswag", "{query}", "{query}", splits=("train", "validation"),
                 eval_split="validation", metric="acc_norm"),
        TaskSpec("piqa", _QA, "{query}", splits=("train", "validation"),
                 eval_split="validation", metric="acc"),
        TaskSpec("winogrande", "", "{query}", partial=True, splits=("train", "validation"),
                 eval_split="validation", metric="acc"),
        TaskSpec("openbookqa", _QA, "{query}", splits=("train", "validation", "test"),
                 eval_split="test", metric="acc_norm"),
        TaskSpec("mmlu", _MMLU_Q, "{question}{options}", answers="letters",
                 description="The following are multiple choice questions (with answers) about "
                 "{subject}.\n\n",
                 splits=("dev", "validation", "test"), eval_split="test", metric="acc"),
    )
}

# Template for rows of user files whose `task` is not a built-in task.
CUSTOM = TaskSpec("custom", _QA, "{query}", metric="acc")

_SPLIT_ALIASES = {"val": "validation", "valid": "validation"}
_LETTERS = string.ascii_uppercase


# -- data location -----------------------------------------------------------------------------------


def resolve_data_dir(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The benchmark folder: `path`, else $PUDDING_MLX_DATA, else a PuddingError."""
    chosen = path if path not in (None, "") else os.environ.get(DATA_ENV) or None
    if chosen is None:
        raise PuddingError(
            "no benchmark data directory: pass --data-dir DIR or set "
            f"{DATA_ENV}=DIR (the folder with <task>.<split>.jsonl.gz files)"
        )
    d = Path(chosen).expanduser()
    if not d.is_dir():
        src = "--data-dir" if path not in (None, "") else DATA_ENV
        raise PuddingError(f"benchmark data directory {str(d)!r} (from {src}) does not exist or "
                           "is not a folder; pass --data-dir DIR or set " f"{DATA_ENV}")
    return d


def is_user_file(task: str) -> bool:
    t = str(task)
    return t.endswith(".jsonl") or t.endswith(".jsonl.gz")


def eval_split(task: str) -> str:
    return _spec(task).eval_split


def eval_metric(task: str) -> str:
    return _spec(task).metric


def splits(task: str) -> Tuple[str, ...]:
    return _spec(task).splits


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise PuddingError(
            f"unknown task {task!r}; known tasks: {', '.join(TASKS)} "
            "(or give the path of a .jsonl/.jsonl.gz file in the benchmark schema)"
        )
    return TASKS[task]


def task_file(task: str, split: str, data_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    spec = _spec(task)
    split = _SPLIT_ALIASES.get(split, split)
    if split not in spec.splits:
        raise PuddingError(f"task {task!r} has no split {split!r}; it has {', '.join(spec.splits)}")
    path = resolve_data_dir(data_dir) / f"{task}.{split}.jsonl.gz"
    if not path.is_file():
        raise PuddingError(f"missing benchmark file {str(path)!r}; check --data-dir / {DATA_ENV}")
    return path


# -- reading -----------------------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[Tuple[int, dict]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise PuddingError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except OSError as e:
        raise PuddingError(f"cannot read {path}: {e}") from None


def _check_row(row: dict, where: str) -> None:
    if not isinstance(row, dict):
        raise PuddingError(f"{where}: a line must be a JSON object")
    for key in ("id", "query", "choices", "label"):
        if key not in row:
            raise PuddingError(f"{where}: missing field {key!r} (schema: task, split, id, query, "
                               "choices, label, src)")
    if not isinstance(row["query"], str):
        raise PuddingError(f"{where}: 'query' must be a string")
    ch = row["choices"]
    if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
        raise PuddingError(f"{where}: 'choices' must be a list of at least 2 strings")
    lab = row["label"]
    if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < len(ch):
        raise PuddingError(f"{where}: 'label' must be an index into choices (0..{len(ch) - 1}), "
                           f"got {lab!r}")


def _build(spec: TaskSpec, row: dict, split: str, ex_id: str, where: str) -> Example:
    """The one generic path: row + template -> Example."""
    query, choices = row["query"], list(row["choices"])
    if spec.answers == "letters" and len(choices) > len(_LETTERS):
        raise PuddingError(f"{where}: too many choices for letter answers")
    src = row.get("src") or {}
    subject = str(src.get("subject", row.get("subject", ""))).replace("_", " ")
    options = "".join(f"\n{_LETTERS[k]}. {c}" for k, c in enumerate(choices))
    fields = {"query": query, "question": query.strip(), "options": options, "subject": subject}

    if spec.partial:
        if query.count("_") != 1:
            raise PuddingError(f"{where}: a WinoGrande-style query needs exactly one '_' blank")
        i = query.index("_")
        contexts = [query[:i] + c for c in choices]
        continuation = " " + query[i + 1:].strip()
        requests = tuple(Request(c, continuation) for c in contexts)
        norm_texts = tuple(contexts)
    else:
        context = spec.description.format(**fields) + spec.context.format(**fields)
        answers = _LETTERS[: len(choices)] if spec.answers == "letters" else choices
        requests = tuple(Request(context, " " + a) for a in answers)
        norm_texts = tuple(answers)
    return Example(
        task=spec.name if spec is not CUSTOM else str(row.get("task") or "custom"),
        split=split,
        id=ex_id,
        requests=requests,
        gold=int(row["label"]),
        router_text=spec.router.format(**fields),
        choices=tuple(choices),
        norm_texts=norm_texts,
    )


def load_task(
    task: str,
    split: Optional[str] = None,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    limit: Optional[int] = None,
) -> List[Example]:
    """Load `task`'s `split` (default: its standard eval split) as Examples, in file order.

    `task` is a name in TASKS or the path of a user .jsonl/.jsonl.gz file in the benchmark schema.
    `limit` keeps the first `limit` examples.
    """
    if limit is not None and limit < 0:
        raise PuddingError(f"limit must be >= 0, got {limit}")
    user = is_user_file(task)
    hub_rows = None
    if user:
        path = Path(task).expanduser()
        if not path.is_file():
            raise PuddingError(f"task file {str(path)!r} does not exist")
        want_split = _SPLIT_ALIASES.get(split, split) if split else None
    else:
        split = _SPLIT_ALIASES.get(split, split) if split else _spec(task).eval_split
        want_split = None
        if hub_datasets.wants_hub(data_dir or os.environ.get(DATA_ENV)):  # no local folder: the hub
            _spec(task)
            path, hub_rows = Path(hub_datasets.describe(task, split)), hub_datasets.rows(task, split)
        else:
            path = task_file(task, split, data_dir)

    out: List[Example] = []
    seen: Dict[str, int] = {}
    for lineno, row in hub_rows or _rows(path):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path.name}:{lineno}"
        _check_row(row, where)
        raw_id = str(row["id"])
        k = seen.get(raw_id, 0)
        seen[raw_id] = k + 1
        ex_id = raw_id if k == 0 else f"{raw_id}#{k}"  # unique within the file, whatever the split
        if want_split is not None:
            if _SPLIT_ALIASES.get(row.get("split"), row.get("split")) != want_split:
                continue
        if user:
            spec = TASKS.get(row.get("task"), CUSTOM)
            row_split = _SPLIT_ALIASES.get(row.get("split"), row.get("split")) or ""
            out.append(_build(spec, row, row_split, ex_id, where))
        else:
            out.append(_build(TASKS[task], row, split, ex_id, where))
    if user and not out and limit != 0:
        raise PuddingError(f"{path}: no examples" + (f" with split {split!r}" if split else ""))
    return out


# -- sampling ----------------------------------------------------------------------------------------


class Sample(list):
    """A list of Examples that remembers how it was drawn (`seed`, `ids`, `n_from`)."""

    seed: int
    n_from: int

    @property
    def ids(self) -> List[str]:
        return [e.id for e in self]


def sample(examples: Sequence[Example], n: int, seed: int) -> Sample:
    """`n` examples drawn without replacement with `random.Random(seed)`, kept in their original
    order. `n >= len(examples)` returns all of them. The result records `seed` and `ids`."""
    if n < 0:
        raise PuddingError(f"sample size must be >= 0, got {n}")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise PuddingError("examples have repeated ids; cannot record a sample by id")
    if n >= len(examples):
        picked = list(range(len(examples)))
    else:
        picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    s = Sample(examples[i] for i in picked)
    s.seed, s.n_from = seed, len(examples)
    return s


def select(examples: Sequence[Example], ids: Sequence[str]) -> List[Example]:
    """The examples with these ids, in the order of `ids` (to replay a recorded sample)."""
    by_id = {e.id: e for e in examples}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise PuddingError(f"{len(missing)} recorded ids are not in the data, e.g. {missing[0]!r}")
    return [by_id[i] for i in ids]
