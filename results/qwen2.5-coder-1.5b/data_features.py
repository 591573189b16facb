"""Router data (train), per-set scores (evaluation) and hidden-state features for the Qwen run, with
the model loaded ONCE (a GGUF load dequantises 1.5B weights on the CPU, ~75 s). Same functions as
`pudding-mlx train data` / `train features` / `train pca`; resumable; run under torchrun for several GPUs.
Usage: data_features.py MODEL WORK_DIR [PER_TASK_TRAIN] [PER_TASK_EVAL] [BATCH] [JOBS]
JOBS: which data folders to score, comma-separated (default train,val,test); features are computed for
every folder that has router data. As run on 2026-11-30: `... 1000 1000 128` (train, then val ran out of
memory: the logits window, since fixed in train.scoring), then `... 1000 1000 16` (val; test was cut off)."""
import sys
import time

from pudding_mlx.train.distributed import finish, init_from_env, is_main
from pudding_mlx.train.features import project_features, write_features
from pudding_mlx.train.hf import load_hf
from pudding_mlx.train.router_data import build_router_data
from pudding_mlx.candidates import read_candidates

model, work = sys.argv[1], sys.argv[2]
n_train = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
n_eval = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
t0 = time.time()
init_from_env()
lm, tok, _ = load_hf(model)
sets, seen = [], set()
for k in (3, 5, 7):
    for c in read_candidates(f"{work}/cand-k{k}.json"):
        if tuple(sorted(c["omitted"])) not in seen:
            seen.add(tuple(sorted(c["omitted"])))
            sets.append(sorted(c["omitted"]))
print(f"loaded in {time.time() - t0:.0f} s; {len(sets)} distinct sets", flush=True)
wanted = (sys.argv[6] if len(sys.argv) > 6 else "train,val,test").split(",")
jobs = [("train", ["arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande"], "train", n_train),
        ("val", ["boolq", "hellaswag", "piqa", "winogrande"], "validation", n_eval),
        ("test", ["arc_challenge", "arc_easy"], "test", n_eval)]
for name, tasks, split, n in jobs:
    if name not in wanted:
        continue
    build_router_data(lm, tok, sets, tasks, f"{work}/data-{name}", n, 0, int(sys.argv[5]) if len(sys.argv) > 5 else 64, split=split, model_name=model,
                      progress=lambda done, total, c: is_main() and print(f"[{time.time() - t0:.0f} s] {c} {done}/{total}", flush=True))
if is_main():
    after = sorted({3, min(min(s) for s in sets) - 1})
    import os

    for name, *_ in jobs:
        if not os.path.isfile(f"{work}/data-{name}/router_data.npz"):
            continue
        write_features(lm, tok, f"{work}/data-{name}", after, batch_size=64)
        print(f"[{time.time() - t0:.0f} s] features after blocks {after} -> data-{name}", flush=True)
    project_features(f"{work}/data-train", [f"{work}/data-val", f"{work}/data-test"], dim=64)
    print(f"[{time.time() - t0:.0f} s] PCA done", flush=True)
finish()
