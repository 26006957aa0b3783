"""Scale-out, on 2 CPU processes with the gloo backend on 127.0.0.1: vocab-parallel heads, sharded (FSDP2 / DTensor)
LM-head weights, DDP and FSDP2 KTO steps, the KTO KL reference point across ranks, and bad distributed input.

One pair of worker processes serves the whole module (a fresh Python with torch costs seconds on 2 cores): each
test sends a module-level function to both ranks and gets back each rank's return value or traceback. A task that
outlives TASK_TIMEOUT_S (a rank stuck in a collective) fails its test and the workers are replaced.

References are float64 and materialize the logits (tests/reference.py); fastkto runs in float32. Tolerances:
values differ by float32 rounding of logits of magnitude ~10 (ATOL_VALUE); gradients are compared relative to the
largest reference gradient, bounded by a few float32 roundings accumulated over D and V terms (GRAD_TOL).
"""

from __future__ import annotations

import gc
import os
import queue
import socket
import sys
import time
import traceback
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkto
import fastkto.distributed as fdist
from fastkto import reference
from tests.conftest import INTERPRET
from tests.reference import leaf64, reference_logprobs, reference_sequence_logps

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed"),
]

WORLD = 2
TASK_TIMEOUT_S = 60  # one task, both ranks; the slowest (Triton interpreter) takes a few seconds
START_TIMEOUT_S = 120  # two fresh interpreters importing torch on 2 busy cores
ATOL_VALUE = 2e-5  # float32 rounding of logits ~10 and of a log-sum-exp over ~100 terms: ~1e-6
GRAD_TOL = 2e-5  # scaled error (max |got - ref| / max |ref|) of float32 gradients summed over ~100 terms

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(), reason="Triton needs CUDA or TRITON_INTERPRET=1"))]


# ----------------------------------------------------------------------------------------------------------------
# The 2-process cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STATE: dict = {}  # per worker process: the vocab-parallel group and the 1-D device mesh


def _serve(rank: int, world: int, port: int, tasks, results) -> None:
    """Worker loop: join the gloo group, then run (function, args) tasks until None arrives."""
    torch.set_num_threads(1)  # 2 ranks on 2 shared cores
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo's pairs on the loopback interface
    try:
        from datetime import timedelta

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=TASK_TIMEOUT_S))
        _STATE["group"] = dist.new_group(ranks=list(range(world)))  # not WORLD: the group must be threaded through
        from torch.distributed.device_mesh import init_device_mesh

        _STATE["mesh"] = init_device_mesh("cpu", (world,))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, None))
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world, *args)))
        except BaseException:
            results.put((rank, False, f"rank {rank}: {traceback.format_exc()}"))
    dist.destroy_process_group()


class _Cluster:
    """Two gloo worker processes on 127.0.0.1 that run one task at a time on both ranks."""

    def __init__(self):
        self._ctx = mp.get_context("spawn")
        self.procs, self.tasks = [], []
        self._start()

    def _start(self):
        error = None
        for _ in range(3):  # a free port can be taken before rank 0 binds it: retry with another
            port = _free_port()
            self.results = self._ctx.Queue()
            self.tasks = [self._ctx.Queue() for _ in range(WORLD)]
            self.procs = [self._ctx.Process(target=_serve, args=(r, WORLD, port, self.tasks[r], self.results),
                                            daemon=True) for r in range(WORLD)]
            for p in self.procs:
                p.start()
            try:
                errors = [payload for ok, payload in self._collect(START_TIMEOUT_S) if not ok]
            except TimeoutError as e:
                errors = [str(e)]
            if not errors:
                return
            error = "\n".join(errors)
            self.close(graceful=False)
        raise RuntimeError(f"could not start {WORLD} gloo workers:\n{error}")

    def _collect(self, timeout):
        deadline = time.monotonic() + timeout
        got = {}
        while len(got) < WORLD:
            left = deadline - time.monotonic()
            try:
                rank, ok, payload = self.results.get(timeout=max(left, 0.01))
            except queue.Empty:
                # the ranks that did answer often say why the others wait (one raised before a collective)
                said = "".join(f"\n{payload}" for ok, payload in got.values() if not ok)
                raise TimeoutError(
                    f"ranks {sorted(set(range(WORLD)) - set(got))} gave no answer in {timeout} s{said}") from None
            got[rank] = (ok, payload)
        return [got[r] for r in range(WORLD)]

    def run(self, fn, *args, timeout=TASK_TIMEOUT_S):
        """Run fn(rank, world, *args) on every rank; the list of return values, or pytest.fail with tracebacks.

        After a failure the workers are replaced: a rank that raised may have skipped a collective that the other
        one ran, and the next task must not pair with it."""
        for q in self.tasks:
            q.put((fn, args))
        try:
            replies = self._collect(timeout)
        except TimeoutError as e:
            self.close(graceful=False)
            self._start()
            pytest.fail(f"{fn.__name__}: {e}", pytrace=False)
        errors = [payload for ok, payload in replies if not ok]
        if errors:
            self.close()
            self._start()
            pytest.fail("\n".join(errors), pytrace=False)
        return [payload for _, payload in replies]

    def close(self, graceful=True):
        if graceful:
            for q, p in zip(self.tasks, self.procs):
                if p.is_alive():
                    q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():  # stuck in a collective: only these two processes, which this module started
                p.kill()
                p.join(timeout=10)
        self.procs = []


@pytest.fixture(scope="module")
def cluster():
    c = _Cluster()
    yield c
    c.close()


# ----------------------------------------------------------------------------------------------------------------
# Helpers used inside the workers


def _scaled_error(got, ref) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def _check_grad(name, got, ref, tol=GRAD_TOL):
    assert got is not None, f"{name}: no gradient"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = _scaled_error(got, ref)
    assert err <= tol, f"{name}: scaled error {err:.2e} > {tol:.1e}"


def _inputs(gen, lead, dim, vocab, *, bias=True, ignore_frac=0.3, logit_scale=3.0):
    """hidden (*lead, D), weight (V, D) with logits of std ~logit_scale, labels with a fraction ignored, bias."""
    hidden = torch.randn(*lead, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * (logit_scale / dim**0.5)
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < ignore_frac] = -100
    if labels.numel():
        labels.view(-1)[0] = vocab - 1  # the last row of the last shard is scored at least once
    b = torch.randn(vocab, generator=gen) * 0.5 if bias else None
    return hidden, weight, labels, b


