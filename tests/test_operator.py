"""The primitive as a PyTorch operator: torch.compile(fullgraph=True), fake tensors, and host syncs.

* ``torch.library.opcheck`` checks the registration (schema, fake implementation, autograd) of both operators.
* Every public entry point compiles in one graph (``fullgraph=True`` raises on any graph break) and equals eager:
  ``aot_eager`` and Inductor (a C++ compiler is on this machine and CI's) within float32 rounding (compiled calls
  score every row and mask the ignored ones, so their tiles and summation order differ from eager's).
* Under ``FakeTensorMode`` a Qwen2.5-32B head (N=8192, D=5120, V=152064, bf16) runs forward and backward in well
  under a second: the fake implementations never run the tile loop.
* A host-sync counter (every read of a tensor's value on the host: ``item``, ``tolist``, ``bool``, ``nonzero``,
  ``masked_select``) bounds each call: one per loss call whatever its passes, none in backward.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from reference import GRAD_TOL, assert_grads_close, make_head
from torch.utils._python_dispatch import TorchDispatchMode

import fastkto
from fastkto import ops
from fastkto.loss import DPOLoss, KTOLoss
from fastkto.packing import cu_seqlens_from_lengths

# lift_fresh: a tensor made from host values (torch.tensor, new_tensor, as_tensor); on a GPU that is a copy from
# the host, which waits for the stream (the H200 run found two such syncs in kto_loss that this counter missed)
_SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
            "aten.equal.default", "aten.is_nonzero.default", "aten.lift_fresh.default"}


class SyncCounter(TorchDispatchMode):
    """Counts host reads of tensor values: the operators that wait for the device on a GPU, and ``tolist`` (which
    on the CPU reads memory without dispatching an operator)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        # indexing with a bool mask is a nonzero on CUDA (the result's size is data)
        masked = name in ("aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None)
        if name in _SYNCING or masked:
            self.count += 1
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.count += 1
            counter.ops.append("tolist")
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def test_sync_counter_sees_each_kind_of_host_read():
    t = torch.arange(4)
    with SyncCounter() as c:
        t.tolist(), t[0].item(), bool(t.any()), t.nonzero(), t[t > 1], torch.nonzero_static(t > 1, size=2)
        t.new_tensor(2.0), torch.full_like(t, 2)
    # nonzero_static given its size and a fill read nothing (on an H200 too: benchmarks/results/h200/)
    assert c.count == 6, c.ops


# ---------------------------------------------------------------------------------------------------- the batch
def _batch(seed_rows=4, steps=7, dim=16, vocab=50):
    hidden = torch.randn(seed_rows, steps, dim)
    labels = torch.randint(0, vocab, (seed_rows, steps))
    labels[:, :2] = -100  # prompts
    labels[1, -2:] = -100  # padding
    weight, bias = make_head(vocab, dim, bias=True)
    return hidden, labels, weight, bias


def _lengths(t):
    return [t.shape[1] - i for i in range(t.shape[0])]  # row i keeps steps - i tokens


def _cat(t):
    """A padded (B, T, ...) tensor's rows concatenated, row i cut to its length."""
    return torch.cat([t[i, :n] for i, n in enumerate(_lengths(t))])


def _packed(hidden, labels):
    """The padded rows concatenated, with their cu_seqlens."""
    return _cat(hidden), _cat(labels), cu_seqlens_from_lengths(_lengths(hidden))


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


ENTRY_POINTS = ["fused_logprobs", "sequence_logps", "sequence_logps_packed", "kto", "kto_packed", "dpo",
                "dpo_packed"]


def _entry(name, hidden, labels, weight, bias):
    """(fn(hidden, weight, bias) -> scalar, description): one public entry point on fixed labels, all passes."""
    kto, dpo = KTOLoss(beta=0.2, backend="torch"), DPOLoss(beta=0.2, backend="torch")
    ref_h, kl_h = hidden.roll(1, 0) * 0.9, hidden.roll(2, 0)
    kl_y = labels.roll(1, 0)
    desirable = torch.tensor([True, False, True, False])
    ph, py, cu = _packed(hidden, labels)
    pref, pkl = _packed(ref_h, labels)[0], _packed(kl_h, kl_y)
    fns = {
        "fused_logprobs": lambda h, w, b: (fastkto.fused_logprobs(h, w, labels, bias=b, backend="torch") ** 2).sum(),
        "sequence_logps": lambda h, w, b: fastkto.sequence_logps(h, w, labels, bias=b, average=True,
                                                                 backend="torch").sum(),
        "sequence_logps_packed": lambda h, w, b: fastkto.sequence_logps(
            _cat(h), w, py, cu_seqlens=cu, bias=b, backend="torch").sum(),
        "kto": lambda h, w, b: kto(h, w, labels, desirable, bias=b, ref_hidden=ref_h, ref_weight=w.detach() * 0.9,
                                   ref_bias=b.detach().clone(), kl_hidden=kl_h, kl_labels=kl_y,
                                   kl_ref_hidden=ref_h).loss,
        "kto_packed": lambda h, w, b: kto(_cat(h), w, py, desirable, bias=b, cu_seqlens=cu,
                                          ref_hidden=pref, ref_weight=w.detach() * 0.9, ref_bias=b.detach().clone(),
                                          kl_hidden=pkl[0], kl_labels=pkl[1], kl_cu_seqlens=pkl[2],
                                          kl_ref_hidden=pkl[0] * 0.5).loss,
        "dpo": lambda h, w, b: dpo(h, w, labels, bias=b, ref_hidden=ref_h, ref_weight=w.detach() * 0.9,
                                   ref_bias=b.detach().clone()).loss,
        "dpo_packed": lambda h, w, b: dpo(_cat(h), w, py, bias=b, cu_seqlens=cu, ref_hidden=pref,
                                          ref_weight=w.detach() * 0.9, ref_bias=b.detach().clone()).loss,
    }
    return fns[name]


def _assert_same_within_rounding(got, want):
    """Compiled against eager: compiled calls score every row (masked) where eager ones skip the ignored rows, so
    the tiles, and so float32's summation order, differ: each result within GRAD_TOL of its largest entry."""
    for g, e in zip(got, want, strict=True):
        assert_grads_close(g, e.double(), tol=GRAD_TOL)


def _value_and_grads(fn, hidden, weight, bias):
    h, w, b = _leaves(hidden, weight, bias)
    out = fn(h, w, b)
    out.backward()
    return out.detach(), h.grad, w.grad, b.grad


# -------------------------------------------------------------------------------------------- the registration
def test_operators_pass_opcheck(seed):
    hidden, labels, weight, bias = _batch()
    flat, h2 = labels.reshape(-1), hidden.reshape(-1, hidden.shape[-1])
    n_scored = int((flat != -100).sum())
    all_ignored = torch.full_like(flat, -100)
    column_major = h2.T.contiguous().T  # a permuted layout: the gradients come back contiguous, as the fake says
    cases = [(h2, flat, n_scored, bias), (h2, flat, -1, None),
             (h2, torch.randint(0, 50, flat.shape), flat.numel(), bias),
             (h2, all_ignored, 0, bias), (h2[:0], flat[:0], 0, bias), (column_major, flat, n_scored, None),
             (column_major, torch.randint(0, 50, flat.shape), flat.numel(), bias)]
    for h, y, scored, b in cases:
        args = (h.detach().clone().requires_grad_() if h.is_contiguous() else column_major.requires_grad_(),
                weight.clone().requires_grad_(), None if b is None else b.clone().requires_grad_(), y, -100, scored,
                None, 1.0, None, "torch")
        torch.library.opcheck(torch.ops.fastkto.logprobs.default, args)


def test_known_and_counted_scored_rows_agree(seed):
    """The operator's two ways to find the scored rows (the count given, or read inside) give identical results."""
    hidden, labels, weight, bias = _batch()
    flat, h2 = labels.reshape(-1), hidden.reshape(-1, hidden.shape[-1])
    given = torch.ops.fastkto.logprobs(h2, weight, bias, flat, -100, int((flat != -100).sum()), 30.0, 0.7, None,
                                       "torch")
    counted = torch.ops.fastkto.logprobs(h2, weight, bias, flat, -100, -1, 30.0, 0.7, None, "torch")
    for a, b in zip(given, counted, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ops.compact_rows(flat, -100, -1), counted[2])


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_points_compile_in_one_graph_and_equal_eager(name, seed):
    hidden, labels, weight, bias = _batch()
    fn = _entry(name, hidden, labels, weight, bias)
    want = _value_and_grads(fn, hidden, weight, bias)
    torch._dynamo.reset()
    got = _value_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), hidden, weight, bias)
    _assert_same_within_rounding(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kto", "sequence_logps_packed"])
def test_compiled_calls_compact_scored_rows_when_dynamic_shapes_are_captured(name, seed):
    """With ``capture_dynamic_output_shape_ops`` the operator compacts the scored rows inside the graph (one sync
    there) instead of scoring every row: same values and gradients."""
    hidden, labels, weight, bias = _batch()
    fn = _entry(name, hidden, labels, weight, bias)
    want = _value_and_grads(fn, hidden, weight, bias)
    torch._dynamo.reset()
    seen = []
    real = ops.compact_rows
    ops.compact_rows = lambda labels, ignore_index, scored: seen.append(scored) or real(labels, ignore_index, scored)
    try:
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            got = _value_and_grads(torch.compile(fn, backend="aot_eager"), hidden, weight, bias)
    finally:
        ops.compact_rows = real
    assert seen and all(s == -1 for s in seen), seen  # the operator counted the rows itself, in the graph
    _assert_same_within_rounding(got, want)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="Inductor needs a C++ compiler")
