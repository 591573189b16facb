"""`pudding-mlx serve` as a client sees it: a live server (the CLI, in its own process, on a free local
port) on the real smollm2-135m preset (SmolLM2-135M-Instruct + its MiniLM router), talked to with the
real `openai` client and, for what that client cannot send, raw HTTP. Replies are kept short (the CPU
is slow); every assertion is on what came back: the text, the usage counts against the tokenizer,
which blocks ran against the router's own choice, what the prompt cache saved, and what the server
reports in /health."""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from helpers import CLI  # noqa: E402

pytestmark = pytest.mark.assets

FRANCE = "What is the capital of France?"
LONG = "List the numbers from 1 to 100, one per line."  # greedy SmolLM2 loops on it: a reply as long as allowed


class Server:
    """A `pudding-mlx serve` process; its output is collected by a thread (pipes never fill up)."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen([*CLI, "serve", "--preset", "smollm2-135m", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="400", **(env or {})))
        self.out, self.err = [], []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, l=lines: [l.append(x) for x in s], daemon=True).start()
        deadline = time.monotonic() + 300  # the first run builds the preset (a 98 MB + 90 MB download)
        while not (m := re.search(r"\((\S+)\) · listening on (http://127\.0\.0\.1:(\d+))/v1", "".join(self.out))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{''.join(self.out)}\n{''.join(self.err)[-3000:]}")
            time.sleep(0.1)
        self.bundle, self.url, self.port = Path(m[1]), m[2], int(m[3])

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kwargs)

    def http(self, method, path, body=None, headers=None):
        """(status, headers, parsed JSON body or the raw text) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read().decode()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return response.status, dict(response.getheaders()), parsed
        finally:
            conn.close()

    def health(self):
        status, _, body = self.http("GET", "/health")
        assert status == 200
        return body

    def wait_health(self, check, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if check(h):
                return h
            assert time.monotonic() < deadline, f"/health never satisfied the check: {h}"
            time.sleep(0.05)

    def stop(self, sig=signal.SIGINT, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    """One waiting place (--queue-size 1) and 8 reply tokens unless a request asks otherwise."""
    s = Server("--queue-size", "1", "--max-tokens", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokenizer(server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(server.bundle))


@pytest.fixture(scope="module")
def loaded(server):
    from pudding_mlx.load import load

    return load(str(server.bundle))


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="smollm2-135m", messages=messages, **kwargs)


def user(text):
    return [{"role": "user", "content": text}]


def prompt_count(tokenizer, messages):
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def completion_count(tokenizer, text, finish):
    """The reply's tokens as the tokenizer counts its text, plus the end-of-turn token it stopped on."""
    return len(tokenizer.encode(text, add_special_tokens=False)) + (finish == "stop")


def test_plain_and_streamed_completion(server, tokenizer, loaded):
    """The same greedy request, plain and streamed: the same text and finish; usage = the tokenizer's
    counts; `pudding` names the blocks the router picks for the message (routing.choose, the chat's
    rule) and the blocks that ran; the stream is SSE chunks of the one reply ending in [DONE]."""
    from pudding_mlx.routing import choose

    client = server.client()
    plain = ask(client, user(FRANCE), max_tokens=12)
    text, finish = plain.choices[0].message.content, plain.choices[0].finish_reason
    assert text.strip() and finish in ("stop", "length")
    assert plain.usage.prompt_tokens == prompt_count(tokenizer, user(FRANCE))
    assert plain.usage.completion_tokens == (12 if finish == "length" else completion_count(tokenizer, text, finish))
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    extra = plain.model_extra["pudding"]
    choice = choose(loaded, FRANCE)
    assert extra["routing"] == "routed" and extra["candidate"] == choice.candidate
    assert extra["omitted"] == list(choice.omitted) and len(extra["omitted"]) == 7
    assert extra["blocks_ran"] == 30 - 7 and extra["num_blocks"] == 30
    assert plain.model == "smollm2-135m" and plain.object == "chat.completion"

    chunks = list(ask(client, user(FRANCE), max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) >= 2  # streamed, not sent in one piece
    assert "".join(pieces) == text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == finish
    assert finals[0].model_extra["pudding"]["omitted"] == extra["omitted"]
    usage = chunks[-1].usage  # include_usage: a last chunk without choices
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert len({c.id for c in chunks}) == 1

    # the wire format itself: SSE events, the last one [DONE]
    status, headers, raw = server.http("POST", "/v1/chat/completions",
                                       {"messages": user(FRANCE), "max_tokens": 3, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"

    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]


def test_a_growing_conversation_reuses_the_prompt_cache(server, tokenizer):
    """Turn 2 resends turn 1 and its reply: the KV cache already holds them (usage's cached_tokens and
    `pudding.prompt` say so: the reused prefix is turn 1's prompt plus its reply tokens), and the
    reply is the one the same request gets when little of it is cached."""
    client = server.client()
    first = ask(client, user("Name a colour."), max_tokens=6)
    history = user("Name a colour.") + [{"role": "assistant", "content": first.choices[0].message.content},
                                        {"role": "user", "content": "And another one?"}]
    second = ask(client, history, max_tokens=6)
    p = second.model_extra["pudding"]["prompt"]
    assert second.usage.prompt_tokens == p["tokens"] == prompt_count(tokenizer, history)
    assert p["reused"] == first.usage.prompt_tokens + first.usage.completion_tokens
    assert p["new"] == p["tokens"] - p["reused"]
    assert p["cached"] == p["reused"] - p["re_prefilled"] == second.usage.prompt_tokens_details.cached_tokens
    if second.model_extra["pudding"]["omitted"] == first.model_extra["pudding"]["omitted"]:
        assert p["re_prefilled"] == 0 and p["cached"] == p["reused"]

    ask(client, user("Something else entirely: what is 2 + 2?"), max_tokens=3)  # the cache moves on
    again = ask(client, history, max_tokens=6)
    assert again.model_extra["pudding"]["prompt"]["reused"] < p["reused"]  # only the shared prefix
    assert again.choices[0].message.content == second.choices[0].message.content


def test_two_concurrent_clients(server):
    """Two clients at once: one runs, the other waits in the queue; both get the reply they get alone."""
    convs = [user(FRANCE), user("Name a colour.")]
    client = server.client()
    alone = [ask(client, c, max_tokens=6).choices[0].message.content for c in convs]
    results, barrier = [None, None], threading.Barrier(2)

    def run(i):
        barrier.wait()
        results[i] = ask(server.client(), convs[i], max_tokens=6)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.choices[0].message.content for r in results] == alone
    waited = sorted(r.model_extra["pudding"]["queue_s"] for r in results)
    assert waited[1] > 0.3  # the second one queued behind the first's generation
    assert len({r.id for r in results}) == 2


def test_a_client_that_disconnects_stops_its_generation(server):
    """A stream closed after three pieces: the server stops that generation (its record says
    'disconnected', a few tokens, not 200), and serves the next request at once."""
    before = server.health()["counts"]["stopped"]
    stream = ask(server.client(), user(LONG), max_tokens=200, stream=True)
    read, ident = 0, None
    for chunk in stream:
        ident = chunk.id
        read += bool(chunk.choices and chunk.choices[0].delta.content)
        if read == 3:
            break
    stream.close()
    t0 = time.monotonic()
    h = server.wait_health(lambda h: h["counts"]["stopped"] == before + 1 and not h["running"])
    stopped_after = time.monotonic() - t0
    record = next(r for r in h["recent"] if r["id"] == ident)
    assert record["finish"] == "disconnected"
    assert 3 <= record["completion_tokens"] <= 3 + 4  # at most a token or so computed after the close
    nxt = ask(server.client(), user(FRANCE), max_tokens=2)
    assert nxt.choices[0].finish_reason == "length" and nxt.usage.completion_tokens == 2
    assert stopped_after < 10  # 200 tokens would take far longer on this CPU (several tokens a second)


def test_a_plain_request_whose_client_leaves_is_stopped(server):
    """Not streamed: the server polls for the disconnect while it generates, and stops there."""
    before = server.health()["counts"]["stopped"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": user(LONG), "max_tokens": 200}),
                 {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    h = server.wait_health(lambda h: h["counts"]["stopped"] == before + 1 and not h["running"], timeout=15)
    record = h["recent"][-1]
    assert record["finish"] == "disconnected" and record["completion_tokens"] < 60


BAD = [  # (body, the param named in the error)
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"model": "m"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ({"messages": user("hi"), "temperature": "hot"}, "temperature"),
    ({"messages": user("hi"), "temperature": 5}, "temperature"),
    ({"messages": user("hi"), "top_p": -1}, "top_p"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens"),
    ({"messages": user("hi"), "max_tokens": "5"}, "max_tokens"),
    ({"messages": user("hi"), "max_tokens": True}, "max_tokens"),
    ({"messages": user("hi"), "seed": 1.5}, "seed"),
    ({"messages": user("hi"), "stream": "yes"}, "stream"),
    ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": user("hi"), "stop": [""]}, "stop"),
    ({"messages": user("hi"), "n": 2}, "n"),
    ({"messages": user("hi"), "model": 7}, "model"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_400_with_an_openai_error_body(server, body, param):
    status, headers, reply = server.http("POST", "/v1/chat/completions", body)
    assert status == 400, reply
    assert headers["content-type"] == "application/json"
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    assert reply["error"]["message"] and "Traceback" not in reply["error"]["message"]


def test_bad_requests_through_the_client_and_the_server_goes_on(server, tokenizer):
    """The openai client raises BadRequestError with the body; an over-long prompt is refused before
    any prefill; unknown paths and methods get JSON errors; then the server still answers."""
    client = server.client()
    before = server.health()["counts"]["bad_request"]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [])
    assert e.value.status_code == 400 and e.value.body["param"] == "messages"
    long = "hello " * 9000
    assert prompt_count(tokenizer, user(long)) > 8192  # SmolLM2's context
    t0 = time.monotonic()
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, user(long), stream=True)
    assert e.value.body["code"] == "context_length_exceeded" and "8192" in e.value.body["message"]
    assert time.monotonic() - t0 < 10  # refused, not prefilled (9,000 tokens take minutes here)
    assert server.health()["counts"]["bad_request"] == before + 2
    for method, path, code in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        status, _, reply = server.http(method, path)
        assert status == code and reply["error"]["message"]
    assert ask(client, user(FRANCE), max_tokens=2).usage.completion_tokens == 2


def test_stop_strings_end_the_reply_before_them(server):
    client = server.client()
    full = ask(client, user(FRANCE), max_tokens=8).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    cut = ask(client, user(FRANCE), max_tokens=8, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = ask(client, user(FRANCE), max_tokens=8, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]


def test_a_full_queue_gives_503(server):
    """--queue-size 1: one request runs, one waits, the next is refused at once with an OpenAI-style
    503 body (and Retry-After); once the running one goes, the waiting one is served."""
    before = server.health()["counts"]["refused"]
    running = ask(server.client(), user(LONG), max_tokens=200, stream=True)
    next(iter(running))  # the role chunk: its generation has started
    waiting = {}
    t = threading.Thread(target=lambda: waiting.setdefault("r", ask(server.client(), user(FRANCE), max_tokens=2)))
    t.start()
    server.wait_health(lambda h: h["running"] and h["queued"] == 1)
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        ask(server.client(), user(FRANCE), max_tokens=2)
    assert time.monotonic() - t0 < 5  # refused at once, not queued
    assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
    assert e.value.body["type"] == "server_error" and "--queue-size" in e.value.body["message"]
    status, headers, reply = server.http("POST", "/v1/chat/completions", {"messages": user("hi")})
    assert status == 503 and headers["retry-after"] == "1" and reply["error"]["code"] == "queue_full"
    assert server.health()["counts"]["refused"] == before + 2
    running.close()
    t.join(60)
    assert waiting["r"].usage.completion_tokens == 2


def test_ctrl_c_shuts_down_cleanly():
    """SIGINT while a reply streams: the stream ends with an OpenAI-style error event (no half-sent
    chunk), the process exits with status 0 and says what it served. --dense: every block runs."""
    s = Server("--dense")
    try:
        client = s.client()
        done = ask(client, user(FRANCE), max_tokens=2)
        extra = done.model_extra["pudding"]
        assert extra["routing"] == "dense" and extra["omitted"] == [] and extra["blocks_ran"] == 30
        stream = ask(client, user(LONG), max_tokens=200, stream=True)
        it = iter(stream)
        next(it), next(it)
        s.proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in it:
                pass
        assert s.proc.wait(30) == 0
        assert time.monotonic() - t0 < 30
        out = "".join(s.out)
        assert re.search(r"stopped · completed 1, stopped 1, refused 0, bad_request 0, error 0", out), out
        assert "Traceback" not in "".join(s.err)
        with pytest.raises(openai.APIConnectionError):
            ask(client, user(FRANCE), max_tokens=2)
    finally:
        s.stop()


def test_cli_errors_are_one_line(tmp_path):
    """Bad CLI input: one line on stderr, exit 2, before any model loads."""
    from helpers import run_cli

    busy = __import__("socket").socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cases = [
            (["serve", str(tmp_path / "nowhere")], "no such directory"),
            (["serve", "--preset", "smollm2-135m", "--dense", "--omit", "3"], "contradict"),
            (["serve", "--preset", "smollm2-135m", "--omit", "3,,5"], "empty block index"),
            (["serve", "--preset", "nope"], "--preset 'nope'"),
            (["serve", "--preset", "smollm2-135m", "--port", str(busy.getsockname()[1])], "cannot listen on"),
        ]
        for args, message in cases:
            done = run_cli(*args, env={"HF_HUB_OFFLINE": "1"}, timeout=120)
            assert done.returncode == 2, (args, done.stderr)
            lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("loading")]
            assert len(lines) == 1 and message in lines[0], (args, done.stderr)
    finally:
        busy.close()