def _batch(gen, lead, dim, vocab):
    """One data-parallel rank's (hidden, labels) for a head of ``vocab`` rows."""
    hidden, _, labels, _ = _inputs(gen, lead, dim, vocab, bias=False)
    return hidden, labels


def _offsets(sizes):
    return [sum(sizes[:r]) for r in range(len(sizes))]


# ----------------------------------------------------------------------------------------------------------------
# Vocab-parallel heads


def _vocab_parallel(rank, world, seed, backend, sizes, use_bias, temperature, softcap):
    gen = torch.Generator().manual_seed(seed)  # the same full tensors on every rank
    vocab = sum(sizes)
    hidden, weight, labels, bias = _inputs(gen, (3, 7), 24, vocab, bias=use_bias)
    upstream = torch.randn(labels.shape, generator=gen)
    lo, hi = _offsets(sizes)[rank], _offsets(sizes)[rank] + sizes[rank]
    opts = dict(temperature=temperature, softcap=softcap)

    ref_h, ref_w, ref_b = leaf64(hidden), leaf64(weight), leaf64(bias)
    ref = reference_logprobs(ref_h, ref_w, labels, bias=ref_b, **opts)
    (ref * upstream.double()).sum().backward()

    h = hidden.clone().requires_grad_()
    w = weight[lo:hi].clone().requires_grad_()
    b = None if bias is None else bias[lo:hi].clone().requires_grad_()
    # a small workspace: the PyTorch path walks several vocabulary chunks of the slice, offsets included
    out = fastkto.fused_logprobs(h, w, labels, bias=b, backend=backend, process_group=_STATE["group"],
                                 workspace_bytes=12 * 1024, **opts)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    err = (out.double() - ref).abs().max().item()
    assert err <= ATOL_VALUE, f"values: max error {err:.2e}"
    ignored = labels == -100
    assert torch.all(out[ignored] == 0)
    (out * upstream).sum().backward()
    _check_grad("hidden (summed over ranks)", h.grad, ref_h.grad)
    assert torch.all(h.grad[ignored] == 0), "ignored positions must get exactly zero gradient"
    if hi > lo:
        _check_grad("weight slice", w.grad, ref_w.grad[lo:hi])
        if b is not None:
            _check_grad("bias slice", b.grad, ref_b.grad[lo:hi])

    # sequence_logps over the same slices, sum and mean over the valid tokens
    for average in (False, True):
        ref_h.grad = None
        ref_seq = reference_sequence_logps(ref_h, ref_w.detach(), labels, bias=None if ref_b is None else
                                           ref_b.detach(), average=average, **opts)
        seq_up = torch.randn(ref_seq.shape, generator=gen)
        (ref_seq * seq_up.double()).sum().backward()
        h2 = hidden.clone().requires_grad_()
        seq = fastkto.sequence_logps(h2, w.detach(), labels, bias=None if b is None else b.detach(), average=average,
                                     backend=backend, process_group=_STATE["group"], **opts)
        assert seq.shape == (3,)
        assert (seq.double() - ref_seq).abs().max().item() <= ATOL_VALUE * 7  # a sum of 7 token values
        (seq * seq_up).sum().backward()
        _check_grad(f"sequence_logps(average={average}) hidden", h2.grad, ref_h.grad)
    return out.detach()


