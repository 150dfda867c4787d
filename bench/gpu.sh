#!/usr/bin/env bash
# The training-speed comparison (bench/throughput.py: mmengine's Runner vs det-mmdet train) and the
# loader bench (bench/gpu_loader.py) on one NVIDIA GPU, for the day one is at hand. It refuses to run
# without a CUDA GPU and CUDA-built mmcv ops, so a CPU figure can never be filed as a GPU one. From the
# repository root, either
#   make bench-gpu                                      (a checkout set up with CUDA torch + mmcv)
#   docker run --gpus 1 --rm -v "$PWD":/w -w /w IMAGE bash bench/gpu.sh   (the cluster image)
# Output: markdown tables on stdout and in $OUT (default bench/gpu_results.md) and, for the loader
# bench, in ${OUT%.md}_loader.md; copy the rows into bench/README.md with the GPU's name and the date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
OUT=${OUT:-bench/gpu_results.md}
WORKERS=${WORKERS:-4}
export PYTHONPATH="$PWD/model_def${PYTHONPATH:+:$PYTHONPATH}"  # the image has no editable install

"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: torch sees no CUDA GPU here; nothing measured")
from mmcv.ops import get_compiling_cuda_version

if get_compiling_cuda_version() == "not available":
    sys.exit("bench/gpu.sh: mmcv's ops were compiled without CUDA (build with MMCV_WITH_OPS=1 FORCE_CUDA=1)")
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

{
    echo "# bench/gpu.sh, $(date -u +%Y-%m-%d)"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
    echo
    # Longer runs than on CPU: a GPU batch takes milliseconds, so start-up must cancel over more batches.
    "$PYTHON" bench/throughput.py --model tiny --batch 16 --short 50 --long 300 --num-workers "$WORKERS"
    "$PYTHON" bench/throughput.py --model r50-320 --batch 8 --short 30 --long 180 --num-workers "$WORKERS"
} | tee "$OUT"
# RTMDet-s fed by 2, 4 and 8 loader workers, mmdet's pipeline vs det-mmdet's, float32 and AMP.
"$PYTHON" bench/gpu_loader.py --workers 2 4 8 --precision fp32 amp --out "${OUT%.md}_loader.md"
