"""The cuBLAS-and-epilogue tile maker (``kernels/gemm_epilogue.py``) against float64 references.

Its epilogues are Triton kernels: interpreted on the CPU (TRITON_INTERPRET=1, set by conftest), where the blocks of
raw logits come from the CPU's BLAS; compiled on a GPU, where cuBLAS makes them. Small workspace budgets force
several (token chunk x vocabulary chunk) blocks with ragged edges; the references materialize the logits.
"""

from __future__ import annotations

import os

import pytest
import torch
from reference import leaf64

from fastkto.kernels import stats as st
from fastkto.kernels import tiled

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton needs CUDA or TRITON_INTERPRET=1")

# float32 sums of V terms of size |z| <= ~10, in another order than float64's: a few hundred ulp at 10 at most,
# far below what a missed column, tile or block changes (> 1e-3)
FWD_ATOL = 2e-5
# float32 gradients summed over ~100 tokens and vocabulary rows, relative to the largest reference entry
GRAD_TOL = 1e-5
BUDGET = 16 << 10  # bytes: blocks of 16 tokens x 64 vocabulary rows (CPU), so every call spans several of each


def _ge():
    from fastkto.kernels import gemm_epilogue

    return gemm_epilogue


def _inputs(m, dim, vocab, *, bias, gathered, outside=True):
    n = m + 7 if gathered else m
    hidden = torch.randn(n, dim, device=DEVICE)
    weight = torch.randn(vocab, dim, device=DEVICE) * (3.0 / dim**0.5)
    b = torch.randn(vocab, device=DEVICE) * 0.5 if bias else None
    rows = torch.randperm(n, device=DEVICE)[:m].sort().values if gathered else None
    labels = torch.randint(0, vocab, (m,), device=DEVICE)
    if outside:  # labels of another shard's rows: no target logit, no one-hot term
        labels[:3] = torch.tensor([-1, vocab, vocab + 5])
    return hidden, weight, b, rows, labels


def _logits64(hidden, weight, bias, rows, softcap, temperature):
    h = hidden if rows is None else hidden[rows]
    a = h.double() @ weight.double().T
    if bias is not None:
        a = a + bias.double()
    z = a if softcap is None else softcap * torch.tanh(a / softcap)
    return z / temperature


@pytest.mark.parametrize("stats, bias, softcap, temperature, gathered", [
    (0, False, None, 1.0, False), (0, True, 4.0, 0.7, True), (1, True, 4.0, 0.7, True), (2, True, None, 1.3, False),
    (2, False, 3.0, 1.0, True)])
