"""Healing on the lent GPU (issue "Healed omission sets", items 1-3), the model loaded once, every phase resumable
(a rerun skips what is on disk). Usage, from the repository root:

    python3 benchmarks/heal_gpu.py MODEL WORK [PHASES]

MODEL: Qwen2.5-Coder-1.5B-Instruct's GGUF. WORK is seeded from the repository: results/distill/prompts.json and
the dense replies to them (results/distill/answers.jsonl.gz, when made from these prompts by this model),
results/qwen2.5-coder-1.5b/cand-k3.json (today's k = 3 candidates: the router's pool) and the committed dense
HumanEval replies (results/qwen2.5-coder-1.5b/generation: dense is the original model, never adapted).
PHASES, in this order (default all):

  answers   the dense model's replies to the distillation prompts        -> WORK/distill/answers.jsonl.gz
  search    the generation-aware search, k = 1, 2, 3, 5 (val split)       -> WORK/cand-distill-k*.json
  pool      one LoRA adapter, the skipped set drawn per step from the k = 3 pool (today's candidates and the
            generation-aware ones)                                          -> WORK/adapters/pool-k3/
  nll       every pool set's val NLL of the dense replies, unhealed and healed -> WORK/heal/val_nll.json
  nll-check the same for a pool adapter trained anew in WORK (after `seed`, which brings the committed table that
            ranks the sets): does the recipe reproduce?                   -> WORK/heal/val_nll_retrained.json
  he-pool   HumanEval with the pool adapter, on the EVAL_N pool sets of lowest healed val NLL, plus the sets
            today's static choices and routers pick ([13,14,15], [12,13,14], [15,17,18])  -> WORK/gen-pool/
  he-new    HumanEval, unhealed, of the generation-aware sets (k = 1, 2, 3)  -> WORK/gen-unhealed/
  mc-pool   the six multiple-choice tasks (1,000 each, the splits and seeds of results/qwen2.5-coder-1.5b's
            data-val / data-test) on the he-pool sets, pool adapter on         -> WORK/mc-pool-{val,test}/
  mc-pool-rest  the same for the pool sets the committed heal/mc-pool-* lacks (EVAL_N=14: all of them)
                                                                             -> WORK/mc-pool-rest-{val,test}/
  mc-new    the same, unhealed, for the generation-aware k = 3 sets           -> WORK/mc-unhealed-{val,test}/
  adaptive-data  for issue "Adaptive depth": the reply NLL of ADAPTIVE_N train and val examples under dense and
            every candidate set of k = 1, 2, 3, 5, 7 (today's searches and the generation-aware one; unhealed,
            and the k = 3 pool healed), and the router's features (the dense hidden state after block 3,
            mean and last)                                                   -> WORK/adaptive/
  agree-data  the same sets' reply NLL and greedy agreement (`distill.target_nll(agreement=True)`: how far each
            set, skipping its blocks, decodes the dense model's greedy reply word for word) on the committed
            heal/adaptive/nll.npz's rows and sets (those with HumanEval results: a menu can hold no other) plus
            every code reply of the distillation data (train and val),
            with the router's features                                        -> WORK/adaptive/agree.npz
  agree-healed  the committed agree.npz's rows and sets again, with the k = 3 pool's reply NLL and greedy agreement
            under the pool adapter added (pool, healed [n, P, 4]; its first ADAPTIVE_N rows): the healed menu's
            generation loss may then be agreement, as the unhealed menu's is (`train adaptive-report --healed`)
                                                                          -> WORK/adaptive/agree-healed.npz
  mc-healed router data (multiple choice, the rows of results/qwen2.5-coder-1.5b's data-train/val/test: their
            tasks, splits, seeds and sizes) of every k = 3 pool set with the pool adapter on, for routers retrained
            on the healed sets' scores (the `dense` columns there have the adapter on: use the run's own)
                                                                             -> WORK/data-healed-{train,val,test}/
  mc-extra  the same, unhealed, for issue "Adaptive depth"'s menu: the k = 1 and 2 sets with HumanEval results
            (generation/sets) of lowest train-split reply NLL in the committed heal/adaptive/nll.npz (3 per k),
            and the generation-aware k = 3 pool sets the run's data lacks       -> WORK/data-extra-{train,val,test}/
            (MC_SPLITS: the splits these two score, default train,val,test; EXTRA_POOL=0: the k = 1, 2 sets alone)
  seed      (alone, before processes sharing WORK start) copy the committed heal results (val NLL, the pool
            adapter's and the generation-aware sets' HumanEval replies) into WORK, so that nll and he-pool skip what is done
  per-set   one adapter per set (the PER_SET sets of lowest healed val NLL), trained the same way and as long,
            with HumanEval and multiple choice of each                        -> WORK/adapters/set-*/, gen-set-*/
  answers-code  the dense model's replies to the wide code prompts (results/distill/prompts-code.json: every
            standard-library module and class, 2,830 prompts)               -> WORK/distill/answers-code.jsonl.gz
  wide      per-set adapters (the PER_SET sets of lowest healed val NLL) trained on both answer files, for each
            step count of WIDE_STEPS (default 240,480), each with its val NLL on the first file's val replies and
            on the wide code val replies, HumanEval and multiple choice: does more code data heal code?
                                           -> WORK/adapters/wide<S>-<set>/, heal/val_nll_wide-*.json, gen-/mc-wide<S>-<set>

Sets are chosen on the val split of the distillation data and on nothing else; HumanEval is only reported.
Env: STEPS (training steps per adapter, default 240), BATCH (16), LR (2e-4), RANK (16), EVAL_N (3), PER_SET (2);
for a smoke run on a small model: LIMIT (the first N prompts), MAX_NEW (512), HE_LIMIT (HumanEval problems), MC_N
(1000 per task), SEARCH_PER_KIND (val code and task replies the search scores, 64 each), PROTECT (blocks never
removed, default 0,1,2,3 and the last), LORA_FROM (the first block given LoRA, default 4: blocks 0..3 run before a
hidden-state router's choice, and the runtime refuses adapters there), ADAPTIVE_N (800).
SHARD=i/n: n processes share the GPU (HF generation is bound by the host's work per step): `answers` answers every
n-th chunk (the shard that finds all chunks on disk writes the file; the others stop there), `he-pool` and `he-new`
run every n-th set. Start the n processes together with the same PHASES (benchmarks/heal_gpu.sh start-shards).
"""

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from pudding_mlx.atomic import write_json
from pudding_mlx.candidates import read_candidates
from pudding_mlx.train import distill as D
from pudding_mlx.train import heal as H
from pudding_mlx.train.generation import run_generation, set_name
from pudding_mlx.train.hf import load_hf
from pudding_mlx.train.router_data import build_router_data
from pudding_mlx.train.scoring import num_blocks
from pudding_mlx.train.search import model_identity

