"""KTO / DPO losses (fastkto.loss): the math against independent float64 formulas and against TRL 1.16's own loss
code, gradients (gradcheck), the KTO paper's Theorem 4.3, z0 (clamping, detaching, the average over ranks), the
modules against the naive pipeline that materializes the logits, and argument checks.

Tolerances. The math layer runs in float64 on both sides, so values agree to a few float64 rounding units on
numbers of order 1-10 (TOL64 = 1e-12 leaves a wide margin). The modules compute log-probs in float32 from
float32 inputs that are exact in float64; each token's log-prob carries ~1e-6 relative error and a sequence sums
T <= 8 of them (magnitude ~ 10), so per-sequence log-probs agree to ~1e-5 absolute and the losses, scaled by
beta <= 0.5, to a few 1e-6: ATOL_MODULE = 5e-5. Gradients are compared relative to the largest reference
gradient, at float32 rounding of accumulated sums: GRAD_TOL = 1e-4 (tests/reference.py).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkto
from fastkto import loss as L
from fastkto import modules as M
from tests.conftest import HAS_CUDA, INTERPRET
from tests.reference import assert_grads_close, leaf64, make_head, reference_sequence_logps

TOL64 = 1e-12
ATOL_MODULE = 5e-5


# ----------------------------------------------------------------------------------------------------------------
# independent formulas (written from the papers / the issue, not from fastkto.loss)


def sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def logsig(x):
    return -torch.log1p(torch.exp(-x))  # inputs here stay within |x| < 30, where this is accurate in float64


def dpo_formula(kind, pc, pr, rc, rr, beta, eps=0.0, tau=0.05, delta=0.0):
    c, r = pc - rc, pr - rr
    h = c - r
    b = beta
    if kind == "sigmoid":
        return -(1 - eps) * logsig(b * h) - eps * logsig(-b * h)
    if kind == "hinge":
        return torch.clamp(1 - b * h, min=0)
    if kind == "ipo":
        return (h - 1 / (2 * b)) ** 2
    if kind == "robust":
        return ((1 - eps) * -logsig(b * h) - eps * -logsig(-b * h)) / (1 - 2 * eps)
    if kind == "exo_pair":
        q = sig(b * h)
        return q * torch.log(q / (1 - eps)) + (1 - q) * torch.log((1 - q) / eps)
    if kind == "bco_pair":
        return -logsig(b * c - delta) - logsig(delta - b * r)
    if kind == "sppo_hard":
        return (c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2
    if kind == "nca_pair":
        return -logsig(b * c) - 0.5 * logsig(-b * c) - 0.5 * logsig(-b * r)
    if kind == "apo_zero":
        return (1 - sig(b * c)) + sig(b * r)
    if kind == "apo_down":
        return sig(b * c) + (1 - sig(b * h))
    if kind == "discopop":
        m = sig(b * h / tau)
        return (1 - m) * -logsig(b * h) + m * torch.exp(-b * h)
    raise KeyError(kind)


def kto_formula(kind, policy, ref, desirable, beta, z0, wd, wu):
    r = policy - ref
    if kind == "kto":
        value_d, value_u = sig(beta * (r - z0)), sig(beta * (z0 - r))
    else:  # apo_zero_unpaired: the same with z0 = 0 on the desirable side and no z0 anywhere
        value_d, value_u = sig(beta * r), 1 - sig(beta * r)
    per = torch.where(desirable, wd * (1 - value_d), wu * (1 - value_u))
    return per.mean()


def random_logps(n, *, requires_grad=False):
    """Plausible per-sequence log-probs in float64 (sums over ~10-30 tokens) and a reference a few nats away."""
    policy = -20 + 5 * torch.randn(n, dtype=torch.float64)
    ref = policy + 2 * torch.randn(n, dtype=torch.float64)
    return policy.requires_grad_(requires_grad), ref


# every row of the table at eps = 0 unless it needs eps > 0, and every type that reads eps at eps > 0
DPO_CASES = [(kind, 0.0) for kind, row in L.DPO_LOSSES.items() if row.label_smoothing != "required"] + [
    ("sigmoid", 0.1), ("robust", 0.2), ("exo_pair", 1e-3), ("exo_pair", 0.3)
]


def test_dpo_table_rows_are_documented_tested_and_their_flags_enforced():
    """Each DPO_LOSSES row documents its formula (in dpo_loss's docstring too), has a case in DPO_CASES (and an eps > 0
    case when it reads label_smoothing), and its flags are what dpo_loss enforces."""
    x = [torch.randn(3, dtype=torch.float64) for _ in range(4)]
    assert L.DPO_LOSS_TYPES == tuple(L.DPO_LOSSES)
    for kind, row in L.DPO_LOSSES.items():
        assert row.per_pair.__doc__ and f"        {kind} " in L.dpo_loss.__doc__, kind
        eps_cases = {eps for k, eps in DPO_CASES if k == kind}
        assert eps_cases and (row.label_smoothing == "no" or max(eps_cases) > 0), kind
        if row.label_smoothing == "no":
            with pytest.raises(ValueError, match=f"loss_type='{kind}' would ignore label_smoothing"):
                L.dpo_loss(*x, loss_type=kind, label_smoothing=0.1)
        if row.label_smoothing == "required":
            with pytest.raises(ValueError, match="needs label_smoothing > 0"):
                L.dpo_loss(*x, loss_type=kind)
        if not row.uses_bco_delta:
            with pytest.raises(ValueError, match="bco_delta is used only by"):
                L.dpo_loss(*x, loss_type=kind, label_smoothing=0.1 if row.label_smoothing == "required" else 0.0,
                           bco_delta=0.5)
        average = L.DPOLoss(loss_type=kind, label_smoothing=0.1 if row.label_smoothing == "required" else 0.0)
        assert average._average() is row.averages_log_probs


# ----------------------------------------------------------------------------------------------------------------
# layer 1: values and gradients


@pytest.mark.parametrize("kind,eps", DPO_CASES)
def test_dpo_loss_matches_formula(kind, eps, seed):
    pairs = 7
    pc, rc = random_logps(pairs, requires_grad=True)
    pr, rr = random_logps(pairs, requires_grad=True)
    beta = float(torch.empty(()).uniform_(0.05, 0.5))
    delta = 0.3 if L.DPO_LOSSES[kind].uses_bco_delta else 0.0
    out = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=kind, label_smoothing=eps, bco_delta=delta)
    want = dpo_formula(kind, pc, pr, rc, rr, beta, eps, delta=delta)
    torch.testing.assert_close(out.losses, want.detach(), rtol=TOL64, atol=TOL64)
    torch.testing.assert_close(out.loss, want.mean(), rtol=TOL64, atol=TOL64)
    # gradients through autograd of the formula
    got = torch.autograd.grad(out.loss, (pc, pr))
    ref = torch.autograd.grad(want.mean(), (pc, pr))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # metrics: rewards are beta * log-ratio, margins their difference, accuracy the fraction with a positive margin
    cr, rj = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    torch.testing.assert_close(out.chosen_rewards, cr, rtol=TOL64, atol=TOL64)
    torch.testing.assert_close(out.rejected_rewards, rj, rtol=TOL64, atol=TOL64)
    torch.testing.assert_close(out.margins, cr - rj, rtol=TOL64, atol=TOL64)
    assert float(out.accuracy) == pytest.approx(float((cr > rj).double().mean()))
    for name in ("losses", "chosen_rewards", "margins", "accuracy", "policy_chosen_logps", "ref_rejected_logps"):
        assert not getattr(out, name).requires_grad, name


@pytest.mark.parametrize("kind", L.KTO_LOSS_TYPES)
def test_kto_loss_matches_formula(kind, seed):
    n = 9
    policy, ref = random_logps(n, requires_grad=True)
    desirable = torch.rand(n) < 0.5
    desirable[0], desirable[1] = True, False  # both classes present
    beta = float(torch.empty(()).uniform_(0.05, 0.5))
    wd, wu = float(torch.empty(()).uniform_(0.5, 3)), float(torch.empty(()).uniform_(0.5, 3))
    z0 = float(torch.rand(())) * 3 if kind == "kto" else None
    out = L.kto_loss(policy, ref, desirable, kl=z0, beta=beta, desirable_weight=wd, undesirable_weight=wu,
                     loss_type=kind)
    want = kto_formula(kind, policy, ref, desirable, beta, z0 or 0.0, wd, wu)
    torch.testing.assert_close(out.loss, want, rtol=TOL64, atol=TOL64)
    got, = torch.autograd.grad(out.loss, policy)
    exp, = torch.autograd.grad(want, policy)
    torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-14)
    rewards = beta * (policy - ref).detach()
    torch.testing.assert_close(out.rewards, rewards, rtol=TOL64, atol=TOL64)
    torch.testing.assert_close(out.desirable_reward_mean, rewards[desirable].mean(), rtol=TOL64, atol=TOL64)
    torch.testing.assert_close(out.undesirable_reward_mean, rewards[~desirable].mean(), rtol=TOL64, atol=TOL64)
    torch.testing.assert_close(out.desirable_logps_mean, policy[desirable].detach().mean(), rtol=TOL64, atol=TOL64)
    assert int(out.n_desirable) == int(desirable.sum()) and int(out.n_undesirable) == n - int(desirable.sum())
    metrics = out.metrics()
    assert metrics["rewards/margins"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])
    assert metrics["loss"] == pytest.approx(float(want.detach()))


def test_kto_metrics_with_one_class_only(seed):
    policy, ref = random_logps(4)
    out = L.kto_loss(policy, ref, torch.ones(4, dtype=torch.bool), kl=0.0)
    metrics = out.metrics()
    assert "rewards/rejected" not in metrics and "rewards/margins" not in metrics
    assert metrics["count/undesirable"] == 0 and metrics["count/desirable"] == 4
    assert math.isnan(float(out.undesirable_reward_mean))


@pytest.mark.parametrize("kind,eps", DPO_CASES)
def test_dpo_gradcheck(kind, eps, seed):
    pc, rc = random_logps(3, requires_grad=True)
    pr, rr = random_logps(3, requires_grad=True)
    if kind == "hinge":  # keep every pair off the kink at beta h = 1, where the derivative jumps
        pc = (pc.detach() + 40 * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)).requires_grad_()
    rc.requires_grad_(), rr.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: L.dpo_loss(a, b, c, d, beta=0.2, loss_type=kind, label_smoothing=eps).loss,
        (pc, pr, rc, rr),
    )


@pytest.mark.parametrize("kind", L.KTO_LOSS_TYPES)
def test_kto_gradcheck(kind, seed):
    policy, ref = random_logps(6, requires_grad=True)
    ref.requires_grad_()
    desirable = torch.tensor([True, False, True, True, False, False])
    kl = 0.7 if kind == "kto" else None
    assert torch.autograd.gradcheck(
        lambda p, r: L.kto_loss(p, r, desirable, kl=kl, beta=0.3, desirable_weight=1.5, loss_type=kind).loss,
        (policy, ref),
    )


def test_theorem_4_3_one_output_labelled_both_ways(seed):
    """KTO paper, Theorem 4.3: with unit weights, an output labelled desirable once and undesirable once
    contributes sigma(-x) + sigma(x) = 1 over two examples (1/2 of the mean) and zero gradient, whatever its
    reward and z0."""
    policy, ref = random_logps(1)
    policy = policy.expand(2).clone().requires_grad_()
    ref = ref.expand(2)
    z0 = float(torch.rand(()))
    out = L.kto_loss(policy, ref, torch.tensor([True, False]), kl=z0, beta=0.5)
    # float64 sigmoid(x) and sigmoid(-x) are each rounded, so the sum and the two derivatives agree to a few ulp
    assert float(out.loss.detach()) == pytest.approx(0.5, abs=4e-16)
    out.loss.backward()
    assert abs(float(policy.grad.sum())) < 1e-16
    # and the rest of a batch is unaffected by such a pair
    others, others_ref = random_logps(3)
    mask = torch.tensor([True, False, True])
    full = L.kto_loss(torch.cat([policy.detach(), others]), torch.cat([ref, others_ref]),
                      torch.cat([torch.tensor([True, False]), mask]), kl=z0, beta=0.5)
    rest = L.kto_loss(others, others_ref, mask, kl=z0, beta=0.5)
    torch.testing.assert_close(full.loss * 5, rest.loss * 3 + 1, rtol=TOL64, atol=TOL64)


def test_kto_class_weights(seed):
    policy, ref = random_logps(6, requires_grad=True)
    desirable = torch.tensor([True, True, False, False, True, False])
    base = L.kto_loss(policy, ref, desirable, kl=0.2)
    weighted = L.kto_loss(policy, ref, desirable, kl=0.2, desirable_weight=2.5, undesirable_weight=0.0)
    torch.testing.assert_close(weighted.losses, torch.where(desirable, 2.5 * base.losses, 0.0), rtol=TOL64, atol=0)
    weighted.loss.backward()
    assert torch.all(policy.grad[~desirable] == 0) and torch.all(policy.grad[desirable] != 0)


def test_kto_kl_clamps_and_detaches(seed):
    policy, ref = random_logps(5, requires_grad=True)
    ref.requires_grad_()
    diff = (policy - ref).detach()
    z0 = L.kto_kl(policy, ref)
    assert not z0.requires_grad and z0.dim() == 0
    assert float(z0) == pytest.approx(max(float(diff.mean()), 0.0), abs=TOL64)
    # a negative mean is clamped at 0
    z_neg = L.kto_kl(ref - 1.0 - diff.abs(), ref)
    assert float(z_neg) == 0.0
    z_pos = L.kto_kl(ref + 2.0, ref)
    assert float(z_pos) == pytest.approx(2.0, abs=TOL64)
    # no gradient flows into the KL inputs through the loss, even from a kl tensor that requires grad
    kl_in = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    out = L.kto_loss(policy, ref.detach(), torch.tensor([True, False, True, False, True]), kl=kl_in)
    out.loss.backward()
    assert kl_in.grad is None and policy.grad is not None
    assert not out.kl.requires_grad


def test_kto_kl_weighted_across_ranks(tmp_path):
    """Two gloo processes with 1 and 3 KL pairs: z0 is the mean over all 4 pairs (not the mean of the two rank
    means); a negative global mean is clamped; a rank with no pair still takes part."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    a = (torch.randn(1, dtype=torch.float64) + 3, torch.zeros(1, dtype=torch.float64))
    b = (torch.randn(3, dtype=torch.float64) - 0.5, torch.zeros(3, dtype=torch.float64))
    neg = (torch.full((2,), -1.0, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    empty = (torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    payload = {0: [a, neg, empty], 1: [b, neg, (torch.tensor([1.5], dtype=torch.float64), torch.zeros(1))]}
    # a file rendezvous: no port to probe, which another program on a shared machine could take before rank 0 binds it
    init = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_kl_worker, args=(rank, 2, init, payload[rank], queue)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = dict(queue.get() for _ in range(2))
    pooled = torch.cat([a[0], b[0]]).mean().clamp(min=0)
    for rank in range(2):
        weighted, negative, with_empty = results[rank]
        assert weighted == pytest.approx(float(pooled), abs=TOL64)
        assert negative == 0.0
        assert with_empty == pytest.approx(1.5, abs=TOL64)


def _kl_worker(rank, world, init, cases, queue):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        values = [float(L.kto_kl(p, r, process_group=dist.group.WORLD)) for p, r in cases]
        queue.put((rank, values))
    finally:
        dist.destroy_process_group()


def test_suggest_kto_weights():
    assert L.suggest_kto_weights(500, 500) == (1.0, 1.0)
    for n_d, n_u in ((1000, 10000), (10000, 1000), (7, 3), (3, 7)):
        for ratio in (1.0, 1.2, 4 / 3):
            wd, wu = L.suggest_kto_weights(n_d, n_u, ratio=ratio)
            assert wd * n_d / (wu * n_u) == pytest.approx(ratio, rel=1e-12)
            assert max(wd, wu) >= 1.0 and min(wd, wu) > 0
    assert L.suggest_kto_weights(1000, 10000) == pytest.approx((10.0, 1.0))
    with pytest.raises(ValueError, match="ratio"):
        L.suggest_kto_weights(10, 10, ratio=1.5)
    with pytest.raises(ValueError, match="n_undesirable"):
        L.suggest_kto_weights(10, 0)
    with pytest.raises(TypeError, match="n_desirable"):
        L.suggest_kto_weights(10.0, 3)


def test_suggest_kto_weights_paper_versions():
    """The early rule (ratio in [1, 4/3], TRL's docs) is the default; the later one (ratio in [1, 3/2]) on request."""
    with pytest.raises(ValueError, match=r"\[1, 4/3\].*early"):
        L.suggest_kto_weights(1000, 10000, ratio=1.5)
    assert L.suggest_kto_weights(1000, 10000, ratio=1.5, rule="later") == pytest.approx((15.0, 1.0), rel=1e-12)
    assert L.suggest_kto_weights(10000, 1000, ratio=1.5, rule="later") == pytest.approx((1.0, 10 / 1.5), rel=1e-12)
    for ratio in (1.0, 1.25, 4 / 3):  # the versions agree where their ranges overlap
        assert L.suggest_kto_weights(7, 30, ratio=ratio, rule="later") == L.suggest_kto_weights(7, 30, ratio=ratio)
    with pytest.raises(ValueError, match=r"\[1, 3/2\].*later"):
        L.suggest_kto_weights(7, 30, ratio=1.6, rule="later")
    with pytest.raises(ValueError, match="rule"):
        L.suggest_kto_weights(7, 30, rule="v2")


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    finite = st.floats(-40, 40, allow_nan=False)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(finite, finite), min_size=1, max_size=8), st.floats(0.01, 2.0), st.floats(0, 3))
    def test_property_kto_flipping_every_label_sums_to_one(pairs, beta, z0):
        """Theorem 4.3 for a whole batch: per example, the desirable and the undesirable loss sum to 1."""
        policy = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
        ref = torch.tensor([r for _, r in pairs], dtype=torch.float64)
        mask = torch.arange(len(pairs)) % 2 == 0
        one = L.kto_loss(policy, ref, mask, kl=z0, beta=beta).losses
        other = L.kto_loss(policy, ref, ~mask, kl=z0, beta=beta).losses
        torch.testing.assert_close(one + other, torch.ones_like(one), rtol=0, atol=1e-15)
        assert torch.all((one >= 0) & (one <= 1))

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=8), st.floats(0.01, 2.0))
    def test_property_sigmoid_dpo_swap(rows, beta):
        """-log sigma(x) - (-log sigma(-x)) = -x: swapping chosen and rejected changes the loss by beta h."""
        pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
        fwd = L.dpo_loss(pc, pr, rc, rr, beta=beta).losses
        swapped = L.dpo_loss(pr, pc, rr, rc, beta=beta).losses
        h = (pc - rc) - (pr - rr)
        torch.testing.assert_close(fwd - swapped, -beta * h, rtol=1e-12, atol=1e-12)
        assert torch.all(fwd >= 0)
