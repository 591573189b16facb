"""Prompts for self-distillation (issue "Healed omission sets", item 1): what the dense model will be asked to
answer, so that a pruned model can be taught its answers. Never HumanEval, never an evaluation split.

Two sources, both offline:

  code   documented public functions of pure-Python standard-library modules (MODULES): the signature and the
         docstring become one chat message, "Write a Python function ...". The standard library's own source
         of the function is kept beside it (`code`): real code text for a logit-distillation term.
  task   questions from the train splits of the benchmark tasks (`pudding_mlx.tasks`), asked as a chat message
         with their choices; a seeded sample of `per_task` each.

  wide   (`build(wide=True)`) every pure-Python module of the standard library (`stdlib_modules`: its files, read,
         never imported), with the public methods of their public classes as well: ten times the code prompts
         of MODULES. `exclude` leaves out the ids of an earlier prompt file, so a second file adds only new ones.

HumanEval is held out: a code prompt is dropped when its function has the name of a HumanEval entry point, or
when its text shares a run of HOLDOUT_WORDS words with a HumanEval prompt. What was dropped is counted.
Docstrings differ between Python versions, so the file records the version that built it; the committed file
is what later runs use (this module needs neither torch nor MLX).
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import sys
import sysconfig
from pathlib import Path
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


# packages of the standard library that are tests, demos, GUI or bundled wheels: not code a user asks for
NOT_LIBRARY = ("test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
               "dist-packages", "pydoc_data", "__pycache__", "venv", "__phello__")


def code_message(name: str, signature: str, doc: str, cls: str = "") -> str:
    if cls:
        return (f"Write the method `{name}{signature}` of a Python class `{cls}`, that does what this docstring "
                f"says:\n\n{doc.strip()}\n\nReply with the method's code in one ```python block.")
    return (f"Write a Python function `{name}{signature}` that does what this docstring says:\n\n"
            f"{doc.strip()}\n\nReply with the function's code in one ```python block.")


def stdlib_modules() -> List[str]:
    """The dotted names of the standard library's pure-Python modules (NOT_LIBRARY left out), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in NOT_LIBRARY and not d.startswith("config-"))
        rel = Path(folder).relative_to(root).parts
        for f in files:
            if f.endswith(".py") and f != "__main__.py" and not f.startswith("test_"):
                name = ".".join(rel + (f[:-3],))
                out.append(name[:-len(".__init__")] if name.endswith(".__init__") else name)
    return sorted(set(out))


def _module_file(module_name: str) -> Path:
    """The module's source file, found without importing it (importing `antigravity` opens a browser); a module
    that is frozen or built in has its file beside the others all the same (posixpath)."""
    root = Path(sysconfig.get_paths()["stdlib"]).joinpath(*module_name.split("."))
    return root / "__init__.py" if root.is_dir() else root.with_suffix(".py")


def _lines(text: str) -> List[str]:
    """`text`'s lines with their ends, split where the parser splits them (\\r\\n, \\r or \\n; not \\f)."""
    return re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z", text)


def _segment(lines: List[str], node) -> str:
    """`ast.get_source_segment(text, node)` from the file's lines split once (it splits the whole file per call:
    minutes over the standard library). Column offsets count UTF-8 bytes."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
    return (lines[first].encode()[node.col_offset:].decode() + "".join(lines[first + 1:last])
            + lines[last].encode()[:node.end_col_offset].decode())


def _entry(node, lines: List[str], cls: str = ""):
    if node.name.startswith("_") or node.end_lineno - node.lineno > MAX_SOURCE_LINES:
        return None
    doc = ast.get_docstring(node) or ""
    if len(doc) < 40:
        return None
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return node.name, f"({ast.unparse(node.args)}){returns}", doc, _segment(lines, node), cls


def _functions(module_name: str, methods: bool = False) -> Iterator[tuple]:
    """(name, signature, docstring, source, class) of the module's public top-level functions (class "") and, with
    `methods`, of the public methods of its public top-level classes; read from its source file, not imported (a
    library loaded beside could have replaced a function, e.g. inspect.getfile)."""
    try:
        text = _module_file(module_name).read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, SyntaxError, UnicodeDecodeError):  # a file for another Python or another encoding
        return
    lines = _lines(text)
    for node in sorted(tree.body, key=lambda n: getattr(n, "name", "")):
        if isinstance(node, ast.FunctionDef):
            entry = _entry(node, lines)
            if entry:
                yield entry
        elif methods and isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for m in sorted((m for m in node.body if isinstance(m, ast.FunctionDef)), key=lambda m: m.name):
                entry = _entry(m, lines, node.name)
                if entry:
                    yield entry


def code_prompts(holdout: Sequence = (), modules: Sequence[str] = MODULES, methods: bool = False,
                 exclude: Sequence[str] = ()) -> tuple:
    """([prompt], {"dropped_name": n, "dropped_text": n}) from `modules`; `holdout`: HumanEval problems;
    `exclude`: prompt ids left out (an earlier file's)."""
    names = {p.entry_point for p in holdout}
    held = set().union(*(_shingles(p.prompt) for p in holdout)) if holdout else set()
    skip = set(exclude)
    out, dropped = [], {"dropped_name": 0, "dropped_text": 0}
    for module_name in modules:
        for name, signature, doc, source, cls in _functions(module_name, methods):
            pid = f"code:{module_name}.{cls + '.' if cls else ''}{name}"
            if pid in skip:
                continue
            text = code_message(name, signature, doc, cls)
            if name in names:
                dropped["dropped_name"] += 1
                continue
            if _shingles(text) & held:
                dropped["dropped_text"] += 1
                continue
            out.append({"id": pid, "source": f"python{sys.version_info[0]}.{sys.version_info[1]} stdlib "
                        f"{module_name}", "kind": "code", "text": text, "code": source})
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


def build(per_task: int = 200, seed: int = 0, data_dir=None, holdout: Optional[Sequence] = None, wide: bool = False,
          exclude=None) -> Dict:
    """The whole prompt set with its provenance (`holdout` default: HumanEval's 164 problems). `wide`: the code
    prompts of every standard-library module and class (module doc); `exclude`: an earlier prompt file whose ids
    are left out (its name and sha256 are recorded, so the file can be rebuilt)."""
    from pudding_mlx import humaneval

    holdout = humaneval.load_problems() if holdout is None else holdout
    modules = stdlib_modules() if wide else list(MODULES)
    earlier = {}
    if exclude is not None:
        from pudding_mlx.train.distill import read_prompts

        ids = [p["id"] for p in read_prompts(exclude)["prompts"]]
        earlier = {"exclude": {"file": Path(exclude).name, "ids": len(ids),
                               "sha256": hashlib.sha256(Path(exclude).read_bytes()).hexdigest()}}
    code, dropped = code_prompts(holdout, modules, methods=wide, exclude=ids if exclude is not None else ())
    task = task_prompts(per_task, seed, data_dir) if per_task else []  # code alone: no benchmark files read
    return {"format": "pudding-mlx-distill-prompts", "schema_version": 1,
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "modules": modules, "tasks": list(TASKS),
            "per_task": per_task, "seed": seed, **({"wide": True} if wide else {}), **earlier,
            "holdout": {"humaneval_problems": len(holdout), **dropped, "shared_words": HOLDOUT_WORDS},
            "counts": {"code": len(code), "task": len(task)}, "prompts": code + task}
