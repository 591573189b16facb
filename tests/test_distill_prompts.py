"""The self-distillation prompt set: standard-library functions as "write this function" messages with their
real source, train-split questions, HumanEval held out, and the committed file rebuilt from its recipe."""

import ast
import gzip
import json
import os
import sys
from pathlib import Path

import pytest

from pudding_mlx import humaneval
from pudding_mlx.train import distill_prompts as D

from helpers import run_cli

DATA = Path(os.environ.get("PUDDING_MLX_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks")
COMMITTED = Path(__file__).resolve().parents[1] / "results" / "distill" / "prompts.json"


def test_code_prompts_are_real_functions_and_humaneval_is_held_out():
    problems = humaneval.load_problems()
    prompts, dropped = D.code_prompts(problems)
    assert len(prompts) > 150 and dropped["dropped_name"] + dropped["dropped_text"] > 0
    held = set().union(*(D._shingles(p.prompt) for p in problems))
    names = {p.entry_point for p in problems}
    for p in prompts:
        name = p["id"].rsplit(".", 1)[1]
        tree = ast.parse(p["code"])
        assert isinstance(tree.body[0], ast.FunctionDef) and tree.body[0].name == name  # the stdlib's own source
        assert f"`{name}(" in p["text"] and name not in names and not D._shingles(p["text"]) & held
    assert D.code_prompts(problems)[0] == prompts  # deterministic


def test_a_humaneval_name_or_text_drops_the_prompt():
    kept, _ = D.code_prompts([], modules=["textwrap"])
    dedent = next(p for p in kept if p["id"] == "code:textwrap.dedent")
    shorten = next(p for p in kept if p["id"] == "code:textwrap.shorten")
    fake = [humaneval.Problem("X/0", dedent["text"].split("\n\n")[1], "other", "", ""),  # shares dedent's docstring
            humaneval.Problem("X/1", "def shorten():\n    pass\n", "shorten", "", "")]     # shares shorten's name
    left, dropped = D.code_prompts(fake, modules=["textwrap"])
    assert dropped == {"dropped_name": 1, "dropped_text": 1}
    assert [p["id"] for p in left] == [p["id"] for p in kept if p not in (dedent, shorten)]


def test_task_prompts_come_from_the_train_split_only():
    prompts = D.task_prompts(20, seed=0, data_dir=DATA, tasks=["arc_easy"])
    def ids(split):
        return {json.loads(line)["id"] for line in gzip.open(DATA / f"arc_easy.{split}.jsonl.gz", "rt")}
    got = {p["id"].split(":", 2)[2] for p in prompts}
    assert len(got) == 20 and got <= ids("train") and not got & (ids("validation") | ids("test"))
    assert all("\nA. " in p["text"] and p["text"].rstrip().endswith("sentences.") for p in prompts)
    assert D.task_prompts(20, seed=0, data_dir=DATA, tasks=["arc_easy"]) == prompts


def test_the_committed_prompt_file_is_rebuilt_from_its_recipe():
    committed = json.loads(COMMITTED.read_text())
    if committed["python"] != f"{sys.version_info[0]}.{sys.version_info[1]}":
        pytest.skip(f"the committed file was built with Python {committed['python']} (docstrings differ by version)")
    again = D.build(committed["per_task"], committed["seed"], DATA)
    assert again == committed


def test_cli_refuses_an_unwritable_output_in_one_line(tmp_path):
    done = run_cli("train", "distill-prompts", "--out", tmp_path / "no" / "such" / "p.json", "--data-dir", DATA)
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


WIDE = COMMITTED.with_name("prompts-code.json")


def test_wide_code_prompts_read_every_module_and_class_without_importing_them():
    modules = D.stdlib_modules()
    assert {"textwrap", "email.utils", "json", "asyncio.tasks", "antigravity"} <= set(modules)
    assert not any(m.split(".")[0] in D.NOT_LIBRARY or ".test" in f".{m}" for m in modules)
    assert "antigravity" not in sys.modules  # read from its file: importing it opens a browser
    kept, _ = D.code_prompts([], modules=["textwrap"], methods=True)
    method = next(p for p in kept if p["id"] == "code:textwrap.TextWrapper.wrap")
    tree = ast.parse(method["code"])
    assert isinstance(tree.body[0], ast.FunctionDef) and tree.body[0].name == "wrap"
    assert "`wrap(self, text)`" in method["text"] and "class `TextWrapper`" in method["text"]
    alone, _ = D.code_prompts([], modules=["textwrap"])
    assert [p for p in kept if p["id"].count(".") == 1] == alone  # methods add to the functions, nothing else
    # a source segment is exactly what `ast` itself cuts out (it splits the file per call: too slow for thousands)
    text = D._module_file("textwrap").read_text(encoding="utf-8")
    lines = D._lines(text)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            assert D._segment(lines, node) == ast.get_source_segment(text, node)


def test_the_committed_wide_code_file_is_rebuilt_from_its_recipe_and_adds_only_new_prompts():
    wide = json.loads(WIDE.read_text())
    committed = json.loads(COMMITTED.read_text())
    assert wide["wide"] and wide["counts"] == {"code": len(wide["prompts"]), "task": 0} and wide["counts"]["code"] > 2500
    assert not {p["id"] for p in wide["prompts"]} & {p["id"] for p in committed["prompts"]}
    assert wide["exclude"]["file"] == COMMITTED.name and wide["exclude"]["ids"] == len(committed["prompts"])
    if wide["python"] != f"{sys.version_info[0]}.{sys.version_info[1]}":
        pytest.skip(f"the committed file was built with Python {wide['python']} (docstrings differ by version)")
    assert D.build(0, wide["seed"], DATA, wide=True, exclude=COMMITTED) == wide