PHASES = ("answers", "search", "pool", "nll", "nll-check", "he-pool", "he-new", "mc-pool", "mc-new", "adaptive-data", "agree-data",
          "agree-healed",
          "mc-healed", "mc-extra", "per-set", "answers-code", "wide")
REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "results" / "qwen2.5-coder-1.5b"
HEAL = RUN / "heal"  # the committed results of the first heal run (2026-12-06)
STEPS, BATCH, LR, RANK = (int(os.environ.get("STEPS", 240)), int(os.environ.get("BATCH", 16)),
                          float(os.environ.get("LR", 2e-4)), int(os.environ.get("RANK", 16)))
EVAL_N, PER_SET = int(os.environ.get("EVAL_N", 3)), int(os.environ.get("PER_SET", 2))
LIMIT, HE_LIMIT = int(os.environ.get("LIMIT", 0)) or None, int(os.environ.get("HE_LIMIT", 0)) or None
MAX_NEW, MC_N = int(os.environ.get("MAX_NEW", D.MAX_NEW_TOKENS)), int(os.environ.get("MC_N", 1000))
SEARCH_PER_KIND = int(os.environ.get("SEARCH_PER_KIND", 64))
SHARD = tuple(int(x) for x in os.environ.get("SHARD", "0/1").split("/"))
ADAPTIVE_N = int(os.environ.get("ADAPTIVE_N", 800))
WIDE_STEPS = [int(x) for x in os.environ.get("WIDE_STEPS", "240,480").split(",")]
# LoRA only on blocks LORA_FROM..: the preset's hidden-state router reads after block 3, and the runtime refuses an
# adapter on the blocks the routed prefill runs before the set is known (pudding_mlx.adapters.check_routable)
LORA_FROM = int(os.environ.get("LORA_FROM", 4))
TODAY = ([13, 14, 15], [12, 13, 14], [15, 17, 18])  # MC-chosen static, fidelity-chosen static, the task router's pick
MC = (("val", ["boolq", "hellaswag", "piqa", "winogrande"], "validation"), ("test", ["arc_challenge", "arc_easy"], "test"))
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:.0f} s] {msg}", flush=True)


