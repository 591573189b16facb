"""Prompts for self-distillation (issue "Healed omission sets", item 1): what the dense model will be asked to
answer, so that a pruned model can be taught its answers. Never HumanEval, never an evaluation split.

Two sources, both offline:

  code   documented public functions of pure-Python standard-library modules (MODULES): the signature and the
         docstring become one chat message, "Write a Python function ...". The standard library's own source
         of the function is kept beside it (`code`): real code text for a logit-distillation term.
  task   questions from the train splits of the benchmark tasks (`pudding_mlx.tasks`), asked as a chat message
         with their choices; a seeded sample of `per_task` each.

HumanEval is held out: a code prompt is dropped when its function has the name of a HumanEval entry point, or
when its text shares a run of HOLDOUT_WORDS words with a HumanEval prompt. What was dropped is counted.
Docstrings differ between Python versions, so the file records the version that built it; the committed file
is what later runs use (this module needs neither torch nor MLX).
"""

from __future__ import annotations

import ast
import importlib
import random
import re
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Set

# pure-Python modules whose public functions are small, documented and self-contained
MODULES = ("textwrap", "string", "shlex", "fnmatch", "posixpath", "ntpath", "colorsys", "calendar", "difflib",
           "heapq", "bisect", "statistics", "html", "base64", "quopri", "glob", "keyword", "urllib.parse",
           "email.utils", "ipaddress", "csv", "json", "tokenize", "inspect", "functools", "copy", "pprint",
           "random", "gettext", "locale", "mimetypes", "platform", "sysconfig", "zipfile", "tarfile")
TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
HOLDOUT_WORDS = 8
MAX_SOURCE_LINES = 60


def _words(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _shingles(text: str, n: int = HOLDOUT_WORDS) -> Set[tuple]:
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def code_message(name: str, signature: str, doc: str) -> str:
    return (f"Write a Python function `{name}{signature}` that does what this docstring says:\n\n"
            f"{doc.strip()}\n\nReply with the function's code in one ```python block.")


def _functions(module_name: str) -> Iterator[tuple]:
    """(name, signature, docstring, source) of the module's public top-level functions, read from its source
    file (not imported: a library loaded beside could have replaced a function, e.g. inspect.getfile)."""
    path = importlib.import_module(module_name).__file__  # frozen modules (posixpath) have it too; their spec does not
    text = open(path, encoding="utf-8").read()
    for node in sorted(ast.parse(text).body, key=lambda n: getattr(n, "name", "")):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node) or ""
        source = ast.get_source_segment(text, node) or ""
        if len(doc) < 40 or source.count("\n") > MAX_SOURCE_LINES:
            continue
        returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
        yield node.name, f"({ast.unparse(node.args)}){returns}", doc, source


def code_prompts(holdout: Sequence = (), modules: Sequence[str] = MODULES) -> tuple:
    """([prompt], {"dropped_name": n, "dropped_text": n}) from `modules`; `holdout`: HumanEval problems."""
    names = {p.entry_point for p in holdout}
    held = set().union(*(_shingles(p.prompt) for p in holdout)) if holdout else set()
    out, dropped = [], {"dropped_name": 0, "dropped_text": 0}
    for module_name in modules:
        for name, signature, doc, source in _functions(module_name):
            text = code_message(name, signature, doc)
            if name in names:
                dropped["dropped_name"] += 1
                continue
            if _shingles(text) & held:
                dropped["dropped_text"] += 1
                continue
            out.append({"id": f"code:{module_name}.{name}", "source": f"python{sys.version_info[0]}."
                        f"{sys.version_info[1]} stdlib {module_name}", "kind": "code", "text": text, "code": source})
    return out, dropped


def task_message(query: str, choices: Sequence[str]) -> str:
    letters = "ABCDEFGH"
    options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    return f"{query.strip()}\n\n{options}\n\nAnswer with the letter of the best option, then explain why in one or two sentences."


def task_prompts(per_task: int, seed: int = 0, data_dir=None, tasks: Sequence[str] = TASKS) -> List[dict]:
    """A seeded sample of `per_task` train-split questions of each task, as chat messages."""
    from pudding_mlx.tasks import load_task

    out = []
    for task in tasks:
        rows = load_task(task, "train", data_dir)
        for ex in random.Random(f"{seed}:{task}").sample(rows, min(per_task, len(rows))):
            query = ex.router_text
            out.append({"id": f"task:{task}:{ex.id}", "source": f"{task} train", "kind": "task",
                        "text": task_message(query, ex.choices)})
    return out


def build(per_task: int = 200, seed: int = 0, data_dir=None, holdout: Optional[Sequence] = None) -> Dict:
    """The whole prompt set with its provenance (`holdout` default: HumanEval's 164 problems)."""
    from pudding_mlx import humaneval

    holdout = humaneval.load_problems() if holdout is None else holdout
    code, dropped = code_prompts(holdout)
    task = task_prompts(per_task, seed, data_dir)
    return {"format": "pudding-mlx-distill-prompts", "schema_version": 1,
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "modules": list(MODULES), "tasks": list(TASKS),
            "per_task": per_task, "seed": seed, "holdout": {"humaneval_problems": len(holdout), **dropped,
                                                             "shared_words": HOLDOUT_WORDS},
            "counts": {"code": len(code), "task": len(task)}, "prompts": code + task}
