#!/usr/bin/env bash
# Train and score the hidden-state routers of a committed run, then rebuild its report (CPU, minutes).
# Usage: benchmarks/hidden_routers.sh RUN_DIR   (e.g. results/smollm2-135m, results/qwen2.5-coder-1.5b)
# RUN_DIR holds data-{train,val,test}.npz/.json (`train data`), features-{train,val,test}.npz
# (`train features` + `train pca`: features_pca.npz of each folder) and cand-k{3,5,7}.json.
# Writes RUN_DIR/routers/preds/hidden-<objective>-k<k>-<split>.npz, RUN_DIR/routers/hidden/*.json
# (each router's settings and validation figures) and RUN_DIR/report.{md,json,png}.
set -euo pipefail
RUN=$1
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
splits=()
for d in train val test; do
    [ -f "$RUN/data-$d.npz" ] || continue
    [ -f "$RUN/features-$d.npz" ] || { echo "$RUN/features-$d.npz: missing (train features + train pca)" >&2; exit 2; }
    mkdir -p "$W/data-$d"
    cp "$RUN/data-$d.npz" "$W/data-$d/router_data.npz"
    cp "$RUN/data-$d.json" "$W/data-$d/router_data.json"
    cp "$RUN/features-$d.npz" "$W/data-$d/features_pca.npz"
    [ "$d" = train ] || splits+=("$d")
done
mkdir -p "$RUN/routers/preds" "$RUN/routers/hidden"
for k in 3 5 7; do
    for objective in mse centered accuracy task; do
        r="$W/router-hidden-$objective-k$k"
        pudding-mlx train router "$W/data-train" --candidates "$RUN/cand-k$k.json" --variant probe \
            --objective "$objective" --out "$r" --force
        cp "$r/router.json" "$RUN/routers/hidden/hidden-$objective-k$k.json"
        for d in "${splits[@]}"; do
            pudding-mlx train predict "$r" --data "$W/data-$d" --out "$RUN/routers/preds/hidden-$objective-k$k-$d.npz"
        done
    done
done
pudding-mlx train evaluate "$RUN"