def seed_dense(out: Path):
    """The committed dense HumanEval replies: run_generation then skips dense (the original model)."""
    (out / "sets").mkdir(parents=True, exist_ok=True)
    (out / "replies").mkdir(exist_ok=True)
    for sub, name in (("sets", "dense.json"), ("replies", "dense.jsonl.gz")):
        if not (out / sub / name).is_file():
            shutil.copy(RUN / "generation" / sub / name, out / sub / name)


def sets_dict(sets, source):
    return {set_name(s): {"omitted": sorted(s), "k": len(s), "sources": [source]} for s in sets}


def mc(model, tok, sets, prefix: Path, name):
    for tag, tasks, split in MC:
        build_router_data(model, tok, [sorted(s) for s in sets], tasks, f"{prefix}-{tag}", MC_N, 0, 128, split=split,
                          model_name=name, progress=lambda d, t, c: log(f"{prefix.name}-{tag} {c} {d}/{t}"))


def router_data_like_run(model, tok, sets, prefix: Path, name):
    """Router data for SETS on exactly the rows of the run's data-{train,val,test}, so its columns can join them."""
    for split in os.environ.get("MC_SPLITS", "train,val,test").split(","):
        st = json.loads((RUN / f"data-{split}.json").read_text())["settings"]
        build_router_data(model, tok, [sorted(s) for s in sets], st["tasks"], f"{prefix}-{split}", st["max_per_task"],
                          st["seed"], 128, split=st["split"], model_name=name,
                          progress=lambda d, t, c: log(f"{prefix.name}-{split} {c} {d}/{t}"))


def extra_sets(pool, per_k: int = 3):
    """mc-extra's sets (module doc): chosen on the adaptive predictor's own training rows, never on evaluation data."""
    import numpy as np

    with np.load(HEAL / "adaptive" / "nll.npz", allow_pickle=False) as z:
        train = z["split"] == "train"
        nll = {str(s): float(z["unhealed"][train, j, 0].sum() / z["unhealed"][train, j, 1].sum())
               for j, s in enumerate(z["sets"])}
    have = {p.stem for p in (RUN / "generation" / "sets").glob("omit-*.json")}
    run_sets = {tuple(s) for s in json.loads((RUN / "data-train.json").read_text())["sets"]}
    chosen = []
    for k in (1, 2):
        sized = [s for s in nll if s and len(s.split(",")) == k and set_name([int(b) for b in s.split(",")]) in have]
        chosen += [[int(b) for b in s.split(",")] for s in sorted(sized, key=nll.get)[:per_k]]
    if os.environ.get("EXTRA_POOL", "1") == "0":  # the k = 1, 2 menu alone, for a short lease
        return chosen
    return chosen + [sorted(s) for s in pool if tuple(sorted(s)) not in run_sets]


def seed_answers(prompts: Path, answers: Path, ident: str):
    """The committed replies (results/distill/<name>), when made from these prompts by this model: no phase
    answers them again."""
    committed = REPO / "results" / "distill" / answers.name
    if answers.is_file() or not committed.is_file() or MAX_NEW != D.MAX_NEW_TOKENS or LIMIT:
        return
    header = D.read_answers(committed)[0]
    if header["prompts_sha256"] == D._sha256(prompts) and header["model"] == ident:
        answers.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(committed, answers)
        log(f"answers: the committed {committed.relative_to(REPO)}")


