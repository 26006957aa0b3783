"""Packed (padding-free) batches: the layout helpers (fastkto.packing), ``sequence_logps`` and the losses on packed
tokens against the padded layout and float64 references, the packed collators and the token-budget sampler.

Tolerances. Per-token log-probs are float32 (each ~1e-6 relative), a sequence sums <= 9 of them (magnitude ~10):
per-sequence values agree with the float64 reference to ATOL = 5e-5, losses (scaled by beta <= 0.5) likewise, and
gradients to GRAD_TOL = 1e-4 (tests/reference.py) of the largest reference entry (float32 rounding of accumulated
sums). Packed and padded layouts of the same float32 rows are compared bitwise where the same numbers go through the
same reduction (``segment_sums`` against a padded batch's row sums), otherwise to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

import fastkto
from fastkto import data as D
from fastkto import loss as L
from fastkto import packing as P
from tests.reference import assert_grads_close, leaf64, make_head, reference_sequence_logps

ATOL = 5e-5


def make_rows(lengths, dim, vocab, *, prompt=1):
    """Per-row float32 hidden states (L_i, D) and labels (L_i,): the first ``prompt`` tokens ignored (a row of
    length 1 with prompt=1 ... has no scored token, so prompt is capped to L_i - 1)."""
    rows = []
    for n in lengths:
        h = torch.randn(n, dim)
        y = torch.randint(0, vocab, (n,))
        y[: min(prompt, n - 1)] = -100
        rows.append((h, y))
    return rows


def padded(rows, width=None):
    """(B, T, D) hidden and (B, T) labels, right-padded with zeros / -100 to ``width`` (default: the longest)."""
    width = width or max(h.shape[0] for h, _ in rows)
    hidden = torch.zeros(len(rows), width, rows[0][0].shape[1])
    labels = torch.full((len(rows), width), -100)
    for i, (h, y) in enumerate(rows):
        hidden[i, : h.shape[0]], labels[i, : y.shape[0]] = h, y
    return hidden, labels


def packed(rows):
    """(T_total, D) hidden, (T_total,) labels and cu_seqlens."""
    return (torch.cat([h for h, _ in rows]), torch.cat([y for _, y in rows]),
            P.cu_seqlens_from_lengths([h.shape[0] for h, _ in rows]))


# ------------------------------------------------------------------------------------------------------- layout
def test_layout_conversions_round_trip():
    cu = P.cu_seqlens_from_lengths([3, 1, 0, 4])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 4, 8]
    assert P.position_ids_from_cu_seqlens(cu).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    # an empty sequence has no position to mark it: position_ids cannot carry it, so the round trip drops it
    assert P.cu_seqlens_from_position_ids(P.position_ids_from_cu_seqlens(cu)).tolist() == [0, 3, 4, 8]
    pos = torch.tensor([[0, 1, 0, 0, 1, 2]])
    assert P.cu_seqlens_from_position_ids(pos).tolist() == [0, 2, 3, 6]
    assert P.cu_seqlens_from_position_ids(pos, dtype=torch.int64).dtype == torch.int64
    assert P.check_cu_seqlens(cu, 8).tolist() == [3, 1, 0, 4]
    assert P.check_cu_seqlens(torch.zeros(1, dtype=torch.int64), 0).tolist() == []  # no sequence at all


@pytest.mark.parametrize("cu, total, kw, error, match", [
    ([0, 3, 5], 5, {}, TypeError, "must be a torch.Tensor"),
    (torch.tensor([0.0, 3.0]), 3, {}, TypeError, "int32 or int64"),
    (torch.tensor([[0, 3]]), 3, {}, ValueError, r"shape \(S \+ 1,\)"),
    (torch.tensor([], dtype=torch.long), 0, {}, ValueError, r"shape \(S \+ 1,\)"),
    (torch.tensor([1, 3, 5]), 5, {}, ValueError, r"start at 0, got cu_seqlens\[0\] = 1"),
    (torch.tensor([0, 4, 3, 5]), 5, {}, ValueError, r"non-decreasing, but cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 4"),
    (torch.tensor([0, 3, 5]), 6, {}, ValueError, r"end at the number of packed tokens, 6 .*got cu_seqlens\[-1\] = 5"),
    (torch.tensor([0, 3, 3, 5]), 5, {"allow_empty": False}, ValueError, r"empty sequences .* at \[1\]"),
    (torch.tensor([0, 3, 5]), 5, {"device": "meta"}, ValueError, "cu_seqlens is on cpu but labels is on meta"),
    (torch.tensor([0, 3, 5]), 5, {"name": "kl_cu_seqlens"}, None, None),
])
def test_check_cu_seqlens_rejects_bad_layouts(cu, total, kw, error, match):
    if error is None:
        assert P.check_cu_seqlens(cu, total, **kw).tolist() == [3, 2]
        with pytest.raises(ValueError, match=r"kl_cu_seqlens must end"):
            P.check_cu_seqlens(cu, total + 1, **kw)
        return
    with pytest.raises(error, match=match):
        P.check_cu_seqlens(cu, total, **kw)


@pytest.mark.parametrize("pos, error, match", [
    (torch.tensor([1, 2, 0]), ValueError, "must start at 0"),
    (torch.tensor([0, 1, 3]), ValueError, "at token 2 it goes from 1 to 3"),
    (torch.tensor([0, 1, 1]), ValueError, "at token 2 it goes from 1 to 1"),
    (torch.tensor([[0, 1], [0, 1]]), ValueError, r"\(T_total,\) or \(1, T_total\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer"),
])
def test_position_ids_that_are_not_a_packed_layout_are_refused(pos, error, match):
    with pytest.raises(error, match=match):
        P.cu_seqlens_from_position_ids(pos)


def test_segment_sums_is_the_padded_reduction_bitwise(seed):
    """The same float32 values reduced as a padded batch (padded to its longest row) reduces them: bitwise."""
    lengths = torch.tensor([5, 1, 0, 37, 12])
    values = torch.randn(int(lengths.sum())) * 10
    want = torch.zeros(5, 37)
    for i, (a, b) in enumerate(zip([0, *lengths.cumsum(0)[:-1].tolist()], lengths.cumsum(0).tolist())):
        want[i, : b - a] = values[a:b]
    assert torch.equal(P.segment_sums(values, lengths), want.sum(-1))
    assert P.segment_sums(values, lengths)[2] == 0  # an empty sequence sums to 0
    flags = values > 0
    assert P.segment_counts(flags, lengths).tolist() == [int(f.sum()) for f in torch.split(flags, lengths.tolist())]


def test_pack_padded_needs_right_padding():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    cu, pos, ids = P.pack_padded(mask, torch.tensor([[5, 6, 0], [7, 8, 9]]))
    assert cu.tolist() == [0, 2, 5] and pos.tolist() == [[0, 1, 0, 1, 2]] and ids.tolist() == [[5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="right-padded"):
        P.pack_padded(torch.tensor([[0, 1, 1]]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"tensor 0 must have attention_mask's \(B, T\)"):
        P.pack_padded(mask, torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------------ sequence_logps
@pytest.mark.parametrize("lengths", [[4, 1, 9, 2, 6], [7], [1, 1, 1]])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("layout", ["flat", "batched"])
def test_packed_sequence_logps_equals_padded_and_float64(lengths, average, layout, seed):
    dim, vocab = 16, 40
    opts = dict(temperature=0.8, softcap=15.0)
    rows = make_rows(lengths, dim, vocab)
    weight, bias = make_head(vocab, dim, bias=True)
    hidden, labels, cu = packed(rows)
    if layout == "batched":  # (1, T_total, D) as a packed model batch comes back
        hidden, labels = hidden[None], labels[None]
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    got = fastkto.sequence_logps(h, w, labels, cu_seqlens=cu, average=average, bias=b, backend="torch", **opts)
    assert got.shape == (len(lengths),) and got.dtype == torch.float32
    upstream = torch.randn(len(lengths))
    (got * upstream).sum().backward()

    ph, pl = padded(rows)
    want_padded = fastkto.sequence_logps(ph, weight, pl, average=average, bias=bias, backend="torch", **opts)
    # the same rows: the per-token values agree to float32 rounding (the head tiles the two layouts differently)
    torch.testing.assert_close(got.detach(), want_padded, rtol=0, atol=ATOL)

    h64, w64, b64 = leaf64(ph), leaf64(weight), leaf64(bias)
    ref = reference_sequence_logps(h64, w64, pl, average=average, bias=b64, **opts)
    torch.testing.assert_close(got.detach().double(), ref.detach(), rtol=0, atol=ATOL)
    (ref * upstream.double()).sum().backward()
    keep = pl != -100  # packed rows of the padded reference's gradient, in packed order
    mask = torch.arange(ph.shape[1]) < torch.tensor(lengths)[:, None]
    assert_grads_close(h.grad.reshape(-1, dim), h64.grad[mask])
    assert_grads_close(w.grad, w64.grad)
    assert_grads_close(b.grad, b64.grad)
    assert keep.any()


def test_packed_sequence_without_a_scored_token_is_zero(seed):
    rows = make_rows([3, 2, 4], 8, 20)
    rows[1][1][:] = -100
    hidden, labels, cu = packed(rows)
    weight, _ = make_head(20, 8)
    for average in (False, True):
        out = fastkto.sequence_logps(hidden, weight, labels, cu_seqlens=cu, average=average, backend="torch")
        assert out[1] == 0 and torch.isfinite(out).all()


def test_packed_sequence_logps_bf16_within_its_rounding(seed):
    """bf16 hidden states and head: packed equals padded to float32 rounding (the same bf16 inputs, fp32 sums),
    and the float64 reference of those bf16 values to float32 rounding too."""
    rows = make_rows([5, 3, 8], 16, 40)
    weight, _ = make_head(40, 16)
    hidden, labels, cu = packed(rows)
    got = fastkto.sequence_logps(hidden.bfloat16(), weight.bfloat16(), labels, cu_seqlens=cu, backend="torch")
    ph, pl = padded(rows)
    want = fastkto.sequence_logps(ph.bfloat16(), weight.bfloat16(), pl, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    ref = reference_sequence_logps(ph.bfloat16().double(), weight.bfloat16().double(), pl)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=ATOL)


def test_sequence_logps_rejects_inconsistent_packed_layouts():
    rows = make_rows([3, 2], 8, 20)
    hidden, labels, cu = packed(rows)
    weight, _ = make_head(20, 8)
    call = lambda h=hidden, y=labels, c=cu: fastkto.sequence_logps(h, weight, y, cu_seqlens=c, backend="torch")  # noqa
    cases = [
        (dict(c=torch.tensor([0, 3, 4])), ValueError, r"end at the number of packed tokens, 5 \(labels's length\)"),
        (dict(c=torch.tensor([1, 3, 5])), ValueError, "start at 0"),
        (dict(c=torch.tensor([0, 4, 3, 5])), ValueError, "non-decreasing"),
        (dict(c=cu.float()), TypeError, "cu_seqlens must be int32 or int64"),
        (dict(c=cu.to("meta")), ValueError, "cu_seqlens is on meta but labels is on cpu"),
        (dict(y=labels[None].expand(2, -1)), ValueError, r"packed labels .* \(T_total,\) or \(1, T_total\)"),
        (dict(y=labels[:4]), ValueError, r"packed hidden must have shape labels.shape \+ \(D,\)"),
        (dict(h=hidden[None]), ValueError, r"packed hidden must have shape labels.shape"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            call(**kwargs)


# ------------------------------------------------------------------------------------------------------- losses
def kto_formula(policy, ref, desirable, beta, z0):
    r = beta * (policy - ref - z0)
    return torch.where(desirable, torch.sigmoid(-r), torch.sigmoid(r)).mean()


@pytest.mark.parametrize("average", [False, True])
def test_packed_kto_loss_equals_padded_and_float64(average, seed):
    """Policy, reference and KL pairs packed (each with its own cu_seqlens): the loss, its metrics and the
    gradients of the policy's hidden states, head weight and bias equal the padded run and a float64 reference."""
    dim, vocab, beta = 16, 40, 0.3
    lengths, kl_lengths = [5, 1, 8, 3], [6, 4, 2, 7]
    rows = make_rows(lengths, dim, vocab)
    rows[1] = (rows[1][0], torch.randint(0, vocab, (1,)))  # a row of length 1, its one token scored
    kl_rows = make_rows(kl_lengths, dim, vocab)
    ref_shift = [0.3 * torch.randn(n, dim) for n in lengths]
    kl_ref_shift = [0.3 * torch.randn(n, dim) for n in kl_lengths]
    weight, bias = make_head(vocab, dim, bias=True)
    desirable = torch.tensor([True, False, False, True])
    loss_fn = L.KTOLoss(beta=beta, backend="torch", average_log_prob=average)

    def inputs(layout):
        ref_rows = [(h + s, y) for (h, y), s in zip(rows, ref_shift)]
        kl_ref_rows = [(h + s, y) for (h, y), s in zip(kl_rows, kl_ref_shift)]
        if layout == "padded":
            (h, y), (rh, _), (kh, ky), (krh, _) = (padded(r) for r in (rows, ref_rows, kl_rows, kl_ref_rows))
            return h, y, dict(ref_hidden=rh, kl_hidden=kh, kl_labels=ky, kl_ref_hidden=krh)
        (h, y, cu), (rh, _, _), (kh, ky, kcu), (krh, _, _) = (packed(r) for r in (rows, ref_rows, kl_rows,
                                                                                  kl_ref_rows))
        return h[None], y[None], dict(ref_hidden=rh[None], kl_hidden=kh, kl_labels=ky, kl_ref_hidden=krh,
                                      cu_seqlens=cu, kl_cu_seqlens=kcu)

    outs, grads = {}, {}
    for layout in ("padded", "packed"):
        h, y, kw = inputs(layout)
        h, w, b = h.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
        outs[layout] = loss_fn(h, w, y, desirable, bias=b, ref_weight=weight, ref_bias=bias, **kw)
        outs[layout].loss.backward()
        keep = (torch.arange(h.shape[1]) < torch.tensor(lengths)[:, None]) if layout == "padded" else slice(None)
        grads[layout] = (h.grad[keep].reshape(-1, dim) if layout == "padded" else h.grad[0], w.grad, b.grad)
    a, b_ = outs["padded"], outs["packed"]
    for field in ("loss", "kl", "policy_logps", "ref_logps", "rewards", "losses"):
        torch.testing.assert_close(getattr(b_, field), getattr(a, field), rtol=0, atol=ATOL, msg=field)
    assert b_.metrics().keys() == a.metrics().keys()
    for key, value in a.metrics().items():
        assert b_.metrics()[key] == pytest.approx(value, abs=ATOL), key
    for got, want in zip(grads["packed"], grads["padded"]):
        assert_grads_close(got, want.double())

    # float64 reference of the whole loss
    ph, pl = padded(rows)
    h64, w64, b64 = leaf64(ph), leaf64(weight), leaf64(bias)
    pol = reference_sequence_logps(h64, w64, pl, average=average, bias=b64)
    ref = reference_sequence_logps(padded([(h + s, y) for (h, y), s in zip(rows, ref_shift)])[0].double(),
                                   weight.double(), pl, average=average, bias=bias.double())
    kh, kl_ = padded(kl_rows)
    kl_pol = reference_sequence_logps(kh.double(), weight.double(), kl_, average=average, bias=bias.double())
    kl_ref = reference_sequence_logps(padded([(h + s, y) for (h, y), s in zip(kl_rows, kl_ref_shift)])[0].double(),
                                      weight.double(), kl_, average=average, bias=bias.double())
    z0 = (kl_pol - kl_ref).mean().clamp(min=0)
    want = kto_formula(pol, ref, desirable, beta, z0)
    want.backward()
    torch.testing.assert_close(b_.loss.double(), want.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(b_.kl.double(), z0, rtol=0, atol=ATOL)
    mask = torch.arange(ph.shape[1]) < torch.tensor(lengths)[:, None]
    assert_grads_close(grads["packed"][0], h64.grad[mask])
    assert_grads_close(grads["packed"][1], w64.grad)
    assert_grads_close(grads["packed"][2], b64.grad)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_packed_dpo_loss_equals_padded(kind, seed):
    dim, vocab, pairs = 16, 48, 3
    rows = make_rows([4, 9, 2, 6, 1, 5], dim, vocab)  # chosen 0..2, rejected 3..5
    rows[4] = (rows[4][0], torch.randint(0, vocab, (1,)))
    weight, _ = make_head(vocab, dim)
    ref_weight = weight + 0.05 * torch.randn_like(weight)
    loss_fn = L.DPOLoss(beta=0.5 if kind == "ipo" else 0.2, loss_type=kind, backend="torch")
    ph, pl = padded(rows)
    h, y, cu = packed(rows)
    outs, wgrads = [], []
    for hidden, labels, kw in ((ph, pl, {}), (h, y, {"cu_seqlens": cu})):
        hid, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        outs.append(loss_fn(hid, w, labels, ref_hidden=hidden, ref_weight=ref_weight, **kw))
        outs[-1].loss.backward()
        wgrads.append(w.grad)
    a, b = outs
    assert b.policy_chosen_logps.shape == (pairs,)
    for field in ("loss", "losses", "margins", "accuracy", "policy_chosen_logps", "policy_rejected_logps",
                  "ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=ATOL, msg=field)
    for key, value in a.metrics().items():
        assert b.metrics()[key] == pytest.approx(value, abs=ATOL), key
    assert_grads_close(wgrads[1], wgrads[0].double())


def test_losses_reject_inconsistent_packed_layouts():
    dim, vocab = 8, 16
    rows = make_rows([3, 4, 2, 5], dim, vocab)
    hidden, labels, cu = packed(rows)
    kl_hidden, kl_labels, kl_cu = packed(make_rows([2, 3, 4, 1], dim, vocab, prompt=0))
    weight, _ = make_head(vocab, dim)
    des = torch.tensor([True, False, True, False])
    kto, dpo = L.KTOLoss(backend="torch"), L.DPOLoss(backend="torch")
    zeros = torch.zeros(4)
    masked = labels.clone()
    masked[3:7] = -100  # sequence 1 (tokens 3..6) scores nothing
    cases = [
        # policy and labels
        (lambda: kto(hidden, weight, labels, des, ref_logps=zeros, kl=0.0), ValueError,
         r"policy_hidden must be a \(B, T, D\) tensor, got \(14, 8\) \(a packed batch also needs cu_seqlens\)"),
        (lambda: kto(hidden[None].expand(2, -1, -1), weight, labels, des, ref_logps=zeros, kl=0.0, cu_seqlens=cu),
         ValueError, r"policy_hidden of a packed batch \(cu_seqlens given\) must be a \(T_total, D\)"),
        (lambda: kto(hidden, weight, labels[:-1], des, ref_logps=zeros, kl=0.0, cu_seqlens=cu), ValueError,
         r"labels must have policy_hidden's leading shape \(14,\)"),
        (lambda: kto(hidden, weight, labels, des, ref_logps=zeros, kl=0.0, cu_seqlens=cu[:-1]), ValueError,
         r"cu_seqlens must end at the number of packed tokens, 14"),
        (lambda: kto(hidden, weight, labels, des, ref_logps=zeros, kl=0.0, cu_seqlens=cu.float()), TypeError,
         "cu_seqlens must be int32 or int64"),
        # sequence counts that disagree
        (lambda: kto(hidden, weight, labels, des[:3], ref_logps=zeros, kl=0.0, cu_seqlens=cu), ValueError,
         r"desirable must have shape \(4,\), one label per sequence"),
        (lambda: kto(hidden, weight, labels, des, ref_logps=zeros[:3], kl=0.0, cu_seqlens=cu), ValueError,
         r"ref_logps must have shape \(4,\)"),
        (lambda: kto(hidden, weight, labels, des, ref_hidden=hidden[:-1], kl=0.0, cu_seqlens=cu), ValueError,
         r"ref_hidden must have policy_hidden's shape \(14, 8\)"),
        (lambda: kto(hidden, weight, masked, des, ref_logps=zeros, kl=0.0, cu_seqlens=cu), ValueError,
         r"packed sequences of labels \(as cu_seqlens splits it\) \[1\] have no scored token"),
        (lambda: kto(hidden, weight, labels, des, ref_logps=zeros, kl=0.0,
                     cu_seqlens=torch.tensor([0, 3, 3, 7, 14])), ValueError, r"\[1\] have no scored token"),
        (lambda: kto(hidden, weight, labels, torch.zeros(0, dtype=torch.bool), ref_logps=zeros[:0], kl=0.0,
                     cu_seqlens=torch.tensor([0])), ValueError, "cu_seqlens must end|no sequence"),
        # the KL pairs' own layout
        (lambda: kto(hidden, weight, labels, des, ref_logps=zeros, cu_seqlens=cu, kl_hidden=kl_hidden,
                     kl_labels=kl_labels, kl_ref_logps=zeros), ValueError,
         r"kl_hidden must be a \(B, T, D\) tensor, got \(10, 8\) \(a packed batch also needs kl_cu_seqlens\)"),
        (lambda: kto(hidden, weight, labels, des, ref_logps=zeros, cu_seqlens=cu, kl_hidden=kl_hidden,
                     kl_labels=kl_labels, kl_ref_logps=zeros, kl_cu_seqlens=cu), ValueError,
         r"kl_cu_seqlens must end at the number of packed tokens, 10 \(kl_labels's length\)"),
        (lambda: kto(hidden, weight, labels, des, ref_logps=zeros, cu_seqlens=cu, kl_hidden=kl_hidden,
                     kl_labels=kl_labels, kl_ref_logps=zeros[:3], kl_cu_seqlens=kl_cu), ValueError,
         r"kl_ref_logps must have shape \(4,\)"),
        (lambda: kto(hidden, weight, labels, des, ref_logps=zeros, kl=0.0, cu_seqlens=cu, kl_cu_seqlens=kl_cu),
         ValueError, "kl_cu_seqlens given without kl_hidden"),
        # DPO pairs that do not line up
        (lambda: dpo(hidden, weight, labels, ref_logps=zeros[:3], cu_seqlens=torch.tensor([0, 3, 7, 14])),
         ValueError, "even number of packed sequences .* cu_seqlens holds 3"),
        (lambda: dpo(hidden, weight, labels, ref_logps=zeros[:2], cu_seqlens=cu), ValueError,
         r"ref_logps must have shape \(4,\)"),
        (lambda: dpo(hidden[:0], weight, labels[:0], ref_logps=zeros[:0], cu_seqlens=torch.tensor([0])), ValueError,
         "cu_seqlens is empty"),
        (lambda: dpo(hidden, weight, masked, ref_logps=zeros, cu_seqlens=cu), ValueError,
         r"packed sequences of labels .* \[1\] have no scored token"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# ---------------------------------------------------------------------------------------------------- collators
KTO_EXAMPLES = [
    {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "label": True},
    {"prompt_ids": [6], "completion_ids": [7], "label": False},
    {"prompt_ids": [3, 3, 9, 9], "completion_ids": [1, 8, 8], "label": True},
]
PAIRED_EXAMPLES = [
    {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
    {"prompt_ids": [7, 8, 9], "chosen_ids": [10, 11], "rejected_ids": [12]},
]


def _unpad(batch, key, prefix=""):
    mask = batch[f"{prefix}attention_mask"].bool()
    return batch[f"{prefix}{key}"][mask][None]


@pytest.mark.parametrize("kind", ["kto", "paired"])
@pytest.mark.parametrize("options", [{}, {"max_length": 5, "max_prompt_length": 2}])
def test_packed_collators_are_the_padded_batch_without_padding(kind, options):
    cls, examples = (D.KTOCollator, KTO_EXAMPLES) if kind == "kto" else (D.PairedCollator, PAIRED_EXAMPLES)
    pad = cls(pad_token_id=0, **options)(examples)
    pack = cls(pad_token_id=0, packed=True, **options)(examples)
    prefixes = ["", "kl_"] if kind == "kto" else [""]
    for prefix in prefixes:
        assert f"{prefix}attention_mask" not in pack  # packed rows are kept apart by position_ids, not a mask
        for key in ("input_ids", "completion_mask", "labels"):
            assert pack[f"{prefix}{key}"].shape[0] == 1
            assert torch.equal(pack[f"{prefix}{key}"], _unpad(pad, key, prefix)), (prefix, key)
        lengths = pad[f"{prefix}attention_mask"].sum(1)
        cu = pack[f"{prefix}cu_seqlens"]
        assert cu.dtype == torch.int32 and cu.tolist() == [0, *lengths.cumsum(0).tolist()]
        assert torch.equal(pack[f"{prefix}position_ids"][0], P.position_ids_from_cu_seqlens(cu))
        # the shift never crosses rows: each row's last token scores nothing, the others score the next token
        labels, ids = pack[f"{prefix}labels"][0], pack[f"{prefix}input_ids"][0]
        mask = pack[f"{prefix}completion_mask"][0]
        assert (labels[cu[1:].long() - 1] == -100).all()
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            want = torch.where(mask[a + 1 : b] != 0, ids[a + 1 : b], -100)
            assert torch.equal(labels[a : b - 1], want)
    if kind == "kto":
        assert torch.equal(pack["desirable"], pad["desirable"])


def test_packed_collator_options_are_checked():
    with pytest.raises(ValueError, match="pad_to_multiple_of does not apply to packed batches"):
        D.KTOCollator(pad_token_id=0, packed=True, pad_to_multiple_of=8)
    with pytest.raises(TypeError, match="packed must be a bool"):
        D.PairedCollator(pad_token_id=0, packed=1)
    # a row that truncation leaves without a completion token is refused in the packed layout too
    with pytest.raises(ValueError, match="labels would be all masked"):
        D.KTOCollator(pad_token_id=0, packed=True, max_length=3)(KTO_EXAMPLES)


def test_packed_collator_batch_scores_like_the_padded_batch(seed):
    """Hidden states laid out as each batch says (a stand-in backbone: one vector per token id) give the same
    KTO loss packed and padded: labels, KL pairs and layouts line up."""
    vocab, dim = 16, 8
    table = torch.randn(vocab, dim)
    weight, _ = make_head(vocab, dim)
    loss_fn = L.KTOLoss(backend="torch")
    results = []
    for packed_ in (False, True):
        batch = D.KTOCollator(pad_token_id=0, packed=packed_)(KTO_EXAMPLES)
        extra = {"cu_seqlens": batch["cu_seqlens"], "kl_cu_seqlens": batch["kl_cu_seqlens"]} if packed_ else {}
        h, kh = table[batch["input_ids"]], table[batch["kl_input_ids"]]
        results.append(loss_fn(h, weight, batch["labels"], batch["desirable"], ref_hidden=0.9 * h, kl_hidden=kh,
                               kl_labels=batch["kl_labels"], kl_ref_hidden=0.9 * kh, **extra))
    for field in ("loss", "kl", "policy_logps", "ref_logps"):
        torch.testing.assert_close(getattr(results[1], field), getattr(results[0], field), rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------- token budget
def test_token_budget_sampler_fills_batches_up_to_the_budget():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 10]
    sampler = D.TokenBudgetSampler(lengths, 16, seed=3)
    batches = list(sampler)
    assert len(sampler) == len(batches)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every example once
    assert all(sum(lengths[i] for i in b) <= 16 for b in batches)
    # greedy: a batch was closed only because the next example did not fit
    order = [i for b in batches for i in b]
    for b, nxt in zip(batches, batches[1:]):
        assert sum(lengths[i] for i in b) + lengths[nxt[0]] > 16
    assert order != list(range(len(lengths)))  # shuffled
    assert list(sampler) == batches  # the same epoch, the same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ordered = list(D.TokenBudgetSampler(lengths, 16, shuffle=False))
    assert ordered[0] == [0, 1]  # 5 + 9 fits, + 3 does not


def test_token_budget_sampler_min_rows_and_errors():
    lengths = [5, 9, 3, 7, 2, 8]
    batches = list(D.TokenBudgetSampler(lengths, 17, min_rows=2, shuffle=False))
    assert all(len(b) >= 2 for b in batches)
    with pytest.raises(ValueError, match="example 1 takes 9 tokens, more than max_tokens=8"):
        D.TokenBudgetSampler(lengths, 8)
    with pytest.raises(ValueError, match="cannot hold min_rows=2 of the longest examples"):
        D.TokenBudgetSampler(lengths, 16, min_rows=2)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        D.TokenBudgetSampler(lengths, 0)
    with pytest.raises(ValueError, match="cannot fill a batch of min_rows=2"):
        D.TokenBudgetSampler([3], 10, min_rows=2)
    # the epoch's last batch is dropped when it cannot hold min_rows examples, or with drop_last
    tail = list(D.TokenBudgetSampler([4, 4, 4, 4, 4], 8, min_rows=2, shuffle=False))
    assert tail == [[0, 1], [2, 3]]
    assert list(D.TokenBudgetSampler([4, 4, 4], 8, shuffle=False, drop_last=True)) == [[0, 1]]


def test_token_budget_sampler_with_a_collator_and_dataloader():
    collator = D.KTOCollator(pad_token_id=0, packed=True)
    lengths = [collator.tokens(e) for e in KTO_EXAMPLES]
    assert lengths == [5, 2, 7]
    paired = D.PairedCollator(pad_token_id=0)
    assert [paired.tokens(e) for e in PAIRED_EXAMPLES] == [3 + 5, 5 + 4]
    loader = torch.utils.data.DataLoader(KTO_EXAMPLES, batch_sampler=D.TokenBudgetSampler(lengths, 12, min_rows=2),
                                         collate_fn=collator)
    for batch in loader:
        assert batch["input_ids"].shape[1] <= 12 and batch["cu_seqlens"].shape[0] >= 3
