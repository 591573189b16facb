"""Multi-turn chat with per-turn routing on one KV cache: the runtime side of `pudding-mlx chat`.

The conversation is explicit: `ChatSession.messages` holds the user and assistant turns (the system
message is added when rendering), and every turn renders the *whole* conversation through the
tokenizer's chat template. The KV cache is only an accelerator: `cached_ids` are the token ids whose
K/V it holds, `omitted` the omission set they were computed under, `cache` one mlx-lm cache object
per kept block of that set (`SkipView.make_cache()`). Whatever the cache holds, the reply is the one
a from-scratch run would give: fresh cache, prefill the whole rendered prompt under the turn's set,
decode (tested, greedy, token for token).

The cache rule, per turn (prompt ids P, omission set S' chosen for this turn's user message; the
cache holds ids C computed under S):

1. p = the longest common prefix of C and P, capped at len(P) - 1 (the last prompt token is always
   run, for the logits). Chat templates re-render earlier turns; when they do so differently from the
   ids in the cache (a reply re-tokenised differently, a template that rewrites history), the cache
   is trimmed back to the first differing token (`KVCache.trim`) and everything after is re-run.
2. S' == S: every cache is trimmed to p and only P[p:] is prefilled. This is the common case.
3. S' != S: let f be the first block whose status changed, f = min(S ^ S'). A block's K/V depends
   only on the residual stream entering it, which only the blocks before it shape, and blocks before
   f run (or are skipped) under S' exactly as under S. So the cache objects of the kept blocks < f
   are reused as they are (trimmed to p); their entries for P[:p] are neither recomputed nor
   rewritten. The kept blocks >= f get fresh caches, filled by re-running P[:p] through the new view.
   That re-run has to go through the leading blocks too, because block f needs the residual stream
   they produce; it gives them *scratch* caches (fresh objects, dropped afterwards), so the reused
   caches are not extended twice. Then P[p:] is prefilled as in 2, through reused + fresh caches.
   Special case: when every kept block of S' lies before f (S' = S plus trailing omissions), nothing
   is re-run at all. Healing adapters (`pudding_mlx.adapters`) go with the set: when S and S' run
   under different adapters (or one healed and one not), f is also at most the first block either
   adapter touches, since those blocks compute differently from there on.
   Cost: apart from that special case a set change costs a prefill of the whole prompt under S' (the
   leading blocks must still run over the prefix, since their output is not stored: keeping the
   residual stream at block boundaries would cost ~hidden / (2 kv_dim) times the KV memory). What
   reuse keeps is the leading entries themselves: unchanged and never duplicated in memory beyond the
   transient scratch copy.
4. Caches that cannot be trimmed (a full rotating window) fall back to a fresh cache and a full
   prefill under S'.

Free routing (a hidden-state router, `_route_and_prepare`): a first turn routes inside its prefill
(blocks 0..after, which every set runs, run once over the prompt and their output picks the set);
later turns route the message alone with a pass of its own (why: `_routes_inline`).

Lossless turns (`lossless=True`): the dense model answers and the turn's set only drafts
(mlx-lm's speculative decoding, the `SkipView` as draft model). The session then keeps two caches,
each under the rule above: the dense one (its set never changes, so it is only ever trimmed and
extended) and the draft's (`self.draft`, a second session used for its cache alone, whose set follows
the router). Both are cut back to the same prefix before the turn, because mlx-lm prefills the two
with one prompt. The reply is the dense reply, token for token (tested).

After the reply, the ids in the cache are P + the generated ids that the cache holds (mlx-lm's
generation loop runs one step ahead, so the cache holds every yielded token, the stop token
included); the cache is reconciled to exactly the ids kept (`_reconcile`).

Interrupting a reply (`should_stop` returning True, or an exception such as KeyboardInterrupt):
the partial reply is *kept* — the conversation gets the assistant message with the text generated so
far, exactly what the user saw — and the cache is trimmed to the prompt plus those tokens; the next
turn's template closes the message (`<|im_end|>`) and the common-prefix rule reuses all of it. An
interruption before the first reply token drops the user's message (the turn is undone); the cache
keeps whatever prefix it computed, which the next turn reuses only where it matches.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from . import DRAFT_TOKENS
from .adapters import adapter_for, first_block
from .errors import PuddingError
from .generate import context_length, no_length_warning
from .omission import check_omitted, kept_blocks
from .skip import SkipView, num_blocks


class Interrupted(Exception):
    """Raised inside a turn when `should_stop()` turns True before the first reply token."""


@dataclass
class Prepared:
    """What the cache rule did for one turn (see the module docstring)."""

    prompt_tokens: int          # len(P)
    reused: int                 # p: prompt tokens whose K/V were kept from the previous turn
    rebuilt: int                # prefix tokens re-run because the set changed (0 if it did not)
    first_changed: Optional[int]  # f, when the set changed and a cache existed; else None
    reused_blocks: tuple        # blocks (0-based) whose cache objects were kept
    fresh_blocks: tuple         # blocks given fresh caches
    rebuild_s: float = 0.0
    prefill_s: float = 0.0      # the new tokens' prefill done before generation (free routing)
    held: Optional[int] = None  # prompt tokens the cache holds when generation starts (default: reused)

    @property
    def start(self) -> int:
        """Where generation's prompt begins: what the cache holds at that point."""
        return self.reused if self.held is None else self.held

    @property
    def new_tokens(self) -> int:
        return self.prompt_tokens - self.reused

    @property
    def cached(self) -> int:
        """Prompt tokens not run again this turn: the reused prefix less what the set change re-ran."""
        return self.reused - self.rebuilt


