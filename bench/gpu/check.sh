#!/usr/bin/env bash
# The GPU check: run on a CUDA machine from the repository root (torch with CUDA already installed there; the
# core dependencies of the pipeline are torch, tokenizers, safetensors, tqdm, numpy, regex, scikit-learn and
# matplotlib). Writes logs to ${OUT:-/tmp/gpu-check}.
#   1. tests/test_cuda.py: forward pass, engine and the tiny pipeline on the GPU against the CPU
#   2. bench/gpu/gpu_bench.py: training tokens/s and MFU (eager, compiled), batched decoding tokens/s; with a
#      tokenizer folder in TOK_DIR (SmolLM2's, saved by `tokenizer.save`), also the cost of a JSON-schema grammar
#   3. the pipeline's gpu preset, scaled down to a few minutes, with its stage times and report card
#   4. with OLD_PPO=1: the same run's PPO-ptx and evaluation again with the preset's earlier PPO method (a value
#      model, the reward model alone as the score), side by side with 3 (measured on an H200 in the twentieth
#      session: 53.4% against the current method's 53.9%; bench/results/gpu.md)
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"

echo "== 1. tests/test_cuda.py"
[ -n "${SKIP_TESTS:-}" ] || timeout "${T_TESTS:-180}" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py ${TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -25

echo "== 2. gpu_bench"
[ -n "${SKIP_BENCH:-}" ] || timeout "${T_BENCH:-240}" $PY bench/gpu/gpu_bench.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.jsonl" | grep -v '^\s*$' | tail -20
if [ -n "${TOK_DIR:-}" ]; then
    timeout "${T_GRAMMAR:-120}" $PY bench/gpu/gpu_bench.py --only grammar --tokenizer "$TOK_DIR" 2>&1 | tee "$OUT/grammar.jsonl" | tail -8
fi

echo "== 3. pipeline --preset gpu (scaled down)"
run=/tmp/gpu-check-run
rm -rf "$run"  # a run folder left by an earlier check would be resumed, not rerun
# the gpu preset scaled down to a few minutes (PIPE_ARGS may override any of it)
SCALED="--ablations false --world.corpus_docs 50000 --world.sft_prompts 2000 --world.rm_prompts 2000
    --world.ppo_prompts 4000 --world.eval_prompts 330 --pretrain.max_steps 1200 --sft.max_steps 400
    --reward.max_steps 250 --ppo.iterations 40 --eval.best_of_n 4 ${PIPE_ARGS:-}"
timeout "${T_PIPE:-240}" $PY -m minichat.cli pipeline --preset gpu --out_dir "$run" $SCALED > "$OUT/pipeline.log" 2>&1
echo "pipeline exit $?"
grep -E '^\[pipeline\]|Error|error' "$OUT/pipeline.log" | tail -30
cp "$run/pipeline.json" "$OUT/" 2>/dev/null
cp "$run/report/report.md" "$run/eval/metrics.json" "$OUT/" 2>/dev/null
$PY - "$run/pipeline.json" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(0)
for k, v in d["stages"].items():
    print(f"{k:12s} {v['wall_s']:7.1f} s")
EOF

echo "== 4. PPO-ptx with the preset's earlier method, on the same run"
if [ -n "${OLD_PPO:-}" ] && [ -f "$run/report/report.md" ]; then
    timeout "${T_OLD:-240}" $PY -m minichat.cli pipeline --preset gpu --out_dir "$run" $SCALED --from ppo \
        --ppo.baseline value --ppo.samples_per_prompt 1 --ppo.ref_logp_coef 0 > "$OUT/pipeline_old_ppo.log" 2>&1
    echo "exit $?"
    cp "$run/report/report.md" "$OUT/report_old_ppo.md" 2>/dev/null
    cp "$run/eval/metrics.json" "$OUT/metrics_old_ppo.json" 2>/dev/null
    grep -E 'PPO-ptx wins|^\| PPO-ptx' "$OUT/report.md" "$OUT/report_old_ppo.md" 2>/dev/null
fi