def load_adapter(pm, folder: Path, name: str):
    """A trained adapter's weights into the PEFT model's adapter `name` (a resumed phase evaluates the adapter it
    trained, not a fresh one)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(pm, load_file(str(folder / "adapter_model.safetensors")), adapter_name=name)


def seed_committed(src: Path, dst: Path):
    """Results an earlier run committed (HumanEval replies, val NLL): the phases skip what is there."""
    for f in src.rglob("*"):
        if f.is_file() and not (dst / f.relative_to(src)).exists():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst / f.relative_to(src))


def adaptive_data(pm, tok, examples, new, pool, out: Path):
    """The per-prompt quality of every candidate (module doc, adaptive-data) and the router's features."""
    import hashlib

    import numpy as np

    from pudding_mlx.atomic import write_npz
    from pudding_mlx.train.features import hidden_features
    from pudding_mlx.train.generation import sets_to_run

    base = pm.get_base_model()
    replies = [e for e in examples if e.kind != "code-text"]
    replies = sorted(replies, key=lambda e: hashlib.sha256(e.id.encode()).hexdigest())[:ADAPTIVE_N]  # a fixed draw
    today = sets_to_run(sorted(RUN.glob("cand-k*.json")), RUN / "cand.state.json", (1, 2))
    sets = [tuple(v["omitted"]) for v in today.values()] + [tuple(s) for k in sorted(new) for s in new[k]]
    sets = list(dict.fromkeys(sets))  # dense first (sets_to_run puts it there)
    with pm.disable_adapter():
        unhealed = D.nll_matrix(base, tok, replies, sets, progress=lambda d, t: log(f"adaptive-data unhealed {d}/{t}"))
    healed = D.nll_matrix(base, tok, replies, [tuple(s) for s in pool],
                          progress=lambda d, t: log(f"adaptive-data healed {d}/{t}"))
    prompts = {p["id"]: p["text"] for p in D.read_prompts(REPO / "results" / "distill" / "prompts.json")["prompts"]}
    with pm.disable_adapter():
        feats = hidden_features(base, tok, [prompts[e.id] for e in replies], [3], batch_size=32)
    write_npz(out / "nll.npz", id=np.array([e.id for e in replies]), kind=np.array([e.kind for e in replies]),
              split=np.array([e.split for e in replies]),
              sets=np.array([",".join(map(str, s)) for s in sets]), unhealed=unhealed.astype(np.float32),
              pool=np.array([",".join(map(str, s)) for s in pool]), healed=healed.astype(np.float32),
              **{k: v.astype(np.float16) for k, v in feats.items()})
    log(f"adaptive-data: {len(replies)} examples x {len(sets)} sets (+{len(pool)} healed) -> {out / 'nll.npz'}")


def agree_data(pm, tok, examples, out: Path):
    """agree-data (module doc): the adaptive predictor's rows and sets, each code reply added, with agreement."""
    import numpy as np

    from pudding_mlx.atomic import write_npz
    from pudding_mlx.train.features import hidden_features

    with np.load(HEAL / "adaptive" / "nll.npz", allow_pickle=False) as z:
        ids, sets = [str(i) for i in z["id"]], [tuple(int(b) for b in s.split(",") if b) for s in z["sets"]]
    have = {p.stem for p in (RUN / "generation" / "sets").glob("*.json")}
    sets = [s for s in sets if not s or set_name(list(s)) in have]  # the sets a menu can hold: HumanEval results
    by_id = {e.id: e for e in examples if e.kind != "code-text"}
    seen = set(ids)
    ids += [e.id for e in examples if e.kind == "code" and e.id not in seen]
    ids = [i for i in ids if i in by_id]  # all of them, unless LIMIT (a smoke run) shortened the data
    rows = [by_id[i] for i in ids]
    base = pm.get_base_model()
    with pm.disable_adapter():
        stats = D.nll_matrix(base, tok, rows, sets, agreement=True,
                             progress=lambda d, t: log(f"agree-data {d}/{t}"))
        prompts = {p["id"]: p["text"] for p in D.read_prompts(REPO / "results" / "distill" / "prompts.json")["prompts"]}
        feats = hidden_features(base, tok, [prompts[e.id] for e in rows], [3], batch_size=32)
    write_npz(out / "agree.npz", id=np.array(ids), kind=np.array([e.kind for e in rows]),
              split=np.array([e.split for e in rows]), sets=np.array([",".join(map(str, s)) for s in sets]),
              unhealed=stats.astype(np.float32), **{k: v.astype(np.float16) for k, v in feats.items()})
    log(f"agree-data: {len(rows)} examples x {len(sets)} sets -> {out / 'agree.npz'}")