VOCAB_CASES = [
    # V = 103 does not divide by 2: slices differ by one, the larger first (torch.chunk's order) ...
    pytest.param((52, 51), True, 0.7, None, id="52+51-bias-temperature"),
    # ... or the smaller first, with the Gemma-2 style soft-cap and a temperature > 1
    pytest.param((51, 52), False, 1.3, 4.0, id="51+52-softcap"),
    # a rank without vocabulary rows contributes max -inf and sum 0 and must not turn the result into NaN
    pytest.param((103, 0), True, 1.0, 4.0, id="103+0-empty-shard"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes,use_bias,temperature,softcap", VOCAB_CASES)
def test_vocab_parallel_matches_unsharded(cluster, seed, backend, sizes, use_bias, temperature, softcap):
    outs = cluster.run(_vocab_parallel, seed, backend, sizes, use_bias, temperature, softcap)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # every rank returns the same log-probs


def _vocab_parallel_stats(rank, world, seed, backend, sizes, softcap):
    """fastkto.token_stats over vocabulary slices: every field equals the unsharded float64 one (the statistics'
    partials combine across ranks like the log-sum-exp), and the entropy's gradient joins the log-prob's."""
    gen = torch.Generator().manual_seed(seed)
    vocab = sum(sizes)
    hidden, weight, labels, bias = _inputs(gen, (3, 7), 24, vocab, bias=True)
    g_lp, g_ent = torch.randn(labels.shape, generator=gen), torch.randn(labels.shape, generator=gen)
    lo, hi = _offsets(sizes)[rank], _offsets(sizes)[rank] + sizes[rank]

    ref_h, ref_w, ref_b = leaf64(hidden), leaf64(weight), leaf64(bias)
    z = reference.logits(ref_h, ref_w, ref_b, softcap=softcap, temperature=0.8)
    logp = torch.log_softmax(z, -1)
    scored = labels != -100
    want = {"log_probs": logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0],
            "entropy": -(logp.exp() * logp).sum(-1), "mean_logits": z.mean(-1),
            "is_top1": z.argmax(-1) == labels,
            "log_sum_sq_probs": torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)}
    ((want["log_probs"] * g_lp.double() + want["entropy"] * g_ent.double()) * scored).sum().backward()

    h = hidden.clone().requires_grad_()
    w = weight[lo:hi].clone().requires_grad_()
    got = fastkto.token_stats(h, w, labels, fastkto.TOKEN_FIELDS, bias=bias[lo:hi], softcap=softcap,
                              temperature=0.8, backend=backend, process_group=_STATE["group"],
                              workspace_bytes=12 * 1024)
    for name, value in got.items():
        if name == "is_top1":
            assert torch.equal(value, want[name] & scored), name
        else:
            err = (value.double() - want[name].detach()).abs()[scored].max().item()
            assert err <= ATOL_VALUE, f"{name}: max error {err:.2e}"
            assert torch.all(value[~scored] == 0), name
    (got["log_probs"] * g_lp + got["entropy"] * g_ent).sum().backward()
    _check_grad("hidden (summed over ranks)", h.grad, ref_h.grad)
    if hi > lo:
        _check_grad("weight slice", w.grad, ref_w.grad[lo:hi])
    return {name: value.detach() for name, value in got.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes, softcap", [((52, 51), None), ((103, 0), 4.0)], ids=["52+51", "103+0-softcap"])
def test_vocab_parallel_token_stats_match_unsharded(cluster, seed, backend, sizes, softcap):
    outs = cluster.run(_vocab_parallel_stats, seed, backend, sizes, softcap)
    for name in fastkto.TOKEN_FIELDS:  # every rank returns the same fields
        assert torch.equal(outs[0][name], outs[1][name]), name


def _tp_dtensor_local_slice(rank, world, seed):
    """torch tensor parallelism (a ColwiseParallel head is a Shard(0) DTensor): its local slice with the mesh's
    group is a vocab-parallel head; the DTensor gets the full gradient (the ranks share the data: no averaging)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _STATE["mesh"]
    gen = torch.Generator().manual_seed(seed)
    hidden, weight, labels, _ = _inputs(gen, (2, 6), 16, 45, bias=False)  # Shard(0): 23 + 22 rows
    ref_h, ref_w = leaf64(hidden), leaf64(weight)
    reference_sequence_logps(ref_h, ref_w, labels).sum().backward()
    w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    h = hidden.clone().requires_grad_()
    fastkto.sequence_logps(h, w.to_local(), labels, process_group=mesh.get_group(), backend="torch").sum().backward()
    _check_grad("DTensor weight", w.grad.full_tensor(), ref_w.grad)
    _check_grad("hidden", h.grad, ref_h.grad)


def test_tensor_parallel_dtensor_head_as_vocab_parallel(cluster, seed):
    cluster.run(_tp_dtensor_local_slice, seed)


def _vocab_parallel_bad_input(rank, world):
    group = _STATE["group"]
    # ranks disagree on the hidden size: each rank's own shapes are consistent, only the all-gather sees it
    dim = 8 + 4 * rank
    with pytest.raises(ValueError, match="disagree on the hidden size"):
        fastkto.fused_logprobs(torch.randn(3, dim), torch.randn(5, dim), torch.zeros(3, dtype=torch.long),
                               process_group=group, backend="torch")
    # ranks disagree on the token count (hidden and labels must be replicated over the group)
    n = 3 + rank
    with pytest.raises(ValueError, match="disagree on the token count"):
        fastkto.fused_logprobs(torch.randn(n, 8), torch.randn(5, 8), torch.zeros(n, dtype=torch.long),
                               process_group=group, backend="torch")
    # same count, different labels: each rank would add other tokens' partial sums (a silently wrong result)
    base = torch.tensor([[1, 7, 2, -100], [4, 4, 0, 9]])
    variants = (base.flip(-1), base.roll(1, -1), base.clone().index_put_((torch.tensor(1), torch.tensor(3)),
                                                                          torch.tensor(-100)))
    for other in variants:
        labels = base if rank == 0 else other
        with pytest.raises(ValueError, match="ranks pass different labels"):
            fastkto.fused_logprobs(torch.randn(2, 4, 8), torch.randn(5, 8), labels, process_group=group,
                                   backend="torch")
    # labels outside the GLOBAL vocabulary [0, 10): 10 and -3 are rejected on every rank ...
    for bad in (10, -3):
        labels = torch.tensor([1, bad, 2])
        with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
            fastkto.fused_logprobs(torch.randn(3, 8), torch.randn(5, 8), labels, process_group=group,
                                   backend="torch")
    # ... while a label in another rank's slice is fine (9 is rank 1's last row)
    fastkto.fused_logprobs(torch.randn(3, 8), torch.randn(5, 8), torch.tensor([9, 0, 4]), process_group=group,
                           backend="torch")
    # a weight shard of the wrong hidden size on one rank: that rank raises its own error, the other learns of it
    # in the layout all-gather and raises too, instead of waiting in a collective until the launcher gives up
    w_dim = 9 if rank == 1 else 8
    with pytest.raises(ValueError, match="hidden size mismatch" if rank == 1 else r"rank\(s\) \[1\] rejected"):
        fastkto.fused_logprobs(torch.randn(3, 8), torch.randn(5, w_dim), torch.zeros(3, dtype=torch.long),
                               process_group=group, backend="torch")
    # a DTensor weight with a process_group: ambiguous (gathering would make every rank's "slice" the whole
    # vocabulary), so a TypeError on every rank before any collective
    from torch.distributed.tensor import Shard, distribute_tensor

    w = distribute_tensor(torch.randn(10, 8), _STATE["mesh"], [Shard(0)])
    with pytest.raises(TypeError, match="DTensor and process_group"):
        fastkto.fused_logprobs(torch.randn(3, 8), w, torch.zeros(3, dtype=torch.long), process_group=group,
                               backend="torch")
    # a sharded trainable head whose detached view is passed as the reference head: refused (the local shards
    # share memory), while a frozen copy is taken
    from fastkto.loss import KTOLoss

    w = distribute_tensor(torch.randn(10, 8), _STATE["mesh"], [Shard(0)]).requires_grad_()
    h, y, d = torch.randn(2, 3, 8), torch.tensor([[1, 2, -100], [3, 4, -100]]), torch.tensor([True, False])
    with pytest.raises(ValueError, match="ref_weight shares memory with weight"):
        KTOLoss(backend="torch")(h, w, y, d, ref_hidden=h, ref_weight=w.detach(), kl=0.0)
    KTOLoss(backend="torch")(h, w, y, d, ref_hidden=h, ref_weight=w.detach().clone(), kl=0.0).loss.backward()
    # the workers are still in step: a collective after all the errors completes
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    assert t.item() == world


def test_vocab_parallel_bad_input(cluster):
    cluster.run(_vocab_parallel_bad_input)


# ----------------------------------------------------------------------------------------------------------------
# Sharded (DTensor / FSDP2) weights


def _dtensor_head(rank, world, seed, backend):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = _STATE["mesh"]
    gen = torch.Generator().manual_seed(seed)
    vocab, dim = 103, 24  # Shard(0) splits 103 rows 52 + 51
    _, weight, _, bias = _inputs(gen, (1,), dim, vocab)
    # each rank its own data (data parallel); every rank builds both ranks' data for the reference
    data = [_batch(torch.Generator().manual_seed(seed + 1 + r), (2, 9), dim, vocab) for r in range(world)]
    ups = [torch.randn(2, 9, generator=torch.Generator().manual_seed(seed + 100 + r)) for r in range(world)]

    # reference: what FSDP2 / DDP give a parameter: the mean over ranks of each rank's gradient
    ref_w, ref_b = leaf64(weight), leaf64(bias)
    for (hidden, labels), up in zip(data, ups):
        (reference_logprobs(hidden.double(), ref_w, labels, bias=ref_b) * up.double()).sum().div(world).backward()

    w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    b = distribute_tensor(bias.clone(), mesh, [Shard(0)]).requires_grad_()
    hidden, labels = data[rank]
    h = hidden.clone().requires_grad_()
    with CommDebugMode() as comm:
        out = fastkto.fused_logprobs(h, w, labels, bias=b, backend=backend, workspace_bytes=12 * 1024)
    # one all-gather for the weight and one for the bias per call, although the small workspace makes the
    # PyTorch path walk several vocabulary chunks
    assert comm.get_total_counts() == 2, comm.get_comm_counts()
    ref = reference_logprobs(hidden.double(), weight.double(), labels, bias=bias.double())
    assert (out.double() - ref).abs().max().item() <= ATOL_VALUE
    with CommDebugMode() as comm:
        (out * ups[rank]).sum().backward()
    # backward gathers the weight and the bias again (the forward's copies were freed), then one reduce-scatter
    # of each gradient
    counts = {str(k).rsplit(".", 1)[-1]: v for k, v in comm.get_comm_counts().items()}
    assert comm.get_total_counts() == 4 and counts.get("reduce_scatter_tensor") == 2, counts
    for name, param, want in (("weight", w, ref_w.grad), ("bias", b, ref_b.grad)):
        assert isinstance(param.grad, DTensor) and param.grad.placements == param.placements, name
        _check_grad(f"{name} (DTensor, mean over ranks)", param.grad.full_tensor(), want)
    # hidden's gradient is this rank's own (no communication on it)
    ref_h = leaf64(hidden)
    (reference_logprobs(ref_h, weight.double(), labels, bias=bias.double()) * ups[rank].double()).sum().backward()
    _check_grad("hidden", h.grad, ref_h.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_weight_gathered_once_with_mean_gradient(cluster, seed, backend):
    cluster.run(_dtensor_head, seed, backend)


def _dtensor_head_bf16_cast(rank, world, seed):
    """The 30B recipe's pattern: an fp32 sharded master weight cast to bf16 (each rank casts its shard, the gather
    moves bf16), gathered once by the caller for a no-grad pass and a gradient pass; the fp32 shard gets the bf16
    gradient's mean over ranks."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    gen = torch.Generator().manual_seed(seed)
    vocab, dim = 61, 16
    weight = torch.randn(vocab, dim, generator=gen) * (3.0 / dim**0.5)
    data = [_batch(torch.Generator().manual_seed(seed + 1 + r), (2, 5), dim, vocab) for r in range(world)]
    ref_w = leaf64(weight.bfloat16().float())  # the reference sees the same bf16-rounded inputs
    for hidden, labels in data:
        reference_logprobs(hidden.bfloat16().double(), ref_w, labels).sum().div(world).backward()
    w = distribute_tensor(weight.clone(), _STATE["mesh"], [Shard(0)]).requires_grad_()
    hidden, labels = data[rank]
    with CommDebugMode() as comm:
        head = fdist.gather_sharded(w.to(torch.bfloat16))[0]
        assert type(head) is torch.Tensor and head.dtype == torch.bfloat16 and head.shape == (vocab, dim)
        with torch.no_grad():  # e.g. the KL pairs
            fastkto.fused_logprobs(hidden.bfloat16(), head, labels, backend="torch")
        out = fastkto.fused_logprobs(hidden.bfloat16(), head, labels, backend="torch")
    assert comm.get_total_counts() == 1, comm.get_comm_counts()  # one all-gather for both passes
    out.sum().backward()
    assert w.grad.dtype == torch.float32
    # bf16 gradient rounding (2^-8 relative) in the head and once more in the pre-divided bf16 reduce-scatter
    _check_grad("fp32 master weight", w.grad.full_tensor(), ref_w.grad, tol=4 * 2**-8)


