"""HumanEval: data from the wheel and from the hub's layout, the extraction rule, the program, the sandbox."""

import os
from pathlib import Path

import pytest

from pudding_mlx import humaneval as he
from pudding_mlx.errors import PuddingError

HUB = Path(__file__).parent / "fixtures" / "hub"
FAST = he.Limits(seconds=3, cpu_seconds=3)


@pytest.fixture(scope="module")
def problems():
    return he.load_problems()


# -- data ----------------------------------------------------------------------------------------------


def test_the_wheel_gives_164_checked_problems(problems):
    assert len(problems) == he.N_PROBLEMS
    assert [p.task_id for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert problems[0].entry_point == "has_close_elements"
    assert "def has_close_elements(" in problems[0].prompt
    assert he.load_problems(limit=7) == problems[:7]


def test_the_hub_layout_gives_the_same_problems(problems, monkeypatch):
    monkeypatch.setenv("PUDDING_MLX_HUB_MIRROR", str(HUB))
    hub = he.load_problems("hub")
    assert len(hub) == 5 and hub == problems[:5]  # field for field


def test_a_damaged_wheel_file_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "HumanEval.jsonl.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(PuddingError, match="cannot read it"):
        he.read_jsonl(bad)
    plain = tmp_path / "h.jsonl"
    plain.write_text('{"task_id": "x", "prompt": "p"}\n')
    with pytest.raises(PuddingError, match=r"h.jsonl line 1: no text field 'entry_point'"):
        he.read_jsonl(plain)
    with pytest.raises(PuddingError, match="no such HumanEval file"):
        he.load_problems(tmp_path / "missing.jsonl")


def test_the_canonical_solutions_pass_and_a_wrong_one_fails(problems):
    some = problems[:12]
    right = he.check_all(some, [f"```python\n{p.prompt}{p.canonical_solution}```" for p in some], workers=2)
    assert he.pass_at_1(right) == 100.0, [o.result for o in right if not o.passed]
    wrong = he.check_all(some, [f"```python\n{p.prompt}    return None\n```" for p in some], workers=2)
    assert he.pass_at_1(wrong) == 0.0
    assert all(o.result.startswith("failed: ") for o in wrong)


def test_each_way_a_reply_ends_has_its_kind(problems):
    """failure_kind on the sandbox's own outcomes for one problem's replies: right, wrong logic, a crash, broken
    syntax; a reply that hit the token limit is cut off whatever its error; hangs and kills from their results."""
    p = problems[0]
    body = {"passed": p.canonical_solution, "wrong answer": "    return not any(numbers)\n",
            "runtime error": "    raise ValueError('nope')\n", "syntax error": "    return (numbers\n"}
    for kind, code in body.items():
        o = he.check(p, f"```python\n{p.prompt}{code}```", FAST)
        assert he.failure_kind({"passed": o.passed, "result": o.result, "finished": True}) == kind, o.result
        assert he.failure_kind({"passed": o.passed, "result": o.result, "finished": False}) == (
            "passed" if o.passed else "cut off")
    assert he.failure_kind({"passed": False, "result": "timed out", "finished": True}) == "timed out"
    assert he.failure_kind({"passed": False, "result": "killed: signal 6", "finished": True}) == "killed"
    assert set(he.FAILURE_KINDS) == {"passed", "wrong answer", "runtime error", "syntax error", "cut off",
                                     "timed out", "killed"}


# -- extraction ------------------------------------------------------------------------------------------


def test_extraction_rules():
    f = "def add(a, b):\n    return a + b\n"
    # 1. the first fenced block that defines the entry point, even after another block
    reply = f"Use it like this:\n```python\nprint(add(1, 2))\n```\nHere it is:\n```python\n{f}```\nDone."
    assert he.extract_code(reply, "add") == f
    # 2. else the first block; a block left open runs to the end
    assert he.extract_code("```\nreturn a + b\n```", "add") == "return a + b\n"
    assert he.extract_code("```python\ndef add(a, b):\n    return a", "add") == "def add(a, b):\n    return a"
    # a fence with a language tag opens a block even right after a bare fence (small models write that)
    assert he.extract_code(f"```\n```python\n{f}```", "add") == f
    # 3. no fence: the whole reply
    assert he.extract_code("    return a + b\n", "add") == "    return a + b\n"
    assert he.defines("async def add(x):", "add") and not he.defines("def adder(x):", "add")


def test_program_replaces_the_stub_or_continues_it(problems):
    p = problems[0]
    full = he.program(p, f"```python\n{p.prompt}{p.canonical_solution}```")
    assert full.startswith(p.prompt + "\n    pass\n\n") and full.rstrip().endswith(f"check({p.entry_point})")
    body = he.program(p, p.canonical_solution)  # completion style: the body continues the stub
    assert body.startswith(p.prompt + p.canonical_solution)
    assert he.check(p, p.canonical_solution, FAST).passed
    # a reply that defines only a helper and no entry point is run as a body: it fails, it is not skipped
    assert not he.check(p, "```python\ndef helper():\n    return 1\n```", FAST).passed


# -- the sandbox: each case costs its problem only ---------------------------------------------------------


def test_a_hang_is_stopped_at_the_time_limit():
    o = he.run_program("while True:\n    pass\n", he.Limits(seconds=2, cpu_seconds=10))
    assert (o.passed, o.result) == (False, "timed out") and 1.9 < o.seconds < 5


def test_a_crash_and_an_exit_status_fail():
    assert he.run_program("import os\nos.abort()\n", FAST).result == "killed: signal 6"
    assert he.run_program("import sys\nsys.exit(3)\n", FAST).result == "failed: exit status 3"
    assert he.run_program("raise ValueError('nope')\n", FAST).result == "failed: ValueError: nope"


def test_endless_output_is_cut_at_the_file_size_limit():
    o = he.run_program("while True:\n    print('x' * 1000)\n", FAST)
    assert not o.passed and o.result.startswith("failed: output limit") and o.seconds < 3


def test_a_write_outside_its_folder_fails_and_writes_nothing(tmp_path):
    target = tmp_path / "escape.txt"
    for src in (f"open({str(target)!r}, 'w').write('x')\n",
                f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
                "open('/tmp/pudding-sandbox-escape.txt', 'w').write('x')\n",
                f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})\n",
                "import shutil\nshutil.rmtree('/tmp')\n"):
        (tmp_path / "keep.txt").write_text("mine")
        o = he.run_program(src, FAST)
        assert not o.passed and "PermissionError: sandbox:" in o.result, (src, o)
        assert (tmp_path / "keep.txt").read_text() == "mine"
    assert not target.exists() and not Path("/tmp/pudding-sandbox-escape.txt").exists()
    # its own folder is writable: a test may use files there
    assert he.run_program("open('a.txt', 'w').write('ok')\nassert open('a.txt').read() == 'ok'\n", FAST).passed


