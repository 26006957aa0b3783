"""fastkto.token_stats: the token statistics of the log-prob pass, the entropy's gradient, batch invariance.

Both paths: the PyTorch tile loop, and the Triton kernels (interpreted on the CPU: TRITON_INTERPRET=1, set by
conftest; compiled on a GPU, where the same tests run on CUDA tensors). Test ids name the path ("torch" /
"triton"), so ``-k triton`` selects the kernels' tests. References are float64 autograd of the naive computation
on the same inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastkto
from fastkto import reference
from fastkto.kernels import stats as st
from fastkto.kernels import torch_chunked

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _backends():
    out = ["torch"]
    if HAS_CUDA or INTERPRET:
        out.append("triton")
    return out


BACKENDS = _backends()
FIELDS = fastkto.TOKEN_FIELDS


def _inputs(n, dim, vocab, *, dtype=torch.float32, scale=0.5, ignored=0.2, bias=True):
    hidden = (torch.randn(n, dim) * scale).to(dtype).to(DEVICE)
    weight = torch.randn(vocab, dim).to(dtype).to(DEVICE)
    b = torch.randn(vocab).to(dtype).to(DEVICE) if bias else None
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[torch.rand(n, device=DEVICE) < ignored] = -100
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, softcap, temperature):
    """float64 fields of every row (ignored rows masked to 0 / False afterwards by the caller)."""
    z = reference.logits(hidden, weight, bias, softcap=softcap, temperature=temperature, dtype=torch.float64)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    safe = labels.clamp(min=0)
    return {
        "log_probs": logp.gather(-1, safe[:, None])[:, 0],
        "entropy": -(p * logp).sum(-1),
        "mean_logits": z.mean(-1),
        "is_top1": z.argmax(-1) == labels,
        "log_sum_sq_probs": torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1),
    }


# a float32 sum of V terms of size |z| <= ~10 carries a few ulp of 10 per term added in a tree or in order:
# 2e-5 absolute is ~170 ulp at 10, far below any wrong formula (a missed tile or split changes them by > 1e-3)
FWD_ATOL = 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap, temperature", [(None, 1.0), (4.0, 0.7)])
def test_token_stats_match_float64(backend, softcap, temperature, seed):
    # V = 700: several vocabulary splits (Triton) and tiles on both paths, a ragged last one
    hidden, weight, bias, labels = _inputs(45, 40, 700)
    got = fastkto.token_stats(hidden, weight, labels, FIELDS, bias=bias, softcap=softcap, temperature=temperature,
                              backend=backend)
    want = _reference(hidden, weight, bias, labels, softcap, temperature)
    scored = labels != -100
    assert set(got) == set(FIELDS)
    for name in FIELDS:
        assert got[name].shape == labels.shape
        if name == "is_top1":
            assert got[name].dtype == torch.bool
            assert torch.equal(got[name], want[name] & scored)
            continue
        assert got[name].dtype == torch.float32
        assert (got[name][~scored] == 0).all(), name
        torch.testing.assert_close(got[name][scored].double(), want[name][scored], rtol=0, atol=FWD_ATOL, msg=name)
    # the log-probs are fused_logprobs': bitwise, except that compiled statistics kernels walk the vocabulary in
    # half-width tiles (``fused_logprob._STATS_CONFIGS``), another summation order
    plain = fastkto.fused_logprobs(hidden, weight, labels, bias=bias, softcap=softcap, temperature=temperature,
                                   backend=backend)
    if backend == "triton" and not INTERPRET:
        torch.testing.assert_close(got["log_probs"], plain, rtol=0, atol=FWD_ATOL)
    else:
        assert torch.equal(got["log_probs"], plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_of_16_bit_inputs_match_float64(backend, seed):
    # bf16 operands: the products are exact in fp32 on both paths, so the fields keep float32 accuracy
    hidden, weight, bias, labels = _inputs(33, 32, 300, dtype=torch.bfloat16)
    got = fastkto.token_stats(hidden, weight, labels, FIELDS, bias=bias, softcap=6.0, backend=backend)
    want = _reference(hidden, weight, bias, labels, 6.0, 1.0)
    scored = labels != -100
    for name in FIELDS:
        if name == "is_top1":
            assert torch.equal(got[name], want[name] & scored)
        else:
            torch.testing.assert_close(got[name][scored].double(), want[name][scored], rtol=0, atol=FWD_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_kernel_levels_compute_only_what_is_asked(backend, seed):
    # "entropy" alone runs level 1 (one extra partial), any other field level 2; each field equals the full
    # level's bitwise (the same sums, in the same order)
    hidden, weight, bias, labels = _inputs(20, 24, 260)
    full = fastkto.token_stats(hidden, weight, labels, FIELDS, bias=bias, backend=backend)
    assert st.level_for(("log_probs", "entropy")) == 1 and st.level_for(("is_top1",)) == 2
    assert st.level_for(("log_probs",)) == 0
    for fields in (("entropy",), ("is_top1",), ("mean_logits", "log_probs"), ("log_sum_sq_probs",)):
        got = fastkto.token_stats(hidden, weight, labels, fields, bias=bias, backend=backend)
        assert set(got) == set(fields)
        for name in fields:
            assert torch.equal(got[name], full[name]), (fields, name)


def test_token_stats_name_bad_fields():
    hidden, weight, bias, labels = _inputs(4, 8, 10)
    with pytest.raises(ValueError, match="fields"):
        fastkto.token_stats(hidden, weight, labels, ("log_probs", "logits"))
    with pytest.raises(ValueError, match="V|dim|mismatch"):
        fastkto.token_stats(hidden[:, :4], weight, labels, ("entropy",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_top1_ties_go_to_the_lowest_index_kernel(backend):
    # exact ties across tiles and vocabulary splits: three copies of one weight row, which every token prefers;
    # torch.argmax (and TRL) pick the lowest index, so only a label at the first copy is top-1
    torch.manual_seed(0)
    vocab, dim = 700, 16
    weight = torch.randn(vocab, dim) * 0.1
    top = torch.randn(dim)
    for j in (37, 420, 650):
        weight[j] = top
    hidden = top.repeat(6, 1) * 3.0
    labels = torch.tensor([37, 420, 650, 5, 37, 650])
    weight, hidden, labels = weight.to(DEVICE), hidden.to(DEVICE), labels.to(DEVICE)
    got = fastkto.token_stats(hidden, weight, labels, ("is_top1",), backend=backend)["is_top1"]
    assert got.tolist() == [True, False, False, False, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combined", [False, True], ids=["entropy", "entropy+logp"])
@pytest.mark.parametrize("softcap, temperature", [(None, 1.0), (4.0, 0.7)])
def test_entropy_gradient_matches_float64(backend, combined, softcap, temperature, seed):
    """d(sum g_H H [+ g log p]) w.r.t. hidden, weight and bias in one backward against float64 autograd."""
    hidden, weight, bias, labels = _inputs(37, 24, 300)
    g_ent = torch.randn(labels.shape, device=DEVICE)
    g_lp = torch.randn(labels.shape, device=DEVICE)
    scored = (labels != -100).double()

    leaves = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    want_fields = _reference(*leaves, labels, softcap, temperature)
    loss = (want_fields["entropy"] * g_ent.double() * scored).sum()
    if combined:
        loss = loss + (want_fields["log_probs"] * g_lp.double() * scored).sum()
    want = torch.autograd.grad(loss, leaves)

    ours = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    got_fields = fastkto.token_stats(ours[0], ours[1], labels, ("log_probs", "entropy"), bias=ours[2],
                                     softcap=softcap, temperature=temperature, backend=backend)
    loss = (got_fields["entropy"] * g_ent).sum()
    if combined:
        loss = loss + (got_fields["log_probs"] * g_lp).sum()
    got = torch.autograd.grad(loss, ours)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        rel = ((g.double() - w).abs().max() / w.abs().max()).item()
        assert rel <= 1e-4, (name, rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_of_ignored_rows_is_exactly_zero(backend, seed):
    hidden, weight, bias, labels = _inputs(12, 16, 100, ignored=0.5)
    labels[0] = -100
    h = hidden.clone().requires_grad_()
    fastkto.token_stats(h, weight, labels, ("entropy",), bias=bias, backend=backend)["entropy"].sum().backward()
    assert (h.grad[labels == -100] == 0).all()


def test_vocabulary_shards_merge_like_one_pass(seed):
    """The partials of vocabulary shards (vocab-parallel ranks, the CPU's worker threads, the Triton forward's
    splits) merged by ``stats.merge`` give the one-pass fields, the arg-max included."""
    hidden, weight, bias, labels = _inputs(30, 16, 500, ignored=0.0)
    hidden, weight, bias, labels = hidden.cpu(), weight.cpu(), bias.cpu(), labels.cpu()
    whole = torch_chunked.logprob_fwd(hidden, weight, bias, None, labels, softcap=5.0, stats=2)
    parts = []
    for v0, v1 in ((0, 123), (123, 124), (124, 500)):  # a one-row shard too
        part = torch_chunked.logprob_fwd(hidden, weight[v0:v1], bias[v0:v1], None, labels - v0, softcap=5.0, stats=2)
        parts.append((*part[:6], part[6] + v0))
    merged = st.merge(parts)
    logp_a, lse_a, fields_a = st.finish(whole, labels, 500)
    logp_b, lse_b, fields_b = st.finish(merged, labels, 500)
    torch.testing.assert_close(logp_b, logp_a, rtol=0, atol=1e-5)
    for name in st.FIELDS:
        if name == "is_top1":
            assert torch.equal(fields_b[name], fields_a[name])
        else:
            torch.testing.assert_close(fields_b[name], fields_a[name], rtol=0, atol=1e-5)
    assert torch.equal(merged[6], whole[6])  # the same first arg-max index


def test_packed_and_padded_batches_give_the_same_token_stats(seed):
    """A packed batch (1, T_total, D) is scored token by token like the padded rows it came from: bitwise."""
    from fastkto.packing import pack_padded

    hidden, weight, bias, labels = _inputs(2 * 9, 16, 200, ignored=0.0)
    hidden, labels = hidden.cpu().view(2, 9, 16), labels.cpu().view(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    labels = labels.masked_fill(mask == 0, -100)
    padded = fastkto.token_stats(hidden, weight.cpu(), labels, FIELDS, bias=bias.cpu(), backend="torch")
    _, _, packed_hidden = pack_padded(mask, hidden)
    _, _, packed_labels = pack_padded(mask, labels)
    packed = fastkto.token_stats(packed_hidden, weight.cpu(), packed_labels, FIELDS, bias=bias.cpu(),
                                 backend="torch")
    keep = mask.bool()
    for name in FIELDS:
        assert torch.equal(packed[name].reshape(-1), padded[name][keep]), name


def _invariance_runs(backend, workspace_bytes, sizes_seed_pool=40):
    """(full call's outputs, [(subset indices, subset call's outputs)]): random subsets (1 token up to all) in
    random orders of one pool, some tokens ignored; outputs = (fields, d_hidden, d_weight). 40 tokens: 3 of the
    interpreter's 16-row tiles, the last ragged (the interpreter's time grows with the tiles); V = 700: several
    vocabulary splits, and 4 chunks of 192 rows under the small budget."""
    hidden, weight, bias, labels = _inputs(sizes_seed_pool, 32, 700, ignored=0.15)
    g_ent = torch.randn(labels.shape, device=DEVICE)

    def run(idx):
        h = hidden[idx].clone().requires_grad_()
        w = weight.clone().requires_grad_()
        got = fastkto.token_stats(h, w, labels[idx], FIELDS, bias=bias, softcap=5.0, temperature=0.9,
                                  backend=backend, workspace_bytes=workspace_bytes)
        (got["log_probs"].sum() + (got["entropy"] * g_ent[idx]).sum()).backward()
        return {k: v.detach() for k, v in got.items()}, h.grad, w.grad

    everything = torch.arange(labels.shape[0], device=DEVICE)
    full = run(everything)
    sizes = [1, 3, 17] + torch.randint(2, labels.shape[0] + 1, (3,)).tolist()
    subsets = []
    for n in sizes:
        idx = torch.randperm(labels.shape[0], device=DEVICE)[:n]
        subsets.append((idx, run(idx)))
    return full, subsets, run(everything)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workspace_bytes", [None, 1 << 17], ids=["default-budget", "small-budget"])
def test_outputs_are_bitwise_batch_invariant(backend, workspace_bytes, seed):
    """A token's log-prob, statistics and row of the hidden gradient are bitwise the same whatever other tokens
    share the call, and in whatever order. The weight's gradient sums over the batch, so it is only deterministic
    (checked by a repeat). On CUDA the contract is narrower (an H200 showed it: benchmarks/results/h200/ run 2):
    the Triton forward's fields are bitwise, the hidden gradient's rows (cuBLAS's dH GEMM) within its rounding,
    and the PyTorch path (cuBLAS logits) within rounding throughout."""
    (full, d_full, dw_full), subsets, (_, _, dw_again) = _invariance_runs(backend, workspace_bytes)
    cuda = torch.device(DEVICE).type == "cuda"
    fields_bitwise, rows_bitwise = not cuda or backend == "triton", not cuda
    for idx, (got, d_hidden, _) in subsets:
        for name in FIELDS:
            if fields_bitwise:
                assert torch.equal(got[name], full[name][idx]), (idx.numel(), name)
            elif got[name].dtype != torch.bool:  # (a near-tie's top-1 may flip with the logits' rounding)
                torch.testing.assert_close(got[name], full[name][idx], rtol=1e-5, atol=1e-5, msg=name)
        if rows_bitwise:
            assert torch.equal(d_hidden, d_full[idx]), (idx.numel(), (d_hidden - d_full[idx]).abs().max().item())
        else:  # one rounding of the gradient's dtype, relative to the row's largest entry
            scale = d_full[idx].abs().amax(-1, keepdim=True).float()
            err = ((d_hidden - d_full[idx]).abs().float() / scale).max().item()
            assert err <= 2 * torch.finfo(d_hidden.dtype).eps, (idx.numel(), err)
    assert torch.equal(dw_again, dw_full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_splits_depend_on_the_vocabulary_only_kernel(backend):
    """The Triton forward's vocabulary splits follow V (and the tile width), never the token count or the GPU."""
    pytest.importorskip("triton")
    from fastkto.kernels import fused_logprob as fl

    for vocab in (100, 700, 32000, 256000):
        splits = fl.vocab_splits(vocab, 128)
        assert 1 <= splits <= fl._VOCAB_SPLITS and (splits == fl._VOCAB_SPLITS or splits == -(-vocab // 512))
    # wave fill of a large call on a 132-SM GPU (one program per SM): the N = 8192 forward at V = 256000
    programs = (8192 // 128) * fl.vocab_splits(256000, 128)
    waves = -(-programs // 132)
    assert programs / (waves * 132) >= 0.95