def test_dtensor_weight_cast_to_bf16_before_the_call(cluster, seed):
    cluster.run(_dtensor_head_bf16_cast, seed)


def _gathered_weight_lifetime(rank, world):
    """Passed a DTensor, fused_logprobs keeps no gathered full weight past the call, with or without gradients
    (backward gathers it again); a weight the caller gathered lives until the backward that needs it."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _STATE["mesh"]
    w = distribute_tensor(torch.randn(31, 8), mesh, [Shard(0)]).requires_grad_()
    hidden, labels = torch.randn(5, 8, requires_grad=True), torch.randint(0, 31, (5,))
    gathered = []
    real = fdist.gather_sharded

    def spy(*args, **kwargs):
        full_w, full_b = real(*args, **kwargs)
        # the returned tensor and the storage it views (the Replicate DTensor's local tensor)
        gathered.append([weakref.ref(full_w)] + ([weakref.ref(full_w._base)] if full_w._base is not None else []))
        return full_w, full_b

    def alive():
        gc.collect()
        return [r() is not None for r in gathered[-1]]

    fdist.gather_sharded = spy  # fused_logprobs looks it up on the module at each call
    try:
        with torch.no_grad():
            fastkto.fused_logprobs(hidden, w, labels, backend="torch")
        assert not any(alive()), "under no_grad the gathered weight must be freed when the call returns"
        out = fastkto.fused_logprobs(hidden, w, labels, backend="torch")
        assert not any(alive()), "with gradients the forward's gathered weight must be freed too (not saved)"
        out.sum().backward()
        assert len(gathered) == 2, "one gather per forward (backward's regather is not a gather_sharded call)"
        assert w.grad is not None and hidden.grad is not None

        # the caller gathers once for several passes: autograd keeps that tensor for the backward that needs it
        full = fdist.gather_sharded(w)[0]
        refs = gathered[-1]
        out = fastkto.fused_logprobs(hidden, full, labels, backend="torch")
        del full
        assert all(alive()), "backward needs the caller's gathered weight: autograd must hold it until then"
        out.sum().backward()
        assert not any(r() is not None for r in refs), "after backward nothing may keep the gathered weight"
        del out
    finally:
        fdist.gather_sharded = real


def test_gathered_weight_freed_after_use(cluster):
    cluster.run(_gathered_weight_lifetime)


# ----------------------------------------------------------------------------------------------------------------
# The KTO reference point z0 across ranks


def _kl_across_ranks(rank, world, seed):
    from fastkto.loss import KTOLoss, kto_kl

    group = _STATE["group"]
    gen = torch.Generator().manual_seed(seed)

    def pairs(counts, shift):
        pol = [torch.randn(c, generator=gen, dtype=torch.float64) + s for c, s in zip(counts, shift)]
        ref = [torch.randn(c, generator=gen, dtype=torch.float64) for c in counts]
        return pol, ref

    # unequal pair counts: the mean is over all 3 + 5 pairs (weighted by counts), not the mean of rank means
    for counts in ((3, 5), (0, 4)):  # (0, 4): a rank without KL pairs still takes part
        pol, ref = pairs(counts, (5.0, 3.0))  # shifts well above the noise: the global mean is > 0
        p = pol[rank].clone().requires_grad_()
        z0 = kto_kl(p, ref[rank], process_group=group)
        want = (torch.cat(pol) - torch.cat(ref)).mean().clamp(min=0)
        assert want > 0
        if counts[0]:
            mean_of_means = sum((a - b).mean() for a, b in zip(pol, ref)) / world
            assert abs(mean_of_means - want) > 1e-9  # so the comparison below tells the two apart
        torch.testing.assert_close(z0, want, rtol=1e-12, atol=0)  # float64 sums of a few terms: exact but ~1 ulp
        assert not z0.requires_grad and z0.grad_fn is None, "z0 must be detached"
    # the clamp applies to the global mean: rank 0's own mean is positive, the global one negative -> 0 everywhere
    pol, ref = pairs((2, 6), (3.0, -4.0))
    assert (pol[0] - ref[0]).mean() > 0 > (torch.cat(pol) - torch.cat(ref)).mean()
    assert kto_kl(pol[rank], ref[rank], process_group=group).item() == 0.0

    # KTOLoss(kl_process_group=...): KL pairs from hidden states, 2 (then 0) pairs on rank 0 and 3 on rank 1
    vocab, dim, t_kl = 23, 8, 5
    heads = torch.randn(vocab, dim, generator=gen) * 0.5
    ref_head = heads * 3.0  # a sharper reference: a mismatched completion is less likely under it, z0 > 0
    policy_hidden, labels = _batch(gen, (4, 6), dim, vocab)
    desirable = torch.tensor([True, False, True, False])
    z0s = []
    for counts in ((2, 3), (0, 3)):
        kl = [_batch(gen, (c, t_kl), dim, vocab) for c in counts]
        kl_ref_hidden = [torch.randn(c, t_kl, dim, generator=gen) for c in counts]
        diffs = [reference_sequence_logps(h, heads, y) - reference_sequence_logps(hr, ref_head, y)
                 for (h, y), hr in zip(kl, kl_ref_hidden)]
        want = torch.cat(diffs).mean().clamp(min=0)
        assert want > 0
        if all(counts):  # with (0, 3) rank 1's own mean is the global one, and rank 0 must get it
            local = diffs[rank].mean().clamp(min=0)
            assert abs(local - want) > 1e-3, "the cross-rank mean must make a difference in this test"
        kl_hidden = kl[rank][0].clone().requires_grad_()
        h = policy_hidden.clone().requires_grad_()
        out = KTOLoss(beta=0.5, backend="torch")(
            h, heads, labels, desirable, ref_logps=torch.zeros(4), kl_hidden=kl_hidden, kl_labels=kl[rank][1],
            kl_ref_hidden=kl_ref_hidden[rank], ref_weight=ref_head, kl_process_group=group)
        # float32 sums of ~4 token log-probs per pair against float64
        assert abs(out.kl.item() - want.item()) <= 1e-5 * max(1.0, want.item()), (out.kl.item(), want.item())
        assert not out.kl.requires_grad
        out.loss.backward()
        assert h.grad is not None and kl_hidden.grad is None, "no gradient may flow through the KL pairs"
        z0s.append(out.kl.item())
    return z0s


def test_kto_kl_averages_over_ranks(cluster, seed):
    z = cluster.run(_kl_across_ranks, seed)
    assert z[0] == z[1]  # every rank uses the same reference point


# ----------------------------------------------------------------------------------------------------------------
# Whole KTO steps under DDP and FSDP2 against one process on the whole batch


class _Backbone(torch.nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Linear(dim, dim)

    def forward(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


class _TinyLM(torch.nn.Module):
    """A transformers-like layout: ``model`` (the backbone) and an untied ``lm_head`` that fastkto applies."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.model = _Backbone(vocab, dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):  # final hidden states, never the logits
        return self.model(ids)


