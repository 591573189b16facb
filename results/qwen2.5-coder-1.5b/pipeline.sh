#!/usr/bin/env bash
# The Qwen2.5-Coder-1.5B-Instruct run on the lent GPU (issue: real scale), resumable phase by phase.
# Usage, from the repository root on the GPU machine:
#   results/qwen2.5-coder-1.5b/pipeline.sh search              # candidate search, k = 3, 5, 7 (+ SLEB-style mix)
#   results/qwen2.5-coder-1.5b/pipeline.sh data                # router data (train) + per-set scores (evaluation) + features
#   results/qwen2.5-coder-1.5b/pipeline.sh features            # hidden-state router inputs + PCA
#   results/qwen2.5-coder-1.5b/pipeline.sh resume              # next session: ARC test + features, from the committed data
#   results/qwen2.5-coder-1.5b/pipeline.sh more-train          # router data on N_TRAIN (2,000) train examples per task + features
#   results/qwen2.5-coder-1.5b/pipeline.sh routers ENCODER      # MiniLM routers (light + full) per k (KS), scored on val/test
#   results/qwen2.5-coder-1.5b/pipeline.sh mlx OUTDIR           # MLX (CUDA or CPU): convert, bundle (hidden router), parity, eval, bench
#   results/qwen2.5-coder-1.5b/pipeline.sh pack OUTDIR         # compact copies of everything for results/
#   results/qwen2.5-coder-1.5b/pipeline.sh preset              # the chat preset's router, from the committed data (CPU)
# Env: GGUF (the assembled Qwen GGUF; default where ../shared/tools/device-stage puts it), WORK (default /tmp/qwen-work), NGPU (default: every visible GPU; >1 runs under torchrun),
# PUDDING_MLX_DATA (the benchmark folder). Every phase resumes where a killed run stopped.
#
# Choices (see the README's Qwen section): blocks 0-3 and the last are never omitted (--protect-first 4),
# so the hidden-state router reads the residual stream after block 3 or later for free; the search
# uses 128 calibration examples per task; router data uses seeded samples of 2,000 train examples per task
# (`more-train`; the first session's `data` ran 1,000, what the shipped preset router was trained on); evaluation uses seeded samples of 1,000 per task of the standard
# evaluation splits (ARC: test; the others: validation), BoolQ only there (the unseen task).
set -euo pipefail
phase=$1
R=$(cd "$(dirname "$0")" && pwd)
W=${WORK:-/tmp/qwen-work}
M=${GGUF:-/tmp/stage/files/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}  # transformers dequantises it on load (a GGUF-quantised model cannot be saved as a HF folder)
NGPU=${NGPU:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}
C=$W/cand-k3.json,$W/cand-k5.json,$W/cand-k7.json
TRAIN_TASKS=arc_challenge,arc_easy,hellaswag,piqa,winogrande
mkdir -p "$W"
if [ "$NGPU" -gt 1 ]; then L="torchrun --standalone --nproc-per-node $NGPU"; else L=python3; fi  # launcher of data_features.py
run() {
    if [ "$NGPU" -gt 1 ]; then torchrun --standalone --nproc-per-node "$NGPU" -m pudding_mlx.app.cli "$@"
    else python3 -m pudding_mlx.app.cli "$@"; fi
}
seeded_data_features() {  # SPLITS N_TRAIN JOBS: seed SPLITS from the committed data, score JOBS, then features
    for d in $1; do
        mkdir -p "$W/data-$d"
        [ -f "$W/data-$d/router_data.npz" ] || { cp "$R/data-$d.npz" "$W/data-$d/router_data.npz"; cp "$R/data-$d.json" "$W/data-$d/router_data.json"; }
    done
    cp -n "$R"/cand-k3.json "$R"/cand-k5.json "$R"/cand-k7.json "$W/"
    $L "$R/data_features.py" "$M" "$W" "$2" 1000 128 "$3" 2>&1 | tee -a "$W/data.log"
}
case $phase in
search)
    run train search "$M" --tasks $TRAIN_TASKS,mix --losses likelihood,likelihood_diff --k 3,5,7 \
        --n-calib 128 --batch-size 512 --protect-first 4 --out "$W/cand.json" 2>&1 | tee -a "$W/search.log" ;;
data)
    # train/val/test data and the hidden-state features with the model loaded once (data_features.py)
    $L "$R/data_features.py" "$M" "$W" 1000 1000 128 2>&1 | tee -a "$W/data.log" ;;
features)
    python3 -m pudding_mlx.app.cli train features "$M" --data "$W/data-train,$W/data-val,$W/data-test" \
        --after 3,auto --candidates "$C" --batch-size 64 2>&1 | tee -a "$W/features.log"
    python3 -m pudding_mlx.app.cli train pca --fit "$W/data-train" --apply "$W/data-val,$W/data-test" --dim 64 \
        2>&1 | tee -a "$W/features.log" ;;
resume)
    # next session: the committed train/val data seed the work folder, then only the ARC test split is
    # scored, and the hidden-state features + PCA are computed for all three (seconds on a GPU)
    seeded_data_features "train val" 1000 test ;;
routers)
    # the paper's routers: MiniLM light (frozen encoder + head) and full (fine-tuned), per k, one job per GPU
    "$R/../../benchmarks/minilm_routers.sh" "$W" "$W" "$2" ${KS:-3 5 7} ;;
more-train)
    # router data on N_TRAIN (default 2,000) train examples per task, with the committed evaluation data
    # (val, test) seeding the work folder; then the hidden-state features + PCA of all three splits
    seeded_data_features "val test" "${N_TRAIN:-2000}" train ;;