@dataclass
class TurnResult:
    text: str
    token_ids: List[int]
    omitted: tuple
    finish_reason: str                 # "stop" | "length" | "interrupted"
    prepared: Prepared
    prompt_tps: float                  # (rebuilt + new prompt tokens) / prefill time
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    choice: object = None              # the routing.Choice of the turn, when given
    kept: bool = True                  # False: the turn was undone (interrupted before any token)
    drafted: Optional[int] = None      # lossless turns: reply tokens accepted from the draft

    @property
    def prefill_tokens(self) -> int:
        return self.prepared.rebuilt + self.prepared.new_tokens


@dataclass
class _Turn:
    """What one reply has produced so far (ChatSession.reply fills it as tokens arrive)."""

    speculative: bool = False
    prepared: Optional[Prepared] = None
    ids: List[int] = field(default_factory=list)
    pieces: List[str] = field(default_factory=list)
    finish: str = "interrupted"
    last: object = None
    drafted: int = 0
    text: str = ""

    def add(self, response) -> None:
        self.ids.append(int(response.token))
        self.pieces.append(response.text)
        self.drafted += bool(response.from_draft)
        self.last = response


def _overall(turns, tokens, tps) -> float:
    """All the tokens of `turns` over all their time (each turn's time = tokens / its tok/s)."""
    seconds = sum(tokens(t) / tps(t) for t in turns)
    return sum(tokens(t) for t in turns) / seconds if seconds > 0 else 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _offset(c) -> int:
    return int(getattr(c, "offset", 0))


