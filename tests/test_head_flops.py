"""The LM head's FLOPs in TRL's trainers with fastkto's head: one pass per call, every requested field from it.

Counted with ``benchmarks.head_flops.HeadFlops``, a dispatch mode that sizes every matrix product inside fastkto's
operators, in units of 2 N D V (N scored tokens through a (V, D) head). Before the token statistics joined the
log-prob pass, the adapter spent 6 units on a KTO policy forward + backward, 9 with an entropy gradient and 3 on a
no-grad call (``benchmarks/results/cpu-2core/head_flops_before_bf34cca.json``).
"""

import pytest
import torch

pytest.importorskip("trl")


def test_adapter_head_costs_one_pass_per_call():
    from benchmarks import head_flops

    calls = head_flops.adapter_calls()
    # 4 = forward, recompute, dH and dW GEMMs; the entropy's gradient joins the same tiles; a no-grad call is one
    # forward. The probe of the fp32-output GEMM (a 2 x 2 product, once per process) may add 16 flops.
    assert calls["policy_fwd_bwd_kto_fields"]["units_2NDV"] == pytest.approx(4.0, abs=1e-3)
    assert calls["policy_fwd_bwd_entropy_grad"]["units_2NDV"] == pytest.approx(4.0, abs=1e-3)
    assert calls["no_grad_call"]["units_2NDV"] == pytest.approx(1.0, abs=1e-3)
    assert calls["no_grad_call"]["operators"] == ["fastkto::token_stats"]


def test_the_counter_sees_products_inside_operators():
    import fastkto
    from benchmarks.head_flops import HeadFlops

    h, w = torch.randn(24, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (24,))
    with HeadFlops() as counter:
        fastkto.fused_logprobs(h, w, y, backend="torch").sum().backward()
    assert counter.flops == pytest.approx(4 * 2 * 24 * 16 * 40, abs=16)