def _kto_setup(seed, world, vocab=37, dim=16, per_rank=4, t=7, t_kl=6):
    """Policy (fresh init from seed), a sharper frozen reference, and each rank's batch: ids, labels with a masked
    prompt, desirable mask, KL pairs (ids, labels)."""
    torch.manual_seed(seed)
    policy = _TinyLM(vocab, dim)
    reference = _TinyLM(vocab, dim)
    with torch.no_grad():
        reference.load_state_dict(policy.state_dict())
        reference.lm_head.weight.mul_(3.0)  # sharper: z0 > 0 (clamping would hide the cross-rank mean otherwise)
        for p in reference.parameters():
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 7)
    batches = []
    for _ in range(world):
        ids = torch.randint(0, vocab, (per_rank, t), generator=gen)
        labels = torch.randint(0, vocab, (per_rank, t), generator=gen)
        labels[:, : 1 + int(torch.randint(0, 3, (), generator=gen))] = -100  # the prompt
        desirable = torch.rand(per_rank, generator=gen) < 0.5
        desirable[0], desirable[1] = True, False
        kl_ids = torch.randint(0, vocab, (per_rank, t_kl), generator=gen)
        kl_labels = torch.randint(0, vocab, (per_rank, t_kl), generator=gen)
        kl_labels[:, :2] = -100
        batches.append((ids, labels, desirable, kl_ids, kl_labels))
    return policy, reference, batches


