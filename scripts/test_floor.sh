#!/usr/bin/env bash
# The declared lower bounds, tested: the core suite (the primitive, its memory bound, properties, validation, the
# losses, the compile checks) on torch 2.11 and triton 3.6, the GPU image's versions, in a virtual environment of
# its own (.venv-floor; about 5 GB, since PyPI's torch 2.11 for Linux is a CUDA build). Not part of CI, which tests
# requirements-ci.txt; run it when a floor moves. Triton 3.6's interpreter cannot run the kernels (a program id in
# a loop bound fails there, fixed in later Triton), so TRITON_INTERPRET=0 skips the interpreted tests; the compile
# checks still compile every kernel with 3.6's own compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-floor}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r scripts/floor-requirements.txt
TRITON_INTERPRET=0 PYTHONPATH="$PWD/src:$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" \
    tests/test_logprob.py tests/test_memory.py tests/test_properties.py tests/test_validation.py tests/test_loss.py \
    tests/test_compile.py