except ImportError:  # hypothesis is a dev extra; the other tests cover the same functions
    pass


# ----------------------------------------------------------------------------------------------------------------
# parity with TRL 1.16's own loss code (its trainers' _compute_loss, called with a minimal stand-in `self` and a
# stand-in model that returns the chosen per-token log-probs; only the fields those methods read are provided)


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)


def _per_token(logps, width):
    """(B, width) per-token log-probs whose row sums are ``logps`` (the model's output on shifted labels)."""
    out = torch.zeros(logps.shape[0], width, dtype=logps.dtype)
    out[:, 0] = logps
    return out


def trl_dpo(kind, pc, pr, rc, rr, *, beta, eps, lengths):
    trl_dpo_mod = pytest.importorskip("trl.trainer.dpo_trainer")
    from trl.trainer.dpo_config import DPOConfig

    logps = torch.cat([pc, pr])
    rows, width = logps.shape[0], int(lengths.max()) + 1
    completion_mask = (torch.arange(width + 1) >= 1) & (torch.arange(width + 1) <= lengths[:, None])
    outputs = SimpleNamespace(
        log_probs=_per_token(logps, width), entropy=torch.zeros(rows, width),
        mean_logits=torch.zeros(rows, width), is_top1=torch.zeros(rows, width, dtype=torch.bool),
    )
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[kind],
        loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
        args=SimpleNamespace(discopop_tau=DPOConfig.__dataclass_fields__["discopop_tau"].default),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, width + 1, dtype=torch.long), "attention_mask": torch.ones(rows, width + 1),
        "completion_mask": completion_mask.long(), "ref_chosen_logps": rc, "ref_rejected_logps": rr,
    }
    loss = trl_dpo_mod.DPOTrainer._compute_loss(stand_in, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stand_in._metrics["train"].items()}