def _kto_step(policy, reference, batch, group, backend="torch", backbone_only=False):
    """One KTO forward + backward, as a training loop writes it; (KTOOutput, whether the head weight was a DTensor).

    backbone_only: run ``policy.model`` (the backbone) directly, as fastkto.integrations.transformers does, instead
    of the root module's forward."""
    from fastkto.loss import KTOLoss

    ids, labels, desirable, kl_ids, kl_labels = batch
    run = policy.model if backbone_only else policy
    hidden = run(ids)
    with torch.no_grad():
        kl_hidden = run(kl_ids)
        ref_hidden, kl_ref_hidden = reference(ids), reference(kl_ids)
    # the head weight is read after the forward: under FSDP2 it is then the unsharded parameter if the head is in
    # the root's group, a DTensor shard if the head is its own (never called) unit
    weight = policy.lm_head.weight
    out = KTOLoss(beta=0.3, backend=backend)(
        hidden, weight, labels, desirable, ref_hidden=ref_hidden,
        ref_weight=reference.lm_head.weight, kl_hidden=kl_hidden, kl_labels=kl_labels, kl_ref_hidden=kl_ref_hidden,
        kl_process_group=group)
    out.loss.backward()
    return out, fdist.is_sharded(weight)


def _single_process_reference(policy, reference, batches):
    """The whole global batch on one process (a copy of the policy): the loss, z0 and every gradient."""
    import copy

    model = copy.deepcopy(policy)
    whole = tuple(torch.cat(parts) for parts in zip(*batches))
    out, _ = _kto_step(model, reference, whole, None)
    return out, {name: p.grad for name, p in model.named_parameters()}


def _ddp_kto(rank, world, seed):
    from torch.nn.parallel import DistributedDataParallel as DDP

    policy, reference, batches = _kto_setup(seed, world)
    ref_out, ref_grads = _single_process_reference(policy, reference, batches)
    ddp = DDP(policy, process_group=_STATE["group"])
    ids, labels, desirable, kl_ids, kl_labels = batches[rank]

    from fastkto.loss import KTOLoss

    hidden = ddp(ids)
    with torch.no_grad():  # no-grad forwards through the wrapped module leave DDP's reducer alone
        kl_hidden = policy(kl_ids)
        ref_hidden, kl_ref_hidden = reference(ids), reference(kl_ids)
    loss_fn = KTOLoss(beta=0.3, backend="torch")
    args = (hidden, policy.lm_head.weight, labels, desirable)
    kw = dict(ref_hidden=ref_hidden, ref_weight=reference.lm_head.weight, kl_hidden=kl_hidden, kl_labels=kl_labels,
              kl_ref_hidden=kl_ref_hidden)
    with torch.no_grad():
        local_z0 = loss_fn(*args, **kw).kl
    out = loss_fn(*args, **kw, kl_process_group=_STATE["group"])
    out.loss.backward()  # DDP averages the gradients of the per-rank means

    assert ref_out.kl > 0 and abs(local_z0 - out.kl) > 1e-4, "z0 must differ per rank for this test to bite"
    torch.testing.assert_close(out.kl, ref_out.kl, rtol=1e-6, atol=0)  # the global KL mean (float32 sums)
    for name, p in policy.named_parameters():
        _check_grad(f"DDP {name}", p.grad, ref_grads[name].double())
    return out.loss.item(), ref_out.loss.item()


def test_ddp_kto_step_matches_single_process(cluster, seed):
    (loss0, ref), (loss1, _) = cluster.run(_ddp_kto, seed)
    # the loss is a mean over the batch: the mean of the equal-sized ranks' losses is the whole batch's loss
    assert abs((loss0 + loss1) / 2 - ref) <= 1e-6 * max(1.0, abs(ref))


def _fsdp2_kto(rank, world, seed, head_unit, backend):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = _STATE["mesh"]
    policy, reference, batches = _kto_setup(seed, world)
    ref_out, ref_grads = _single_process_reference(policy, reference, batches)
    if head_unit:
        # backbone and head are units of their own, the backbone is run directly and the head's forward never
        # runs, so its weight stays a DTensor that fastkto gathers (hidden_states calls the root instead: see
        # _fsdp2_root_llama)
        fully_shard(policy.model, mesh=mesh)
        fully_shard(policy.lm_head, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    out, sharded = _kto_step(policy, reference, batches[rank], _STATE["group"], backend, backbone_only=head_unit)
    assert sharded == head_unit, "the variant must reach fastkto with the weight it is meant to test"
    torch.testing.assert_close(out.kl, ref_out.kl, rtol=1e-6, atol=0)
    for name, p in policy.named_parameters():
        assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), name
        assert p.grad.placements == p.placements, name  # what the optimizer expects for a sharded parameter
        _check_grad(f"FSDP2 {name}", p.grad.full_tensor(), ref_grads[name].double())


@pytest.mark.parametrize("head_unit", [False, True], ids=["head-in-root-unit", "head-own-unit-dtensor"])
def test_fsdp2_kto_step_matches_single_process(cluster, seed, head_unit):
    cluster.run(_fsdp2_kto, seed, head_unit, "torch")


# ----------------------------------------------------------------------------------------------------------------
# A transformers Llama through fastkto.integrations.transformers.hidden_states under DDP and FSDP2


def _llama_setup(seed, world, tied, *, per_rank=2, t=9, steps=1):
    """A tiny Llama (tied or untied head) and ``steps`` global batches: ids (world * per_rank, t), next-token labels
    with a masked prompt, desirable flags, fixed reference log-probs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, 97, (world * per_rank, t), generator=gen)
        labels = ids[:, 1:].clone()
        labels[:, : 1 + int(torch.randint(0, 3, (), generator=gen))] = -100  # the prompt
        desirable = torch.tensor([True, False] * (world * per_rank // 2))
        ref_logps = -40.0 + 5.0 * torch.randn(world * per_rank, generator=gen)
        batches.append((ids, labels, desirable, ref_logps))
    return model, batches


def _llama_kto_loss(model, batch, rows):
    """A KTO loss of ``model``'s rows through ``hidden_states`` and ``get_lm_head`` (whatever wraps ``model``)."""
    import fastkto.integrations.transformers as T
    from fastkto.loss import kto_loss

    ids, labels, desirable, ref_logps = batch
    hidden = T.hidden_states(model, ids[rows])[:, :-1]
    logps = T.get_lm_head(model).sequence_logps(hidden, labels[rows])
    return kto_loss(logps, ref_logps[rows], desirable[rows], kl=0.5, beta=0.5).loss


