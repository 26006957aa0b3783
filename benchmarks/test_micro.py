"""pytest-benchmark micro-benchmarks of the primitive: per-token log-probs, forward + backward, per method.

    python -m pytest benchmarks/test_micro.py --benchmark-enable -q              # timings (pytest-benchmark)
    python -m pytest benchmarks/test_micro.py -q                                 # one pass each, as a smoke test

(The project's pytest options disable pytest-benchmark unless ``--benchmark-enable`` is given; then each case
runs once untimed.) On the CPU: float32 on the SmolLM2-135M head (D=576, V=49152) and a soft-capped 2048-token
slice of Gemma-2's vocabulary; on CUDA: bf16 on SmolLM2-135M and Llama-3-8B heads with more tokens. Methods
that cannot run here are skipped with the reason. ``python -m benchmarks.run`` is the full comparison (memory,
sweeps, steps, peers); these are for quick before / after timings of a kernel change.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import peers
from benchmarks.workloads import SHAPES, HeadShape, _primitive_fn, make_weight, primitive_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
if DEVICE.type == "cuda":
    CASES = [(SHAPES["smollm2-135m"], 8192), (SHAPES["llama3-8b"], 4096)]
else:
    CASES = [(SHAPES["smollm2-135m"], 256), (HeadShape("Gemma-2 (2048-row slice)", 2304, 2048, softcap=30.0), 256)]
METHODS = ("naive", "fastkto-torch", "fastkto-triton", "trl", "cce")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,tokens", CASES, ids=[f"{s.name}-{n}" for s, n in CASES])
def test_primitive_forward_backward(benchmark, shape, tokens, method):
    reason = peers.skip_reason(method, DEVICE)
    if reason:
        pytest.skip(reason)
    weight = make_weight(shape, DTYPE, DEVICE, seed=0)
    hidden, labels, grad_out = primitive_inputs(shape, tokens, weight, seed=0)
    fn = _primitive_fn(method, shape.softcap)

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels).backward(grad_out)
        _sync()

    benchmark.extra_info.update(tokens=tokens, hidden=shape.hidden, vocab=shape.vocab, dtype=str(DTYPE))
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert weight.grad is not None and torch.isfinite(weight.grad.float()).all()
