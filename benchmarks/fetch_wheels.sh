#!/usr/bin/env bash
# Download the peers the GPU image lacks as wheels into .whl/ (run where PyPI is reachable, from anywhere in the
# repository). benchmarks/gpu_check.sh installs them offline with pip --no-index. The image (torch 2.11, triton
# 3.6, transformers, accelerate) has every other dependency of these three; all the wheels are pure Python.
#   trl 1.16.0               trl.kernels.ChunkedLogProbFunction (imports without datasets)
#   liger-kernel 0.8.5       LigerFusedLinearKTOLoss / LigerFusedLinearDPOLoss
#   cut-cross-entropy 25.1.1 linear_cross_entropy
#   datasets 5.2.0, dill, multiprocess: TRL's backward imports trl.trainer.utils, which imports datasets (the
#                            first H200 run lost TRL for want of it)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
