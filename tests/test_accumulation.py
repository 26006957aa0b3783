"""KTO's z0 over a gradient-accumulation window (fastkto.accumulation.KLWindow): an accumulated step with one z0
from a KL pre-pass equals the whole-batch step, and the per-micro-batch estimate it replaces does not.

Tolerances: the losses and gradients are float32 computations of the same float64-exact inputs, summed in a
different order (micro-batch by micro-batch); they agree to float32 rounding of sums of order 1: values to 1e-6
relative, gradients to GRAD_TOL (1e-4) of the largest entry (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch

import fastkto
from fastkto import accumulation
from fastkto.accumulation import KLWindow
from fastkto.loss import KTOLoss, kto_kl
from tests.reference import assert_grads_close, make_head

B, T, D, V, MICRO = 8, 6, 16, 40, 2


def _batch():
    backbone = torch.nn.Linear(D, D)  # stands in for the model: the gradient goes through hidden
    x, kl_x = torch.randn(B, T, D), torch.randn(B, T, D)
    weight, _ = make_head(V, D)
    labels, kl_labels = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    labels[:, :2] = -100  # prompts
    kl_labels[:, :2] = -100
    desirable = torch.tensor([True, False] * (B // 2))
    ref_logps = -torch.rand(B) * 5 - 20
    kl_ref_logps = -torch.rand(B) * 5 - 24  # below the policy's: z0 > 0, not clamped
    return backbone, x, kl_x, weight.requires_grad_(), labels, kl_labels, desirable, ref_logps, kl_ref_logps


def _grads(backbone, weight):
    return [p.grad.clone() for p in (*backbone.parameters(), weight)]


def test_one_z0_for_the_window_gives_the_whole_batch_step(seed):
    backbone, x, kl_x, weight, labels, kl_labels, desirable, ref, kl_ref = _batch()
    loss_fn = KTOLoss(beta=0.2)

    whole = loss_fn(backbone(x), weight, labels, desirable, ref_logps=ref, kl_hidden=backbone(kl_x).detach(),
                    kl_labels=kl_labels, kl_ref_logps=kl_ref)
    whole.loss.backward()
    want = _grads(backbone, weight)
    backbone.zero_grad()
    weight.grad = None

    window = KLWindow()
    with torch.no_grad():
        for s in range(0, B, MICRO):
            window.add(fastkto.sequence_logps(backbone(kl_x[s:s + MICRO]), weight, kl_labels[s:s + MICRO]),
                       kl_ref[s:s + MICRO])
    z0 = window.z0()
    assert window.pairs == B
    torch.testing.assert_close(z0, whole.kl, rtol=1e-6, atol=0)
    total, per_micro_z0 = 0.0, []
    for s in range(0, B, MICRO):
        sl = slice(s, s + MICRO)
        out = loss_fn(backbone(x[sl]), weight, labels[sl], desirable[sl], ref_logps=ref[sl], kl=z0)
        (out.loss * window.weight(MICRO)).backward()
        total += float(out.loss.detach()) * window.weight(MICRO)
        per_micro_z0.append(float(loss_fn(backbone(x[sl]).detach(), weight.detach(), labels[sl], desirable[sl],
                                          ref_logps=ref[sl], kl_hidden=backbone(kl_x[sl]).detach(),
                                          kl_labels=kl_labels[sl], kl_ref_logps=kl_ref[sl]).kl))
    assert total == pytest.approx(float(whole.loss), rel=1e-6)
    for got, w in zip(_grads(backbone, weight), want):
        assert_grads_close(got, w.double())
    # what it replaces: each micro-batch's own z0 differs from the window's (2 pairs each)
    assert max(abs(z - float(z0)) for z in per_micro_z0) > 1e-3


def test_z0_over_ranks_is_the_mean_over_all_pairs(monkeypatch, seed):
    """Two ranks with 3 and 5 pairs: each rank's (sum, count) all-reduced gives kto_kl of the 8 pairs together."""
    pol, ref = -torch.rand(8) * 3, -torch.rand(8) * 3 - 1
    ranks = [KLWindow(), KLWindow()]
    ranks[0].add(pol[:3], ref[:3])
    ranks[1].add(pol[3:5], ref[3:5])
    ranks[1].add(pol[5:], ref[5:])
    other = torch.tensor([float(ranks[1]._sum), float(ranks[1].pairs)], dtype=torch.float64)

    def all_reduce_sum(t, group):  # rank 0's view of the all-reduce
        return t.add_(other)

    monkeypatch.setattr(accumulation._dist, "all_reduce_sum", all_reduce_sum)
    got = ranks[0].z0(process_group=object())
    torch.testing.assert_close(got, kto_kl(pol, ref).float(), rtol=1e-6, atol=0)
    assert float(ranks[0].z0()) != pytest.approx(float(got))  # rank 0 alone: a different estimate


def test_clamped_at_zero_and_bad_inputs():
    w = KLWindow()
    w.add(torch.tensor([-5.0, -6.0]), torch.tensor([-1.0, -1.0]))  # policy below reference: z0 clamped
    assert float(w.z0()) == 0.0
    with pytest.raises(ValueError, match="needs at least one KL pair"):
        KLWindow().z0()
    with pytest.raises(ValueError, match="ref_kl_logps must have policy_kl_logps' shape"):
        w.add(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="policy_kl_logps must be a 1-D floating tensor"):
        w.add(torch.zeros(2, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match="sequences must be an int >= 0"):
        w.add(torch.zeros(2), torch.zeros(2), sequences=-1)
    with pytest.raises(ValueError, match="needs the window's micro-batches added first"):
        KLWindow().weight(2)
