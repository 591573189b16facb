#!/usr/bin/env bash
# The real SmolLM2-135M-Instruct run, as it was made on the lent GPU (see README "Results").
# Usage: pipeline.sh search|data|routers GGUF ENCODER_DIR WORK_DIR OUT_DIR
#   search   candidate search, k = 3, 5, 7 (+ the SLEB-style "mix" chains)
#   data     router data on the train splits, and per-set scores on the evaluation splits
#   routers  light and full routers per k, and their scores on the evaluation texts
set -euo pipefail
phase=$1 G=$2 ENC=$3 W=$4 OUT=$5
R=$(dirname "$0")
C=$R/cand-k3.json,$R/cand-k5.json,$R/cand-k7.json
N=500   # examples per task (seeded sample) for router data and for evaluation
mkdir -p "$W" "$OUT"
case $phase in
search)
    pudding-mlx train search "$G" --tasks arc_challenge,arc_easy,hellaswag,piqa,winogrande,mix \
        --k 3,5,7 --n-calib 128 --batch-size 128 --out "$OUT/cand.json" ;;
data)
    pudding-mlx train data "$G" --candidates "$C" --split train --max-per-task $N --batch-size 128 --out "$W/data-train"
    pudding-mlx train data "$G" --candidates "$C" --tasks boolq,hellaswag,piqa,winogrande --split validation \
        --max-per-task $N --batch-size 128 --out "$W/data-val"
    pudding-mlx train data "$G" --candidates "$C" --tasks arc_challenge,arc_easy,openbookqa,mmlu --split test \
        --max-per-task $N --batch-size 128 --out "$W/data-test"
    for d in train val test; do cp "$W/data-$d/router_data.npz" "$OUT/data-$d.npz"; cp "$W/data-$d/router_data.json" "$OUT/data-$d.json"; done ;;
routers)
    "$R/../../benchmarks/minilm_routers.sh" "$W" "$R" "$ENC"
    tar -C "$W" -cf "$OUT/routers.tar" preds heads ;;
esac
