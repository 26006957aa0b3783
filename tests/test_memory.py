"""The PyTorch path's workspace: bounded by the budget and flat as tokens or vocabulary grow.

Workspace = peak bytes allocated during forward + backward, minus what any method must hold: the output and the
hidden and weight gradients. Measured with fastkto.memory.track_peak_memory (allocator events on the CPU).
"""

import gc
import os

import pytest
import torch

import fastkto
from fastkto.memory import track_peak_memory

BUDGET = 1 << 20
# per-token statistics (row max, sum of exp, target logit, log-sum-exp, upstream gradient): a few floats per token,
# of size tokens, never tokens x vocabulary
PER_TOKEN_BYTES = 32


def workspace(tokens, vocab, dim=32, ignore_every=0):
    hidden = torch.randn(tokens, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    if ignore_every:
        labels[::ignore_every] = -100
    with track_peak_memory("cpu") as mem:
        out = fastkto.fused_logprobs(hidden, weight, labels, backend="torch", workspace_bytes=BUDGET)
        out.sum().backward()
    must_hold = out.numel() * 4 + hidden.numel() * 4 + weight.numel() * 4
    return mem.peak - must_hold


@pytest.mark.parametrize("ignore_every", [0, 2])
def test_workspace_is_bounded_and_flat(ignore_every):
    base = workspace(1024, 4096, ignore_every=ignore_every)
    more_tokens = workspace(2048, 4096, ignore_every=ignore_every)
    more_vocab = workspace(1024, 8192, ignore_every=ignore_every)
    both = workspace(2048, 8192, ignore_every=ignore_every)  # tokens x vocab grown 4x
    for name, value in (("base", base), ("2x tokens", more_tokens), ("2x vocab", more_vocab), ("4x", both)):
        assert 0 < value <= BUDGET, f"{name}: workspace {value / 2**20:.2f} MiB over the {BUDGET >> 20} MiB budget"
    assert more_vocab <= base + 64 * 1024, "doubling the vocabulary must not raise the workspace"
    assert more_tokens <= base + PER_TOKEN_BYTES * 1024, "doubling tokens may add only per-token statistics"
    assert both <= more_tokens + 64 * 1024
    # flat down to a few scored tokens too: the workspace does not move with how much of a batch is masked
    few = workspace(16, 4096, ignore_every=ignore_every)
    assert abs(few - base) <= PER_TOKEN_BYTES * 1024 + 64 * 1024, (few, base)


def test_naive_logits_dwarf_the_workspace():
    # the point of the package, measured the same way: the naive head holds tokens x vocab floats several times
    tokens, vocab, dim = 1024, 4096, 32
    hidden = torch.randn(tokens, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    with track_peak_memory("cpu") as mem:
        torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[:, None]).sum().backward()
    assert mem.peak >= 2 * tokens * vocab * 4
    assert workspace(tokens, vocab, dim) * 10 < mem.peak


def _bound_case(backend, dtype, gathered, softcap_bias, frozen, budget):
    # the interpreter's time grows with tokens x vocabulary; at V = 512 its plans are those of V = 1024 (tiles of
    # 96 or 64 x 128 rows in fp32, 48 or 64 x 96 in bf16: 4 to 6 vocabulary chunks), at half the time
    tokens, vocab, dim = 96, 512 if backend == "triton" else 1024, 32
    hidden = torch.randn(tokens, dim).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim) * 0.3).to(dtype).requires_grad_(not frozen)
    bias = (torch.randn(vocab) * 0.3).to(dtype).requires_grad_() if softcap_bias else None
    labels = torch.randint(0, vocab, (tokens,))
    if gathered:
        labels[::3] = -100
    gc.collect()  # garbage freed inside the region would hide allocations
    with track_peak_memory("cpu") as mem:
        out = fastkto.fused_logprobs(hidden, weight, labels, bias=bias, softcap=20.0 if softcap_bias else None,
                                     backend=backend, workspace_bytes=budget)
        (out * torch.linspace(-1, 1, tokens)).sum().backward()
    scored = int((labels != -100).sum())
    size = hidden.element_size()
    # what a call must hold: its output, the gradients it returns, and the fp32 hidden gradient it accumulates
    # (which is the returned gradient itself for fp32 inputs with every token scored)
    must_hold = out.numel() * 4 + hidden.numel() * size + (0 if frozen else weight.numel() * size)
    must_hold += 0 if bias is None else bias.numel() * size
    if gathered or dtype != torch.float32:
        must_hold += scored * dim * 4
    return mem.peak - must_hold


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.interpret, pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU runs the Triton path only under its interpreter")])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "gathered+softcap+bias", "gathered+frozen"])
def test_every_temporary_fits_the_budget(backend, dtype, variant):
    """Peak allocation during forward and backward, beyond what the call must hold, within ``workspace_bytes``:
    the tile buffers, operand copies, accumulators and per-token vectors, on both paths (Triton under the
    interpreter: its kernels' memory is the interpreter's, the loop's buffers are real tensors)."""
    budget = 96 * 1024  # small enough that both the tokens and the vocabulary split into several chunks
    extra = _bound_case(backend, dtype, "gathered" in variant, "softcap" in variant, "frozen" in variant, budget)
    assert 0 < extra <= budget, f"{extra / 1024:.1f} KiB of temporaries over the {budget // 1024} KiB budget"


