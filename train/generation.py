"""Generation measured on the PyTorch side, for many omission sets with the model loaded once: HumanEval
pass@1 and agreement with dense on the fixed chat prompts (the twin of `pudding_mlx.generation_eval`;
data, prompt, extraction and sandbox are `pudding_mlx.humaneval`'s, the chat prompts
`pudding_mlx.generation_eval.chat_prompts`).

Generation: `model.generate`, greedy, batched with LEFT padding and an attention mask, with the blocks
of a set skipped by `train.scoring.skip_blocks`. Generation needs a KV cache, and transformers keys its
cache by each attention module's `layer_idx`; while a set is skipped the kept blocks' attention modules
are renumbered 0..L-k-1 (the positions in the kept list, as the cache is built for the narrowed config)
and restored afterwards. A reply ends at the first stop token: the tokenizer's EOS and the generation
config's EOS ids (for a GGUF: its eos/eot ids, the ones `convert llm` gives MLX), or at `max_new_tokens`.

`run_generation` walks the sets in order (dense first: fidelity compares with it), writes one JSON per set
into OUT/sets/ (atomic; a rerun skips the sets already written: resumable) and runs each set's HumanEval
programs in the sandbox on the CPU while the GPU generates the next set. OUT/replies/<set>.jsonl.gz keeps
every reply's text, so the tests can be rerun anywhere (`pudding-mlx train generate --recheck`).
Optionally it writes the router features of every prompt (`train.features.hidden_features`) to
OUT/features.npz, so any hidden-state router's pick can be computed later without the GPU.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pudding_mlx import humaneval as he
from pudding_mlx.atomic import write_json, write_npz
from pudding_mlx.errors import PuddingError
from pudding_mlx.fidelity import FIDELITY_MAX_TOKENS, agreement, chat_prompts

from .features import prompt_ids
from .scoring import find_decoder, skip_blocks

Log = Callable[[str], None]


def stop_ids(model, tokenizer) -> List[int]:
    """The token ids that end a reply: the tokenizer's EOS and the generation config's."""
    ids = []
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in (v if isinstance(v, (list, tuple)) else [v]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise PuddingError("the tokenizer and the generation config name no EOS token: generation could not stop")
    return ids


@contextlib.contextmanager
def cache_keys_for_kept(model):
    """Inside `skip_blocks`: number the kept blocks' attention modules 0..n-1 (their KV-cache keys)."""
    saved = []
    for i, layer in enumerate(find_decoder(model).layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            saved.append((attn, attn.layer_idx))
            attn.layer_idx = i
    try:
        yield
    finally:
        for attn, idx in saved:
            attn.layer_idx = idx


def generate(model, tokenizer, messages: Sequence[str], omitted: Sequence[int] = (), max_new_tokens: int = 512,
             batch_size: int = 64, progress: Optional[Callable[[int, int], None]] = None) -> List[dict]:
    """Greedy replies to `messages` (each one user message through the chat template): {"token_ids", "text",
    "finished", "stop" (the stop token, None at the limit), "seconds", "batch"} each."""
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [prompt_ids(tokenizer, m, max_tokens=1 << 30) for m in messages]
    order = sorted(range(len(messages)), key=lambda i: -len(encoded[i]))  # similar lengths batch together
    out: List[Optional[dict]] = [None] * len(messages)
    with torch.inference_mode(), skip_blocks(model, omitted), cache_keys_for_kept(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):  # left padding: every prompt ends where generation starts
                ids[j, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[j, width - len(encoded[i]):] = 1
            t0 = time.perf_counter()
            gen = _generate_fitting(model, ids.to(device), mask.to(device), dict(
                do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                temperature=None, top_p=None, top_k=None, use_cache=True))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            for j, i in enumerate(rows):
                new = gen[j, width:].tolist()
                cut = next((n for n, t in enumerate(new) if t in stops), None)
                toks = new if cut is None else new[:cut]
                out[i] = dict(token_ids=toks, text=tokenizer.decode(toks), finished=cut is not None,
                              stop=new[cut] if cut is not None else None, seconds=seconds, batch=len(rows))
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    return out


def _generate_fitting(model, ids, mask, settings: dict):
    """model.generate on the batch, or on its halves when the GPU runs out of memory (several processes share
    one GPU: a batch of long prompts can meet a neighbour's peak). The halves' outputs are padded to one width
    with the pad token, which the caller cuts at the first stop anyway."""
    try:
        return model.generate(input_ids=ids, attention_mask=mask, **settings)
    except torch.cuda.OutOfMemoryError:
        if len(ids) == 1:
            raise
        if ids.is_cuda:
            torch.cuda.empty_cache()
        half = len(ids) // 2
        parts = [_generate_fitting(model, ids[:half], mask[:half], settings),
                 _generate_fitting(model, ids[half:], mask[half:], settings)]
        width = max(p.shape[1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=settings["pad_token_id"])
                          for p in parts])


def set_name(omitted: Sequence[int]) -> str:
    return "dense" if not omitted else "omit-" + "-".join(str(b) for b in sorted(omitted))


def sets_to_run(candidate_files: Sequence, state_file=None, prefix_k: Sequence[int] = ()) -> Dict[str, dict]:
    """{name: {"omitted", "k", "sources"}}: dense, the first k removals of every chain of a search state
    for each k in `prefix_k` (k = 1, 2 from the same searches), then every set of the candidate files;
    each distinct set once, with every (k, source) that named it."""
    from pudding_mlx.candidates import read_candidates
    from pudding_mlx.jsonio import read_json

    found: Dict[str, dict] = {"dense": {"omitted": [], "k": 0, "sources": ["dense"]}}

    def add(omitted, k, source):
        name = set_name(omitted)
        found.setdefault(name, {"omitted": sorted(int(b) for b in omitted), "k": k, "sources": []})
        found[name]["sources"].append(f"k{k}/{source}")

    if prefix_k:
        state = read_json(Path(state_file), "the search state")
        for chain, phases in state["chains"].items():
            for k in prefix_k:
                if len(phases) >= k:
                    add([p["removed"] for p in phases[:k]], k, chain)
    for f in candidate_files:
        for c in read_candidates(Path(f)):
            add(c["omitted"], len(c["omitted"]), f"{c.get('task')}/{c.get('loss')}")
    return found


def run_generation(model, tokenizer, sets: Dict[str, dict], out_dir, tasks: Sequence[str] = ("humaneval", "fidelity"),
                   limit: Optional[int] = None, max_new_tokens: int = he.MAX_TOKENS, batch_size: int = 64,
                   workers: Optional[int] = None, features_after: Sequence[int] = (), log: Log = print,
                   progress: Optional[Callable[[int, int], None]] = None, shard: Tuple[int, int] = (0, 1),
                   fidelity_max_k: Optional[int] = None) -> Path:
    """Generate and score every set (module doc); returns OUT/summary.json. `shard` (i, n): this process
    runs every n-th of the sets from the i-th (by k, then name; dense always, first), skipping those already
    written, so n processes can share one GPU (generation here is bound by the host's per-step work, not by
    the GPU) whenever each of them starts; a rerun with n = 1 finishes what any shard left. Fidelity runs for the
    sets of at most `fidelity_max_k` blocks (all when None)."""
    out_dir = Path(out_dir)
    (out_dir / "sets").mkdir(parents=True, exist_ok=True)
    (out_dir / "replies").mkdir(exist_ok=True)
    problems = he.load_problems(limit=limit) if "humaneval" in tasks else []
    prompts = (chat_prompts()[:limit] if limit else chat_prompts()) if "fidelity" in tasks else []
    if features_after and not (out_dir / "features.npz").is_file():
        from .features import hidden_features

        texts = [p.message for p in problems] + [p["text"] for p in prompts]
        feats = hidden_features(model, tokenizer, texts, features_after, batch_size=32)
        ids = [p.task_id for p in problems] + [p["id"] for p in prompts]
        write_npz(out_dir / "features.npz", id=np.array(ids), after=np.array(sorted(set(features_after))),
                  **{k: v.astype(np.float16) for k, v in feats.items()})
        log(f"router features of {len(texts)} prompts -> {out_dir / 'features.npz'}")
    rest = sorted((n for n in sets if n != "dense"), key=lambda n: (sets[n]["k"], n))
    # the shards split the whole list, written sets included (skipped below): a split of only what is left
    # depends on when each shard starts, and shards that start a phase at different times then miss sets
    order = ["dense"] + rest[shard[0]::shard[1]]  # dense first: fidelity compares with it
    dense_fid = None
    pending = []
    with ThreadPoolExecutor(max_workers=1) as tester:
        for n, name in enumerate(order):
            path = out_dir / "sets" / f"{name}.json"
            if path.is_file():  # resumable: a set already written is not generated again
                if name == "dense" and prompts:
                    dense_fid = _read_replies(out_dir / "replies" / "dense.jsonl.gz", "fidelity")
                log(f"[{n + 1}/{len(order)}] {name}: done before")
                continue
            omitted = sets[name]["omitted"]
            t0 = time.perf_counter()
            he_replies = generate(model, tokenizer, [p.message for p in problems], omitted, max_new_tokens,
                                  batch_size, progress) if problems else []
            fid = prompts and (fidelity_max_k is None or sets[name]["k"] <= fidelity_max_k)
            fid_replies = generate(model, tokenizer, [p["text"] for p in prompts], omitted, FIDELITY_MAX_TOKENS,
                                   batch_size, progress) if fid else []
            gen_s = time.perf_counter() - t0
            if name == "dense":
                dense_fid = fid_replies
            _write_replies(out_dir / "replies" / f"{name}.jsonl.gz", problems, he_replies, prompts, fid_replies)
            pending.append(tester.submit(_score_and_write, path, name, sets[name], problems, he_replies,
                                         prompts if fid else [], fid_replies, dense_fid, workers, gen_s,
                                         max_new_tokens, log))
            log(f"[{n + 1}/{len(order)}] {name}: generated in {gen_s:.1f} s")
        for f in pending:
            f.result()  # a failure in the tester surfaces here
    summary = summarize(out_dir)
    return summary


def _score_and_write(path, name, info, problems, he_replies, prompts, fid_replies, dense_fid, workers, gen_s,
                     max_new_tokens, log):
    result = {"name": name, **info, "generation_seconds": round(gen_s, 2), "max_new_tokens": max_new_tokens}
    if problems:
        outcomes = he.check_all(problems, [r["text"] for r in he_replies], workers=workers)
        result["humaneval"] = {
            "pass@1": he.pass_at_1(outcomes), "n": len(problems), "outcomes": he.summary(outcomes),
            "records": [{"task_id": p.task_id, "passed": o.passed, "result": o.result, "tokens": len(r["token_ids"]),
                         "finished": r["finished"]} for p, o, r in zip(problems, outcomes, he_replies)]}
    if prompts and dense_fid is not None:
        agree = agreement([r["token_ids"] for r in dense_fid], [r["token_ids"] for r in fid_replies])
        kept = agree.pop("per_prompt")
        result["fidelity"] = {**agree, "n": len(prompts), "records": [
            {"id": p["id"], "kind": p["kind"], "prefix_kept": k, "tokens": len(r["token_ids"]), "finished": r["finished"]}
            for p, k, r in zip(prompts, kept, fid_replies)]}
    write_json(path, result)
    he_txt = f"HumanEval pass@1 {result['humaneval']['pass@1']:.1f}" if problems else ""
    fid_txt = f", identical to dense {result['fidelity']['identical']:.1f}%" if "fidelity" in result else ""
    log(f"  {name}: {he_txt}{fid_txt}")


def _write_replies(path: Path, problems, he_replies, prompts, fid_replies) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for p, r in zip(problems, he_replies):
            f.write(json.dumps({"task": "humaneval", "id": p.task_id, **r}) + "\n")
        for p, r in zip(prompts if fid_replies else [], fid_replies):
            f.write(json.dumps({"task": "fidelity", "id": p["id"], **r}) + "\n")
    tmp.replace(path)


def _read_replies(path: Path, task: str) -> List[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["task"] == task]


def recheck(out_dir, workers: Optional[int] = None, log: Log = print) -> Path:
    """Run every stored HumanEval reply's tests again here and rewrite the sets' pass@1 (the sandbox on
    this machine), e.g. after copying OUT from the GPU box."""
    out_dir = Path(out_dir)
    problems = {p.task_id: p for p in he.load_problems()}
    for path in sorted((out_dir / "sets").glob("*.json")):
        result = json.loads(path.read_text())
        if "humaneval" not in result:
            continue
        replies = _read_replies(out_dir / "replies" / f"{path.stem}.jsonl.gz", "humaneval")
        ps = [problems[r["id"]] for r in replies]
        outcomes = he.check_all(ps, [r["text"] for r in replies], workers=workers)
        before = result["humaneval"]["pass@1"]
        result["humaneval"].update({"pass@1": he.pass_at_1(outcomes), "outcomes": he.summary(outcomes)})
        for rec, o in zip(result["humaneval"]["records"], outcomes):
            rec.update(passed=o.passed, result=o.result)
        write_json(path, result)
        log(f"{path.stem}: pass@1 {before:.2f} -> {result['humaneval']['pass@1']:.2f}")
    return summarize(out_dir)


def summarize(out_dir) -> Path:
    """OUT/summary.json: per set, its sources and pass@1 / fidelity (no per-problem records)."""
    out_dir = Path(out_dir)
    rows = []
    for path in sorted((out_dir / "sets").glob("*.json")):
        r = json.loads(path.read_text())
        row = {k: r[k] for k in ("name", "omitted", "k", "sources", "generation_seconds")}
        if "humaneval" in r:
            h = r["humaneval"]
            row["humaneval"] = {"pass@1": h["pass@1"], "n": h["n"], "outcomes": h["outcomes"],
                                "tokens_mean": float(np.mean([x["tokens"] for x in h["records"]])),
                                "hit_limit": sum(not x["finished"] for x in h["records"])}
        if "fidelity" in r:
            row["fidelity"] = {k: r["fidelity"][k] for k in ("identical", "prefix_kept", "first_difference_median", "n")}
        rows.append(row)
    rows.sort(key=lambda r: (r["k"], r["name"]))
    write_json(out_dir / "summary.json", {"sets": rows})
    return out_dir / "summary.json"
