"""Property-based tests: random shapes, dtypes, masks and options, every backend against the float64 reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastkto
from tests.conftest import HAS_CUDA, INTERPRET
from tests.reference import leaf64, reference_logprobs
from tests.test_logprob import ATOL_VALUE, DEVICE, GRAD_TOL, scaled_error


@st.composite
def problems(draw):
    lead = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    dim = draw(st.integers(1, 40))
    vocab = draw(st.integers(1, 160))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    ignore_p = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    bias = draw(st.booleans())
    temperature = draw(st.sampled_from([1.0, 0.5, 2.5]))
    softcap = draw(st.sampled_from([None, 2.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, dim, vocab, dtype, ignore_p, bias, temperature, softcap, seed


def run_case(backend, lead, dim, vocab, dtype, ignore_p, bias, temperature, softcap, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, dim, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(vocab, dim, generator=gen) * (3 / dim**0.5)).to(DEVICE, dtype)
    b = (torch.randn(vocab, generator=gen) * 0.5).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < ignore_p] = -100
    labels = labels.to(DEVICE)
    opts = dict(temperature=temperature, softcap=softcap)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    out = fastkto.fused_logprobs(h, w, labels, bias=bb, backend=backend, **opts)
    rh, rw, rb = leaf64(hidden), leaf64(weight), leaf64(b)
    ref = reference_logprobs(rh, rw, labels, bias=rb, **opts)
    assert out.shape == labels.shape and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() <= ATOL_VALUE
    assert torch.all(out[labels == -100] == 0)

    upstream = torch.randn(lead, generator=gen).to(DEVICE)
    (out * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    # Each gradient is a sum of terms u_n (onehot - p) / T (times h or W, soft-cap factor <= 1). Where the terms
    # cancel (V = 2, two tokens: a bias gradient of 5e-4 from terms of 0.5) float32 leaves an absolute error of
    # about eps * sum |term| that no scale of the result bounds, so the bound adds 2 eps32 times the sum of the
    # terms' magnitude bounds: sum |u| / T (bias), sum |u| max|h| / T (weight), 2 max|u| max|W| / T (hidden).
    scored = (labels != -100).to(upstream.device)
    u = (upstream.abs() * scored).double()
    terms = [2 * u.max() * rw.detach().abs().max(), u.sum() * rh.detach().abs().max(), u.sum()]
    pairs = [(h.grad, rh.grad), (w.grad, rw.grad)] + ([] if b is None else [(bb.grad, rb.grad)])
    all_ignored = bool((labels == -100).all())
    for (got, want), term in zip(pairs, terms):
        if all_ignored:  # no token scored: gradients exactly zero
            assert torch.all(got == 0)
        elif want.abs().max() == 0:  # V = 1: log p = 0 always; only float32 rounding of p = 1 remains
            assert got.abs().max().item() <= 1e-4
        else:
            floor = 2 * torch.finfo(torch.float32).eps * float(term) / temperature
            err = (got.double() - want).abs().max().item()
            assert err <= GRAD_TOL[dtype] * want.abs().max().item() + floor, (err, scaled_error(got, want))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_torch_backend_matches_reference(case):
    run_case("torch", *case)


@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton needs CUDA or TRITON_INTERPRET=1")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_triton_backend_matches_reference(case):
    run_case("triton", *case)
