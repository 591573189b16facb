"""`pudding-mlx serve`: an OpenAI-compatible chat-completions server for one model, routed per request.

    POST /v1/chat/completions   messages, max_tokens (max_completion_tokens), temperature, top_p, seed,
                                stop, stream (server-sent events ending in `data: [DONE]`),
                                stream_options.include_usage, max_loss (a pudding-mlx extension:
                                this request's adaptive-depth budget, on a server started with
                                --max-loss); usage counts; an extra field `pudding`
    GET  /v1/models             the one model served
    GET  /health                status, queue, counters and the last requests

Built on Starlette (routing, request bodies, `StreamingResponse` for server-sent events, which also
tells a streaming response that its client went away) served by uvicorn (HTTP/1.1 over h11, graceful
shutdown on SIGINT / SIGTERM). Both are small, pure Python and widely used (FastAPI is Starlette plus
validation and OpenAPI that this fixed schema does not need).

Generation. One `chat.ChatSession` owns the model, its KV cache and the routing (`routed_reply`: the
same rules as `pudding-mlx chat`, the router reading the last user message). MLX state is mutated
during a call, so every request runs on one worker thread, one at a time; the model is loaded on that
thread. Requests wait in a bounded queue (`queue_size` waiting, besides the one running); a request
that finds it full is refused at once with 503 and an OpenAI-style error body. The client's
conversation replaces the session's history on each request (`ChatSession.set_history`) while the
KV cache stays: a conversation that grows turn by turn reuses the cached prefix (the chat's cache
rule), so an editor does not re-prefill its history; unrelated requests in between only trim the
cache back to the prefix they share.

Stopping. A client that disconnects (while queued, during the prefill or while tokens stream) stops
its generation: the worker polls the request's stop flag between prefill chunks and per token
(`should_stop`), and goes on to the next request. A `stop` string ends generation the same way; the
returned text is cut before it (a streamed reply holds back text that could begin a stop string).

Errors are OpenAI-style bodies `{"error": {"message", "type", "param", "code"}}`, never a traceback:
400 for malformed JSON, wrong types, an empty message list, a last message that is not the user's, a
prompt as long as the model's context or longer; 503 for a full queue or a server shutting down; 404 /
405 for unknown paths and methods; 500 (one line, the traceback in the server's log) for a failure of
the server itself.
"""

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .errors import PuddingError, first_line

ROLES = {"system", "user", "assistant", "developer"}  # "developer": OpenAI's newer name for system
MAX_BODY = 8 << 20  # bytes of request JSON accepted
MAX_STOP = 4        # stop strings per request, as OpenAI
RECENT = 32         # finished requests kept for /health


