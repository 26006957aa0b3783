"""fastkto.reference: the naive head every test, benchmark and example compares with.

Its formulas are checked against the same math written out by hand, element by element, in float64 (the two
differ only by the order of a few float64 operations: 1e-12 is far below anything a test of fastkto resolves);
the "logits" upcast is checked to multiply in the inputs' dtype, since that rounding is what the naive baseline
is meant to carry.
"""

from __future__ import annotations

import pytest
import torch

from fastkto import reference


def test_transform_applies_bias_then_softcap_then_temperature(seed):
    a, b = 20 * torch.randn(5, 11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    got = reference.transform_logits(a, bias=b, softcap=7.0, temperature=0.6)
    torch.testing.assert_close(got, 7.0 * torch.tanh((a + b) / 7.0) / 0.6, rtol=0, atol=1e-12)
    assert reference.transform_logits(a) is a  # neutral arguments skip every step
    assert [name for name, _, _ in reference.LOGIT_TRANSFORMS] == ["bias", "softcap", "temperature"]


def test_logprobs_are_the_log_softmax_at_the_labels_and_zero_where_ignored(seed):
    hidden, weight, bias = torch.randn(2, 6, 8), torch.randn(13, 8), torch.randn(13)
    labels = torch.randint(0, 13, (2, 6))
    labels[0, 2] = labels[1, 5] = -100
    got = reference.logprobs(hidden, weight, labels, bias=bias, softcap=4.0, temperature=1.5)
    assert got.dtype == torch.float64 and got.shape == labels.shape
    for i in range(2):
        for t in range(6):
            z = 4.0 * torch.tanh((hidden[i, t].double() @ weight.double().T + bias.double()) / 4.0) / 1.5
            want = 0.0 if labels[i, t] == -100 else (z[labels[i, t]] - torch.logsumexp(z, 0)).item()
            assert abs(got[i, t].item() - want) < 1e-12
    seq = reference.sequence_logps(hidden, weight, labels, average=True, bias=bias, softcap=4.0, temperature=1.5)
    torch.testing.assert_close(seq, got.sum(-1) / (labels != -100).sum(-1), rtol=0, atol=1e-12)


def test_logits_upcast_chooses_where_the_matmul_rounds(seed):
    hidden, weight = torch.randn(4, 64).bfloat16(), torch.randn(9, 64).bfloat16()
    exact = reference.logits(hidden, weight, dtype=torch.float32)
    naive = reference.logits(hidden, weight, dtype=torch.float32, upcast="logits")
    assert exact.dtype == naive.dtype == torch.float32
    torch.testing.assert_close(exact, hidden.float() @ weight.float().T, rtol=0, atol=0)
    torch.testing.assert_close(naive, (hidden @ weight.T).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="upcast"):
        reference.logits(hidden, weight, upcast="outputs")