def _ddp_llama(rank, world, seed, tied):
    """DDP around a transformers Llama, run by ``hidden_states(ddp_model, ...)``: every parameter's gradient equals
    one process on the whole batch (DDP's forward ran, so its reducer averaged them)."""
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastkto.integrations.transformers as T

    model, (batch,) = _llama_setup(seed, world, tied)
    single = copy.deepcopy(model)
    _llama_kto_loss(single, batch, slice(None)).backward()
    want = dict(single.named_parameters())
    ddp = DDP(model, process_group=_STATE["group"])
    with pytest.raises(ValueError, match="bypass DistributedDataParallel"):
        T.get_backbone(ddp)  # the module it would return runs without the gradient sync
    rows = slice(rank * 2, (rank + 1) * 2)
    with ddp.no_sync():  # the same step without the all-reduce: proves the comparison below can fail
        _llama_kto_loss(ddp, batch, rows).backward()
    local = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # a no-grad pass (KL pairs, a reference) through the wrapper leaves the reducer alone
        T.hidden_states(ddp, batch[0][rows])
    _llama_kto_loss(ddp, batch, rows).backward()
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == len(want) == (20 if tied else 21)  # two layers of 9, norm, embeddings (+ untied head)
    unsynced = max(_scaled_error(local[n], want[n].grad.double()) for n in names)
    assert unsynced > 100 * GRAD_TOL, f"the ranks' own gradients are already the global ones ({unsynced:.1e})"
    for name, p in model.named_parameters():
        _check_grad(f"DDP {name}", p.grad, want[name].grad.double())
    return len(names)


@pytest.mark.parametrize("tied", [False, True], ids=["untied-head", "tied-head"])
def test_ddp_llama_through_hidden_states_matches_single_process(cluster, seed, tied):
    """docs/training.md's DDP recipe: ``hidden_states(ddp_model, ...)`` and ``get_lm_head(ddp_model)``."""
    cluster.run(_ddp_llama, seed, tied)


def _ddp_static_graph_llama(rank, world, seed):
    """``DistributedDataParallel(static_graph=True)`` (what reentrant gradient checkpointing under DDP needs) starts
    its first backward's all-reduce from a node on the wrapper's outputs; the loss reaches the model through the
    backbone's output instead, so ``hidden_states`` must route the backward through the root's output too. Two
    iterations: the first (the graph recorded, the all-reduce delayed to the end of backward) and a steady one."""
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    model, (batch,) = _llama_setup(seed, world, False)
    single = copy.deepcopy(model)
    _llama_kto_loss(single, batch, slice(None)).backward()
    want = dict(single.named_parameters())
    ddp = DDP(model, process_group=_STATE["group"], static_graph=True)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        _llama_kto_loss(ddp, batch, slice(rank * 2, (rank + 1) * 2)).backward()
        for name, p in model.named_parameters():
            _check_grad(f"DDP(static_graph) step {step} {name}", p.grad, want[name].grad.double())


def test_ddp_static_graph_through_hidden_states_syncs_gradients(cluster, seed):
    cluster.run(_ddp_static_graph_llama, seed)


def _fsdp2_root_llama(rank, world, seed, tied, head_unit=False):
    """docs/scale-out.md's FSDP2 layout (each decoder layer a unit, the root unit holding the embeddings, the final
    norm and the head, tied or not): 3 SGD steps with momentum equal one process on the whole batch, gradients and
    parameters, and a tie holds (one parameter, and after the root's forward one tensor, in both modules).
    ``head_unit`` (untied): the 30B recipe's layout instead, ``model.model`` and ``model.lm_head`` units of their own
    (the head's unit runs on zero rows inside the root's call and is resharded: fastkto always gathers it).
    Returns the type of the head weight fastkto got at each step."""
    import copy

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import fastkto.integrations.transformers as T
    from fastkto.loss import kto_loss

    mesh = _STATE["mesh"]
    model, batches = _llama_setup(seed, world, tied, steps=3)
    single = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if head_unit:
        fully_shard(model.model, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)  # reshard_after_forward unset: the root keeps its parameters until backward
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied, "fully_shard kept the tie"
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (single, model)]
    rows = slice(rank * 2, (rank + 1) * 2)
    kinds = set()
    for step, batch in enumerate(batches):
        _llama_kto_loss(single, batch, slice(None)).backward()
        # the head looked up before the root's forward is the DTensor shard (fastkto gathers it); after it, the
        # unsharded parameter the root keeps until backward: steps 0 and 2 take it before, step 1 after
        ids, labels, desirable, ref_logps = batch
        head = T.get_lm_head(model) if step != 1 else None
        hidden = T.hidden_states(model, ids[rows])[:, :-1]
        if head is None:
            head = T.get_lm_head(model)
            assert head.weight is model.lm_head.weight
        kinds.add(f"step {step}: {type(head.weight).__name__}")
        if step == 0:  # the materialized logits (naive baselines, metric chunks) gather a DTensor head too
            with torch.no_grad():
                want_logits = single(input_ids=ids[rows], use_cache=False).logits[:, :3].double()
                torch.testing.assert_close(head.logits(hidden[:, :3].detach()).double(), want_logits, rtol=0,
                                           atol=ATOL_VALUE)
        logps = head.sequence_logps(hidden, labels[rows])
        kto_loss(logps, ref_logps[rows], desirable[rows], kl=0.5, beta=0.5).loss.backward()
        want = dict(single.named_parameters())
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), name
            _check_grad(f"FSDP2 step {step} {name}", p.grad.full_tensor(), want[name].grad.double())
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied, f"step {step}: the tie broke"
        for name, p in model.named_parameters():
            _check_grad(f"FSDP2 step {step} {name} (value)", p.full_tensor(), want[name].detach().double())
    return sorted(kinds)


@pytest.mark.parametrize("tied, head_unit", [(True, False), (False, False), (False, True)],
                         ids=["tied-head", "untied-head", "untied-head-own-unit"])
def test_fsdp2_root_layout_matches_single_process_and_stays_tied(cluster, seed, tied, head_unit):
    kinds = cluster.run(_fsdp2_root_llama, seed, tied, head_unit)
    step1 = "DTensor" if head_unit else "Parameter"
    assert kinds[0] == kinds[1] == ["step 0: DTensor", f"step 1: {step1}", "step 2: DTensor"], kinds