def test_worker_threads_stay_within_the_budget():
    # the CPU's worker threads: a workspace each and an (M, D) hidden-gradient partial each beyond the first, all
    # inside the budget
    from fastkto.kernels import cpu_threads, tiled, torch_chunked

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tokens, vocab, dim, budget = 512, 4096, 64, 40 << 20
        hidden = torch.randn(tokens, dim, requires_grad=True)
        weight = torch.randn(vocab, dim, requires_grad=True)
        labels = torch.randint(0, vocab, (tokens,))
        call = tiled.call_shape(hidden, weight, None, None, labels, None)
        assert cpu_threads.backward_workers(call, budget, torch_chunked.TILE_MAKER) == 2
        gc.collect()
        with track_peak_memory("cpu") as mem:
            out = fastkto.fused_logprobs(hidden, weight, labels, backend="torch", workspace_bytes=budget)
            out.sum().backward()
        extra = mem.peak - (out.numel() * 4 + hidden.numel() * 4 + weight.numel() * 4)
        assert tokens * dim * 4 < extra <= budget, extra  # the partial is there, and inside the budget
    finally:
        torch.set_num_threads(threads)


def test_single_token_chunk_writes_dw_directly_without_an_fp32_chunk_buffer():
    # with one token chunk and 16-bit GEMMs (a GPU) the dW GEMM writes the weight gradient itself: the plan has no
    # fp32 (V_chunk, D) buffer, and the budget it saved goes to the tiles; with several token chunks it is there
    from fastkto.kernels import fused_logprob as fl
    from fastkto.kernels import tiled

    tiles = fl.TILE_MAKER
    for tokens, vocab, dim in ((8192, 256000, 2304), (8192, 128256, 4096), (300, 5000, 64)):
        call = tiled.CallShape(tokens, vocab, dim, torch.bfloat16, torch.bfloat16, "cuda", False, False, False,
                               False, True, False, True)
        n, v = tiled.plan_tiles(call, tiles, 128 << 20, False)
        assert n >= tokens, (tokens, n)  # the default budget gives one token chunk at these shapes
        bufs = tiled.workspace_buffers(n, v, call, tiles)
        assert "dw" not in bufs and not any(dt == torch.float32 and numel >= v * dim for numel, dt in bufs.values())
        assert tiled.buffers_nbytes(bufs) <= 128 << 20
        several = tiled.workspace_buffers(tokens // 2, v, call, tiles)
        assert several["dw"] == (v * dim, torch.float32)
    # fp32 GEMM operands (the CPU's path for 16-bit inputs) keep the accumulator: its rounding happens at the cast
    cpu = tiled.CallShape(300, 5000, 64, torch.bfloat16, torch.float32, "cpu", False, False, False, False, True,
                          False, False)
    assert "dw" in tiled.workspace_buffers(300, 512, cpu, tiles)


def test_direct_16bit_gemm_output_is_the_fp32_product_rounded_once():
    from fastkto.kernels import tiled

    a = torch.randn(64, 300).to(torch.bfloat16)
    b = torch.randn(300, 48).to(torch.bfloat16)
    out = torch.empty(64, 48, dtype=torch.bfloat16)
    tiled.matmul_fp32(out, a, b, accumulate=False)
    ref = (a.double() @ b.double()).to(torch.bfloat16)
    # one rounding of an fp32-accumulated sum: at most one bf16 ulp from the exact product rounded
    ulp = torch.finfo(torch.bfloat16).eps * ref.double().abs().clamp_min(1e-3)
    assert ((out.double() - ref.double()).abs() <= ulp).all()
    with pytest.raises(ValueError, match="cannot accumulate"):
        tiled.matmul_fp32(out, a, b, accumulate=True)
