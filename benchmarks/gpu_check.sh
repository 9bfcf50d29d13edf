#!/usr/bin/env bash
# One command on a CUDA machine (under 8 minutes on an H200): every Triton kernel against its
# reference at realistic sizes in bf16 and fp16, the engine against HF transformers on a random
# ~0.5B Qwen2-style model (fp32 exact, bf16 within tolerance), CUDA graphs against eager, then the
# benchmark table (benchmarks/gpu_bench.py). Tensor parallel runs at size 1 on a one-GPU machine (its
# TP=2 test needs two GPUs and says so; the CPU suite runs TP=2 over gloo). Uses the machine's own torch / triton / transformers;
# downloads nothing. Logs go to $OUT (or benchmarks/out).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${OUT:-benchmarks/out}
mkdir -p "$LOG_DIR"
# The kernels package lives in kernels/ (installed as dashinfer_kernels): expose it without pip.
SHIM=$(mktemp -d)
ln -s "$PWD/kernels" "$SHIM/dashinfer_kernels"
export PYTHONPATH="$PWD:$SHIM:$PWD/tests:${PYTHONPATH:-}"
export DASHINFER_TEST_DEVICE=cuda PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
status=0
timeout 300 $PY -m pytest -q -rs -p no:cacheprovider tests/kernels tests/gpu -o addopts="" 2>&1 | tee "$LOG_DIR/gpu_tests.log" || status=1
timeout 240 $PY benchmarks/gpu_bench.py 2>&1 | tee "$LOG_DIR/gpu_bench.log" || status=1
exit $status
