#!/usr/bin/env bash
# GPU-host session steps, one or more per call: bash benchmarks/gpu_session.sh PART [PART ...]
#   install  staged wheels (once per host: .gpu-stage batches must have arrived) and this package
#   tests    every test marked gpu (CUDA FP8 numerics, kernels, proxy graphs, TE backend, vLLM serving), or in $TESTS
#   controls / controls_wait  quality controls and remedies (quality.py --study controls) in the background / collected
#   fitspeed benchmarks/fit_throughput.py $FIT_ARGS: falqon fit tokens/s, packed vs unpacked, vs the fixed-shape bench
#   refresh  benchmarks/profile_refresh.py: cost of one A refresh on the 7B shape
#   blocks   benchmarks/block_bench.py $BLOCK_ARGS: block-scaled layer against its FP8 GEMM floor and row scales
#   layers   benchmarks/layer_bench.py $LAYER_ARGS: one layer against its two FP8 GEMMs (both backends)
#   fit      configs/smollm2-chat.yaml for $FIT_STEPS steps (default 300) with the summary callback, no
#            mid-fit validation (clean step time); a hang gets a Python stack dump (SIGABRT + faulthandler)
#   serve    benchmarks/serve_check.py $SERVE_ARGS (SmolLM2 through vLLM offline and `vllm serve`, then the 7B shape)
#   quality  benchmarks/quality.py $QUALITY_ARGS in $QUALITY_JOBS (4) concurrent shards, $QUALITY_BUDGET seconds
#            (480) each; resumable across calls
#   proxy    benchmarks/profile_proxy.py: the whole-model proxy update (7B shape), nearest and stochastic merges
#   steps    benchmarks/profile_step.py: GPU time of one 7B-shape step by kernel family ($STEP_VARIANTS)
#   peers    benchmarks/train_step_bench.py: falqon against its peers, LLaMA-7B shape
# Logs and results go to $OUT (or ./gpu-out); each part prints a short table last. Result files carry the names of
# benchmarks/results/ (peers with --compile: save train_step.json as train_step_compile.json): copy each over its
# current file there and add a row for the replaced one to the History table of benchmarks/RESULTS.md.
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
stamp() { echo "[$(date +%T)] $*"; }

install() {
  if [ -x /tmp/staged-wheels/install_staged.sh ] && [ ! -e /tmp/staged-wheels/.installed ]; then
    bash /tmp/staged-wheels/install_staged.sh --install 2>&1 | tail -2 && touch /tmp/staged-wheels/.installed
  fi
  python3 -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | grep -v WARNING
  python3 - <<'PY' | tee "$out/versions.txt"
import importlib, torch
names = [
    "triton", "transformers", "lightning", "peft", "vllm", "torchao", "bitsandbytes", "compressed_tensors",
    "transformer_engine", "liger_kernel",
]
found = []
for n in names:
    try:
        found.append(f"{n} {importlib.import_module(n).__version__}")
    except Exception as err:  # noqa: BLE001 - report, do not stop the session
        found.append(f"{n} missing ({type(err).__name__})")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()};", ", ".join(found))
PY
}

tests() {
  # Every test marked gpu (or $TESTS), with the reasons of skips; -rfE lists failures last.
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest ${TESTS:-tests} -m gpu -q -p no:cacheprovider -rfE 2>&1 \
    | tee "$out/gpu_tests.log" | grep -E "passed|failed|FAILED|ERROR" | tail -15
}

controls() {
  # The quality controls and remedies (benchmarks/quality.py --study controls) in the background, so that untimed
  # work (the GPU tests) can share the GPU meanwhile; controls_wait collects them.
  mkdir -p /tmp/quality-controls
  # $QUALITY_RECORDS: an earlier call's quality.jsonl; its finished runs are skipped, the rest resume.
  [ -n "${QUALITY_RECORDS:-}" ] && [ ! -e /tmp/quality-controls/quality.jsonl ] && cp "$QUALITY_RECORDS" /tmp/quality-controls/
  OMP_NUM_THREADS=2 timeout 560 python3 -m benchmarks.quality --study controls --jobs "${QUALITY_JOBS:-8}" \
    --out /tmp/quality-controls --time-budget "${QUALITY_BUDGET:-420}" ${QUALITY_ARGS:-} > "$out/quality_controls.log" 2>&1 &
  controls_pid=$!
}

controls_wait() {
  wait "$controls_pid"
  tail -n 25 "$out/quality_controls.log"
  cp /tmp/quality-controls/quality.jsonl /tmp/quality-controls/quality_summary.json /tmp/quality-controls/quality.png \
    "$out/" 2>/dev/null
}