def test_a_fork_a_fork_bomb_and_subprocesses_fail():
    for src in ("import os\nos.fork()\n", "import os\nwhile True:\n    os.fork()\n",
                "import subprocess\nsubprocess.run(['true'])\n", "import os\nos.system('true')\n",
                "import ctypes\n", "import socket\nsocket.create_connection(('127.0.0.1', 9))\n"):
        o = he.run_program(src, FAST)
        assert not o.passed and "sandbox:" in o.result, (src, o)


def test_memory_is_limited():
    o = he.run_program("x = bytearray(8 << 30)\n", FAST)
    assert (o.passed, o.result) == (False, "failed: MemoryError")


def test_a_clean_environment_and_a_private_folder():
    os.environ["PUDDING_SECRET_FOR_TEST"] = "1"
    try:
        src = ("import os, sys\nassert 'PUDDING_SECRET_FOR_TEST' not in os.environ\n"
               "assert os.getcwd().startswith(os.environ['TMPDIR'])\nassert not sys.flags.no_site or True\n")
        assert he.run_program(src, FAST).passed
    finally:
        del os.environ["PUDDING_SECRET_FOR_TEST"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="another uid only when run as root")
def test_as_root_the_program_runs_as_a_uid_of_its_own():
    src = "import os\nassert os.getuid() >= 1 << 20, os.getuid()\nassert os.getgid() == os.getuid()\n"
    assert he.run_program(src, FAST).passed


def test_sandboxes_of_two_processes_at_once_leave_each_other_alone(problems, tmp_path):
    """Two evaluations on one machine (the GPU runs do this): each one's clean-up must not kill the other's
    programs (as root it kills by uid; a uid shared between processes made 'killed: killed' failures)."""
    import subprocess
    import sys

    code = ("from pudding_mlx import humaneval as he\n"
            "ps = he.load_problems(limit=24)\n"
            "out = he.check_all(ps, [p.prompt + p.canonical_solution for p in ps], workers=3)\n"
            "print(sum(o.passed for o in out), sorted({o.result for o in out if not o.passed}))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert outs == ["24 []", "24 []"], outs