def test_forward_statistics_match_float64(stats, bias, softcap, temperature, gathered, seed):
    m, vocab = 37, 300
    hidden, weight, b, rows, labels = _inputs(m, 24, vocab, bias=bias, gathered=gathered)
    call = tiled.call_shape(hidden, weight, b, rows, labels, softcap, stats=stats)
    n_plan, v_plan = tiled.plan_tiles(call, _ge().TILE_MAKER, BUDGET, size_by_budget=DEVICE == "cpu")
    assert n_plan < m and v_plan < vocab, (n_plan, v_plan)  # several blocks in both directions
    part = _ge().logprob_fwd(hidden, weight, b, rows, labels, softcap=softcap, temperature=temperature,
                             workspace_bytes=BUDGET, stats=stats)
    assert len(part) == st.n_partials(stats) and all(p.dtype == torch.float32 and p.shape == (m,) for p in part)
    z = _logits64(hidden, weight, b, rows, softcap, temperature)
    inside = (labels >= 0) & (labels < vocab)
    _, lse, fields = st.finish(part, labels, vocab)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), rtol=0, atol=FWD_ATOL)
    want_t = torch.where(inside, z.gather(1, labels.clamp(0, vocab - 1)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(part[2].double(), want_t, rtol=0, atol=FWD_ATOL)
    logp = torch.log_softmax(z, -1)
    if stats >= 1:
        entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(fields["entropy"].double(), entropy, rtol=0, atol=FWD_ATOL)
    if stats >= 2:
        torch.testing.assert_close(fields["mean_logits"].double(), z.mean(-1), rtol=0, atol=FWD_ATOL)
        torch.testing.assert_close(fields["log_sum_sq_probs"].double(),
                                   torch.logsumexp(2 * logp, -1), rtol=0, atol=FWD_ATOL)
        assert torch.equal(part[6].long(), z.argmax(-1))  # the first maximum, as a row of the weight


def test_forward_arg_max_takes_the_first_of_tied_columns():
    # every logit equal: torch.argmax's first maximum (column 0), whichever block or tile sees it first
    hidden = torch.zeros(20, 16, device=DEVICE)
    weight = torch.randn(90, 16, device=DEVICE)
    labels = torch.zeros(20, dtype=torch.long, device=DEVICE)
    part = _ge().logprob_fwd(hidden, weight, None, None, labels, workspace_bytes=BUDGET, stats=2)
    assert torch.equal(part[6], torch.zeros(20, device=DEVICE))


@pytest.mark.parametrize("entropy_grad, bias, softcap, temperature, gathered", [
    (False, False, None, 1.0, False), (False, True, None, 1.3, True), (True, True, 4.0, 0.7, True)])
def test_backward_matches_float64_autograd(entropy_grad, bias, softcap, temperature, gathered, seed):
    m, vocab = 37, 300
    hidden, weight, b, rows, labels = _inputs(m, 24, vocab, bias=bias, gathered=gathered)
    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(b)
    z = _logits64(h64, w64, b64, rows, softcap, temperature)
    logp = torch.log_softmax(z, -1)
    inside = (labels >= 0) & (labels < vocab)
    # a label on another shard: its logit is a constant here, so log p(y) = const - lse (a -p term, no one-hot)
    picked = torch.where(inside, logp.gather(1, labels.clamp(0, vocab - 1)[:, None])[:, 0], -torch.logsumexp(z, -1))
    grad = torch.randn(m, device=DEVICE)
    loss = (grad.double() * picked).sum()
    g_ent = entropy = None
    if entropy_grad:
        ent64 = -(logp.exp() * logp).sum(-1)
        g_ent, entropy = torch.randn(m, device=DEVICE), ent64.detach().float()
        loss = loss + (g_ent.double() * ent64).sum()
    loss.backward()
    lse = torch.logsumexp(z.detach(), -1).float()
    d_hidden, d_weight, d_bias = _ge().logprob_bwd(
        hidden, weight, b, rows, labels, lse, grad, softcap=softcap, temperature=temperature,
        workspace_bytes=BUDGET, grad_entropy=g_ent, entropy=entropy)
    want_h = h64.grad if rows is None else h64.grad[rows]
    for got, want in ((d_hidden, want_h), (d_weight, w64.grad), (d_bias, None if b is None else b64.grad)):
        if want is None:
            assert got is None
            continue
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < GRAD_TOL, err


def test_backward_writes_every_element_of_the_workspace_it_reads(monkeypatch, seed):
    # a NaN-poisoned workspace: a block element the GEMM or the dz epilogue leaves unwritten reaches the gradients
    real = tiled.Workspace.__init__

    def poisoned(self, bufs, device, tile=None):
        real(self, bufs, device, tile)
        for buf in self.bufs.values():
            if buf.is_floating_point():
                buf.fill_(float("nan"))

    monkeypatch.setattr(tiled.Workspace, "__init__", poisoned)
    hidden, weight, b, rows, labels = _inputs(37, 24, 300, bias=True, gathered=True)
    part = _ge().logprob_fwd(hidden, weight, b, rows, labels, softcap=5.0, workspace_bytes=BUDGET)
    lse = part[0] + part[1].log()
    grads = _ge().logprob_bwd(hidden, weight, b, rows, labels, lse, torch.randn(37, device=DEVICE), softcap=5.0,
                              workspace_bytes=BUDGET)
    assert all(torch.isfinite(t).all() for t in (*part, *grads))


def test_results_are_bitwise_reproducible(seed):
    hidden, weight, b, rows, labels = _inputs(37, 24, 300, bias=True, gathered=False)
    runs = []
    for _ in range(2):
        part = _ge().logprob_fwd(hidden, weight, b, rows, labels, softcap=5.0, workspace_bytes=BUDGET)
        lse = part[0] + part[1].log()
        grads = _ge().logprob_bwd(hidden, weight, b, rows, labels, lse, torch.ones(37, device=DEVICE),
                                  softcap=5.0, workspace_bytes=BUDGET)
        runs.append((*part, *grads))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


# ---------------------------------------------------------------------------------------------------------------
# Through the public API: backend="cublas"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_api_values_and_gradients(dtype, monkeypatch, seed):
    # fused_logprobs on a (2, 13) batch with ignored tokens, bias and soft-cap, against the float64 reference; the
    # default budget shrunk so that the call spans several blocks
    from test_logprob import check_against_reference, make_inputs

    monkeypatch.setenv("FASTKTO_WORKSPACE_MIB", str(BUDGET / 2**20))
    hidden, weight, labels, bias = make_inputs((2, 13), 19, 101, dtype, bias=True)
    check_against_reference(hidden, weight, labels, bias, backend="cublas", softcap=7.0)


def test_public_api_token_stats_and_loss_module(seed):
    from test_token_stats import _reference

    import fastkto

    hidden, weight, b, _, labels = _inputs(30, 16, 150, bias=True, gathered=False, outside=False)
    labels[::4] = -100
    got = fastkto.token_stats(hidden, weight, labels, fastkto.TOKEN_FIELDS, bias=b, softcap=4.0, backend="cublas",
                              workspace_bytes=BUDGET)
    want = _reference(hidden, weight, b, labels, 4.0, 1.0)
    scored = labels != -100
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(got[name][scored].double(), want[name][scored], rtol=0, atol=FWD_ATOL)
    assert torch.equal(got["is_top1"][scored], want["is_top1"][scored])
    # per-sequence sums (what the losses take) as the PyTorch path gives them
    seqs = [fastkto.sequence_logps(hidden.view(3, 10, 16), weight, labels.view(3, 10), bias=b, softcap=4.0,
                                   backend=name, workspace_bytes=BUDGET) for name in ("cublas", "torch")]
    torch.testing.assert_close(seqs[0], seqs[1], rtol=0, atol=10 * FWD_ATOL)


def test_kept_epilogue_compile_report_is_current():
    """benchmarks/results/compile/epilogue_report.md lists today's launch shapes and variants, none spilling or at
    255 registers (regenerate: python -m tools.compile_epilogue --out benchmarks/results/compile/epilogue_report.md,
    TRITON_INTERPRET unset)."""
    from pathlib import Path

    from tools import compile_epilogue as ce

    report = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compile" / "epilogue_report.md"
    rows = set()
    for line in report.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("_"):
            assert cells[-1] == "yes", line
            rows.add((cells[0], cells[1], cells[2], cells[3], cells[4]))
    ge = _ge()
    want = set()
    for kernel, launch, sw in ce.variants():
        n, v, w, regs = ge._GPU_LAUNCH[launch]
        shape = f"N{n} V{v} w{w}" + (f" r{regs}" if regs else "")
        for dtype in ce.DTYPES:
            for target in ce.TARGETS:
                want.add((f"_{kernel}_kernel", shape, dtype, f"sm_{target}", ce.variant_name(sw)))
    assert rows == want