@pytest.mark.parametrize("name", ["kto", "dpo_packed"])
def test_entry_points_compile_with_inductor(name, seed):
    hidden, labels, weight, bias = _batch()
    fn = _entry(name, hidden, labels, weight, bias)
    want = _value_and_grads(fn, hidden, weight, bias)
    torch._dynamo.reset()
    got = _value_and_grads(torch.compile(fn, fullgraph=True), hidden, weight, bias)
    for g, e in zip(got, want, strict=True):
        # Inductor fuses the element-wise code around the operators: float32 rounding of O(1) values
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kto_packed", "sequence_logps_packed"])
def test_entry_points_compile_with_dynamic_shapes(name, seed):
    """``dynamic=True``: sizes and Python numbers traced symbolically; one graph, equal to eager."""
    hidden, labels, weight, bias = _batch()
    fn = _entry(name, hidden, labels, weight, bias)
    want = _value_and_grads(fn, hidden, weight, bias)
    torch._dynamo.reset()
    got = _value_and_grads(torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager"), hidden, weight, bias)
    _assert_same_within_rounding(got, want)


@pytest.mark.slow
def test_compiled_calls_keep_non_finite_ignored_rows_out_of_the_gradients(seed):
    """Compiled calls score every row and mask the ignored ones; an inf / NaN hidden state on an ignored row (fully
    masked attention, fp16 overflow) must still reach no gradient, as in eager mode where the row is skipped."""
    hidden, labels, weight, bias = _batch()
    hidden[0, 0] = float("nan")  # labels[0, 0] is a prompt position: ignored
    hidden[1, 1] = float("inf")
    fn = _entry("kto", hidden, labels, weight, bias)
    want = _value_and_grads(fn, hidden, weight, bias)
    torch._dynamo.reset()
    got = _value_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), hidden, weight, bias)
    assert all(torch.isfinite(g).all() for g in got)
    _assert_same_within_rounding(got, want)