def _fsdp2_refusals(rank, world):
    """The layout with the embeddings and the head in separate units splits a tied pair into two parameters:
    ``hidden_states`` and ``get_lm_head`` refuse it, naming the layout to use. A root resharded after forward
    would not be unsharded for the embeddings' backward (a crash in FSDP2): refused after the forward."""
    from torch.distributed.fsdp import fully_shard

    import fastkto.integrations.transformers as T

    mesh = _STATE["mesh"]
    model, ((ids, *_),) = _llama_setup(0, world, True)
    fully_shard(model.model, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    for call in (lambda: T.get_lm_head(model), lambda: T.hidden_states(model, ids)):
        with pytest.raises(ValueError, match=r"two different parameters.*fully_shard\(model\) at the root"):
            call()
    with pytest.raises(ValueError, match="bypass fully_shard"):
        T.get_backbone(model)
    model, ((ids, *_),) = _llama_setup(0, world, True)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    with pytest.raises(ValueError, match="reshard_after_forward=True. at the root"):
        T.hidden_states(model, ids)


def test_fsdp2_split_tie_and_resharded_root_are_refused(cluster):
    cluster.run(_fsdp2_refusals)


def test_labels_fingerprint_tells_label_tensors_apart():
    """The cheap check of the vocab-parallel layout: equal labels hash equal, likely mistakes hash apart."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50_000, (4, 300), generator=gen)
    labels[:, :100] = -100  # prompts
    fp = fdist.labels_fingerprint
    assert fp(labels).item() == fp(labels.clone().view(-1).view(4, 300)).item() == fp(labels.int()).item()
    swapped = labels.clone()
    swapped[0, 200], swapped[0, 201] = labels[0, 201], labels[0, 200]
    assert (labels[0, 200] != labels[0, 201]).item()
    one_off = labels.clone()
    one_off[3, 299] += 1
    masked = labels.clone()
    masked[2, 150] = -100
    others = (labels.roll(1, -1), labels.flip(0), swapped, one_off, masked)
    assert len({fp(t).item() for t in (labels,) + others}) == 1 + len(others)


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3: a partitioned LM head through fastkto.integrations.transformers


def _zero3_kto(rank, world, seed, train_head, tied=False):
    """A KTO step of a tiny Llama under real DeepSpeed ZeRO-3 (every parameter partitioned, the LM head included),
    log-probs from ``get_lm_head(model)``, against the same step on one process with the whole batch. ``tied``: the
    head is the input embeddings (one partitioned parameter), and the engine itself is what hidden_states runs."""
    import copy
    import importlib

    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastkto.integrations.transformers as T
    from fastkto.loss import kto_kl, kto_loss

    # the shared-memory all-reduce that DeepSpeed JIT-compiles for CPU inference: a C++ build on every fresh
    # machine, unrelated to ZeRO-3's gather / reduce-scatter (which go through torch.distributed / gloo)
    # (the package's __init__ shadows the submodule's name with the torch module: take it from sys.modules)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # what a launcher sets
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(cfg)
    assert (policy.lm_head.weight is policy.model.embed_tokens.weight) == tied
    policy.lm_head.weight.requires_grad_(train_head)  # frozen: the LoRA layout
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        reference.lm_head.weight.mul_(2.0)  # a sharper reference: z0 > 0
    single = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(seed + 1)
    per_rank, t = 2, 9
    ids = torch.randint(0, 97, (world * per_rank, t), generator=gen)
    labels = ids[:, 1:].clone()
    labels[:, :3] = -100  # the prompt
    desirable = torch.tensor([True, False] * world)
    kl_ids = torch.cat([ids[:, :4], ids.roll(1, 0)[:, 4:]], 1)  # prompt i with completion i - 1
    kl_labels = kl_ids[:, 1:].clone()
    kl_labels[:, :3] = -100

    def kto_step(model, rows, group, run=None):
        run = model if run is None else run
        head = T.get_lm_head(run)
        ref_head = T.get_lm_head(reference)
        hidden = T.hidden_states(run, ids[rows])[:, :-1]
        policy_logps = head.sequence_logps(hidden, labels[rows])
        with torch.no_grad():
            ref_logps = ref_head.sequence_logps(T.hidden_states(reference, ids[rows])[:, :-1], labels[rows])
            kl_policy = head.sequence_logps(T.hidden_states(run, kl_ids[rows])[:, :-1], kl_labels[rows])
            kl_ref = ref_head.sequence_logps(T.hidden_states(reference, kl_ids[rows])[:, :-1], kl_labels[rows])
        z0 = kto_kl(kl_policy, kl_ref, process_group=group)
        return kto_loss(policy_logps, ref_logps, desirable[rows], kl=z0, beta=0.5), head

    want, _ = kto_step(single, slice(None), None)
    want.loss.backward()

    config = {"train_micro_batch_size_per_gpu": per_rank, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=policy, config=config,
                                      model_parameters=[p for p in policy.parameters() if p.requires_grad])
    assert T._is_partitioned(policy.lm_head.weight), "the head must be partitioned for this test to mean anything"
    assert (policy.lm_head.weight is policy.model.embed_tokens.weight) == tied, "ZeRO-3 kept the tie"
    engine_calls = []
    engine.register_forward_pre_hook(lambda module, args: engine_calls.append(1))
    out, head = kto_step(policy, slice(rank * per_rank, (rank + 1) * per_rank), _STATE["group"],
                         engine if tied else None)
    assert len(engine_calls) == (2 if tied else 0), "hidden_states(engine) calls the engine (policy and KL pass)"
    assert "forward" not in vars(head.module), "the head module's forward must be restored"
    # through the engine's forward DeepSpeed (0.19.8) leaves the tied weight gathered afterwards, so fastkto takes
    # it as a plain weight there; the gradients below are one process's either way
    assert tied or T._is_partitioned(policy.lm_head.weight), "released again after the forward"
    torch.testing.assert_close(out.kl, want.kl, rtol=1e-5, atol=0)
    engine.backward(out.loss)
    single_params = dict(single.named_parameters())
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            assert name == "lm_head.weight" and not train_head
            continue
        # DeepSpeed averages the ranks' gradients of their own batch means: the whole batch's mean
        _check_grad(f"ZeRO-3 {name}", safe_get_full_grad(p), single_params[name].grad.double(), tol=1e-5)
    engine.step()
    assert (policy.lm_head.weight is policy.model.embed_tokens.weight) == tied, "the step kept the tie"
    return out.loss.item(), want.loss.item()


@pytest.mark.parametrize("train_head, tied", [(True, False), (False, False), (True, True)],
                         ids=["trainable-head", "frozen-head", "tied-head-engine"])
def test_deepspeed_zero3_partitioned_head_matches_single_process(cluster, seed, train_head, tied):
    pytest.importorskip("deepspeed", reason="deepspeed is installed by scripts/setup.sh (CI); optional elsewhere")
    (loss0, want), (loss1, _) = cluster.run(_zero3_kto, seed, train_head, tied)
    assert abs((loss0 + loss1) / 2 - want) <= 1e-6 * max(1.0, abs(want))
