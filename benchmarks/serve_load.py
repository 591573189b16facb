"""Load on `pudding-mlx serve`: N clients x M requests on 127.0.0.1, through the openai client.

Starts the server itself (`pudding-mlx serve --preset P --port 0`, or MODEL) unless --url and --pid
name a running one. Each client holds its own conversation and grows it turn by turn (so the server's
one prompt cache is shared by interleaved conversations); every other request streams. A request is
*answered* (200 with a well-formed reply: text, finish_reason stop/length, usage counts; a stream
ending in [DONE] whose usage matches), *refused* (503 with an OpenAI-style body; the client waits
for Retry-After and goes on with its next request) or *lost* (anything else: a connection error, a
timeout, another status, a malformed reply). The server's RSS is sampled every 0.5 s.

    python benchmarks/serve_load.py --preset smollm2-135m --clients 6 --requests 10 --queue-size 2 \\
        --json results/serve/load_smollm2_cpu.json | tee results/serve/load_smollm2_cpu.txt
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import psutil

QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello in Spanish.",
             "Name an animal that lives in the sea.", "What day comes after Monday?", "Why is the sky blue?",
             "Give me a word that rhymes with cat."]


def start_server(args):
    cmd = [sys.executable, "-m", "pudding_mlx.app.cli", "serve", "--port", "0", "--queue-size", str(args.queue_size),
           "--max-tokens", str(args.max_tokens)]
    cmd += [args.model] if args.model else ["--preset", args.preset]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, COLUMNS="400"))
    for line in proc.stdout:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m[1]
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.answered, self.refused, self.lost = 0, 0, 0
        self.latency, self.waited, self.cached, self.lost_why = [], [], [], []

    def add(self, what, **kw):
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)
            if what == "answered":
                self.latency.append(kw["seconds"])
                self.waited.append(kw["queue_s"])
                self.cached.append(kw["cached"])
            elif what == "lost":
                self.lost_why.append(kw["why"])


def one_request(client, messages, stream, max_tokens):
    """(text, finish, usage, pudding) of one request; raises on anything malformed."""
    if not stream:
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens)
        choice = r.choices[0]
        return choice.message.content, choice.finish_reason, r.usage, r.model_extra["pudding"]
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and chunks[-1].usage is not None, "stream without one final chunk and usage"
    return text, final[0].choices[0].finish_reason, chunks[-1].usage, final[0].model_extra["pudding"]


def client_loop(c, url, args, tally):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=args.timeout)
    messages = []
    for r in range(args.requests):
        asked = messages + [{"role": "user", "content": QUESTIONS[(c + r) % len(QUESTIONS)]}]
        t0 = time.monotonic()
        try:
            text, finish, usage, extra = one_request(client, asked, stream=(c + r) % 2 == 1, max_tokens=args.max_tokens)
            assert finish in ("stop", "length"), f"finish_reason {finish!r}"
            assert usage.completion_tokens >= 1 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
            assert usage.prompt_tokens == extra["prompt"]["tokens"], "usage and the pudding field disagree"
            tally.add("answered", seconds=time.monotonic() - t0, queue_s=extra["queue_s"],
                      cached=extra["prompt"]["cached"] / max(1, usage.prompt_tokens))
            messages = asked + [{"role": "assistant", "content": text}]
            if len(messages) > 2 * args.turns:  # a new conversation now and then
                messages = []
        except openai.APIStatusError as e:
            if e.status_code == 503 and isinstance(e.body, dict) and e.body.get("code") == "queue_full":
                tally.add("refused")
                time.sleep(float(e.response.headers.get("retry-after", 1)))
            else:
                tally.add("lost", why=f"{e.status_code}: {e.body}")
        except Exception as e:  # noqa: BLE001 (anything else is a lost request)
            tally.add("lost", why=f"{type(e).__name__}: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--url", help="a running server (with --pid, for its RSS)")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--requests", type=int, default=10, help="per client")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--queue-size", type=int, default=2)
    ap.add_argument("--turns", type=int, default=3, help="turns per conversation before a client starts a new one")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    proc = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        proc, url = start_server(args)
        pid = proc.pid
    server = psutil.Process(pid) if pid else None
    samples, done = [], threading.Event()
    t_start = time.monotonic()

    def sample():
        while not done.is_set():
            if server is not None:
                samples.append((round(time.monotonic() - t_start, 2), server.memory_info().rss / 2**20))
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(1.0)  # an idle sample or two after the model loaded
    tally = Tally()
    threads = [threading.Thread(target=client_loop, args=(c, url, args, tally)) for c in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    time.sleep(1.0)
    done.set()
    sampler.join()
    health = json.loads(urllib.request.urlopen(url + "/health", timeout=30).read())
    if proc is not None:
        proc.send_signal(2)  # Ctrl-C: the server's clean shutdown
        proc.wait(60)

    total = args.clients * args.requests
    rss = [r for _, r in samples]
    busy = [r for t, r in samples if t >= 1.0 + (t0 - t_start)]
    quarter = busy[len(busy) // 4] if busy else None
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    out = {
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {"json": str(args.json) if args.json else None},
        "requests": total, "answered": tally.answered, "refused": tally.refused, "lost": tally.lost,
        "lost_why": tally.lost_why[:10], "wall_s": round(wall, 1),
        "latency_s": {"p50": pct(tally.latency, 0.5), "p90": pct(tally.latency, 0.9), "max": max(tally.latency, default=None)},
        "queue_wait_s": {"p50": pct(tally.waited, 0.5), "max": max(tally.waited, default=None)},
        "prompt_cached_fraction_mean": statistics.mean(tally.cached) if tally.cached else None,
        "server_counts": health["counts"],
        "rss_mb": {"idle": rss[0] if rss else None, "at_25pct": quarter, "max": max(rss, default=None),
                   "end": rss[-1] if rss else None},
        "rss_samples": [(t, round(r, 1)) for t, r in samples[:: max(1, len(samples) // 120)]],
    }
    print(f"pudding-mlx serve load: {args.clients} clients x {args.requests} requests on {url} "
          f"(--queue-size {args.queue_size}, max_tokens {args.max_tokens}), {wall:.0f} s")
    print(f"  answered {tally.answered}, refused (503) {tally.refused}, lost {tally.lost} of {total}"
          + ("" if tally.answered + tally.refused + tally.lost == total else "  (COUNTS DO NOT ADD UP)"))
    print(f"  server's own counts: {health['counts']}")
    if tally.latency:
        print(f"  answered latency p50 {out['latency_s']['p50']:.1f} s, p90 {out['latency_s']['p90']:.1f} s, "
              f"max {out['latency_s']['max']:.1f} s; queue wait p50 {out['queue_wait_s']['p50']:.1f} s; "
              f"prompt tokens from cache, mean {100 * out['prompt_cached_fraction_mean']:.0f}%")
    if rss:
        print(f"  server RSS (MiB): idle {out['rss_mb']['idle']:.0f}, at 25% of the run {quarter:.0f}, "
              f"max {out['rss_mb']['max']:.0f}, end {out['rss_mb']['end']:.0f}")
        step = max(1, len(samples) // 12)
        print("  RSS over time: " + ", ".join(f"{t:.0f}s {r:.0f}" for t, r in samples[::step]))
    for why in tally.lost_why[:10]:
        print(f"  lost: {why}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    sys.exit(1 if tally.lost or tally.answered + tally.refused != total else 0)


if __name__ == "__main__":
    main()