@pytest.mark.slow
def test_a_tiny_models_training_step_compiles_in_one_graph(seed):
    """Backbone forward and the KTO loss with reference and KL passes: one graph (Dynamo's), whose backward AOT
    autograd traces from it; loss and every parameter's gradient equal eager's."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ref = transformers.LlamaForCausalLM(cfg).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 64, (4, 9))
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1)
    labels[:, :3] = -100
    kl_ids, kl_labels = ids.roll(1, 0), labels.roll(1, 0)
    desirable = torch.tensor([True, False, True, True])
    loss_fn = KTOLoss(beta=0.1, backend="torch")

    def step():
        h = model.model(input_ids=ids).last_hidden_state
        with torch.no_grad():
            ref_h = ref.model(input_ids=ids).last_hidden_state
            kl_h = model.model(input_ids=kl_ids).last_hidden_state
            kl_ref = ref.model(input_ids=kl_ids).last_hidden_state
        return loss_fn(h, model.lm_head.weight, labels, desirable, ref_hidden=ref_h,
                       ref_weight=ref.lm_head.weight, kl_hidden=kl_h, kl_labels=kl_labels, kl_ref_hidden=kl_ref).loss

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    want = run(step)
    torch._dynamo.reset()
    graphs = []

    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    got = run(torch.compile(step, fullgraph=True, backend=counting))
    assert len(graphs) == 1
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for g, e in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bad_labels_fail_inside_a_compiled_call():
    """While compiling, the range check is a device-side assert (on the CPU it raises at once)."""
    hidden, labels, weight, bias = _batch()
    labels[0, -1] = weight.shape[0]  # one past the vocabulary
    torch._dynamo.reset()
    fn = torch.compile(lambda h: fastkto.fused_logprobs(h, weight, labels, backend="torch"), fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 50\) or equal ignore_index=-100"):
        fn(hidden)


# ------------------------------------------------------------------------------------------------- fake tensors
def test_fake_tensors_run_every_entry_point_at_a_32b_head():
    """Qwen2.5-32B's head (D=5120, V=152064) on 8192 bf16 tokens: shapes and dtypes of every output and gradient,
    from the fake implementations, without data (a real call would allocate a 1.5 GiB weight gradient)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, dim, vocab = 8192, 5120, 152064
    with FakeTensorMode():
        h = torch.empty(2, n // 2, dim, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(vocab, dim, dtype=torch.bfloat16, requires_grad=True)
        y = torch.zeros(2, n // 2, dtype=torch.long)
        y[:, :1000] = -100  # prompts: no data to count them, so every token counts as scored
        per_token = fastkto.fused_logprobs(h, w, y)
        assert per_token.shape == (2, n // 2) and per_token.dtype == torch.float32
        per_token.sum().backward()
        assert h.grad.shape == h.shape and w.grad.dtype == torch.bfloat16 and w.grad.shape == w.shape
        seq = fastkto.sequence_logps(h.reshape(1, n, dim), w, y.reshape(1, n),
                                     cu_seqlens=torch.tensor([0, n // 2, n]))
        assert seq.shape == (2,)
        desirable = torch.tensor([True, False])
        kto = KTOLoss()(h, w, y, desirable, ref_hidden=h.detach(), ref_weight=w.detach().clone(),
                        kl_hidden=h.detach(), kl_labels=y, kl_ref_hidden=h.detach())
        kto.loss.backward()
        dpo = DPOLoss()(h, w, y, ref_logps=torch.zeros(2))
        dpo.loss.backward()
        assert kto.loss.shape == () and dpo.loss.shape == ()
        flat_h, flat_y, cu = h.reshape(n, dim), y.reshape(n), torch.tensor([0, n // 2, n])
        packed_kto = KTOLoss()(flat_h, w, flat_y, desirable, cu_seqlens=cu, ref_logps=torch.zeros(2), kl=0.0)
        packed_dpo = DPOLoss()(flat_h, w, flat_y, cu_seqlens=cu, ref_hidden=flat_h.detach(),
                                ref_weight=w.detach().clone())
        (packed_kto.loss + packed_dpo.loss).backward()
        assert w.grad.shape == w.shape


# --------------------------------------------------------------------------------------------------- host syncs
def _syncs(fn):
    with SyncCounter() as c:
        out = fn()
    return c, out


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_one_host_sync_per_call_and_none_in_backward(name, seed):
    hidden, labels, weight, bias = _batch()
    fn = _entry(name, hidden, labels, weight, bias)
    h, w, b = _leaves(hidden, weight, bias)
    forward, out = _syncs(lambda: fn(h, w, b))
    assert forward.count == 1, forward.ops  # the labels' range and count (and the layouts): one read, all passes
    backward, _ = _syncs(out.backward)
    assert backward.count == 0, backward.ops


def test_bad_inputs_still_get_named_errors_after_one_read():
    """Folding the value checks into one read loses none of them: each bad value is named, as before."""
    hidden, labels, weight, bias = _batch()
    kto = KTOLoss(backend="torch")
    desirable = torch.tensor([True, False, True, False])
    bad = labels.clone()
    bad[2, 4] = 77
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\) or equal ignore_index=-100; found 77"):
        kto(hidden, weight, bad, desirable, ref_logps=torch.zeros(4), kl=0.0)
    kl_bad = labels.clone()
    kl_bad[3] = -100
    with pytest.raises(ValueError, match=r"kl_labels rows \[3\] have no scored token"):
        kto(hidden, weight, labels, desirable, ref_logps=torch.zeros(4), kl_hidden=hidden, kl_labels=kl_bad,
            kl_ref_logps=torch.zeros(4))
    with pytest.raises(ValueError, match=r"weight has shape \(16, 50\), which looks transposed: it must be \(V, D\)"):
        kto(hidden, weight.T, labels, desirable, ref_logps=torch.zeros(4), kl=0.0)  # (D, V): transposed
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        kto(hidden, weight, labels.float() * 1000, desirable, ref_logps=torch.zeros(4), kl=0.0)
    both = labels.clone()
    both[0] = -100
    both[2, 4] = 77
    with pytest.raises(ValueError, match=r"labels rows \[0\] have no scored token"):  # rows before values, as before
        kto(hidden, weight, both, desirable, ref_logps=torch.zeros(4), kl=0.0)
    kl_range = labels.clone()
    kl_range[0, 3] = -5
    with pytest.raises(ValueError, match=r"kl_labels must be in \[0, 50\) .* found -5"):
        kto(hidden, weight, labels, desirable, ref_logps=torch.zeros(4), kl_hidden=hidden, kl_labels=kl_range,
            kl_ref_logps=torch.zeros(4))


@pytest.mark.slow
def test_the_gpu_scripts_stack_check_runs_on_the_cpu(tmp_path):
    """benchmarks.stack_check (gpu_check.sh runs it on CUDA) as a dry run: its compile check passes and writes JSON."""
    import json

    from benchmarks import stack_check

    assert stack_check.main(["--out", str(tmp_path), "--device", "cpu", "--tokens", "32", "--dim", "16",
                             "--vocab", "100"]) == 0
    report = json.loads((tmp_path / "stack_check.json").read_text())
    assert report["compile"]["ok"] and report["compile"]["graphs"] == 1 and "skipped" in report["syncs"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_a_compiled_fast_trainer_step_has_no_graph_break(loss):
    """FastKTOTrainer / FastDPOTrainer with torch_compile=True: the whole model forward, fastkto's head and the
    metric fields trace without a break (TRL's own trainers break 14 and 7 times in two steps:
    benchmarks/results/cpu-2core/graph_breaks_{kto,dpo}.json)."""
    pytest.importorskip("trl")
    from benchmarks import graph_breaks

    before = torch.get_num_threads()
    try:
        row = graph_breaks.count("fastkto", loss, steps=1)
    finally:
        torch.set_num_threads(before)
    assert row["graph_breaks"] == 0, row["reasons"]
    assert row["graphs"] >= 1


def test_the_token_stats_operators_pass_opcheck(seed):
    """fastkto::token_stats (log-probs with the entropy, mean_logits, is_top1 and log_sum_sq_probs of the same pass,
    which the TRL adapter uses) and its backward with the entropy's gradient: schema, fake implementation and
    autograd registration, at both statistics levels, with and without scored-row compaction."""
    hidden, labels, weight, bias = _batch()
    h2, flat = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    n_scored = int((flat != -100).sum())
    for b, softcap, level, scored in ((bias, None, 2, n_scored), (None, 5.0, 1, -1), (bias, 5.0, 2, flat.numel())):
        y = flat if scored != flat.numel() else torch.randint(0, weight.shape[0], flat.shape)
        args = (h2.clone().requires_grad_(), weight.clone().requires_grad_(),
                None if b is None else b.clone().requires_grad_(), y, -100, scored, softcap, 0.8, None, "torch", level)
        torch.library.opcheck(torch.ops.fastkto.token_stats.default, args)


@pytest.mark.parametrize("fields", [("log_probs", "entropy"), ("entropy", "is_top1", "mean_logits")])
def test_token_stats_compile_in_one_graph_and_equal_eager(fields, seed):
    hidden, labels, weight, bias = _batch()

    def fn(h, w, b):
        got = fastkto.token_stats(h, w, labels, fields, bias=b, softcap=5.0, backend="torch")
        return sum(t.float().sum() for t in got.values()) + got["entropy"].sum()

    eager = _value_and_grads(fn, hidden, weight, bias)
    compiled = _value_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), hidden, weight, bias)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