@pytest.mark.parametrize("kind,eps", [(k, e) for k, e in DPO_CASES if not (k == "sigmoid" and e)])
def test_dpo_matches_trl(kind, eps, seed):
    pairs = 5
    pc, rc = random_logps(pairs)
    pr, rr = random_logps(pairs)
    lengths = torch.randint(1, 9, (2 * pairs,))
    beta = 0.1 if kind != "ipo" else 0.4
    trl_loss, trl_metrics = trl_dpo(kind, pc, pr, rc, rr, beta=beta, eps=eps, lengths=lengths)
    if kind == "ipo":  # TRL averages over completion tokens for ipo; fastkto's math takes what it is given
        n_c, n_r = lengths[:pairs].double(), lengths[pairs:].double()
        ours = L.dpo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta=beta, loss_type=kind)
        rewards = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")  # TRL logs rewards of the sums
    else:
        ours = rewards = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=kind, label_smoothing=eps)
    # exo_pair: TRL takes log(eps) of a float32 tensor, so its loss carries float32 rounding (~1e-7 relative)
    tol = 1e-6 if kind == "exo_pair" else TOL64
    assert float(ours.loss) == pytest.approx(float(trl_loss), rel=tol, abs=tol)
    metrics = rewards.metrics()
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        # TRL averages the accuracy flags in float32
        tol = 1e-7 if name == "rewards/accuracies" else 1e-12
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=tol, abs=tol), name


