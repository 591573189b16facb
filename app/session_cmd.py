"""`pudding-mlx chat`, `route` and `info`.

chat: a local streaming chat, routed per user message (runtime: pudding_mlx.chat.ChatSession).
route: the router's choice and scores for one prompt. info: what a bundle or model directory holds,
read from its files' headers (no weights are loaded).
"""

import json
import signal
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pudding_mlx.app.options import DRAFT, LORA_TERMS, LOSSLESS, MAX_LOSS, MODEL_OR_PRESET, ROUTED, UNHEALED
from pudding_mlx.errors import PuddingError

HELP = [
    ("/route", "router scores for the last user message"),
    ("/dense on|off", "run every block (on), or go back to routing / --omit (off)"),
    ("/reset", "forget the conversation and its KV cache"),
    ("/stats", "session totals: turns, cache, tokens, speed, candidates used"),
    ("/help", "this list"),
    ("/quit", "leave (Ctrl-D too)"),
]


def register(app):
    """Add this module's commands to the top-level Typer app."""
    app.command()(chat)
    app.command()(route)
    app.command()(info)


# -- chat ------------------------------------------------------------------------------------------


def chat(
    model: Optional[str] = MODEL_OR_PRESET,
    preset: Optional[str] = typer.Option(None, "--preset", help="Without MODEL: qwen2.5-coder-1.5b (the default; "
                                         "1.1 GB download, hidden-state router, k=3 of 28 blocks) or smollm2-135m "
                                         "(190 MB, MiniLM router, k=7 of 30; fast but weak answers)."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message for the chat template."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-m", min=1, help="Most tokens per reply."),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    dense: bool = typer.Option(False, "--dense", help="Start with every block running (/dense off "
                               "switches routing back on)."),
    omit: Optional[str] = typer.Option(None, "--omit", help="Skip these 0-based blocks on every turn, "
                                       "e.g. 3,5,9 (overrides the router)."),
    routed: bool = ROUTED,
    max_loss: Optional[float] = MAX_LOSS,
    unhealed: bool = UNHEALED,
    lora_terms: bool = LORA_TERMS,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: "
                                        "float32 on the CPU backend, the stored dtype elsewhere)."),
    lossless: bool = LOSSLESS,
    draft_tokens: int = DRAFT,
):
    """Chat with a model, each message routed to a set of skipped blocks. In-chat: /help.

    With --lossless every reply is the dense model's (token for token in float32; in bf16/fp16 it is
    the dense model under multi-token verification): the routed set only drafts."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from pudding_mlx.chat import ChatSession
    from pudding_mlx.convert.default_bundle import ensure_default_bundle, note_for
    from pudding_mlx.load import DTYPES, load, resolve
    from pudding_mlx.omission import parse_omit
    from pudding_mlx.routing import check_override, default_note, fixed_choice
    from pudding_mlx.skip import SkipView

    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False)
    base_omit = None if omit is None else parse_omit(omit)
    check_override(dense, base_omit, routed, max_loss)
    if dtype is not None and dtype not in DTYPES:
        raise PuddingError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")

    try:
        if model is not None and preset is not None:
            raise PuddingError("give either MODEL or --preset (a preset is a bundle built for you)")
        path = ensure_default_bundle(console=err, preset=preset) if model is None else resolve(model)
        with console.status("loading the model", spinner="dots"):
            loaded = load(str(path), dtype=dtype, routed=routed, healed=not unhealed, max_loss=max_loss,
                          lora_terms=lora_terms)
            SkipView(loaded.model)  # an unsupported architecture fails here, in one line
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130)
    n = loaded.n_blocks
    if base_omit is not None:  # checked against the model now, not at the first message
        base_omit = list(fixed_choice(n, loaded.router is not None, omit=base_omit).omitted)
    note = note_for(loaded.manifest) or (None if dense or base_omit is not None else default_note(loaded))
    if seed is not None:
        mx.random.seed(seed)
    session = ChatSession.from_loaded(loaded, system=system, lossless=lossless, draft_tokens=draft_tokens)
    state = _ChatState(loaded, session,
                       make_sampler(temp=temp, top_p=top_p), max_tokens, dense, base_omit, note, err)

    router = ("no router" if loaded.router is None else
              f"adaptive depth under --max-loss {max_loss:g}: loss predictor over {len(loaded.router.sets)} sets"
              if getattr(loaded.router, "kind", None) == "adaptive" else f"router with {len(loaded.manifest.candidates)} candidate sets")
    mode = f" · lossless: the routed set drafts {draft_tokens} tokens, the dense model verifies" if lossless else ""
    console.print(f"[bold]pudding-mlx chat[/bold] · {path} · {n} blocks · {router}"
                  + (f" · {note}" if note else "") + mode)
    console.print("[dim]type a message; /help for commands, /quit or Ctrl-D to leave, Ctrl-C stops a reply[/dim]")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            text = console.input("[bold green]>>> [/bold green]").strip()
            if not text:
                continue
            if text.startswith("/"):
                if state.command(console, text) == "quit":
                    return
                continue
            state.turn(console, text)  # Ctrl-C inside a turn stops the reply (see _StopFlag)
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:  # at the prompt, or during a command
            console.print("\n[dim](/quit or Ctrl-D to leave)[/dim]")
        except PuddingError as e:  # a bad turn (too long, ...) is reported; the chat goes on
            console.print(f"[bold red]error:[/bold red] {e}", markup=True)


class _StopFlag:
    """While active, Ctrl-C (SIGINT) only sets a flag, which the generation loop polls per token."""

    def __enter__(self):
        self.stop = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __call__(self) -> bool:
        return self.stop

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


class _PrefillProgress:
    """A progress bar on stderr while a long prompt is prefilled, or the history re-prefilled after a
    set change; it disappears when the reply starts to stream."""

    LONG = 64  # tokens: below this a prefill is quick enough to need no display

    def __init__(self, console):
        self.console, self.bar, self.tasks = console, None, {}

    def update(self, phase: str, done: int, total: int) -> None:
        if phase in self.tasks and self.tasks[phase] is None:  # shown and finished already
            return
        if phase not in self.tasks and (total < self.LONG or done >= total):
            return
        if self.bar is None:
            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("tokens"), TimeElapsedColumn(), console=self.console, transient=True)
        if phase not in self.tasks:
            what = ("re-prefilling the conversation under the new set" if phase == "re-prefill"
                    else "prefilling the prompt")
            self.tasks[phase] = self.bar.add_task(what, total=total, completed=done)
            self.bar.start()  # (no-op when running) now that there is a line to show
        self.bar.update(self.tasks[phase], completed=done, total=total)
        if done >= total:  # this phase is over: its line goes, the next phase gets its own
            self.bar.remove_task(self.tasks[phase])
            self.tasks[phase] = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar, self.tasks = None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _ChatState:
    def __init__(self, loaded, session, sampler, max_tokens, dense, base_omit, note, err=None):
        self.loaded, self.session, self.sampler = loaded, session, sampler
        self.max_tokens, self.dense, self.base_omit, self.note = max_tokens, dense, base_omit, note
        self.err = err or Console(stderr=True, highlight=False)
        self.last_route = None  # (text, index, scores, ms) of the last routed message
        self.used = {}

    # one user turn
    def turn(self, console, text):
        def show(piece):
            progress.close()
            console.print(piece, end="", markup=False, highlight=False, emoji=False)

        # Ctrl-C from here on (routing included) stops this turn only
        with _StopFlag() as stop, _PrefillProgress(self.err) as progress:
            result = self.session.routed_reply(
                text, dense=self.dense, omit=None if self.dense else self.base_omit,
                max_tokens=self.max_tokens, sampler=self.sampler, should_stop=stop,
                on_token=show, on_prefill=progress.update,
            )
        choice = result.choice  # None: stopped while routing inside the prefill (the message is dropped)
        if choice is not None and choice.how in ("routed", "adaptive"):
            self.last_route = (text, choice.candidate, choice.scores, choice.router_ms)
        console.print()
        if result.finish_reason == "interrupted":
            if result.kept:
                console.print(f"[yellow]\\[interrupted: the partial reply ({result.generation_tokens} tokens) "
                              "is kept in the conversation][/yellow]")
            else:
                console.print("[yellow]\\[interrupted before the reply began: the message was dropped][/yellow]")
        elif result.finish_reason == "length":
            limit = (f"--max-tokens {self.max_tokens}" if result.generation_tokens >= self.max_tokens
                     else "the model's context")
            console.print(f"[yellow]\\[cut off: the reply reached {result.generation_tokens} tokens "
                          f"({limit}); it may be unfinished][/yellow]")
        if choice is None:  # no set ran: nothing to count or show
            return
        key = choice.candidate if choice.how == "routed" else f"k={choice.k}" if choice.how == "adaptive" else choice.how
        self.used[key] = self.used.get(key, 0) + 1
        console.print(self.status(choice, result), style="dim", markup=False)

    def status(self, choice, result) -> str:
        n = self.loaded.n_blocks
        k = len(choice.omitted)
        if choice.how == "adaptive":
            from pudding_mlx.routing import depth_line

            where = (f"inside the prefill (blocks 0-{self.loaded.router.after}, {choice.router_ms:.1f} ms)"
                     if result.prepared.held is not None else f"predictor {choice.router_ms:.1f} ms")
            what = f"{depth_line(choice, n)} · {where}"
        elif choice.how == "routed":
            if result.prepared.held is not None:  # routed inside the prefill: no pass of its own
                routed = f"routed inside the prefill (blocks 0-{self.loaded.router.after}, {choice.router_ms:.1f} ms)"
            else:
                routed = f"router {choice.router_ms:.1f} ms"
            what = f"candidate {choice.candidate}: omitted {list(choice.omitted)} ({n - k}/{n} blocks) · {routed}"
        elif choice.how == "omit":
            what = f"--omit: omitted {list(choice.omitted)} ({n - k}/{n} blocks)"
        elif choice.how == "no-router":
            what = f"dense ({n}/{n} blocks): {self.note or 'this model has no router'}"
        elif choice.how == "dense-default":
            what = f"dense ({n}/{n} blocks): the bundle's default (--routed to route)"
        else:
            what = f"dense ({n}/{n} blocks)"
        if result.drafted is not None:  # lossless: the set above drafted, the dense model answered
            what = (f"lossless, dense output · draft {what.replace(' · router', ', router', 1)} · "
                    f"{result.drafted}/{result.generation_tokens} tokens accepted from the draft")
        p = result.prepared
        if p.rebuilt:
            cache = f"set changed at block {p.first_changed}: {p.rebuilt} re-prefilled + {p.new_tokens} new"
        elif p.reused:
            cache = f"{p.new_tokens} new + {p.reused} cached"
        else:
            cache = f"{p.new_tokens} new"
        return (f"{what} · prompt {result.prefill_tokens} tok ({cache}), {result.prompt_tps:.1f} tok/s · "
                f"generation {result.generation_tokens} tok, {result.generation_tps:.1f} tok/s · "
                f"peak memory {result.peak_memory_gb:.3f} GB")

    # in-chat commands
    def command(self, console, text):
        cmd, _, arg = text.partition(" ")
        arg = arg.strip().lower()
        if cmd in ("/quit", "/exit", "/q"):
            return "quit"
        if cmd == "/help":
            table = Table(show_header=False, box=None, padding=(0, 2))
            for name, what in HELP:
                table.add_row(name, what)
            console.print(table)
        elif cmd == "/reset":
            self.session.reset()
            self.last_route = None
            console.print("[dim]conversation and KV cache cleared[/dim]")
        elif cmd == "/dense":
            if arg in ("on", "off"):
                self.dense = arg == "on"
            elif arg:
                console.print("[red]usage: /dense on|off[/red]")
                return None
            mode = "dense (every block runs)" if self.dense else (
                f"--omit {self.base_omit}" if self.base_omit is not None else
                f"dense: {self.note}" if self.loaded.dense_by_default else
                "routed" if self.loaded.router is not None else f"dense: {self.note or 'no router'}")
            console.print(f"[dim]mode: {mode}[/dim]")
        elif cmd == "/route":
            self.show_route(console)
        elif cmd == "/stats":
            self.show_stats(console)
        else:
            console.print(f"[red]unknown command {cmd}[/red]; /help lists them", markup=True)
        return None

    def show_route(self, console):
        loaded = self.loaded
        if loaded.router is None:
            console.print(f"[yellow]no router: {self.note or 'this model has no router'}[/yellow]")
            return
        text = self.session.last_user
        if text is None:
            console.print("[dim]no user message yet[/dim]")
            return
        if self.last_route is not None and self.last_route[0] == text:
            _, index, scores, ms = self.last_route
        else:  # dense or --omit ran: score the message now
            index, scores, ms = loaded.router.best(text)
        ran = self.session.turns[-1].omitted if self.session.turns else None
        preview = text if len(text) <= 60 else text[:57] + "..."
        if getattr(loaded.router, "kind", None) == "adaptive":
            console.print(adaptive_table(loaded.router, index, scores, loaded.n_blocks,
                                         title=f"predicted losses for {preview!r} ({ms:.1f} ms)"))
            return
        console.print(route_table(loaded.manifest, index, scores, ran,
                                  title=f"router scores for {preview!r} ({ms:.1f} ms)"))

    def show_stats(self, console):
        s = self.session.stats()
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_row("turns", f"{s['turns']} ({s['interrupted']} interrupted, {s['dropped']} dropped)")
        table.add_row("messages", str(s["messages"]))
        table.add_row("KV cache", f"{s['cache_tokens']} tokens under omitted {s['cache_omitted']}, "
                      f"{s['cache_bytes'] / 1e6:.2f} MB allocated")
        table.add_row("prompt tokens", f"{s['prompt_rendered']} rendered, {s['prompt_from_cache']} from cache, "
                      f"{s['prompt_re_prefilled']} re-prefilled after set changes")
        table.add_row("generated", f"{s['generated']} tokens")
        if s["turns"]:
            table.add_row("speed (overall)", f"prompt {s['prompt_tps']:.1f} tok/s, "
                          f"generation {s['generation_tps']:.1f} tok/s")
            table.add_row("peak memory", f"{s['peak_memory_gb']:.3f} GB")
        used = ", ".join(f"{'candidate ' + str(k) if isinstance(k, int) else k}: {v}"
                         for k, v in sorted(self.used.items(), key=lambda kv: str(kv[0])))
        table.add_row("sets used", used or "-")
        console.print(table)


def route_table(manifest, index, scores, ran=None, title=None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("omitted blocks")
    table.add_column("task / loss")
    table.add_column("")
    for m, (cand, score) in enumerate(zip(manifest.candidates, scores)):
        mark = []
        if m == index:
            mark.append("◀ best")
        if ran is not None and tuple(ran) == tuple(cand.omitted) and m == index:
            mark.append("(ran)")
        origin = " / ".join(x for x in (cand.task, cand.loss) if x) or "-"
        style = "bold" if m == index else None
        table.add_row(str(m), f"{score:.3f}", ",".join(map(str, cand.omitted)), origin, " ".join(mark),
                      style=style)
    return table


def adaptive_table(router, index, losses, n_blocks, title=None) -> Table:
    """Every set of the loss predictor: its depth, its predicted loss against the budget, the chosen one."""
    table = Table(title=title, title_justify="left")
    for col, justify in (("#", "right"), ("k", "right"), ("blocks", "right"), ("predicted loss", "right"),
                         ("omitted blocks", "left"), ("", "left")):
        table.add_column(col, justify=justify)
    for m, (s, loss) in enumerate(zip(router.sets, losses)):
        fits = "dense: always allowed" if not s else ("fits" if loss <= router.max_loss else "over the budget")
        table.add_row(str(m), str(len(s)), f"{n_blocks - len(s)}/{n_blocks}", f"{loss:.4f}",
                      ",".join(map(str, s)) or "- (dense)", fits + ("  ◀ chosen" if m == index else ""),
                      style="bold" if m == index else None)
    return table


# -- route -----------------------------------------------------------------------------------------


def route(
    model: str = typer.Argument(..., help="A pudding-mlx bundle with a router (a directory or hub id)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message to route."),
    max_loss: Optional[float] = MAX_LOSS,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Which candidate set the bundle's router picks for a prompt, with every score; with --max-loss, every
    set's predicted loss, the budget and the depth chosen."""
    from pudding_mlx.bundle import check_bundle_files, is_bundle, read_manifest
    from pudding_mlx.load import resolve
    from pudding_mlx.router import load_router

    path = resolve(model)
    if not is_bundle(path):
        raise PuddingError(f"{path}: not a pudding-mlx bundle (no pudding.json), so there is no router to ask; "
                           "build a bundle with `pudding-mlx convert bundle`")
    manifest = read_manifest(path)
    check_bundle_files(path, manifest)
    if max_loss is not None:
        return _route_adaptive(path, prompt, max_loss, as_json)
    if manifest.router is None:
        raise PuddingError(f"{path}: this bundle has no router (pudding.json: \"router\": null); "
                           "it serves --dense and --omit only")
    if manifest.router.kind == "hidden":  # it reads the LLM's own hidden state: the LLM loads too
        from pudding_mlx.load import load

        router = load(str(path)).router
    else:
        router = load_router(path / manifest.router.path, num_outputs=len(manifest.candidates))
    index, scores, ms = router.best(prompt)
    omitted = list(manifest.candidates[index].omitted)
    if as_json:
        print(json.dumps({"candidate": index, "omitted": omitted, "scores": scores, "router_ms": ms,
                          "num_blocks": manifest.num_blocks,
                          "candidates": [list(c.omitted) for c in manifest.candidates],
                          "model": str(path)}))
        return
    console = Console(highlight=False)
    console.print(route_table(manifest, index, scores))
    console.print(f"candidate {index}: omitted {omitted} "
                  f"({manifest.num_blocks - len(omitted)}/{manifest.num_blocks} blocks) · router {ms:.1f} ms")


