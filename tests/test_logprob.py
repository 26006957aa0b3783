"""fused_logprobs / sequence_logps against a float64 reference that materializes the logits: values and gradients,
on every backend that runs here (PyTorch everywhere; Triton under the interpreter on the CPU, compiled on CUDA).

Tolerances. Every path accumulates the D-long dot products and the log-sum-exp in float32, from inputs that are
exactly representable in float64, so values differ from the reference by float32 rounding only: ATOL_VALUE covers
logits of magnitude ~10 summed over D <= 64 terms (about 1e-6 relative). Gradients come back in the input dtype, so
their error is measured relative to the largest reference gradient ("scaled error") and bounded by a few units of
that dtype's rounding (GRAD_TOL). On a GPU, 16-bit dots also round the logit gradient to the input dtype before
the second product, which the same bound covers.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import fastkto
from fastkto.kernels import cpu_threads, tiled, torch_chunked
from tests.conftest import HAS_CUDA, INTERPRET
from tests.reference import dz_rounding_amplification, leaf64, reference_logprobs, reference_sequence_logps

ATOL_VALUE = 2e-4
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET), reason="Triton needs CUDA or TRITON_INTERPRET=1"))]
MAKER = torch_chunked.TILE_MAKER


def make_inputs(lead, dim, vocab, dtype, *, ignore_frac=0.3, bias=False, device=DEVICE, logit_scale=3.0):
    """Random hidden (*lead, D), weight (V, D), labels (*lead) with a fraction ignored, optional bias.

    weight is scaled so logits have a standard deviation of about ``logit_scale``, as in trained LM heads.
    """
    hidden = torch.randn(*lead, dim, device=device).to(dtype)
    weight = (torch.randn(vocab, dim, device=device) * (logit_scale / dim**0.5)).to(dtype)
    labels = torch.randint(0, vocab, lead, device=device)
    if ignore_frac:
        labels[torch.rand(lead, device=device) < ignore_frac] = -100
    b = (torch.randn(vocab, device=device) * 0.5).to(dtype) if bias else None
    return hidden, weight, labels, b


def rounds_dz(backend, dtype):
    """Whether this path rounds the logits' gradient to the 16-bit input dtype before its GEMMs: the Triton and
    cuBLAS-epilogue paths (on a GPU and under the interpreter) and the PyTorch path on CUDA; the CPU's PyTorch
    path keeps it fp32."""
    return dtype != torch.float32 and (backend in ("triton", "cublas") or DEVICE == "cuda")


def grad_tol(dtype, amplification=None):
    """GRAD_TOL, plus, for a path that rounds dz, that rounding (relative 2^-9 in bf16, 2^-12 in fp16: half a
    unit in the last place) times how much the inputs amplify it (``dz_rounding_amplification``)."""
    if amplification is None:
        return GRAD_TOL[dtype]
    return GRAD_TOL[dtype] + torch.finfo(dtype).eps / 2 * amplification


def scaled_error(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def check_against_reference(hidden, weight, labels, bias=None, backend="torch", **opts):
    """Run fastkto and the float64 reference with the same random upstream gradient; compare all outputs."""
    params = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = fastkto.fused_logprobs(params[0], params[1], labels, bias=b, backend=backend, **opts)
    assert out.dtype == torch.float32 and out.shape == labels.shape

    ref_params = [leaf64(hidden), leaf64(weight), leaf64(bias)]
    ref = reference_logprobs(ref_params[0], ref_params[1], labels, bias=ref_params[2], **opts)
    assert (out.double() - ref).abs().max().item() <= ATOL_VALUE

    upstream = torch.randn(labels.shape, device=labels.device)
    (out * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    got_grads = [params[0].grad, params[1].grad] + ([] if b is None else [b.grad])
    ref_grads = [ref_params[0].grad, ref_params[1].grad] + ([] if b is None else [ref_params[2].grad])
    amplification = None
    if rounds_dz(backend, hidden.dtype):
        amplification = dz_rounding_amplification(hidden, weight, labels, upstream, bias=bias, **opts)
    for name, got, want in zip(("hidden", "weight", "bias"), got_grads, ref_grads):
        assert got.dtype == hidden.dtype, name
        tol = grad_tol(hidden.dtype, None if amplification is None else amplification[name])
        err = scaled_error(got, want)
        assert err <= tol, f"d{name}: scaled error {err:.2e} > {tol:.2e}"
    ignored = labels == -100
    assert torch.all(out[ignored] == 0)
    assert torch.all(params[0].grad[ignored] == 0), "ignored positions must get exactly zero gradient"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_and_gradients_3d(backend, dtype, seed):
    # vocab 101 and D 19 are not multiples of any tile; (2, 13) tokens spans more than one 16-row tile
    hidden, weight, labels, _ = make_inputs((2, 13), 19, 101, dtype)
    check_against_reference(hidden, weight, labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_temperature_softcap(backend, dtype, seed):
    hidden, weight, labels, bias = make_inputs((3, 7), 24, 70, dtype, bias=True, logit_scale=20.0)
    check_against_reference(hidden, weight, labels, bias, backend=backend, temperature=0.7, softcap=15.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token(backend, seed):
    hidden, weight, labels, _ = make_inputs((1,), 16, 33, torch.float32, ignore_frac=0.0)
    check_against_reference(hidden, weight, labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zeros_and_zero_grads(backend, seed):
    hidden, weight, labels, _ = make_inputs((2, 5), 16, 40, torch.float32)
    labels.fill_(-100)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fastkto.fused_logprobs(h, w, labels, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    seq = fastkto.sequence_logps(h, w, labels, average=True, backend=backend)
    assert torch.equal(seq, torch.zeros(2, device=seq.device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, seed):
    # hidden as a transposed view (T, B, D) -> (B, T, D), weight as a slice with a row stride wider than D
    base = torch.randn(9, 2, 20, device=DEVICE)
    hidden = base.transpose(0, 1)
    wide = torch.randn(57, 40, device=DEVICE) * 0.7
    weight = wide[:, 5:25]
    labels = torch.randint(0, 57, (2, 9), device=DEVICE)
    labels[0, :3] = -100
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    check_against_reference(hidden, weight, labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_int32_labels(backend, seed):
    hidden, weight, labels, _ = make_inputs((4, 6), 16, 50, torch.float32, ignore_frac=0.0)
    labels[:, :2] = 7  # token 7 plays the ignore role: those positions must be skipped
    out = fastkto.fused_logprobs(hidden, weight, labels.int(), ignore_index=7, backend=backend)
    ref = reference_logprobs(hidden, weight, labels, ignore_index=7)
    assert torch.all(out[:, :2] == 0)
    assert (out.double() - ref).abs().max().item() <= ATOL_VALUE


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_wrt_one_input_only(backend, seed):
    hidden, weight, labels, bias = make_inputs((2, 8), 16, 45, torch.float32, bias=True)
    ref_w = leaf64(weight)
    ref = reference_logprobs(hidden.double(), ref_w, labels, bias=bias.double())
    ref.sum().backward()
    w = weight.clone().requires_grad_()
    fastkto.fused_logprobs(hidden, w, labels, bias=bias, backend=backend).sum().backward()
    assert scaled_error(w.grad, ref_w.grad) <= GRAD_TOL[torch.float32]

    ref_h = leaf64(hidden)
    reference_logprobs(ref_h, weight.double(), labels).sum().backward()
    h = hidden.clone().requires_grad_()
    fastkto.fused_logprobs(h, weight, labels, backend=backend).sum().backward()
    assert scaled_error(h.grad, ref_h.grad) <= GRAD_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps(backend, average, seed):
    hidden, weight, labels, _ = make_inputs((3, 11), 16, 64, torch.float32, ignore_frac=0.4)
    labels[2] = -100  # a sequence with no valid token: 0, never NaN
    h = hidden.clone().requires_grad_()
    seq = fastkto.sequence_logps(h, weight, labels, average=average, backend=backend)
    ref_h = leaf64(hidden)
    ref = reference_sequence_logps(ref_h, weight.double(), labels, average=average)
    assert seq.shape == (3,) and seq[2].item() == 0.0
    assert (seq.double() - ref).abs().max().item() <= ATOL_VALUE * 11
    upstream = torch.randn(3, device=DEVICE)
    (seq * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    assert scaled_error(h.grad, ref_h.grad) <= GRAD_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend, seed):
    # |z| ~ 1e4: the online log-sum-exp must not overflow; the error is float32 rounding of values near 1e4
    hidden, weight, labels, _ = make_inputs((2, 6), 16, 40, torch.float32, ignore_frac=0.0, logit_scale=1e4)
    out = fastkto.fused_logprobs(hidden, weight, labels, backend=backend)
    ref = reference_logprobs(hidden, weight, labels)
    assert torch.isfinite(out).all()
    assert ref.abs().max() > 1e3  # the test really exercises large logits
    assert ((out.double() - ref).abs() / ref.abs().clamp(min=1.0)).max().item() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_gives_nan_out(backend, seed):
    hidden, weight, labels, _ = make_inputs((5,), 16, 40, torch.float32, ignore_frac=0.0)
    hidden[2, 3] = float("nan")
    out = fastkto.fused_logprobs(hidden, weight, labels, backend=backend)
    assert torch.isnan(out[2])
    keep = torch.tensor([0, 1, 3, 4], device=DEVICE)
    ref = reference_logprobs(hidden[keep], weight, labels[keep])
    assert (out[keep].double() - ref).abs().max().item() <= ATOL_VALUE  # one bad row does not spoil the others
    weight[0, 0] = float("nan")
    assert torch.isnan(fastkto.fused_logprobs(hidden, weight, labels, backend=backend)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, seed):
    hidden, weight, labels, bias = make_inputs((3, 20), 24, 150, torch.bfloat16, bias=True)
    results = []
    for _ in range(2):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        # a small budget: several token x vocabulary tiles, so the fixed tile order is what is tested
        out = fastkto.fused_logprobs(h, w, labels, bias=b, softcap=10.0, backend=backend, workspace_bytes=1 << 14)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        results.append((out, h.grad, w.grad, b.grad))
    for first, second in zip(*results):
        assert torch.equal(first, second), "two identical runs must agree bitwise"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiling_does_not_change_results(backend, dtype, seed):
    # a budget so small that every tile is a handful of tokens x vocabulary rows, against one big tile: the same
    # values, and gradients within the dtype's rounding (the sums run in another order)
    # 2 x 25 tokens (about 35 scored): 3-5 token chunks under the small budget (the interpreter's time follows them)
    hidden, weight, labels, bias = make_inputs((2, 25), 32, 300, dtype, bias=True)
    outs = []
    for budget in (1 << 14, 1 << 30):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        out = fastkto.fused_logprobs(h, w, labels, bias=b, backend=backend, workspace_bytes=budget, softcap=9.0)
        out.sum().backward()
        outs.append((out, h.grad, w.grad, b.grad))
    impl = torch_chunked if backend == "torch" else _triton()
    rows = (labels.view(-1) != -100).nonzero().squeeze(1)
    call = tiled.call_shape(hidden.view(-1, 32), weight, bias, rows, labels.view(-1)[rows], 9.0)
    n, v = tiled.plan_tiles(call, impl.TILE_MAKER, 1 << 14, False)
    # the small budget really tiles the call: at least 5 tiles, whatever the random labels leave scored (with 32 or
    # fewer scored tokens the interpreted fp32 plan keeps them whole: 1 x 5 tiles of 64 vocabulary rows; on a GPU
    # the vocabulary chunk, planned without the batch, can be so narrow that the tokens fit whole: 72 x 1 on an H200)
    tiles = -(-rows.numel() // n) * -(-300 // v)
    assert tiles >= 5, (n, v, tiles)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-5)
    for small, big in zip(outs[0][1:], outs[1][1:]):
        assert scaled_error(small, big.double()) <= GRAD_TOL[dtype]


def _triton():
    from fastkto.kernels import fused_logprob

    return fused_logprob


def _call(tokens, vocab, dim, dtype, device, *, gathered=False, softcap=False, need_weight=True, need_bias=False,
          fused_accumulate=True):
    # a CallShape as tiled.call_shape would make it on ``device`` (written out: no CUDA here to probe)
    gemm = dtype if device == "cuda" or dtype == torch.float32 else torch.float32
    return tiled.CallShape(tokens, vocab, dim, dtype, gemm, device, gathered, False, False, softcap, need_weight,
                           need_bias, fused_accumulate and device == "cuda")


@pytest.mark.parametrize("maker", ["torch", "triton"])
def test_plan_fits_the_budget(maker):
    tiles = torch_chunked.TILE_MAKER if maker == "torch" else _triton().TILE_MAKER
    cases = [(8192, 128256, 4096, 64 << 20), (100, 49152, 576, 64 << 20), (4096, 256000, 2304, 1 << 20),
             (5, 7, 3, 1 << 20), (16384, 248320, 2048, 128 << 20), (300, 1000, 8192, 1 << 16)]
    for tokens, vocab, dim, budget in cases:
        for device in ("cpu", "cuda"):
            for dtype in (torch.float32, torch.bfloat16):
                for flags in (dict(), dict(gathered=True, softcap=True, need_bias=True),
                              dict(need_weight=False), dict(fused_accumulate=False, gathered=True)):
                    call = _call(tokens, vocab, dim, dtype, device, **flags)
                    for by_budget in (False, True):
                        n, v = tiled.plan_tiles(call, tiles, budget, by_budget)
                        assert n >= 1 and 1 <= v <= vocab and (by_budget or n <= tokens)
                        used = tiled.buffers_nbytes(tiled.workspace_buffers(n, v, call, tiles))
                        assert used + tiled.PER_TOKEN_BYTES * tokens <= budget or (n, v) == (1, 1), (
                            tokens, vocab, dim, budget, device, dtype, flags, n, v, used)


def test_plan_gives_gpu_tiles_of_thousands_of_rows():
    # the default CUDA budget at the three shapes the roofline is about: GEMMs of thousands of rows on each side,
    # multiples of the dz kernel's 128-row blocks
    budget = tiled.DEFAULT_WORKSPACE_MIB["cuda"] << 20
    gpu_tiles = dataclasses.replace(_triton().TILE_MAKER, align=_triton().GPU_ALIGN)  # as compiled, not interpreted
    for tokens, vocab, dim in ((16384, 248320, 2048), (8192, 256000, 2304), (8192, 128256, 4096)):
        for gathered in (False, True):
            call = _call(tokens, vocab, dim, torch.bfloat16, "cuda", gathered=gathered)
            n, v = tiled.plan_tiles(call, gpu_tiles, budget, False)
            assert n >= 2048 and v >= 2048 and n % 128 == 0 and v % 128 == 0, (tokens, vocab, dim, n, v)


@pytest.mark.parametrize("accumulate_support", [(True, True), (True, False)])
def test_gemm_forms_for_16_bit_operands(monkeypatch, accumulate_support):
    # the CUDA forms of the fp32-accumulating GEMM (mm / addmm with out_dtype), run on meta tensors: this CPU
    # torch has no 16-bit GEMM with an fp32 output, and meta checks the calls' arguments and shapes
    monkeypatch.setattr(tiled, "fp32_gemm_support", lambda device_type: accumulate_support)
    a = torch.empty(8, 32, dtype=torch.bfloat16, device="meta")
    b = torch.empty(32, 16, dtype=torch.bfloat16, device="meta")
    out = torch.empty(8, 16, device="meta")
    prod = None if accumulate_support[1] else torch.empty(8, 16, device="meta")
    for accumulate in (False, True):
        try:
            tiled.matmul_fp32(out, a, b, accumulate, prod=prod)
        except TypeError:
            # torch 2.11's meta kernel decomposes addmm.dtype_out as a plain addmm (reading out_dtype as beta); the
            # CUDA kernel is its own: there, check the call's keywords against the op's schema instead
            import traceback

            assert accumulate and accumulate_support[1] and "decompositions" in traceback.format_exc()
            schema = str(torch.ops.aten.addmm.dtype_out._schema)
            assert "ScalarType out_dtype" in schema and "Tensor(a!) out" in schema, schema
    assert out.dtype == torch.float32 and out.shape == (8, 16)


def test_fp32_gemm_support_on_this_cpu():
    # the CPU build has no fp32-output 16-bit GEMM: 16-bit inputs multiply as fp32 copies here
    assert tiled.fp32_gemm_support("cpu") == (False, False)
    assert tiled.gemm_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert tiled.gemm_dtype(torch.float32, torch.device("cpu")) == torch.float32


def test_workspace_env_setting(monkeypatch):
    monkeypatch.setenv("FASTKTO_WORKSPACE_MIB", "8")
    assert torch_chunked.default_workspace_bytes() == 8 << 20
    assert torch_chunked.default_workspace_bytes("cuda") == 8 << 20
    monkeypatch.setenv("FASTKTO_WORKSPACE_MIB", "zero")
    with pytest.raises(ValueError, match="FASTKTO_WORKSPACE_MIB"):
        torch_chunked.default_workspace_bytes()
    monkeypatch.delenv("FASTKTO_WORKSPACE_MIB")
    assert torch_chunked.default_workspace_bytes() == 64 << 20
    assert torch_chunked.default_workspace_bytes("cuda") == 128 << 20


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_tiles_match_torch(dtype, seed):
    """The two tile makers in the shared loop, through the implementation contract: the forward's split merge and
    a backward of several token x vocabulary tiles (ragged edges, rows, bias, soft-cap, temperature, and a
    vocabulary shard's labels outside it)."""
    fused_logprob = _triton()
    hidden, weight, labels, bias = make_inputs((45,), 20, 230, dtype, bias=True)
    labels[::7] = 231  # rows of another shard: no one-hot term here
    rows = (labels != -100).nonzero().squeeze(1)
    kept = labels[rows]
    opts = dict(softcap=8.0, temperature=1.3)
    want = torch_chunked.logprob_fwd(hidden, weight, bias, rows, kept, **opts)
    got = fused_logprob.logprob_fwd(hidden, weight, bias, rows, kept, splits=3, **opts)
    lse_want = want[0] + want[1].log()
    lse_got = got[0] + got[1].log()
    torch.testing.assert_close(lse_got, lse_want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-5)

    grad = torch.randn(rows.numel(), device=DEVICE)
    want_g = torch_chunked.logprob_bwd(hidden, weight, bias, rows, kept, lse_want, grad, tile=(64, 256), **opts)
    got_g = fused_logprob.logprob_bwd(hidden, weight, bias, rows, kept, lse_want, grad, tile=(16, 64), **opts)
    for name, g, w in zip(("hidden", "weight", "bias"), got_g, want_g):
        assert g.dtype == w.dtype, name
        assert scaled_error(g, w.double()) <= GRAD_TOL[dtype], name


def test_backend_resolution():
    from fastkto.logprob import resolve_backend

    assert resolve_backend("torch", torch.device("cpu"), torch.float32) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"), torch.float32)


def test_every_registered_implementation_meets_the_contract():
    """Each row of ``kernels.IMPLEMENTATIONS`` that can be imported here is a module with the contract's names, a
    ``TileMaker``, and every keyword the callers (``ops.forward_compute`` / ``backward_compute``) pass; the
    backend names are the table's."""
    import inspect

    from fastkto import kernels
    from fastkto.logprob import BACKENDS

    assert BACKENDS == ("auto", *kernels.IMPLEMENTATIONS)
    contract = {name: set(inspect.signature(getattr(kernels.Implementation, name)).parameters) - {"self"}
                for name in ("logprob_fwd", "logprob_bwd")}
    checked = 0
    for name in kernels.IMPLEMENTATIONS:
        if not kernels.available(name):
            continue
        impl = kernels.load(name)
        assert kernels.name_of(impl) == name
        assert isinstance(impl.TILE_MAKER, tiled.TileMaker), name
        for fn, params in contract.items():
            missing = params - set(inspect.signature(getattr(impl, fn)).parameters)
            assert not missing, f"{name}.{fn} lacks {sorted(missing)}"
        checked += 1
    assert checked >= 1 and kernels.auto_choice(torch.device("cpu"), torch.float32) == "torch"
    cuda_only = kernels.needs_cuda("x")  # the rule a CUDA-only row names
    assert cuda_only(torch.device("cuda")) is None
    assert "backend='x' needs CUDA tensors (got cpu)" in cuda_only(torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_subprocess():
    """backend="triton" on CPU tensors without the interpreter: a clear error (checked in a fresh process, since
    this one may interpret)."""
    import subprocess
    import sys

    code = (
        "import torch, fastkto\n"
        "h = torch.randn(3, 8); w = torch.randn(10, 8); y = torch.randint(0, 10, (3,))\n"
        "try:\n"
        "    fastkto.fused_logprobs(h, w, y, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if "No module named 'triton'" in res.stderr:
        pytest.skip("triton not installed")
    assert "RAISED" in res.stdout and "TRITON_INTERPRET" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_head_in_the_autocast_dtype(backend, seed):
    # fp32 master weights under autocast: the head computes on bf16 casts (as nn.Linear would) and the gradients
    # reach the fp32 tensors in fp32, equal to the gradients of an explicit cast
    hidden, weight, labels, _ = make_inputs((2, 9), 24, 60, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = fastkto.fused_logprobs(h, w, labels, backend=backend)
    out.sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = fastkto.fused_logprobs(h2.bfloat16(), w2.bfloat16(), labels, backend=backend)
    want.sum().backward()
    assert out.dtype == torch.float32 and torch.equal(out, want)
    assert h.grad.dtype == torch.float32 and torch.equal(h.grad, h2.grad) and torch.equal(w.grad, w2.grad)


def test_autocast_accepts_a_head_in_another_dtype_in_every_entry_point(seed):
    """Under autocast an fp32 hidden state meets a bf16 head (a bf16 copy of the head, a norm computed in fp32):
    every entry point casts both to the autocast dtype, as fused_logprobs does, instead of refusing them with an
    error that asks for autocast. Equal to the explicit cast."""
    from fastkto.loss import DPOLoss, KTOLoss

    hidden, weight, labels, _ = make_inputs((4, 9), 24, 60, torch.float32)
    labels[:, 0] = 7  # every row scored
    w16 = weight.bfloat16()
    desirable = torch.tensor([True, False, True, False])
    calls = {
        "sequence_logps": lambda h, w: fastkto.sequence_logps(h, w, labels, backend="torch"),
        "KTOLoss": lambda h, w: KTOLoss(beta=0.5, backend="torch")(h, w, labels, desirable, ref_logps=-torch.ones(4),
                                                                   kl=0.1).loss,
        "DPOLoss": lambda h, w: DPOLoss(beta=0.5, backend="torch")(h, w, labels, ref_logps=-torch.ones(4)).loss,
    }
    for name, call in calls.items():
        h, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            got = call(h, w16)
        want = call(h2.bfloat16(), w16)
        got.sum().backward()
        want.sum().backward()
        assert torch.equal(got, want), name
        assert h.grad.dtype == torch.float32 and torch.equal(h.grad, h2.grad), name


@pytest.mark.parametrize("accumulate_support", [(True, True), (True, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_path_in_its_cuda_form(monkeypatch, accumulate_support, dtype, seed):
    """The PyTorch path as it runs on CUDA: 16-bit GEMM operands (no fp32 copy of the weight), an fp32 logits
    tile, dz rounded once to the input dtype, fp32 accumulation (fused into addmm, or through the product buffer).
    This CPU torch has no fp32-output 16-bit GEMM, so mm / addmm with ``out_dtype`` are emulated exactly as a
    tensor core computes them: exact products of the 16-bit operands, summed in fp32."""
    mm, addmm = torch.mm, torch.addmm

    def mm_fp32(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return mm(a, b, out=out) if out is not None else mm(a, b)
        assert out_dtype == torch.float32 and a.dtype == b.dtype == dtype
        return mm(a.float(), b.float(), out=out)

    def addmm_fp32(c, a, b, *args, out_dtype=None, **kw):
        if out_dtype is None:
            return addmm(c, a, b, *args, **kw)
        assert accumulate_support[1], "addmm with an fp32 input used where the device has none"
        return addmm(c, a.float(), b.float(), *args, **kw)

    monkeypatch.setattr(torch, "mm", mm_fp32)
    monkeypatch.setattr(torch, "addmm", addmm_fp32)
    monkeypatch.setattr(tiled, "fp32_gemm_support", lambda device_type: accumulate_support)
    hidden, weight, labels, bias = make_inputs((3, 21), 24, 333, dtype, bias=True, device="cpu", logit_scale=10.0)
    call = tiled.call_shape(hidden.view(-1, 24), weight, bias, None, labels.view(-1), 12.0)
    assert call.gemm_dtype == dtype  # 16-bit operands, as on a GPU
    bufs = tiled.workspace_buffers(64, 64, call, torch_chunked.TILE_MAKER)
    assert "w" not in bufs and bufs["dz"][1] == dtype and bufs["z"][1] == torch.float32
    assert ("prod" in bufs) == (not accumulate_support[1])
    monkeypatch.setenv("FASTKTO_WORKSPACE_MIB", "0.03125")  # 32 KiB: several tiles each way
    check_against_reference(hidden, weight, labels, bias, backend="torch", softcap=12.0, temperature=0.8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_worker_threads_match_one_thread(dtype, seed):
    """On the CPU the PyTorch path runs vocabulary shards on worker threads (one per torch thread): the same values
    and gradients as one thread within rounding, bitwise the same run after run, and the caller's thread setting
    and gradient mode untouched."""
    if DEVICE != "cpu":
        pytest.skip("the worker threads are the CPU's")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        hidden, weight, labels, bias = make_inputs((3, 40), 32, 3000, dtype, bias=True)  # 3 vocabulary chunks
        call = tiled.call_shape(hidden.view(-1, 32), weight, bias, None, labels.view(-1), 9.0)
        assert cpu_threads.backward_workers(call, torch_chunked.default_workspace_bytes(), MAKER) == 2
        runs = []
        for n_threads in (2, 2, 1):
            torch.set_num_threads(n_threads)
            h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
            out = fastkto.fused_logprobs(h, w, labels, bias=b, softcap=9.0, backend="torch")
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            assert torch.get_num_threads() == n_threads and torch.is_grad_enabled()
            runs.append((out, h.grad, w.grad, b.grad))
        for first, second in zip(runs[0], runs[1]):
            assert torch.equal(first, second), "two runs on the worker threads must agree bitwise"
        torch.testing.assert_close(runs[0][0], runs[2][0], rtol=0, atol=1e-5)
        for threaded, single in zip(runs[0][1:], runs[2][1:]):
            assert scaled_error(threaded, single.double()) <= GRAD_TOL[dtype]
        check_against_reference(hidden, weight, labels, bias, backend="torch", softcap=9.0)  # on 1 thread
        torch.set_num_threads(2)
        check_against_reference(hidden, weight, labels, bias, backend="torch", softcap=9.0)  # on 2 workers
        # a frozen head: only dH, on the workers
        w = weight.clone()
        h = hidden.clone().requires_grad_()
        fastkto.fused_logprobs(h, w, labels, bias=bias, backend="torch").sum().backward()
        ref_h = leaf64(hidden)
        reference_logprobs(ref_h, weight.double(), labels, bias=bias.double()).sum().backward()
        assert w.grad is None and scaled_error(h.grad, ref_h.grad) <= GRAD_TOL[dtype]
    finally:
        torch.set_num_threads(threads)


def test_cpu_workers_follow_threads_and_budget():
    call = _call(1024, 49152, 576, torch.float32, "cpu")
    workers = cpu_threads.backward_workers
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert workers(call, 64 << 20, MAKER) == 2
        assert workers(call, 16 << 20, MAKER) == 1  # no room for a second workspace and dH partial
        assert workers(_call(1024, 1000, 576, torch.float32, "cpu"), 64 << 20, MAKER) == 1  # 1 chunk
        assert workers(_call(1024, 49152, 576, torch.float32, "cuda"), 64 << 20, MAKER) == 1
        torch.set_num_threads(1)
        assert workers(call, 64 << 20, MAKER) == 1
    finally:
        torch.set_num_threads(threads)
    assert cpu_threads.shards(3000, 2, MAKER) == [(0, 2048), (2048, 3000)]
    assert cpu_threads.shards(49152, 2, MAKER) == [(0, 24576), (24576, 49152)]


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dz_kernel_rounds_to_nearest_like_a_gpu(dtype, seed):
    # dz written in 16 bits equals the fp32 dz rounded by torch (round to nearest even): under the interpreter,
    # whose own fp32 -> bf16 conversion truncates, too
    fused_logprob = _triton()
    hidden, weight, labels, _ = make_inputs((40,), 24, 100, torch.float32, ignore_frac=0.0)
    lse = torch.logsumexp(hidden @ weight.T, 1)
    grad = torch.randn(40, device=DEVICE)
    rounded = torch.empty(40, 100, dtype=dtype, device=DEVICE)
    exact = torch.empty(40, 100, device=DEVICE)
    for out in (rounded, exact):
        fused_logprob.make_dz(hidden, weight, None, labels, 0, lse, grad, None, 1.0, out, None)
    assert torch.equal(rounded, exact.to(dtype))