def test_dpo_cdpo_reduces_to_trl_sigmoid_at_zero(seed):
    """TRL 1.16's sigmoid ignores label_smoothing; fastkto's sigmoid with eps > 0 is conservative DPO, and at eps=0
    equals TRL's (checked in test_dpo_matches_trl)."""
    pc, rc = random_logps(4)
    pr, rr = random_logps(4)
    out = L.dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", label_smoothing=0.2)
    torch.testing.assert_close(out.losses, dpo_formula("sigmoid", pc, pr, rc, rr, 0.1, 0.2), rtol=TOL64, atol=0)


def trl_kto(kind, policy, ref, desirable, kl_policy, kl_ref, *, beta, wd, wu):
    trl_kto_mod = pytest.importorskip("trl.trainer.kto_trainer")
    n = policy.shape[0]
    calculate_kl = kind == "kto"
    input_ids, kl_ids = torch.zeros(n, 2, dtype=torch.long), torch.zeros(n, 2, dtype=torch.long)

    def outputs(logps):
        zeros = torch.zeros(n, 1)
        return SimpleNamespace(log_probs=_per_token(logps, 1), entropy=zeros, mean_logits=zeros)

    by_input = {id(input_ids): outputs(policy), id(kl_ids): outputs(kl_policy)}
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        calculate_KL=calculate_kl, precompute_ref_logps=True, loss_type=kind, beta=beta, desirable_weight=wd,
        undesirable_weight=wu, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    stand_in._compute_kl_logps = lambda model, batch: trl_kto_mod.KTOTrainer._compute_kl_logps(stand_in, model, batch)
    inputs = {
        "input_ids": input_ids, "attention_mask": torch.ones(n, 2), "completion_mask": torch.ones(n, 2),
        "label": desirable, "ref_logps": ref,
    }
    if calculate_kl:
        inputs.update(KL_input_ids=kl_ids, KL_attention_mask=torch.ones(n, 2), KL_completion_mask=torch.ones(n, 2),
                      ref_KL_logps=kl_ref)
    loss = trl_kto_mod.KTOTrainer._compute_loss(
        stand_in, lambda **kw: by_input[id(kw["input_ids"])], inputs, return_outputs=False
    )
    return loss, {k: v[-1] for k, v in stand_in._metrics["train"].items()}


@pytest.mark.parametrize("kind", L.KTO_LOSS_TYPES)
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])  # a positive and a clamped (negative) KL estimate
def test_kto_matches_trl(kind, kl_sign, seed):
    n = 8
    policy, ref = random_logps(n)
    desirable = torch.rand(n) < 0.4
    desirable[0], desirable[1] = True, False
    kl_policy = ref + kl_sign * (1 + torch.rand(n, dtype=torch.float64))
    beta, wd, wu = 0.2, 1.3, 0.8
    trl_loss, trl_metrics = trl_kto(kind, policy, ref, desirable, kl_policy, ref, beta=beta, wd=wd, wu=wu)
    z0 = L.kto_kl(kl_policy, ref) if kind == "kto" else None
    ours = L.kto_loss(policy, ref, desirable, kl=z0, beta=beta, desirable_weight=wd, undesirable_weight=wu,
                      loss_type=kind)
    assert float(ours.loss) == pytest.approx(float(trl_loss), rel=TOL64, abs=TOL64)
    metrics = ours.metrics()
    for name in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-12, abs=1e-12), name


# ----------------------------------------------------------------------------------------------------------------
# layer 2: the modules against the naive pipeline (float64 logits)


def make_batch(rows, steps, dim, vocab, *, prompt=2):
    """float32 hidden (rows, steps, D) and labels with the first ``prompt`` positions and some padding ignored."""
    hidden = torch.randn(rows, steps, dim)
    labels = torch.randint(0, vocab, (rows, steps))
    labels[:, :prompt] = -100
    for i in range(rows):  # right padding of random length, at least one completion token left
        pad = int(torch.randint(0, steps - prompt, ()))
        if pad:
            labels[i, steps - pad:] = -100
    return hidden, labels


@pytest.mark.parametrize("kind", L.KTO_LOSS_TYPES)
def test_kto_module_matches_naive(kind, seed):
    rows, steps, dim, vocab = 6, 8, 16, 40
    opts = dict(temperature=0.9, softcap=20.0)
    hidden, labels = make_batch(rows, steps, dim, vocab)
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden)
    kl_hidden, kl_labels = make_batch(rows, steps, dim, vocab)
    kl_ref_hidden = kl_hidden + 0.3 * torch.randn_like(kl_hidden)
    weight, bias = make_head(vocab, dim, bias=True)
    desirable = torch.tensor([True, False, True, True, False, False])
    hp = dict(beta=0.3, desirable_weight=1.2, undesirable_weight=0.7, loss_type=kind)
    loss_fn = L.KTOLoss(**hp, backend="torch", **opts)

    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    kl_kwargs = dict(kl_hidden=kl_hidden, kl_labels=kl_labels, kl_ref_hidden=kl_ref_hidden) if kind == "kto" else {}
    # the head is trainable, so the reference's (here the head before the step, its values) is passed
    out = loss_fn(h, w, labels, desirable, ref_hidden=ref_hidden, ref_weight=weight, ref_bias=bias, bias=b,
                  **kl_kwargs)
    out.loss.backward()

    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias)
    policy = reference_sequence_logps(h64, w64, labels, bias=b64, **opts)
    ref = reference_sequence_logps(ref_hidden.double(), weight.double(), labels, bias=bias.double(), **opts)
    z0 = 0.0
    if kind == "kto":
        kl_pol = reference_sequence_logps(kl_hidden.double(), weight.double(), kl_labels, bias=bias.double(), **opts)
        kl_ref = reference_sequence_logps(kl_ref_hidden.double(), weight.double(), kl_labels, bias=bias.double(),
                                          **opts)
        z0 = (kl_pol - kl_ref).mean().clamp(min=0)
        torch.testing.assert_close(out.kl.double(), z0, rtol=0, atol=ATOL_MODULE)
    want = kto_formula(kind, policy, ref, desirable, 0.3, z0, 1.2, 0.7)
    want.backward()
    torch.testing.assert_close(out.policy_logps.double(), policy.detach(), rtol=0, atol=ATOL_MODULE)
    torch.testing.assert_close(out.ref_logps.double(), ref, rtol=0, atol=ATOL_MODULE)
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=0, atol=ATOL_MODULE)
    for got, ref_grad in ((h.grad, h64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert_grads_close(got, ref_grad)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "apo_down"])
