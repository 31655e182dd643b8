#!/usr/bin/env bash
# The GPU checks of one device session, in one go: the throughput table, then the gpu-marked tests.
#   OUT=/dir bash bench/gpu_checks.sh [extra gpu_throughput.py args]     (QUICK= for all six workloads)
# Needs torch (CUDA) and transformers; pydantic and its needs can come as wheels in .whl/.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/vipoly-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, importlib.util as u; print('torch', torch.__version__, 'transformers', transformers.__version__, 'flash_attn', u.find_spec('flash_attn') is not None)"
timeout "${BENCH_TIMEOUT:-270}" python3 bench/gpu_throughput.py ${QUICK---quick} "$@" 2>&1 | tee "$OUT/gpu_throughput.log"
timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -m gpu tests/test_packing.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
