#!/bin/sh
# The fused healing adapter on the lent GPU (issue "Healed omission sets", item 6): what the 8-bit merged copy
# keeps of the adapter (benchmarks/adapter_fuse.py) and what it costs in decode speed, fused and as LoRA terms,
# against the same set unhealed (`pudding-mlx bench`: healed and unhealed in the same interleaved rounds).
#
#   benchmarks/fuse_gpu.sh STAGED OUT [SET]
#
# STAGED holds healed-preset.tar (the qwen2.5-coder-1.5b preset with the heal run's pool adapter: `convert
# bundle --adapter`) and the mlx, mlx-cuda-13 and mlx-lm wheels (installed to /tmp/site by the staging).
set -u
staged=$1 out=$2 set=${3:-13,14,15}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/fuse
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
[ -d /tmp/fuse/healed-preset ] || tar xf "$staged/healed-preset.tar" -C /tmp/fuse
B=/tmp/fuse/healed-preset PM="python3 -m pudding_mlx.app.cli" tag=$(echo "$set" | tr ',' '-')
python3 benchmarks/adapter_fuse.py "$B" --omit "$set" --replies 64 --json "$out/fuse_${tag}_cuda.json" \
    --md "$out/fuse_${tag}_cuda.md" >"$out/fuse_${tag}_cuda.log" 2>&1 || echo "failed: adapter_fuse"
tail -12 "$out/fuse_${tag}_cuda.log"
for mode in fused lora-terms; do
    flag=""; [ $mode = lora-terms ] && flag="--lora-terms"
    $PM bench "$B" --omit "$set" --cells 16+64,128+128 --runs 8 --no-memory $flag \
        --json "$out/cost_${mode}_${tag}_cuda.json" >"$out/cost_${mode}_${tag}_cuda.log" 2>&1 || echo "failed: bench $mode"
    grep -h "healed/unhealed" "$out/cost_${mode}_${tag}_cuda.log" | head -2 | sed "s/^/$mode: /"
done