mlx)
    # the device side on the real model: the GGUF converted to MLX 4-bit (what users run), a bundle with
    # the hidden-state router (k=$K, objective $OBJ, trained here on the train features), MLX-vs-PyTorch
    # eval parity on the same float32 weights, the bundle's own eval (4-bit: routed, its fallback set,
    # dense), and its bench. Needs MLX; writes into OUTDIR.
    out=$2; mkdir -p "$out"
    K=${K:-5} OBJ=${OBJ:-accuracy} LIMIT=${LIMIT:-300}
    cli() { python3 -m pudding_mlx.app.cli "$@"; }
    [ -d "$W/qwen-mlx-q4" ] || cli convert llm "$M" "$W/qwen-mlx-q4" --quantize 4 2>&1 | tee -a "$out/mlx.log"
    cli train router "$W/data-train" --candidates "$W/cand-k$K.json" --variant probe --objective "$OBJ" \
        --out "$W/router-hidden-$OBJ-k$K" --force 2>&1 | tee -a "$out/mlx.log"
    cli convert bundle "$W/bundle-k$K" --llm "$W/qwen-mlx-q4" --router "$W/router-hidden-$OBJ-k$K" \
        --candidates "$W/cand-k$K.json" --force 2>&1 | tee -a "$out/mlx.log"
    cli info "$W/bundle-k$K" --json > "$out/bundle-k$K-info.json" || true
    cp -r "$W/router-hidden-$OBJ-k$K" "$out/router-hidden-$OBJ-k$K"
    static=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(','.join(map(str, r['sets'][r['fallback']])))" \
        "$W/router-hidden-$OBJ-k$K/router.json")
    python3 benchmarks/eval_parity.py --gguf "$M" --limit "$LIMIT" --omit "$static" --device "${TORCH_DEVICE:-cuda}" \
        --md "$out/eval_parity_qwen_cuda.md" --json "$out/eval_parity_qwen_cuda.json" 2>&1 | tee -a "$out/mlx.log" || echo "mlx: eval parity FAILED" >&2
    for mode in routed "omit $static" dense; do
        tag=$(echo "$mode" | cut -d' ' -f1)
        flag=""; [ "$tag" = omit ] && flag="--omit $static"; [ "$tag" = dense ] && flag="--dense"
        cli eval "$W/bundle-k$K" --tasks arc_challenge,arc_easy,boolq,hellaswag,piqa,winogrande --limit "$LIMIT" $flag \
            --json "$out/eval_bundle_k${K}_${tag}.json" 2>&1 | tee -a "$out/mlx.log" || echo "mlx: eval $tag FAILED" >&2
    done
    cli bench "$W/bundle-k$K" --runs "${RUNS:-10}" ${CELLS:+--cells $CELLS} --json "$out/bench_qwen_bundle_k${K}_$(python3 -c 'from pudding_mlx.load import backend; print(backend())').json" \
        2>&1 | tee -a "$out/mlx.log" || echo "mlx: bench FAILED" >&2 ;;
preset)
    # the chat preset's router (pudding_mlx/data/qwen25_coder_k3/, a copy in routers/hidden-k3-shipped/):
    # the hidden-state router with the best six-task average at k = 3 in report.md (objective OBJ,
    # default task), trained on this folder's committed router data; seconds on a CPU, no GPU
    OBJ=${OBJ:-task} D=$(mktemp -d)
    mkdir -p "$D/data-train"
    cp "$R/data-train.npz" "$D/data-train/router_data.npz"; cp "$R/data-train.json" "$D/data-train/router_data.json"
    cp "$R/features-train.npz" "$D/data-train/features_pca.npz"
    python3 -m pudding_mlx.app.cli train router "$D/data-train" --candidates "$R/cand-k3.json" --variant probe \
        --objective "$OBJ" --out "$D/router"
    cp "$D/router/router.json" "$D/router/head.safetensors" "$R/../../pudding_mlx/data/qwen25_coder_k3/"
    rm -rf "$R/routers/hidden-k3-shipped"; cp -r "$D/router" "$R/routers/hidden-k3-shipped"; rm -rf "$D" ;;
pack)
    out=$2; mkdir -p "$out"
    # per-choice floats as float16 and compressed: the committed copies stay small (acc/acc_norm are exact bools)
    python3 - "$W" "$out" <<'PY'
import pathlib, shutil, sys
import numpy as np
w, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for d in ("train", "val", "test"):
    src = w / f"data-{d}"
    if not (src / "router_data.npz").is_file():
        continue
    with np.load(src / "router_data.npz") as z:
        arrays = {k: (z[k].astype(np.float16) if k in ("logprob", "mean_ll", "dense_logprob", "dense_mean_ll") else z[k])
                  for k in z.files}
    np.savez_compressed(out / f"data-{d}.npz", **arrays)
    shutil.copy(src / "router_data.json", out / f"data-{d}.json")
    if (src / "features_pca.npz").is_file():
        shutil.copy(src / "features_pca.npz", out / f"features-{d}.npz")
for f in ["cand-k3.json", "cand-k5.json", "cand-k7.json", "cand.state.json", "search.log", "data.log", "features.log", "routers.log"]:
    if (w / f).is_file():
        shutil.copy(w / f, out / f)
if (w / "preds").is_dir():  # the MiniLM routers' scores and heads
    import tarfile
    with tarfile.open(out / "routers.tar", "w") as t:
        for sub in ("preds", "heads"):
            if (w / sub).is_dir():
                t.add(w / sub, arcname=sub)
print(sorted(p.name for p in out.iterdir()))
PY
    ;;
*) echo "usage: $0 search|data|features|resume|routers ENCODER|mlx OUTDIR|pack OUTDIR|preset" >&2; exit 2 ;;
esac