def _route_adaptive(path, prompt: str, max_loss: float, as_json: bool):
    from pudding_mlx.load import load
    from pudding_mlx.routing import depth_line, route as route_prompt

    loaded = load(str(path), max_loss=max_loss)
    choice = route_prompt(loaded, prompt)
    n = loaded.n_blocks
    if as_json:
        print(json.dumps(dict(choice.to_json(), num_blocks=n, model=str(path))))
        return
    console = Console(highlight=False, soft_wrap=True)
    console.print(adaptive_table(loaded.router, choice.candidate, choice.scores, n,
                                 title=f"predicted loss against dense per set (unit: "
                                       f"{loaded.router.predictor.settings.get('loss', 'the predictor says none')})"))
    console.print(f"{depth_line(choice, n)} · predictor {choice.router_ms:.1f} ms", markup=False)


# -- info ------------------------------------------------------------------------------------------


def _size(n) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def info(
    model: str = typer.Argument(..., help="A pudding-mlx bundle, an mlx-lm model directory, or a hub id."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """What a bundle or model directory holds: architecture, size, quantization, candidates, router, adapters.
    Read from config files and safetensors headers; no weights are loaded."""
    from pudding_mlx.info import model_info
    from pudding_mlx.load import resolve

    data = model_info(resolve(model))
    if as_json:
        print(json.dumps(data))
        return
    console = Console(highlight=False)
    table = Table(show_header=False, box=None, padding=(0, 2), title=data["path"], title_justify="left")
    table.add_row("kind", "pudding-mlx bundle" if data["kind"] == "bundle" else "mlx-lm model directory")
    table.add_row("architecture", f"{data['model_type']}: {data['blocks']} blocks, hidden {data['hidden_size']}, "
                  f"MLP {data['intermediate_size']}, {data['attention_heads']} heads / {data['kv_heads']} KV heads, "
                  f"vocab {data['vocab_size']}, context {data['context']}")
    table.add_row("parameters", f"{data['parameters'] / 1e6:.1f} M in {data['tensors']} tensors, "
                  f"{_size(data['weights_bytes'])} (" + ", ".join(f"{k} {_size(v)}" for k, v in data["dtypes"].items()) + ")")
    q = data["quantization"]
    if q:
        extra = f", {len(q['overrides'])} layer overrides" if q.get("overrides") else ""
        table.add_row("quantization", f"{q.get('bits')}-bit {q.get('mode', 'affine')}, group size {q.get('group_size')}{extra}")
    else:
        table.add_row("quantization", "none")
    c = data["candidates"]
    if c is not None:
        sets = "; ".join(",".join(map(str, s)) for s in c["sets"]) or "-"
        table.add_row("candidates", f"{c['count']}: {sets}")
    r = data["router"]
    if r is not None and r["kind"] == "hidden":
        table.add_row("router", f"hidden state after block {r['after']} ({r['pooling']}), linear head, "
                      f"{r['outputs']} outputs ({r['objective']}); fallback candidate {r['fallback']} unless the gain "
                      f"exceeds {r['margin'] if r['margin'] is not None else r['margin_is']}")
    elif r is not None:
        table.add_row("router", f"{r['encoder']} ({r['layers']} layers, hidden {r['hidden_size']}, "
                      f"{r['parameters'] / 1e6:.1f} M params), {r['outputs']} outputs, max {r['max_tokens']} tokens")
    elif data["kind"] == "bundle":
        table.add_row("router", "none (serves --dense and --omit)")
    p = data.get("predictor")
    if p is not None:
        sets = "; ".join(",".join(map(str, s)) or "dense" for s in p["sets"])
        table.add_row("loss predictor", f"{len(p['sets'])} sets (k = {', '.join(map(str, p['ks']))}): {sets}; reads "
                      f"the hidden state after block {p['after']} ({p['pooling']}, at most {p['max_tokens']} tokens); "
                      f"loss: {p['loss'] or 'unit not recorded'}; trained default budget {p['default_max_loss']:g}; "
                      "runtime default: off (adaptive only with --max-loss)")
    for a in data.get("adapters") or []:
        sets = "; ".join(",".join(map(str, s)) for s in a["sets"] or [])
        table.add_row("adapter", f"{a['name']}: heals {sets} (LoRA rank {a['rank']}, {a['modules']} linears of blocks "
                      f"{a['blocks'][0]}..{a['blocks'][-1]}, {a['parameters'] / 1e6:.2f} M params); on only while its "
                      f"set is skipped; runs fused: ~{_size(a['fused_bytes'])} of 8-bit merged copies in memory "
                      "(--lora-terms: none, slower)")
    d = data["disk"]
    table.add_row("on disk", f"{_size(d['total'])}: LLM weights {_size(d['llm_weights'])}, router {_size(d['router'])}, "
                  f"tokenizer {_size(d['tokenizer'])}, other {_size(d['other'])}")
    console.print(table)