def agree_healed(pm, tok, examples, pool, out: Path):
    """agree-healed (module doc): the committed agree.npz with the pool's healed statistics beside its own."""
    import numpy as np

    from pudding_mlx.atomic import write_npz

    with np.load(HEAL / "adaptive" / "agree.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    by_id = {e.id: e for e in examples if e.kind != "code-text"}
    keep = np.array([str(i) in by_id for i in arrays["id"]])
    keep &= np.arange(len(keep)) < ADAPTIVE_N  # all 594 by default; fewer for a smoke run
    if not keep.all():  # the per-row arrays (every one but "sets")
        arrays = {k: (v if k == "sets" else v[keep]) for k, v in arrays.items()}
    rows = [by_id[str(i)] for i in arrays["id"]]
    healed = D.nll_matrix(pm.get_base_model(), tok, rows, [tuple(s) for s in pool], agreement=True,
                          progress=lambda d, t: log(f"agree-healed {d}/{t}"))  # the pool adapter on
    write_npz(out / "agree-healed.npz", **arrays, pool=np.array([",".join(map(str, s)) for s in pool]),
              healed=healed.astype(np.float32))
    log(f"agree-healed: {len(rows)} examples x {len(pool)} pool sets healed -> {out / 'agree-healed.npz'}")


def main():
    model_path, work = sys.argv[1], Path(sys.argv[2])
    phases = sys.argv[3].split(",") if len(sys.argv) > 3 else PHASES
    work.mkdir(parents=True, exist_ok=True)
    prompts = REPO / "results" / "distill" / "prompts.json"
    if phases == ["seed"]:  # no model needed
        seed_committed(HEAL / "heal", work / "heal")
        seed_committed(HEAL / "gen-pool", work / "gen-pool")
        seed_committed(HEAL / "gen-unhealed", work / "gen-unhealed")
        for f in HEAL.glob("cand-distill*.json"):  # the generation-aware search: the pool holds its k = 3 sets
            if not (work / f.name).exists():
                shutil.copy(f, work / f.name)
        return log("seeded from the committed results")
    lm, tok, name = load_hf(model_path)
    ident = model_identity(model_path)
    n_blocks = num_blocks(lm)
    protect = [n_blocks - 1 if p == "last" else int(p) for p in os.environ.get("PROTECT", "0,1,2,3,last").split(",")]
    log(f"loaded {name}")
    answers = work / "distill" / "answers.jsonl.gz"
    code_prompts, code_answers = REPO / "results" / "distill" / "prompts-code.json", answers.with_name("answers-code.jsonl.gz")
    seed_answers(prompts, answers, ident)
    seed_answers(code_prompts, code_answers, ident)
    if "answers-code" in phases and not code_answers.is_file():
        D.answer_prompts(lm, tok, code_prompts, code_answers, ident, MAX_NEW, limit=LIMIT, log=log, shard=SHARD)
        if not code_answers.is_file():
            log(f"answers-code: shard {SHARD[0]}/{SHARD[1]}'s chunks written; the last shard to finish writes the file")
            return
    if phases == ["answers-code"]:
        return log(f"answers-code: {D.read_answers(code_answers)[0]}")
    if "answers" in phases and not answers.is_file():
        D.answer_prompts(lm, tok, prompts, answers, ident, MAX_NEW, limit=LIMIT, log=log, shard=SHARD)
        if not answers.is_file():
            log(f"answers: shard {SHARD[0]}/{SHARD[1]}'s chunks written; the last shard to finish writes the file")
            return
    log(f"answers: {D.read_answers(answers)[0]}")
    examples = D.build_examples(tok, prompts, answers)
    train = [e for e in examples if e.split == "train"]
    val = [e for e in examples if e.split == "val"]
    val_replies = [e for e in val if e.kind != "code-text"]
    log(f"{len(train)} train and {len(val)} val examples")
    cand = {k: work / f"cand-distill-k{k}.json" for k in (1, 2, 3, 5)}
    if "search" in phases and not cand[5].is_file():
        D.run_distill_search(lm, tok, val, [1, 2, 3, 5], work / "cand-distill.json", ident, protected=protect,
                             per_kind=SEARCH_PER_KIND, log=log)
    new = {k: [c["omitted"] for c in read_candidates(p)] for k, p in cand.items() if p.is_file()}
    today = [c["omitted"] for c in read_candidates(RUN / "cand-k3.json")]
    pool = [list(s) for s in dict.fromkeys(tuple(sorted(s)) for s in today + new.get(3, []))]
    log(f"k=3 pool: {len(pool)} sets; generation-aware: {new}")

    lora_layers = list(range(LORA_FROM, n_blocks))
    settings = {"steps": STEPS, "batch": BATCH, "lr": LR, "rank": RANK, "alpha": 2 * RANK, "kl_weight": 1.0,
                "layers": lora_layers}
    import torch

    torch.manual_seed(0)  # LoRA's A matrices start random: a rerun of a phase starts from the same weights
    pm = H.add_lora(lm, rank=RANK, alpha=2 * RANK, layers=lora_layers)
    pool_dir = work / "adapters" / "pool-k3"
    if "pool" in phases and not (pool_dir / "heal.json").is_file():
        curve = H.train_adapter(pm, tok, train, pool, STEPS, BATCH, LR, log=log)
        H.save_adapter(pm, pool_dir, pool, {**settings, "data": D.read_answers(answers)[0], "curve": curve})
    if (pool_dir / "heal.json").is_file():
        load_adapter(pm, pool_dir, "default")
    base = pm.get_base_model()

    def write_val_nll(path, **about):  # every pool set's val NLL, unhealed and with the pool adapter
        write_json(path, {"examples": len(val_replies), **about, "table": H.nll_table(pm, tok, val_replies, pool, ["default"])})
        log(f"val NLL -> {path}")

    nll_path = work / "heal" / "val_nll.json"
    if "nll" in phases and not nll_path.is_file():
        write_val_nll(nll_path)
    check_path = work / "heal" / "val_nll_retrained.json"
    if "nll-check" in phases and (pool_dir / "heal.json").is_file() and not check_path.is_file():
        write_val_nll(check_path, adapter=json.loads((pool_dir / "heal.json").read_text()))
    table = json.loads(nll_path.read_text())["table"] if nll_path.is_file() else {}
    ranked = sorted(pool, key=lambda s: table.get(set_name(s), {}).get("default", 1e9))
    chosen = [list(s) for s in dict.fromkeys(tuple(s) for s in ranked[:EVAL_N] + list(TODAY))]
    log(f"evaluated with the pool adapter: {chosen}")

    if "he-pool" in phases:
        seed_dense(work / "gen-pool")
        run_generation(base, tok, sets_dict(chosen, "pool-k3 adapter"), work / "gen-pool", tasks=("humaneval",), limit=HE_LIMIT,
                       batch_size=164, workers=12, log=log, shard=SHARD)
    if "he-new" in phases and new:
        seed_dense(work / "gen-unhealed")
        fresh = [s for k in (1, 2, 3) for s in new.get(k, [])]
        with pm.disable_adapter():
            run_generation(base, tok, sets_dict(fresh, "generation-aware search"), work / "gen-unhealed",
                           tasks=("humaneval",), limit=HE_LIMIT, batch_size=164, workers=12, log=log, shard=SHARD)
    if "mc-pool" in phases:
        mc(base, tok, chosen, work / "mc-pool", f"{ident}+pool-k3")
    if "mc-pool-rest" in phases:  # the pool sets the committed mc-pool lacks, on the same rows (joined later)
        done = {tuple(sorted(x)) for x in json.loads((HEAL / "mc-pool-val" / "router_data.json").read_text())["sets"]}
        mc(base, tok, [s for s in chosen if tuple(sorted(s)) not in done], work / "mc-pool-rest", f"{ident}+pool-k3")
    if "mc-new" in phases and new.get(3):
        with pm.disable_adapter():
            mc(base, tok, new[3], work / "mc-unhealed", ident)
    if "adaptive-data" in phases and not (work / "adaptive" / "nll.npz").is_file():
        adaptive_data(pm, tok, examples, new, pool, work / "adaptive")
    if "agree-data" in phases and not (work / "adaptive" / "agree.npz").is_file():
        agree_data(pm, tok, examples, work / "adaptive")
    if "agree-healed" in phases and not (work / "adaptive" / "agree-healed.npz").is_file():
        if not (pool_dir / "heal.json").is_file():
            sys.exit("agree-healed: no pool adapter in WORK/adapters/pool-k3; run the phase pool first")
        agree_healed(pm, tok, examples, pool, work / "adaptive")
    if "mc-healed" in phases:
        router_data_like_run(base, tok, pool, work / "data-healed", f"{ident}+pool-k3")
    if "mc-extra" in phases:
        with pm.disable_adapter():
            router_data_like_run(base, tok, extra_sets(pool), work / "data-extra", ident)
    if "per-set" in phases:
        for s in ranked[:PER_SET]:
            tag = set_name(s)
            out = work / "adapters" / f"set-{tag}"
            pm = H.add_lora(pm, rank=RANK, alpha=2 * RANK, name=tag, layers=lora_layers)
            if not (out / "heal.json").is_file():
                curve = H.train_adapter(pm, tok, train, [s], STEPS, BATCH, LR, log=log)
                H.save_adapter(pm, out, [s], {**settings, "data": D.read_answers(answers)[0], "curve": curve})
            else:
                load_adapter(pm, out, tag)
            table.setdefault(tag, {})[f"set-{tag}"] = D.mean_nll(D.target_nll(base, tok, val_replies, s))
            write_json(work / "heal" / "val_nll_per_set.json", table)
            seed_dense(work / f"gen-set-{tag}")
            run_generation(base, tok, sets_dict([s], f"set-{tag} adapter"), work / f"gen-set-{tag}",
                           tasks=("humaneval",), limit=HE_LIMIT, batch_size=164, workers=12, log=log)
            mc(base, tok, [s], work / f"mc-set-{tag}", f"{ident}+set-{tag}")
    if "wide" in phases:
        wide(pm, tok, train, val_replies, ranked[:PER_SET], code_prompts, code_answers, work,
             {**settings, "data": [D.read_answers(answers)[0], D.read_answers(code_answers)[0]]}, ident)
    log("done")


def wide(pm, tok, train, val_replies, sets, code_prompts: Path, code_answers: Path, work: Path, settings: dict, ident):
    """Phase `wide` (module doc): per-set adapters on both answer files, one per step count of WIDE_STEPS."""
    code = D.build_examples(tok, code_prompts, code_answers)
    code_train = [e for e in code if e.split == "train"]
    code_val = [e for e in code if e.split == "val" and e.kind != "code-text"]
    log(f"wide: {len(train)} + {len(code_train)} train examples; val {len(val_replies)} + {len(code_val)} code replies")
    base = pm.get_base_model()
    path = work / "heal" / f"val_nll_wide-{'-'.join(map(str, WIDE_STEPS))}.json"  # one per process (WIDE_BESIDE)
    table = json.loads(path.read_text()) if path.is_file() else {}

    def val_nll(s):
        return {"val": D.mean_nll(D.target_nll(base, tok, val_replies, s)),
                "code_val": D.mean_nll(D.target_nll(base, tok, code_val, s))}

    with pm.disable_adapter():
        for s in [[]] + [list(s) for s in sets]:
            row = table.setdefault(set_name(s) if s else "dense", {})
            if "unhealed" not in row:
                row["unhealed"] = val_nll(s)
    write_json(path, table)
    for steps in WIDE_STEPS:
        for s in sets:
            tag = f"wide{steps}-{set_name(s)}"
            out = work / "adapters" / tag
            pm = H.add_lora(pm, rank=RANK, alpha=2 * RANK, name=tag, layers=settings["layers"])
            if not (out / "heal.json").is_file():
                curve = H.train_adapter(pm, tok, train + code_train, [s], steps, BATCH, LR, log=log)
                H.save_adapter(pm, out, [s], {**settings, "steps": steps, "curve": curve})
            else:
                load_adapter(pm, out, tag)
            table[set_name(s)][tag] = val_nll(s)
            write_json(path, table)
            log(f"{tag}: val NLL {table[set_name(s)][tag]} (unhealed {table[set_name(s)]['unhealed']})")
            if not all(math.isfinite(v) for v in table[set_name(s)][tag].values()):
                log(f"{tag}: its val NLL is not finite; no HumanEval or multiple choice (see the skipped steps)")
                continue
            seed_dense(work / f"gen-{tag}")
            run_generation(base, tok, sets_dict([s], f"{tag} adapter"), work / f"gen-{tag}", tasks=("humaneval",),
                           limit=HE_LIMIT, batch_size=164, workers=12, log=log)
            mc(base, tok, [s], work / f"mc-{tag}", f"{ident}+{tag}")


if __name__ == "__main__":
    main()