class ChatSession:
    """A conversation with one model, routed per turn, on one KV cache (rule: module docstring).

    `routed_reply(text)` routes the turn (the router on this message alone, a first turn inside its
    prefill with a hidden-state router, or the `dense` / `omit` overrides) and calls `reply`, which
    renders the conversation plus `text`, applies the cache rule for the turn's set, prefills what
    is not cached and streams the reply (`on_token(text_piece)`); `should_stop()` is polled per
    token and between prefill chunks.
    """

    def __init__(self, model, tokenizer, system: Optional[str] = None, chat_template: bool = True,
                 prefill_step_size: int = 512, loaded=None, lossless: bool = False, draft_tokens: int = DRAFT_TOKENS):
        self.loaded = loaded  # a load.Loaded (bundle + router) for routed_reply
        # lossless: the dense model answers, the turn's set drafts `draft_tokens` at a time; the
        # draft's cache lives in a second session (its conversation is unused)
        self.draft_tokens = draft_tokens
        self.draft = (ChatSession(model, tokenizer, system, chat_template, prefill_step_size)
                      if lossless else None)
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.prefill_step_size = prefill_step_size
        self.n_blocks = num_blocks(model)
        self.context = context_length(model)
        self.messages: List[Dict[str, str]] = []
        self.cached_ids: List[int] = []
        self.omitted: tuple = ()
        self.cache: Optional[list] = None
        self.turns: List[TurnResult] = []
        self.last_user: Optional[str] = None

    @classmethod
    def from_loaded(cls, loaded, **kwargs) -> "ChatSession":
        """A session on what `load.load` returned, so that turns can be routed by its router."""
        return cls(loaded.model, loaded.tokenizer, loaded=loaded, **kwargs)

    # -- the conversation ----------------------------------------------------------------------

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> List[int]:
        """Token ids of `messages` (system message prepended) through the chat template."""
        full = ([{"role": "system", "content": self.system}] if self.system else []) + list(messages)
        with no_length_warning():  # check_prompt refuses an over-long conversation in one line
            if self.chat_template:
                ids = self.tokenizer.apply_chat_template(full, add_generation_prompt=add_generation_prompt,
                                                         tokenize=True)
                return [int(i) for i in ids]
            # no template: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in full)
            if add_generation_prompt:
                text += "assistant:"
            return [int(i) for i in self.tokenizer.encode(text)]

    def set_history(self, messages: Sequence[dict], system: Optional[str] = None) -> None:
        """Make the conversation `messages` (earlier turns) with system message `system`, for a
        client that keeps the history itself and sends all of it each turn (`pudding-mlx serve`).
        The KV cache is kept: the next turn's cache rule reuses whatever prefix of it the new
        prompt shares, exactly as for a history built turn by turn here."""
        self.messages = [dict(m) for m in messages]
        self.system = system

    def prompt_for(self, user_text: str) -> List[int]:
        return self.render(self.messages + [{"role": "user", "content": user_text}])

    def check_prompt(self, ids: Sequence[int]) -> None:
        if self.context and len(ids) >= self.context:
            raise PuddingError(
                f"the conversation is {len(ids)} tokens but the model's context is {self.context}; "
                "/reset the conversation or send a shorter message"
            )

    def reset(self) -> None:
        """Forget the conversation and drop the KV cache."""
        self.messages = []
        self.cached_ids = []
        self.cache = None
        self.omitted = ()
        self.last_user = None
        if self.draft is not None:
            self.draft.reset()

    @property
    def cache_tokens(self) -> int:
        return len(self.cached_ids)

    @property
    def cache_bytes(self) -> int:
        total = 0
        for c in self.cache or []:
            try:
                total += int(c.nbytes)
            except (NotImplementedError, AttributeError):
                pass
        return total

    # -- the cache rule ------------------------------------------------------------------------

    def _fresh(self, view: SkipView, omitted: tuple, n_ids: int) -> Prepared:
        self.cache = view.make_cache()
        self.cached_ids = []
        self.omitted = omitted
        return Prepared(n_ids, 0, 0, None, (), view.kept)

    @property
    def lossless(self) -> bool:
        return self.draft is not None

    def prepare(self, prompt: Sequence[int], omitted: Sequence[int] = (),
                should_stop: Optional[Callable[[], bool]] = None, limit: Optional[int] = None,
                on_prefill: Optional[Callable[[str, int, int], None]] = None) -> Prepared:
        """Make the cache hold a prefix of `prompt` computed under `omitted` (the rule above) and
        return what was reused and rebuilt. `prompt[Prepared.reused:]` is left to prefill. `limit`:
        reuse at most that many tokens. `on_prefill("re-prefill", done, total)` reports the re-run
        of the prefix after a set change, chunk by chunk."""
        prompt = [int(i) for i in prompt]
        if not prompt:
            raise PuddingError("the prompt is empty")
        omitted = check_omitted(omitted, self.n_blocks)
        view = SkipView(self.model, omitted)
        if self.cache is None:
            return self._fresh(view, omitted, len(prompt))
        p = min(common_prefix(self.cached_ids, prompt), len(prompt) - 1)
        if limit is not None:
            p = min(p, limit)
        if p == 0:
            return self._fresh(view, omitted, len(prompt))

        if omitted == self.omitted:
            if not self._trim(self.cache, p):
                return self._fresh(view, omitted, len(prompt))
            self.cached_ids = prompt[:p]
            return Prepared(len(prompt), p, 0, None, view.kept, ())

        f = min(set(self.omitted) ^ set(omitted))
        before = adapter_for(self.model, self.omitted)
        if before != view.adapter:  # another healing adapter: every block it or the old one touches changed
            f = min(f, first_block(self.model, before, view.adapter))
        old_index = {b: i for i, b in enumerate(kept_blocks(self.omitted, self.n_blocks))}
        lead = [b for b in view.kept if b < f]  # kept under both sets, same position in the stream
        reused = [self.cache[old_index[b]] for b in lead]
        if not self._trim(reused, p):
            return self._fresh(view, omitted, len(prompt))
        new_cache = view.make_cache()
        fresh = new_cache[len(lead):]
        start = time.perf_counter()
        # From here on the session holds reused + fresh; the fresh caches are filled below.
        self.cache, self.omitted, self.cached_ids = reused + fresh, omitted, prompt[:p]
        rebuilt = 0
        if fresh:
            scratch = new_cache[: len(lead)]  # stand-ins for the reused caches during the re-run
            caches = scratch + fresh
            try:
                for lo in range(0, p, self.prefill_step_size):
                    if on_prefill is not None:
                        on_prefill("re-prefill", lo, p)
                    if should_stop is not None and should_stop():
                        raise Interrupted()
                    chunk = prompt[lo: min(p, lo + self.prefill_step_size)]
                    view(mx.array(chunk)[None], cache=caches)  # logits unused: never computed
                    mx.eval([c.state for c in caches])
                    rebuilt = lo + len(chunk)
                if on_prefill is not None:
                    on_prefill("re-prefill", p, p)
            finally:
                del scratch, caches
                if rebuilt < p:  # interrupted: keep what is consistent
                    self._reconcile(prompt[:rebuilt])
        return Prepared(len(prompt), p, rebuilt, f, tuple(lead), tuple(view.kept[len(lead):]),
                        time.perf_counter() - start)

    def _routes_inline(self, user_text: str, dense: bool, omit) -> bool:
        """Free routing (`_route_and_prepare`) where it reads exactly what the router was trained on:
        a hidden-state router, a model whose forward can continue from a block's output, no
        override, not lossless, no conversation yet and no system message of the user's (the prompt
        is then this message alone through the template). Later turns route the message with a pass
        of its own: inside their prefill the router would pool the new tokens with the conversation
        in context, which is not what it was trained on (the message alone, the template's system
        prompt included), and a pick that differs from the message-alone one costs a re-prefill of
        the whole history."""
        from .hidden_router import CONTINUABLE
        from .routing import reads_hidden_state

        router = getattr(self.loaded, "router", None)
        return (reads_hidden_state(router) and not dense and omit is None and not self.lossless
                and not getattr(self.loaded, "dense_by_default", None)
                and not self.messages and self.system is None
                and getattr(self.model, "model_type", None) in CONTINUABLE and len(self.prompt_for(user_text)) >= 2)

    def _route_and_prepare(self, prompt: Sequence[int], should_stop=None, on_prefill=None):
        """A first turn routed inside its prefill (`hidden_router.routed_prefill`, chunked): blocks
        0..after run once over the prompt, their output picks the set, its other blocks continue
        from there. The cache starts empty (a dropped turn's prefix is not reused: the router pools
        every prompt token). Returns (Prepared, routing.Choice); the cache then holds P[:-1]."""
        from .hidden_router import routed_prefill
        from .routing import candidate_sets, routed_choice

        def between(phase, done, total):
            if phase == "prefill" and on_prefill is not None:
                on_prefill("prefill", done, total)
            if should_stop is not None and should_stop():
                raise Interrupted()

        self.cache, self.cached_ids, self.omitted = None, [], ()
        start = time.perf_counter()
        candidate, values, ms, omitted, cache = routed_prefill(self.model, self.loaded.router, prompt,
                                                               candidate_sets(self.loaded),
                                                               step=self.prefill_step_size, between=between)
        if on_prefill is not None:
            on_prefill("prefill", len(prompt) - 1, len(prompt) - 1)
        omitted = check_omitted(omitted, self.n_blocks)
        self.cache, self.omitted, self.cached_ids = cache, omitted, list(prompt[:-1])
        prepared = Prepared(len(prompt), 0, 0, None, (), tuple(kept_blocks(omitted, self.n_blocks)),
                            prefill_s=time.perf_counter() - start, held=len(prompt) - 1)
        return prepared, routed_choice(self.loaded, candidate, values, ms)

    @staticmethod
    def _trim(caches, n: int) -> bool:
        """Trim every cache to its first n tokens; False when one cannot be trimmed that far."""
        extra = [_offset(c) - n for c in caches]
        if any(e < 0 for e in extra):
            return False
        if any(extra) and not can_trim_prompt_cache([c for c, e in zip(caches, extra) if e]):
            return False
        for c, e in zip(caches, extra):
            if e:
                c.trim(e)
        return True

    def _reconcile(self, ids: Sequence[int]) -> None:
        """After a forward pass that may have stopped anywhere: make every cache hold exactly the
        first n of `ids` for the largest n that all of them hold, and record those ids."""
        if not self.cache:
            self.cached_ids = []
            return
        n = min([_offset(c) for c in self.cache] + [len(ids)])
        if self._trim(self.cache, n):
            self.cached_ids = [int(i) for i in ids[:n]]
        else:  # cannot make them agree: start over next turn
            self.cache, self.cached_ids = None, []

    # -- one turn ------------------------------------------------------------------------------

    def choose(self, user_text: str, dense: bool = False, omit: Optional[Sequence[int]] = None):
        """This turn's omission set (a routing.Choice): `dense`, else `omit`, else the router's
        pick for this message alone, else dense when there is no router."""
        from .routing import choose, fixed_choice

        if self.loaded is None:
            return fixed_choice(self.n_blocks, False, dense, omit)
        return choose(self.loaded, user_text, dense, omit)

    def routed_reply(self, user_text: str, dense: bool = False, omit: Optional[Sequence[int]] = None,
                     should_stop: Optional[Callable[[], bool]] = None, **kwargs) -> TurnResult:
        """Route this turn's message (`choose`), then `reply` under the chosen set. Ctrl-C during
        routing (`should_stop`) stops the turn before it starts, as during prefill."""
        if self._routes_inline(user_text, dense, omit):  # the choice comes with the turn
            return self.reply(user_text, (), should_stop=should_stop, route_inline=True, **kwargs)
        choice = self.choose(user_text, dense, omit)
        return self.reply(user_text, choice.omitted, should_stop=should_stop, choice=choice, **kwargs)

    def reply(
        self,
        user_text: str,
        omitted: Sequence[int] = (),
        max_tokens: int = 256,
        sampler=None,
        should_stop: Optional[Callable[[], bool]] = None,
        on_token: Optional[Callable[[str], None]] = None,
        choice=None,
        on_prefill: Optional[Callable[[str, int, int], None]] = None,
        route_inline: bool = False,
    ) -> TurnResult:
        """Answer `user_text` with blocks `omitted` skipped; append the turn to the conversation.
        `on_token(piece)` gets each piece of text shown; `on_prefill(phase, done, total)` reports
        the prompt's prefill ("prefill") and a set change's re-run of the history ("re-prefill").
        `route_inline`: route with the hidden-state router inside the prefill (`_route_and_prepare`;
        `omitted` is then ignored and the turn's set is the router's)."""
        if max_tokens < 1:
            raise PuddingError("max_tokens must be at least 1")
        omitted = check_omitted(omitted, self.n_blocks)
        prompt = self.prompt_for(user_text)
        self.check_prompt(prompt)
        if self.context:
            max_tokens = min(max_tokens, self.context - len(prompt))
        self.last_user = user_text
        mx.reset_peak_memory()
        turn = _Turn(speculative=self.lossless and bool(omitted))
        try:
            if route_inline:
                turn.prepared, choice = self._route_and_prepare(prompt, should_stop, on_prefill)
                omitted = choice.omitted
            else:
                turn.prepared = self._prepare_turn(prompt, omitted, turn.speculative, should_stop, on_prefill)
            self._stream(turn, prompt, omitted, max_tokens, sampler or make_sampler(temp=0.0),
                         should_stop, on_token, on_prefill)
        except Interrupted:
            pass
        finally:  # whatever happened (Ctrl-C included), the conversation and the caches agree
            self._close_turn(turn, user_text, prompt)
        return self._record(turn, prompt, omitted, choice)

    def _prepare_turn(self, prompt, omitted, speculative, should_stop, on_prefill) -> Prepared:
        """The cache rule for this turn: the dense and the draft caches (lossless), or the one cache
        under `omitted` (the dense one, for a lossless turn with nothing to draft)."""
        if speculative:
            return self._prepare_both(prompt, omitted, should_stop, on_prefill)
        return self.prepare(prompt, () if self.lossless else omitted, should_stop, on_prefill=on_prefill)

    def _stream(self, turn, prompt, omitted, max_tokens, sampler, should_stop, on_token, on_prefill) -> None:
        """Prefill what the cache does not hold and decode, collecting the reply in `turn`. A token
        that arrives after `should_stop()` turned True is neither shown nor kept: the reply is
        exactly what was shown when the interrupt landed."""

        def progress(done, total):  # mlx-lm calls this between prefill chunks (states evaluated)
            if on_prefill is not None:
                on_prefill("prefill", done, total)
            if should_stop is not None and done < total and should_stop():
                raise Interrupted()

        if turn.speculative:
            kwargs = dict(draft_model=SkipView(self.model, omitted), num_draft_tokens=self.draft_tokens,
                          prompt_cache=self.cache + self.draft.cache)
            view = SkipView(self.model, ())
        else:
            kwargs = dict(prompt_cache=self.cache, prompt_progress_callback=progress)
            view = SkipView(self.model, self.omitted)
        if should_stop is not None and should_stop():
            raise Interrupted()
        gen = mlx_stream_generate(view, self.tokenizer, mx.array(prompt[turn.prepared.start:]),
                                  max_tokens=max_tokens, sampler=sampler,
                                  prefill_step_size=self.prefill_step_size, **kwargs)
        try:
            for response in gen:
                if should_stop is not None and should_stop():
                    break  # interrupted while this token was computed: the user never saw it
                turn.add(response)
                if on_token is not None and response.text:
                    on_token(response.text)
                if response.finish_reason is not None:
                    turn.finish = response.finish_reason
                    break
        finally:
            gen.close()

    def _close_turn(self, turn, user_text, prompt) -> None:
        """Make every cache describe exactly the ids it holds, and keep the turn (with the text
        shown) in the conversation if any reply token was produced."""
        if self.cache is not None:
            self._reconcile(prompt + turn.ids)
        if turn.speculative and self.draft.cache is not None:
            self.draft._reconcile(prompt + turn.ids)
        if not turn.ids:
            return
        eos = set(getattr(self.tokenizer, "eos_token_ids", ()) or ())
        body = turn.ids[:-1] if turn.finish == "stop" and turn.ids[-1] in eos else turn.ids
        turn.text = self.tokenizer.decode(body) if turn.finish == "interrupted" else "".join(turn.pieces)
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": turn.text}]

    def _record(self, turn, prompt, omitted, choice) -> TurnResult:
        prepared = turn.prepared or Prepared(len(prompt), 0, 0, None, (), ())
        prompt_time = prepared.rebuild_s + prepared.prefill_s
        if turn.last is not None and turn.last.prompt_tps > 0:
            prompt_time += turn.last.prompt_tokens / turn.last.prompt_tps
        result = TurnResult(
            text=turn.text,
            token_ids=turn.ids,
            omitted=omitted,
            finish_reason=turn.finish,
            prepared=prepared,
            prompt_tps=(prepared.rebuilt + prepared.new_tokens) / prompt_time if prompt_time > 0 else 0.0,
            generation_tokens=len(turn.ids),
            generation_tps=turn.last.generation_tps if turn.last is not None else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            choice=choice,
            kept=bool(turn.ids),
            drafted=turn.drafted if turn.speculative else None,
        )
        self.turns.append(result)
        return result

    def stats(self) -> dict:
        """Session totals for `/stats`. `from_cache` counts the prompt tokens that were not run again
        (a set change re-runs the reused prefix: those count as re-prefilled, not cached); speeds are
        all tokens over all time, over the turns that ran that phase (a dropped turn has none)."""
        turns = self.turns
        prefilled = [t for t in turns if t.prompt_tps > 0]
        generated = [t for t in turns if t.generation_tps > 0 and t.generation_tokens]
        return {
            "turns": len(turns),
            "interrupted": sum(t.finish_reason == "interrupted" for t in turns),
            "dropped": sum(not t.kept for t in turns),
            "messages": len(self.messages),
            "cache_tokens": self.cache_tokens,
            "cache_bytes": self.cache_bytes,
            "cache_omitted": list(self.omitted),
            "prompt_rendered": sum(t.prepared.prompt_tokens for t in turns),
            "prompt_from_cache": sum(t.prepared.cached for t in turns),
            "prompt_re_prefilled": sum(t.prepared.rebuilt for t in turns),
            "generated": sum(t.generation_tokens for t in turns),
            "prompt_tps": _overall(prefilled, lambda t: t.prefill_tokens, lambda t: t.prompt_tps),
            "generation_tps": _overall(generated, lambda t: t.generation_tokens, lambda t: t.generation_tps),
            "peak_memory_gb": max((t.peak_memory_gb for t in turns), default=0.0),
        }

    def _prepare_both(self, prompt, omitted, should_stop, on_prefill=None) -> Prepared:
        """Lossless: the dense cache and the draft's cache (under `omitted`), cut back to one common
        prefix of `prompt`, since mlx-lm prefills both with the same tokens."""
        limit = None
        while True:
            prepared = self.prepare(prompt, (), should_stop, limit, on_prefill)
            drafting = self.draft.prepare(prompt, omitted, should_stop, limit, on_prefill)
            if prepared.reused == drafting.reused:
                break
            limit = min(prepared.reused, drafting.reused)  # a fallback to a fresh cache; shrinks to 0
        return Prepared(len(prompt), prepared.reused, drafting.rebuilt, drafting.first_changed,
                        drafting.reused_blocks, drafting.fresh_blocks, prepared.rebuild_s + drafting.rebuild_s)