class ApiError(Exception):
    """An error answered as an OpenAI-style body with HTTP status `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# -- the request --------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """A checked `POST /v1/chat/completions` body."""

    messages: List[dict]          # [{"role": "system"|"user"|"assistant", "content": str}], last: user
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    model: Optional[str] = None
    max_loss: Optional[float] = None  # this request's adaptive-depth budget (the server's --max-loss otherwise)

    def conversation(self):
        """(system message or None, earlier turns, the last user message's text)."""
        rest = list(self.messages)
        system = rest.pop(0)["content"] if rest and rest[0]["role"] == "system" else None
        return system, rest[:-1], rest[-1]["content"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _content(m: int, content) -> str:
    """A message's text: a string, or a list of text parts ({"type": "text", "text": ...})."""
    where = f"messages[{m}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                  "supported", f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}: must be a string or a list of text parts, got {type(content).__name__}", where)


def parse_request(body: bytes, max_tokens: int, temperature: float, top_p: float) -> ChatRequest:
    """Check a request body; the defaults are the server's. Raises ApiError(400) saying what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad_request(f"the request body is not valid JSON ({first_line(e)})", code="invalid_json")
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")

    messages = data.get("messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be a list of {role, content} objects", "messages")
    if not messages:
        raise bad_request("'messages' is empty; send at least one user message", "messages")
    checked = []
    for m, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad_request(f"messages[{m}] must be an object with 'role' and 'content'", f"messages[{m}]")
        role = msg.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{m}].role {role!r}: supported roles are system, developer, user, "
                              "assistant", f"messages[{m}].role")
        if "content" not in msg or msg["content"] is None:
            raise bad_request(f"messages[{m}] has no content", f"messages[{m}].content")
        checked.append({"role": "system" if role == "developer" else role, "content": _content(m, msg["content"])})
    if checked[-1]["role"] != "user":
        raise bad_request(f"the last message must be the user's, got {checked[-1]['role']!r}", "messages")

    def number(name, default, lo, hi):
        v = data.get(name)
        if v is None:
            return default
        if not _is_number(v) or not lo <= v <= hi:
            raise bad_request(f"'{name}' must be a number from {lo} to {hi}, got {v!r}", name)
        return float(v)

    limit = data.get("max_completion_tokens", data.get("max_tokens"))
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    if limit is None:
        limit = max_tokens
    elif not _is_int(limit) or limit < 1:
        raise bad_request(f"'{name}' must be a positive integer, got {limit!r}", name)
    seed = data.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad_request(f"'seed' must be an integer, got {seed!r}", "seed")
    stop = data.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stop)):
        raise bad_request(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request(f"'stream' must be true or false, got {stream!r}", "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_request("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    n = data.get("n")
    if n is not None and n != 1:
        raise bad_request(f"'n' must be 1 (one choice per request), got {n!r}", "n")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {model!r}", "model")
    max_loss = data.get("max_loss")  # a number; JSON has no infinity: "inf" / "-inf" as strings
    if isinstance(max_loss, str) and max_loss in ("inf", "+inf", "-inf"):
        max_loss = float(max_loss)
    if max_loss is not None and (not _is_number(max_loss) or max_loss != max_loss):
        raise bad_request(f"'max_loss' must be a number (or \"inf\" / \"-inf\"), got {max_loss!r}", "max_loss")
    return ChatRequest(checked, int(limit), number("temperature", temperature, 0, 2), number("top_p", top_p, 0, 1),
                       seed, list(stop), stream, bool(options.get("include_usage", False)), model,
                       None if max_loss is None else float(max_loss))


class StopText:
    """The reply's text as it streams, cut before the first stop string. `feed(piece)` returns what
    may be shown now (a tail that could begin a stop string is held back); `hit` turns True once a
    stop string appeared; `flush()` returns the held-back tail at the end."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.text, self.shown, self.hit = "", 0, False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        self.text += piece
        found = [i for i in (self.text.find(s, self.shown) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            self.text = self.text[: min(found)]
            return self._show(len(self.text))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._show(len(self.text) - hold)

    def flush(self) -> str:
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        out = self.text[self.shown: upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return out


# -- the engine: one model, one worker thread, a bounded queue ---------------------------------------


class Job:
    """One request in the engine. The worker thread reports to the request's event loop through
    `events` (an asyncio.Queue): ("start", None) once the prompt is accepted, ("token", text) when
    streaming, ("done", record) at the end, or ("error", ApiError) instead."""

    def __init__(self, request: ChatRequest, loop: asyncio.AbstractEventLoop):
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.request, self.loop = request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.created = int(time.time())
        self.queued_at = time.monotonic()
        self.stopped = threading.Event()
        self.stop_reason: Optional[str] = None  # "disconnected" | "shutdown"
        self._getter: Optional[asyncio.Task] = None

    def stop(self, reason: str) -> None:
        if not self.stopped.is_set():
            self.stop_reason = reason
            self.stopped.set()

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def drop_getter(self) -> None:
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None

    async def next_event(self, request=None, poll: float = 0.2):
        """The next event; with `request` (a starlette Request), None as soon as its client has
        disconnected (the job is then stopped)."""
        if self._getter is None:
            self._getter = asyncio.ensure_future(self.events.get())
        while True:
            done, _ = await asyncio.wait({self._getter}, timeout=None if request is None else poll)
            if done:
                getter, self._getter = self._getter, None
                return getter.result()
            if await request.is_disconnected():
                self.drop_getter()
                self.stop("disconnected")
                return None


class QueueFull(Exception):
    pass


class Engine:
    """The model, its ChatSession and the one worker thread that runs every generation."""

    def __init__(self, model_path, model_id: str, dtype: Optional[str] = None, dense: bool = False,
                 omit: Optional[Sequence[int]] = None, queue_size: int = 8, max_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, lossless: bool = False,
                 draft_tokens: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
                 routed: bool = False, healed: bool = True, max_loss: Optional[float] = None,
                 lora_terms: bool = False):
        if queue_size < 0:
            raise PuddingError(f"--queue-size {queue_size}: must be 0 or more")
        self.model_path, self.model_id, self.dtype = Path(model_path), model_id, dtype
        self.dense, self.omit, self.routed = dense, None if omit is None else list(omit), routed
        self.healed = healed  # False: the bundle's healing adapters stay off (--unhealed)
        self.lora_terms = lora_terms  # the adapters as LoRA terms, not merged copies (--lora-terms)
        self.max_loss = max_loss  # adaptive depth: the loss predictor routes under this budget (--max-loss)
        self.queue_size, self.max_tokens = queue_size, max_tokens
        self.temperature, self.top_p = temperature, top_p
        self.lossless, self.draft_tokens = lossless, draft_tokens
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.session = None
        self.context: Optional[int] = None
        self.num_blocks: Optional[int] = None
        self.router: Optional[str] = None
        self._waiting: deque = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._current: Optional[Job] = None
        self._ready: Future = Future()
        self._thread = threading.Thread(target=self._run, name="pudding-mlx generation", daemon=True)
        self._lock = threading.Lock()
        self.counts = {"completed": 0, "stopped": 0, "refused": 0, "bad_request": 0, "error": 0}
        self.recent: deque = deque(maxlen=RECENT)
        self.started = time.time()

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker, which loads the model; return once it is ready (or raise its error)."""
        self._thread.start()
        self._ready.result()

    def close(self) -> None:
        """Refuse new requests, stop the running one, answer the queued ones with 503. Safe to call
        from a signal handler: it does not wait (`join` does)."""
        with self._cond:
            self._closing = True
            waiting, self._waiting = list(self._waiting), deque()
            if self._current is not None:
                self._current.stop("shutdown")
            self._cond.notify_all()
        for job in waiting:
            job.stop("shutdown")
            job.emit("error", _shutting_down())

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise _shutting_down()
            if len(self._waiting) + (self._current is not None) > self.queue_size:  # one runs, queue_size wait
                raise QueueFull()
            self._waiting.append(job)
            self._cond.notify()

    def status(self) -> dict:
        with self._cond:
            running, queued = self._current is not None, len(self._waiting)
        with self._lock:
            return {"status": "shutting down" if self._closing else "ok", "model": self.model_id,
                    "running": running, "queued": queued, "queue_size": self.queue_size,
                    "counts": dict(self.counts), "recent": list(self.recent),
                    "uptime_s": round(time.time() - self.started, 1)}

    def count(self, what: str, record: Optional[dict] = None) -> None:
        with self._lock:
            self.counts[what] += 1
            if record is not None:
                self.recent.append(record)

    # -- the worker thread --------------------------------------------------------------------

    def _load(self) -> None:
        from .chat import ChatSession
        from .load import load
        from .routing import default_note, fixed_choice
        from .skip import SkipView

        loaded = load(str(self.model_path), dtype=self.dtype, routed=self.routed, healed=self.healed,
                      max_loss=self.max_loss, lora_terms=self.lora_terms)
        if default_note(loaded) and not self.dense and self.omit is None:
            self.log(default_note(loaded))
        SkipView(loaded.model)  # an unsupported architecture fails here, in one line
        if self.omit is not None:  # checked against the model now, not at the first request
            self.omit = list(fixed_choice(loaded.n_blocks, loaded.router is not None, omit=self.omit).omitted)
        kwargs = {} if self.draft_tokens is None else {"draft_tokens": self.draft_tokens}
        self.session = ChatSession.from_loaded(loaded, lossless=self.lossless, **kwargs)
        self.context, self.num_blocks = self.session.context, loaded.n_blocks
        self.router = None if loaded.router is None else type(loaded.router).__name__

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as e:  # noqa: B902 (handed to the thread that waits for it)
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._current = self._waiting.popleft()
            try:
                self._serve(job)
            finally:
                with self._cond:
                    self._current = None

    def _serve(self, job: Job) -> None:
        from mlx_lm.sample_utils import make_sampler
        import mlx.core as mx

        req, session = job.request, self.session
        waited = time.monotonic() - job.queued_at
        if job.stopped.is_set():  # the client left while it waited
            self._finish(job, None, None, job.stop_reason, waited)
            return
        system, history, user = req.conversation()
        try:
            session.set_history(history, system)
            router = getattr(session.loaded, "router", None)
            if req.max_loss is not None and getattr(router, "kind", None) != "adaptive":
                raise bad_request("'max_loss' sets this request's adaptive-depth budget, but this server does not run "
                                  "adaptive depth; start it with --max-loss on a bundle with a loss predictor",
                                  "max_loss")
            if req.max_loss is not None and (self.dense or self.omit is not None):
                raise bad_request("'max_loss' contradicts the server's --dense / --omit", "max_loss")
            prompt = session.prompt_for(user)
            if self.context and len(prompt) >= self.context:
                raise bad_request(f"the prompt is {len(prompt)} tokens (chat template included) but the model's "
                                  f"context is {self.context}; send a shorter conversation", "messages",
                                  "context_length_exceeded")
        except ApiError as e:
            self.count("bad_request")
            job.emit("error", e)
            self.log(f"{job.id} 400 {e.message}")
            return
        job.emit("start")
        stopper = StopText(req.stop)

        def on_token(piece: str) -> None:
            shown = stopper.feed(piece)
            if shown and req.stream:
                job.emit("token", shown)

        def should_stop() -> bool:
            return job.stopped.is_set() or stopper.hit

        if req.seed is not None:
            mx.random.seed(req.seed)
        started = time.monotonic()
        budget = router.budget(req.max_loss) if req.max_loss is not None else contextlib.nullcontext()
        try:
            with budget:  # one worker thread: the request's budget holds for its routing alone
                result = session.routed_reply(user, dense=self.dense, omit=None if self.dense else self.omit,
                                              max_tokens=req.max_tokens,
                                              sampler=make_sampler(temp=req.temperature, top_p=req.top_p),
                                              should_stop=should_stop, on_token=on_token)
        except Exception as e:  # a failure of the server itself: one line to the client, the traceback to the log
            session.reset()  # whatever the cache holds now is not trusted
            self.log(f"{job.id} 500 {type(e).__name__}: {first_line(e)}\n{traceback.format_exc()}")
            self.count("error")
            job.emit("error", ApiError(500, f"generation failed ({type(e).__name__}: {first_line(e)})",
                                       "server_error", code="generation_failed"))
            return
        finally:
            session.turns.clear()  # the server keeps no per-turn history (memory stays flat)
        tail = stopper.flush() if not stopper.hit else ""
        if tail and req.stream and not job.stopped.is_set():
            job.emit("token", tail)
        if job.stopped.is_set():
            finish = job.stop_reason
        elif stopper.hit or result.finish_reason == "stop":
            finish = "stop"
        else:
            finish = result.finish_reason  # "length"
        self._finish(job, result, stopper.text, finish, waited, time.monotonic() - started)

    def _finish(self, job: Job, result, text: Optional[str], finish: str, waited: float,
                seconds: float = 0.0) -> None:
        record = {"id": job.id, "finish": finish, "queue_s": round(waited, 3), "seconds": round(seconds, 3),
                  "prompt_tokens": None, "completion_tokens": 0}
        if result is not None:
            record.update(self.usage(result))
            record["pudding"] = self.extra(result, waited)
        self.count("completed" if finish in ("stop", "length") else "stopped", record)
        what = record.get("pudding")
        if what is None:
            line = "not started (the client left while it waited)"
        else:
            line = (f"omitted {what['omitted']} ({what['blocks_ran']}/{self.num_blocks} blocks, {what['routing']}) · "
                    f"prompt {record['prompt_tokens']} tok ({what['prompt']['cached']} cached) · "
                    f"{record['completion_tokens']} tok in {seconds:.1f} s")
        self.log(f"{job.id} {finish} · {line}" + (f" · waited {waited:.1f} s" if waited >= 0.1 else ""))
        job.emit("done", dict(record, text=text))

    @staticmethod
    def usage(result) -> dict:
        p = result.prepared
        return {"prompt_tokens": p.prompt_tokens, "completion_tokens": result.generation_tokens,
                "total_tokens": p.prompt_tokens + result.generation_tokens,
                "prompt_tokens_details": {"cached_tokens": p.cached}}

    def extra(self, result, waited: float) -> dict:
        """The `pudding` field: which blocks ran for this request and what the prompt cache saved."""
        choice, p, n = result.choice, result.prepared, self.num_blocks
        out = {"routing": choice.how if choice is not None else None,
               "candidate": getattr(choice, "candidate", None),
               "router_ms": getattr(choice, "router_ms", None),
               "routed_in_prefill": p.held is not None,
               "omitted": list(result.omitted), "blocks_ran": n - len(result.omitted), "num_blocks": n,
               "prompt": {"tokens": p.prompt_tokens, "reused": p.reused, "re_prefilled": p.rebuilt,
                          "cached": p.cached, "new": p.new_tokens},
               "prompt_tps": round(result.prompt_tps, 2), "generation_tps": round(result.generation_tps, 2),
               "peak_memory_gb": round(result.peak_memory_gb, 4), "queue_s": round(waited, 3)}
        out["k"] = len(result.omitted)
        if getattr(choice, "how", None) == "adaptive":  # the depth chosen under the budget, and why
            from .routing import json_number

            out.update(max_loss=json_number(choice.max_loss), predicted_losses=choice.scores,
                       sets=[list(x) for x in choice.sets], reason=choice.reason)
        if result.drafted is not None:
            out["lossless"] = {"drafted": result.drafted}
        return out


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", "server_error", code="shutting_down")


# -- HTTP ---------------------------------------------------------------------------------------------


def _sse(data) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def create_app(engine: Engine):
    """The Starlette application serving `engine`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error_response(e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def chunk(job: Job, delta: dict, finish=None, **extra) -> dict:
        out = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": engine.model_id,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        out.update(extra)
        return out

    async def read_body(request) -> bytes:
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY:
                raise bad_request(f"the request body is larger than {MAX_BODY >> 20} MiB", code="body_too_large")
            parts.append(part)
        return b"".join(parts)

    async def chat_completions(request):
        try:
            req = parse_request(await read_body(request), engine.max_tokens, engine.temperature, engine.top_p)
        except ApiError as e:
            engine.count("bad_request")
            return error_response(e)
        job = Job(req, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            engine.count("refused")
            return error_response(ApiError(503, f"the server is busy: one request is running and "
                                                f"{engine.queue_size} are waiting (--queue-size); retry later",
                                           "server_error", code="queue_full"))
        except ApiError as e:
            engine.count("refused")
            return error_response(e)
        event = await job.next_event(request)  # queued, then the prompt is checked
        if event is None:  # the client left while it waited
            return Response(status_code=499)
        kind, value = event
        if kind == "error":
            return error_response(value)
        if req.stream:
            return StreamingResponse(stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while True:
            event = await job.next_event(request)
            if event is None:
                return Response(status_code=499)
            kind, value = event
            if kind == "error":
                return error_response(value)
            if kind == "done":
                break
        if value["finish"] == "shutdown":
            return error_response(_shutting_down())
        return JSONResponse({
            "id": job.id, "object": "chat.completion", "created": job.created, "model": engine.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": value["text"]},
                         "finish_reason": value["finish"], "logprobs": None}],
            "usage": {k: value[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens",
                                            "prompt_tokens_details")},
            "pudding": value["pudding"]})

    async def stream(job: Job):
        finished = False
        try:
            yield _sse(chunk(job, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await job.next_event()
                if kind == "token":
                    yield _sse(chunk(job, {"content": value}))
                elif kind == "error":
                    yield _sse(value.body())
                    break
                elif kind == "done":
                    if value["finish"] == "shutdown":
                        yield _sse(_shutting_down().body())
                        break
                    yield _sse(chunk(job, {}, value["finish"], pudding=value.get("pudding")))
                    if job.request.include_usage:
                        usage = {k: value[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens",
                                                       "prompt_tokens_details")}
                        out = chunk(job, {}, usage=usage)
                        out["choices"] = []
                        yield _sse(out)
                    break
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # cancelled: the client disconnected (starlette listens for it while streaming)
                job.stop("disconnected")
                job.drop_getter()

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": int(engine.started), "owned_by": "pudding-mlx"}]})

    async def health(request):
        return JSONResponse(engine.status())

    async def http_error(request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        message = {404: f"no route {request.url.path}; this server has POST /v1/chat/completions, GET "
                        "/v1/models and GET /health", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                                     "invalid_request_error", code=kind).body(), status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        engine.log(f"500 {type(exc).__name__}: {first_line(exc)}\n{traceback.format_exc()}")
        return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__})", "server_error").body(),
                            status_code=500)

    async def api_error(request, exc: ApiError):
        return error_response(exc)

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, ApiError: api_error,
                                                        Exception: server_error})


# -- serve --------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free port), not yet listening."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PuddingError(f"--host {host!r}: cannot resolve it ({first_line(e)})")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise PuddingError(f"cannot listen on {host}:{port} ({first_line(e)}); choose another --port")
    return sock


def serve(model_path, model_id: Optional[str] = None, host: str = "127.0.0.1", port: int = 8080,
          on_ready: Optional[Callable[[str], None]] = None, **engine_options) -> dict:
    """Serve the model at `model_path` (a bundle or mlx-lm model directory) until SIGINT / SIGTERM.
    The socket is bound first (a port in use fails before the model loads), then the model loads,
    then `on_ready(url)` is called and requests are served. On Ctrl-C: the running generation is
    stopped, queued requests get 503, the server closes its connections and returns the counts."""
    try:
        import uvicorn
        import starlette  # noqa: F401
    except ImportError as e:
        raise PuddingError(f"`pudding-mlx serve` needs the serve extra ({first_line(e)}): "
                           "pip install 'pudding-mlx[serve]'")
    import signal

    sock = bind(host, port)
    engine = Engine(model_path, model_id or Path(model_path).name, **engine_options)
    try:
        engine.start()
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        url = f"http://{shown}:{bound_port}"

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):  # Ctrl-C: stop the generation now, then uvicorn's shutdown
                engine.close()
                super().handle_exit(sig, frame)

        config = uvicorn.Config(create_app(engine), http="h11", ws="none", lifespan="off", loop="asyncio",
                                log_level="warning", timeout_graceful_shutdown=10)
        server = Server(config)
        if on_ready is not None:
            on_ready(url)
        previous = None
        if threading.current_thread() is threading.main_thread():  # SIGTERM ends like Ctrl-C
            previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn raises the signal it handled again once it has shut down
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    finally:
        engine.close()
        engine.join(timeout=30)
        sock.close()
    return engine.status()["counts"]


def _interrupt(signum, frame):
    raise KeyboardInterrupt()