fitspeed() {
  timeout 560 python3 -m benchmarks.fit_throughput --out /tmp/fit-throughput ${FIT_ARGS:-} 2>&1 \
    | tee "$out/fit_throughput.log" | tail -25
  cp /tmp/fit-throughput/*.json "$out/" 2>/dev/null
}

refresh() {
  timeout 120 python3 -m benchmarks.profile_refresh --json "$out/refresh.json" 2>&1 | tail -8
}

blocks() {
  timeout 200 python3 -m benchmarks.block_bench --json "$out/block_bench.json" ${BLOCK_ARGS:-} 2>&1 \
    | tee "$out/block_bench.log" | tail -20
}

layers() {
  timeout 300 python3 -m benchmarks.layer_bench --json "$out/layer.json" ${LAYER_ARGS:-} 2>&1 | tee "$out/layer.log" \
    | tail -30
}

fit() {
  local start; start=$(date +%s)
  # SIGABRT makes faulthandler print every thread's stack if the process is still alive at the limit.
  timeout -s ABRT "${FIT_TIMEOUT:-240}" falqon fit --config configs/smollm2-chat.yaml \
    --trainer.max_steps "${FIT_STEPS:-300}" --trainer.limit_val_batches 0 --trainer.num_sanity_val_steps 0 \
    --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir=/tmp/smollm2-gpu \
    --trainer.enable_progress_bar=false > "$out/smollm2_fit.log" 2>&1
  local rc=$?
  stamp "falqon fit exit code $rc, wall $(( $(date +%s) - start )) s (124/134: timed out or aborted)"
  grep -A14 "fit summary" "$out/smollm2_fit.log" | head -16
  [ $rc -eq 0 ] || tail -40 "$out/smollm2_fit.log"
  cp /tmp/smollm2-gpu/lightning_logs/version_0/metrics.csv "$out/smollm2_chat_metrics.csv" 2>/dev/null
}

serve() {
  timeout 570 python3 -m benchmarks.serve_check --out "$out" ${SERVE_ARGS:-} 2>&1 | tee "$out/serve_check.log" | tail -30
}

quality() {
  # $QUALITY_JOBS processes share the GPU (SmolLM2's step is bound by host-side dispatch), each taking every
  # N-th pending run; $QUALITY_RECORDS seeds /tmp/quality with earlier records (same settings: they are skipped).
  local jobs=${QUALITY_JOBS:-4} i
  mkdir -p /tmp/quality
  if [ -n "${QUALITY_RECORDS:-}" ] && [ ! -e /tmp/quality/quality.jsonl ]; then
    cp "$QUALITY_RECORDS" /tmp/quality/quality.jsonl
  fi
  for ((i = 0; i < jobs; i++)); do
    OMP_NUM_THREADS=4 timeout 560 python3 -m benchmarks.quality --out /tmp/quality --shard "$i/$jobs" \
      --time-budget "${QUALITY_BUDGET:-480}" ${QUALITY_ARGS:-} > "/tmp/quality/shard_$i.log" 2>&1 &
  done
  wait
  for ((i = 0; i < jobs; i++)); do grep -E "^\[" "/tmp/quality/shard_$i.log" | sed "s/^/[shard $i] /"; done \
    > "$out/quality_shards.log"
  tail -n 40 /tmp/quality/shard_*.log | grep -iE "error|traceback" | head -5
  python3 -m benchmarks.quality --out /tmp/quality --report-only ${QUALITY_ARGS:-} 2>&1 | tee "$out/quality.log" | tail -40
  cp /tmp/quality/quality.jsonl /tmp/quality/quality_summary.json /tmp/quality/quality.png "$out/" 2>/dev/null
}

proxy() {
  local rounding
  for rounding in nearest stochastic; do
    timeout 200 python3 -m benchmarks.profile_proxy --rounding $rounding 2>&1 | tee "$out/proxy_$rounding.log" | head -20
  done
}

steps() {
  local variant
  for variant in ${STEP_VARIANTS:-falqon-tensor falqon-default peft-bf16}; do
    timeout 180 python3 -m benchmarks.profile_step --variant $variant 2>&1 | tee "$out/profile_step_$variant.log" \
      | grep -v -i warn | head -14
  done
}

peers() {
  timeout 570 python3 -m benchmarks.train_step_bench --json "$out/train_step.json" ${PEERS_ARGS:-} \
    2>&1 | tee "$out/train_step.log" | tail -25
}

for part in "$@"; do
  stamp "== $part"
  "$part"
done
