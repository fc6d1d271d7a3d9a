#!/usr/bin/env bash
# One GPU-host session: install staged wheels and the package, run every GPU test, then the SmolLM2 chat config.
# Usage (on the GPU host, after the staged batches arrived): bash benchmarks/gpu_session.sh [MAX_STEPS]
# Writes logs to $OUT (or ./gpu-out); prints a short table last.
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
steps=${1:-300}
export PYTHONUNBUFFERED=1
[ -x /tmp/staged-wheels/install_staged.sh ] && bash /tmp/staged-wheels/install_staged.sh --install 2>&1 | tail -1
python3 -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | grep -v WARNING
python3 -c "import torch, triton, transformers, lightning; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"

timeout 400 python3 -m pytest tests/test_numerics.py tests/test_gemm.py tests/test_layer.py tests/test_proxy.py \
  tests/test_proxy_graph.py tests/test_kernels.py tests/test_merge_kernel.py tests/test_convert.py -q -p no:cacheprovider \
  2>&1 | tee "$out/gpu_tests.log" | tail -3

start=$(date +%s)
timeout 900 falqon fit --config configs/smollm2-chat.yaml --trainer.max_steps "$steps" --trainer.val_check_interval 100 \
  --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir=/tmp/smollm2-gpu \
  --trainer.enable_progress_bar=false 2>&1 | tee "$out/smollm2_fit.log" | tail -25
echo "fit wall time: $(( $(date +%s) - start )) s"
cp /tmp/smollm2-gpu/lightning_logs/version_0/metrics.csv "$out/smollm2_metrics.csv" 2>/dev/null
cp /tmp/smollm2-gpu/lightning_logs/version_0/quant_stats.png "$out/" 2>/dev/null
true
