#!/usr/bin/env bash
# The paper's routers (a MiniLM encoder + head): light (encoder frozen) and full (fine-tuned) per k,
# trained on WORK/data-train and scored on WORK/data-val and WORK/data-test. Shared by the runs in
# results/*/pipeline.sh. Usage:
#   benchmarks/minilm_routers.sh WORK CAND_DIR ENCODER [K ...]        (default K: 3 5 7)
# CAND_DIR holds cand-k<k>.json. Writes WORK/preds/<variant>-k<k>-<split>.npz, WORK/heads/ (each
# router's router_train.json, the light heads) and WORK/routers.log. NGPU (default: the GPUs torch
# sees, at least 1) jobs run side by side, one per GPU (CUDA_VISIBLE_DEVICES), the slow full routers
# first; a failed job is reported and the others go on (exit status 1 at the end).
set -uo pipefail
W=$1 C=$2 ENC=$3
shift 3
ks=("$@")
[ $# -gt 0 ] || ks=(3 5 7)
NGPU=${NGPU:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)}
mkdir -p "$W/preds" "$W/heads"
cli() { python3 -m pudding_mlx.app.cli "$@"; }

one() {  # variant k: train, score val/test, keep the settings (and a light router's head)
    local v=$1 k=$2 r="$W/router-$1-k$2"
    cli train router "$W/data-train" --candidates "$C/cand-k$k.json" --variant "$v" --encoder "$ENC" \
        --out "$r" --force || return 1
    for d in val test; do
        [ -d "$W/data-$d" ] || continue
        cli train predict "$r" --data "$W/data-$d" --out "$W/preds/$v-k$k-$d.npz" || return 1
    done
    cp "$r/router_train.json" "$W/heads/router_train-$v-k$k.json"
    if [ "$v" = light ]; then mkdir -p "$W/heads/light-k$k"; cp "$r/head.json" "$r/head.safetensors" "$W/heads/light-k$k/"; fi
}

jobs=()
for v in full light; do for k in "${ks[@]}"; do jobs+=("$v $k"); done; done
pids=()
for g in $(seq 0 $((NGPU - 1))); do
    (   # GPU g takes jobs g, g + NGPU, ...
        status=0
        for i in $(seq "$g" "$NGPU" $((${#jobs[@]} - 1))); do
            set -- ${jobs[$i]}
            echo "[$(date +%T)] gpu $g: $1 k=$2"
            CUDA_VISIBLE_DEVICES=$g one "$1" "$2" || { echo "minilm_routers: FAILED: $1 k=$2" >&2; status=1; }
        done
        exit $status
    ) >>"$W/routers.log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
grep -E "FAILED|^\[" "$W/routers.log" | tail -20
exit $status