def test_dpo_module_matches_naive(kind, seed):
    pairs, steps, dim, vocab = 3, 7, 16, 48
    hidden, labels = make_batch(2 * pairs, steps, dim, vocab)
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden)
    weight, _ = make_head(vocab, dim)
    ref_weight = weight + 0.05 * torch.randn_like(weight)
    beta = 0.5 if kind == "ipo" else 0.2
    loss_fn = L.DPOLoss(beta=beta, loss_type=kind, backend="torch")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = loss_fn(h, w, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    out.loss.backward()

    average = kind == "ipo"  # the module length-normalizes for ipo only, as TRL does
    h64, w64 = leaf64(hidden), leaf64(weight)
    policy = reference_sequence_logps(h64, w64, labels, average=average)
    ref = reference_sequence_logps(ref_hidden.double(), ref_weight.double(), labels, average=average)
    want = dpo_formula(kind, policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta).mean()
    want.backward()
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=0, atol=ATOL_MODULE)
    torch.testing.assert_close(out.policy_chosen_logps.double(), policy[:pairs].detach(), rtol=0, atol=ATOL_MODULE)
    torch.testing.assert_close(out.ref_rejected_logps.double(), ref[pairs:], rtol=0, atol=ATOL_MODULE)
    assert_grads_close(h.grad, h64.grad)
    assert_grads_close(w.grad, w64.grad)


def test_dpo_module_precomputed_reference_and_reference_free(seed):
    hidden, labels = make_batch(4, 6, 8, 20)
    weight, _ = make_head(20, 8)
    ref_logps = -10 + torch.randn(4)
    out = L.DPOLoss(backend="torch")(hidden, weight, labels, ref_logps=ref_logps)
    policy = fastkto.sequence_logps(hidden, weight, labels, backend="torch")
    want = L.dpo_loss(policy[:2], policy[2:], ref_logps[:2], ref_logps[2:])
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    free = L.DPOLoss(backend="torch", reference_free=True)(hidden, weight, labels)
    zero = torch.zeros(2)
    torch.testing.assert_close(free.loss, L.dpo_loss(policy[:2], policy[2:], zero, zero).loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reference_free"):
        L.DPOLoss(backend="torch", reference_free=True)(hidden, weight, labels, ref_logps=ref_logps)


def test_reference_and_kl_passes_save_nothing_and_reuse(seed, monkeypatch):
    """Only the policy pass saves tensors for backward; the reference and KL passes add nothing. When the
    reference is the policy's own computation (same hidden states, same head), no second pass runs."""
    rows, steps, dim, vocab = 4, 6, 8, 24
    hidden, labels = make_batch(rows, steps, dim, vocab)
    weight, _ = make_head(vocab, dim)
    desirable = torch.tensor([True, False, False, True])
    loss_fn = L.KTOLoss(backend="torch")

    def saved_count(**kwargs):
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(h, w, labels, desirable, **kwargs).loss.backward()
        return count[0]

    baseline = saved_count(ref_logps=torch.zeros(rows), kl=0.0)
    kl_hidden, kl_labels = make_batch(rows, steps, dim, vocab)
    # inputs that require grad (an unfrozen reference model, say): still nothing saved and no gradient for them
    others = [t.clone().requires_grad_() for t in (hidden + 1, kl_hidden, kl_hidden - 1, weight)]
    with_passes = saved_count(ref_hidden=others[0], kl_hidden=others[1], kl_labels=kl_labels,
                              kl_ref_hidden=others[2], ref_weight=others[3])
    assert with_passes == baseline
    assert all(t.grad is None for t in others)

    calls = []
    real = M._sequence_logps  # the modules' one entry into the primitive
    monkeypatch.setattr(M, "_sequence_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    h = hidden.clone().requires_grad_()
    out = loss_fn(h, weight, labels, desirable, ref_hidden=h, kl_hidden=kl_hidden, kl_labels=kl_labels,
                  kl_ref_hidden=kl_hidden)
    assert len(calls) == 2  # the policy pass and the KL pairs' policy pass; both references reused
    assert torch.all(out.rewards == 0) and float(out.kl) == 0.0
    calls.clear()
    loss_fn(h, weight, labels, desirable, ref_hidden=h.detach(), ref_weight=weight.detach(), kl=0.0)
    assert len(calls) == 1  # detached views of the same tensors are the same computation too
    calls.clear()
    loss_fn(h, weight, labels, desirable, ref_hidden=h, ref_weight=weight + 0, kl=0.0)
    assert len(calls) == 2  # a different head: a second pass


def test_gradients_arrive_through_ordinary_autograd(seed):
    """No gradient is computed inside forward: the weight gets its gradient (and its hooks fire, as DDP's do)
    only during backward."""
    hidden, labels = make_batch(4, 5, 8, 16)
    head = torch.nn.Linear(8, 16, bias=False)
    fired = []
    head.weight.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    out = L.KTOLoss(backend="torch")(hidden.requires_grad_(), head.weight, labels,
                                     torch.tensor([True, False, True, False]), ref_logps=torch.full((4,), -12.0),
                                     kl=0.0)
    assert head.weight.grad is None and not fired
    out.loss.backward()
    assert len(fired) == 1 and torch.equal(fired[0], head.weight.grad) and hidden.grad is not None


@pytest.mark.skipif(not fastkto.logprob.triton_available(), reason="triton is not installed")
@pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_kto_module_triton_backend(seed):
    device = "cuda" if HAS_CUDA else "cpu"
    hidden, labels = make_batch(2, 4, 16, 32)
    kl_hidden, kl_labels = make_batch(2, 4, 16, 32)
    weight, _ = make_head(32, 16)
    hidden, labels, kl_hidden, kl_labels, weight = (t.to(device) for t in (hidden, labels, kl_hidden, kl_labels,
                                                                          weight))
    desirable = torch.tensor([True, False], device=device)
    ref_logps = torch.tensor([-9.0, -11.0], device=device)
    grads = {}
    for backend in ("torch", "triton"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = L.KTOLoss(beta=0.4, backend=backend)(h, w, labels, desirable, ref_logps=ref_logps,
                                                   kl_hidden=kl_hidden, kl_labels=kl_labels,
                                                   kl_ref_logps=ref_logps)
        out.loss.backward()
        grads[backend] = (out.loss.detach(), out.kl, h.grad, w.grad)
    for got, want in zip(grads["triton"], grads["torch"]):  # two float32 paths: float32 rounding apart
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# bad input


def _logps(n=4):
    return torch.zeros(n, dtype=torch.float64)


BAD_MATH = [
    (lambda: L.kto_loss(_logps(4), _logps(3), torch.ones(4, dtype=torch.bool)), ValueError, "ref_logps"),
    (lambda: L.kto_loss(_logps(), _logps(), torch.ones(4)), TypeError, "desirable must be a bool"),
    (lambda: L.kto_loss(_logps(), _logps(), torch.ones(2, 2, dtype=torch.bool)), ValueError, "desirable"),
    (lambda: L.kto_loss(_logps(), _logps(), torch.ones(3, dtype=torch.bool)), ValueError, "desirable"),
    (lambda: L.kto_loss(_logps(), _logps(), torch.ones(4, dtype=torch.bool), beta=0.0), ValueError, "beta"),
    (lambda: L.kto_loss(_logps(), _logps(), torch.ones(4, dtype=torch.bool), beta=-1), ValueError, "beta"),
    (lambda: L.kto_loss(_logps(), _logps(), torch.ones(4, dtype=torch.bool), loss_type="dpo"), ValueError,
     "loss_type"),
    (lambda: L.kto_loss(_logps(), _logps(), torch.ones(4, dtype=torch.bool), desirable_weight=-1), ValueError,
     "desirable_weight"),
    (lambda: L.kto_loss(_logps(), _logps(), torch.ones(4, dtype=torch.bool), kl=torch.ones(2)), ValueError, "kl"),
    (lambda: L.kto_loss(_logps(), _logps(), torch.ones(4, dtype=torch.bool), kl=0.1,
                        loss_type="apo_zero_unpaired"), ValueError, "apo_zero_unpaired"),
    (lambda: L.kto_loss(_logps(0), _logps(0), torch.ones(0, dtype=torch.bool)), ValueError, "empty"),
    (lambda: L.kto_loss(torch.zeros(4, dtype=torch.long), _logps(), torch.ones(4, dtype=torch.bool)), TypeError,
     "policy_logps"),
    (lambda: L.kto_kl(_logps(3), _logps(2)), ValueError, "ref_kl_logps"),
    (lambda: L.kto_kl(_logps(0), _logps(0)), ValueError, "KL pair"),
    (lambda: L.dpo_loss(_logps(3), _logps(2), _logps(3), _logps(3)), ValueError, "policy_rejected_logps"),
    (lambda: L.dpo_loss(_logps(), _logps(), _logps(), _logps(), loss_type="kto"), ValueError, "loss_type"),
    (lambda: L.dpo_loss(_logps(), _logps(), _logps(), _logps(), beta=0), ValueError, "beta"),
    (lambda: L.dpo_loss(_logps(), _logps(), _logps(), _logps(), label_smoothing=0.5), ValueError, "label_smoothing"),
    (lambda: L.dpo_loss(_logps(), _logps(), _logps(), _logps(), label_smoothing=-0.1), ValueError,
     "label_smoothing"),
    (lambda: L.dpo_loss(_logps(), _logps(), _logps(), _logps(), loss_type="hinge", label_smoothing=0.1), ValueError,
     "label_smoothing"),
    (lambda: L.dpo_loss(_logps(), _logps(), _logps(), _logps(), loss_type="exo_pair"), ValueError, "exo_pair"),
    (lambda: L.dpo_loss(_logps(), _logps(), _logps(), _logps(), bco_delta=0.2), ValueError, "bco_delta"),
    (lambda: L.dpo_loss(_logps(), _logps(), _logps(), _logps(), loss_type="discopop", discopop_tau=0), ValueError,
     "discopop_tau"),
]


@pytest.mark.parametrize("call,error,match", BAD_MATH)
def test_math_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_modules_reject_bad_input():
    hidden, labels = make_batch(4, 5, 8, 16)
    weight, _ = make_head(16, 8)
    des = torch.tensor([True, False, True, False])
    kto = L.KTOLoss(backend="torch")
    ref = dict(ref_logps=torch.zeros(4), kl=0.0)
    no_kl = dict(ref_logps=torch.zeros(4))
    cases = [
        (lambda: kto(hidden, weight, labels, des, kl=0.0), ValueError, "reference is missing"),
        (lambda: kto(hidden, weight, labels, des, ref_logps=torch.zeros(3), kl=0.0), ValueError, "ref_logps"),
        (lambda: kto(hidden, weight, labels, des, ref_logps=torch.zeros(4), ref_hidden=hidden, kl=0.0), ValueError,
         "not both"),
        (lambda: kto(hidden, weight, labels, des.float(), **ref), TypeError, "desirable"),
        (lambda: kto(hidden, weight, labels, des[:3], **ref), ValueError, "desirable"),
        (lambda: kto(hidden, weight, labels[:3], des, **ref), ValueError, "labels"),
        (lambda: kto(hidden[0], weight, labels[0], des, **ref), ValueError, "policy_hidden"),
        (lambda: kto(hidden, weight, labels, des, kl_hidden=hidden, **no_kl), ValueError, "kl_labels"),
        (lambda: kto(hidden, weight, labels, des, kl_labels=labels, **ref), ValueError, "without kl_hidden"),
        (lambda: kto(hidden, weight, labels, des, kl_hidden=hidden, kl_labels=labels[:, :3],
                     kl_ref_logps=ref["ref_logps"], **no_kl), ValueError, "kl_labels"),
        (lambda: kto(hidden, weight, labels, des, kl_hidden=hidden, kl_labels=labels, **no_kl), ValueError,
         "kl_ref_logps"),
        (lambda: kto(hidden, weight, labels, des, kl_hidden=hidden, kl_labels=labels, kl=0.1, **no_kl), ValueError,
         "not both"),
        (lambda: L.KTOLoss(backend="torch", loss_type="apo_zero_unpaired")(
            hidden, weight, labels, des, kl_hidden=hidden, kl_labels=labels, **no_kl), ValueError,
         "apo_zero_unpaired"),
        (lambda: L.DPOLoss(backend="torch")(hidden[:3], weight, labels[:3], ref_logps=torch.zeros(3)), ValueError,
         "even batch"),
        (lambda: L.DPOLoss(backend="torch")(hidden, weight, labels), ValueError, "reference is missing"),
        (lambda: L.KTOLoss(beta=0), ValueError, "beta"),
        (lambda: L.KTOLoss(loss_type="sigmoid"), ValueError, "loss_type"),
        (lambda: L.DPOLoss(loss_type="kto"), ValueError, "loss_type"),
        (lambda: L.DPOLoss(label_smoothing=0.7), ValueError, "label_smoothing"),
        (lambda: L.DPOLoss(backend="cuda"), ValueError, "backend"),
        (lambda: L.KTOLoss(temperature=0), ValueError, "temperature"),
        (lambda: L.KTOLoss(average_log_prob=1), TypeError, "average_log_prob"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# ----------------------------------------------------------------------------------------------------------------
# issue 13: silent traps (z0 must be chosen, fully masked rows, errors that name the argument)


def test_kto_without_kl_needs_an_explicit_z0(seed):
    """loss_type='kto' with no KL input used to take z0 = 0 silently (and log kl: 0.0); now z0 is a choice."""
    policy, ref = random_logps(4)
    desirable = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match=r"kl=0\.0"):
        L.kto_loss(policy, ref, desirable)
    explicit = L.kto_loss(policy, ref, desirable, kl=0.0)
    assert float(explicit.kl) == 0.0
    torch.testing.assert_close(explicit.loss, kto_formula("kto", policy, ref, desirable, 0.1, 0.0, 1.0, 1.0),
                               rtol=TOL64, atol=TOL64)
    # apo_zero_unpaired has no z0 at all: nothing to choose
    L.kto_loss(policy, ref, desirable, loss_type="apo_zero_unpaired")

    hidden, labels = make_batch(4, 5, 8, 16)
    weight, _ = make_head(16, 8)
    with pytest.raises(ValueError, match="kl_hidden"):
        L.KTOLoss(backend="torch")(hidden, weight, labels, desirable, ref_logps=torch.zeros(4))
    out = L.KTOLoss(backend="torch")(hidden, weight, labels, desirable, ref_logps=torch.zeros(4), kl=0.0)
    assert float(out.kl) == 0.0


@pytest.mark.parametrize("module", ["kto", "dpo"])
def test_fully_masked_rows_are_refused_by_name(module, seed):
    """A row with no scored token has log-prob 0: it would add a constant (0.5 for KTO) with zero gradient and count
    in the class means. The modules refuse it and name the rows."""
    hidden, labels = make_batch(4, 5, 8, 16)
    weight, _ = make_head(16, 8)
    labels[1] = -100
    labels[3] = -100
    if module == "kto":
        call = lambda h, y: L.KTOLoss(backend="torch")(  # noqa: E731
            h, weight, y, torch.tensor([True, False, True, False]), ref_logps=torch.zeros(h.shape[0]), kl=0.0)
    else:
        call = lambda h, y: L.DPOLoss(backend="torch")(h, weight, y, ref_logps=torch.zeros(h.shape[0]))  # noqa: E731
    with pytest.raises(ValueError, match=r"labels rows \[1, 3\] have no scored token"):
        call(hidden, labels)
    with pytest.raises(ValueError, match="labels rows .* no scored token"):  # T = 0
        call(hidden[:, :0], labels[:, :0])


def test_fully_masked_kl_rows_are_refused(seed):
    hidden, labels = make_batch(4, 5, 8, 16)
    kl_hidden, kl_labels = make_batch(4, 6, 8, 16)
    weight, _ = make_head(16, 8)
    kl_labels[2] = -100
    with pytest.raises(ValueError, match=r"kl_labels rows \[2\] have no scored token"):
        L.KTOLoss(backend="torch")(hidden, weight, labels, torch.tensor([True, False, True, False]),
                                   ref_logps=torch.zeros(4), kl_hidden=kl_hidden, kl_labels=kl_labels,
                                   kl_ref_logps=torch.zeros(4))


def test_errors_name_the_argument(seed):
    hidden, labels = make_batch(4, 5, 8, 16)
    weight, _ = make_head(16, 8)
    des = torch.tensor([True, False, True, False])
    kto = L.KTOLoss(backend="torch")
    # a desirable mask on another device than the log-probs
    with pytest.raises(ValueError, match="desirable is on meta.*policy_logps is on cpu"):
        L.kto_loss(_logps(), _logps(), des.to("meta"), kl=0.0)
    with pytest.raises(ValueError, match="desirable is on meta.*policy_hidden is on cpu"):
        kto(hidden, weight, labels, des.to("meta"), ref_logps=torch.zeros(4), kl=0.0)
    # reference hidden states of another batch or length than the policy's
    with pytest.raises(ValueError, match=r"ref_hidden must have policy_hidden's shape \(4, 5, 8\)"):
        kto(hidden, weight, labels, des, ref_hidden=hidden[:3], kl=0.0)
    with pytest.raises(ValueError, match=r"ref_hidden must have policy_hidden's shape"):
        kto(hidden, weight, labels, des, ref_hidden=hidden[:, :4], kl=0.0)
    kl_hidden, kl_labels = make_batch(4, 6, 8, 16)
    with pytest.raises(ValueError, match=r"kl_ref_hidden must have kl_hidden's shape \(4, 6, 8\)"):
        kto(hidden, weight, labels, des, ref_logps=torch.zeros(4), kl_hidden=kl_hidden, kl_labels=kl_labels,
            kl_ref_hidden=kl_hidden[:, :5])


# ----------------------------------------------------------------------------------------------------------------
# issue 22: the reference head, the names in errors, unshifted labels


def _kto_inputs(rows=4, steps=6, dim=8, vocab=16):
    hidden, labels = make_batch(rows, steps, dim, vocab)
    weight, bias = make_head(vocab, dim, bias=True)
    desirable = torch.tensor([True, False] * (rows // 2))
    return hidden, labels, weight, bias, desirable


def test_trainable_head_requires_the_reference_head(seed):
    """A trainable head (weight.requires_grad) no longer defaults to itself as the reference head: that scored
    the reference with the head being trained, so every reward drifted with it (issue 22: loss 0.457 instead of
    0.104 after 3 steps). A frozen head keeps the default."""
    hidden, labels, weight, bias, des = _kto_inputs()
    kto, dpo = L.KTOLoss(backend="torch"), L.DPOLoss(backend="torch")
    trainable = weight.clone().requires_grad_()
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    for call in (lambda: kto(hidden, trainable, labels, des, ref_hidden=ref_hidden, kl=0.0),
                 lambda: dpo(hidden, trainable, labels, ref_hidden=ref_hidden)):
        with pytest.raises(ValueError, match=r"ref_weight is required: weight requires grad .* pass "
                                             r"ref_weight=ref_model.get_output_embeddings\(\).weight"):
            call()
    # the KL pairs' reference pass too, when the main reference was precomputed
    with pytest.raises(ValueError, match=r"ref_weight is required.*score kl_ref_hidden.*or kl_ref_logps"):
        kto(hidden, trainable, labels, des, ref_logps=torch.zeros(4), kl_hidden=hidden, kl_labels=labels,
            kl_ref_hidden=ref_hidden)
    # a trainable bias needs its reference bias
    with pytest.raises(ValueError, match="ref_bias is required: bias requires grad"):
        kto(hidden, weight, labels, des, ref_hidden=ref_hidden, kl=0.0, bias=bias.clone().requires_grad_(),
            ref_weight=weight)
    # precomputed reference log-probs need no head
    kto(hidden, trainable, labels, des, ref_logps=torch.zeros(4), kl=0.0)
    # with the head given, the trainable policy is scored against it: the reference log-probs use ref_weight
    ref_weight = weight + 0.05 * torch.randn_like(weight)
    out = kto(hidden, trainable, labels, des, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=bias, kl=0.0,
              bias=bias)
    want = reference_sequence_logps(ref_hidden.double(), ref_weight.double(), labels, bias=bias.double())
    torch.testing.assert_close(out.ref_logps.double(), want, rtol=0, atol=ATOL_MODULE)
    # a frozen head may leave the reference head out: it is the policy's, and equals passing it explicitly
    frozen = kto(hidden, weight, labels, des, ref_hidden=ref_hidden, kl=0.0, bias=bias)
    explicit = kto(hidden, weight, labels, des, ref_hidden=ref_hidden, kl=0.0, bias=bias, ref_weight=weight,
                   ref_bias=bias)
    torch.testing.assert_close(frozen.loss, explicit.loss, rtol=0, atol=0)


def test_reference_head_of_another_vocabulary_is_refused(seed):
    hidden, labels, weight, _, des = _kto_inputs()
    for ref_weight in (torch.randn(17, 8), torch.randn(15, 8)):
        with pytest.raises(ValueError, match=r"ref_weight has vocabulary size 1[57] but weight has 16"):
            L.KTOLoss(backend="torch")(hidden, weight, labels, des, ref_hidden=hidden, ref_weight=ref_weight, kl=0.0)
        with pytest.raises(ValueError, match=r"ref_weight has vocabulary size"):
            L.DPOLoss(backend="torch")(hidden, weight, labels, ref_hidden=hidden, ref_weight=ref_weight)


def test_errors_name_the_pass_and_recognize_logits(seed):
    """Errors about the reference and KL passes name ref_hidden / kl_hidden / kl_ref_hidden and ref_weight /
    ref_bias, not the primitive's "hidden"; hidden states whose last dimension is the vocabulary size are called
    what they most likely are, logits."""
    hidden, labels, weight, bias, des = _kto_inputs()
    kto = L.KTOLoss(backend="torch")
    logits = torch.randn(4, 6, 16)
    kl = dict(kl_hidden=hidden, kl_labels=labels, kl_ref_hidden=hidden)
    cases = [
        (lambda: kto(logits, weight, labels, des, ref_logps=torch.zeros(4), kl=0.0), ValueError,
         r"policy_hidden's last dimension is 16, weight's vocabulary size.*look like logits"),
        (lambda: kto(hidden, weight, labels, des, ref_logps=torch.zeros(4), kl_hidden=logits, kl_labels=labels,
                     kl_ref_logps=torch.zeros(4)), ValueError,
         r"kl_hidden's last dimension is 16.*look like logits"),
        (lambda: kto(hidden, weight, labels, des, ref_hidden=hidden, ref_weight=torch.randn(16, 5), kl=0.0),
         ValueError, r"hidden size mismatch: ref_hidden has D=8 but ref_weight has shape \(16, 5\)"),
        (lambda: kto(hidden, weight, labels, des, ref_hidden=hidden.double(), kl=0.0), TypeError,
         "ref_hidden and ref_weight must share a dtype"),
        (lambda: kto(hidden, weight, labels, des, ref_hidden=hidden, **dict(kl, kl_ref_hidden=hidden.bfloat16())),
         TypeError, "kl_ref_hidden and ref_weight must share a dtype"),
        (lambda: kto(hidden, weight, labels, des, ref_hidden=hidden, ref_bias=torch.zeros(15), kl=0.0),
         ValueError, r"ref_bias must have shape \(V,\) = \(16,\)"),
        (lambda: kto(hidden, weight, labels, des, ref_hidden=hidden, **kl, kl_ref_logps=None, bias=bias[:3]),
         ValueError, r"bias must have shape \(V,\) = \(16,\)"),
    ]
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()
    # the primitive says it too
    with pytest.raises(ValueError, match="hidden size mismatch.*look like logits"):
        fastkto.sequence_logps(logits, weight, labels)


def _collated(packed):
    from fastkto.data import KTOCollator

    examples = [{"prompt_ids": [1, 2, 3][: 1 + i % 3], "completion_ids": [4, 5, 6, 7][: 1 + (i * 3) % 4],
                 "label": bool(i % 2)} for i in range(4)]
    return KTOCollator(pad_token_id=0, packed=packed)(examples)


def test_unshifted_labels_are_caught(seed):
    """input_ids passed as labels score every sequence at its last position, which shifted labels never do: the
    losses warn, naming the argument and the fix, padded and packed; the collators' shifted labels do not warn.
    (Issue 22: loss 0.164 instead of 0.104 after 3 steps, silently.)"""
    import warnings

    from fastkto.labels import UnshiftedLabelsWarning

    vocab, dim = 12, 8
    table = torch.randn(vocab, dim)
    weight, _ = make_head(vocab, dim)
    kto, dpo = L.KTOLoss(backend="torch"), L.DPOLoss(backend="torch")
    for packed in (False, True):
        batch = _collated(packed)
        layout = {"cu_seqlens": batch["cu_seqlens"], "kl_cu_seqlens": batch["kl_cu_seqlens"]} if packed else {}
        h, kh = table[batch["input_ids"]], table[batch["kl_input_ids"]]
        good = dict(ref_hidden=h, kl_hidden=kh, kl_labels=batch["kl_labels"], kl_ref_hidden=kh, **layout)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the documented path: no warning
            kto(h, weight, batch["labels"], batch["desirable"], **good)
            dpo(h, weight, batch["labels"], ref_hidden=h, **({"cu_seqlens": batch["cu_seqlens"]} if packed else {}))
        where = "its last token" if packed else r"the last position \(column T - 1\)"
        with pytest.warns(UnshiftedLabelsWarning, match=rf"labels: every sequence is scored at {where}.*"
                                                         r"fastkto.shift_labels\(input_ids, completion_mask\)"):
            kto(h, weight, batch["input_ids"], batch["desirable"], **good)
        with pytest.warns(UnshiftedLabelsWarning, match="kl_labels: every sequence"):
            kto(h, weight, batch["labels"], batch["desirable"], **dict(good, kl_labels=batch["kl_input_ids"]))
        with pytest.warns(UnshiftedLabelsWarning, match="labels: every sequence"):
            dpo(h, weight, batch["input_ids"], ref_hidden=h, **({"cu_seqlens": batch["cu_seqlens"]} if packed else {}))
    # held out: HF-style labels (input_ids, -100 on the prompt) of a left-padded batch
    ids = torch.tensor([[0, 0, 1, 5, 6], [0, 2, 3, 7, 8], [1, 2, 3, 4, 9], [0, 0, 0, 1, 4]])
    hf_labels = ids.masked_fill(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
                                .bool(), -100)
    with pytest.warns(UnshiftedLabelsWarning):
        kto(table[ids], weight, hf_labels, torch.tensor([True, False, True, False]), ref_hidden=table[ids], kl=0.0)


def test_completion_logps_shifts_once_and_refuses_cut_hidden(seed):
    """The entry point that takes what the model read: equal to sequence_logps on shift_labels' labels, and a
    hidden-state tensor cut by hand (hidden[:, :-1]) is refused with the reason."""
    vocab, dim = 12, 8
    weight, _ = make_head(vocab, dim)
    ids = torch.randint(0, vocab, (3, 7))
    completion_mask = torch.arange(7).expand(3, 7) >= torch.tensor([[2], [3], [4]])
    hidden = torch.randn(3, 7, dim)
    got = fastkto.completion_logps(hidden, weight, ids, completion_mask, backend="torch")
    labels = torch.full((3, 7), -100)
    labels[:, :-1] = torch.where(completion_mask[:, 1:], ids[:, 1:], -100)  # the shift, written out here
    want = reference_sequence_logps(hidden.double(), weight.double(), labels)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=ATOL_MODULE)
    with pytest.raises(ValueError, match=r"hidden is one position shorter, cut by hand \(hidden\[:, :-1\]\)"):
        fastkto.completion_logps(hidden[:, :-1], weight, ids, completion_mask)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        fastkto.completion_logps(hidden, weight, ids[0], completion_mask)
