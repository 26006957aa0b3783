"""Bad input to the primitive: a clear ValueError / TypeError naming the argument, never a wrong number or a crash
inside a kernel."""

import pytest
import torch

import fastkto

H = torch.randn(2, 5, 8)
W = torch.randn(30, 8)
Y = torch.randint(0, 30, (2, 5))


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(weight=torch.randn(30, 9)), ValueError, "hidden size mismatch"),
        (dict(hidden=torch.randn(2, 5, 30)), ValueError, r"hidden size mismatch.*equals the vocabulary size V: these "
                                                          r"look like logits"),
        (dict(weight=torch.randn(30)), ValueError, "weight must have shape"),
        (dict(labels=torch.randint(0, 30, (2, 4))), ValueError, "labels must have hidden's leading shape"),
        (dict(labels=torch.rand(2, 5)), TypeError, "labels must be an integer"),
        (dict(labels=torch.ones(2, 5, dtype=torch.bool)), TypeError, "labels must be an integer"),
        (dict(labels=torch.full((2, 5), 30)), ValueError, r"labels must be in \[0, 30\)"),
        (dict(labels=torch.full((2, 5), -3)), ValueError, r"labels must be in \[0, 30\)"),
        (dict(hidden=H.long()), TypeError, "hidden must be float32"),
        (dict(weight=W.double()), TypeError, "weight must be float32"),
        (dict(hidden=H.double(), weight=W.double()), TypeError, "hidden must be float32"),
        (dict(weight=W.bfloat16()), TypeError, "hidden and weight must share a dtype"),
        (dict(hidden=H.numpy()), TypeError, "hidden must be a torch.Tensor"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-30.0), ValueError, "softcap"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(bias=torch.randn(29)), ValueError, "bias must have shape"),
        (dict(bias=torch.randn(30).double()), TypeError, "bias must have weight's dtype"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
        (dict(workspace_bytes=0), ValueError, "workspace_bytes"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, exc, pattern):
    args = dict(hidden=H, weight=W, labels=Y)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        args.setdefault("backend", "torch")
        fastkto.fused_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_devices_must_match():
    meta_w = torch.empty(30, 8, device="meta")
    with pytest.raises(ValueError, match="one device"):
        fastkto.fused_logprobs(H, meta_w, Y)


def test_sequence_logps_needs_a_sequence_dim():
    with pytest.raises(ValueError, match="sequence dimension"):
        fastkto.sequence_logps(H[0, 0], W, Y[0, 0])
    with pytest.raises(TypeError, match="average must be a bool"):
        fastkto.sequence_logps(H, W, Y, average=1)


def test_ignored_positions_may_hold_any_label_value():
    # labels outside [0, V) are fine where they equal ignore_index, and only there
    labels = Y.clone()
    labels[0, 0] = -100
    out = fastkto.fused_logprobs(H, W, labels, backend="torch")
    assert out[0, 0] == 0 and torch.isfinite(out).all()


def test_meta_tensors_are_named():
    """Inputs that all live on the meta device used to fail inside autocast ("unknown device type")."""
    with pytest.raises(ValueError, match="meta device"):
        fastkto.fused_logprobs(H.to("meta"), W.to("meta"), Y.to("meta"))


def test_mixed_precision_error_suggests_autocast_or_a_cast():
    with pytest.raises(TypeError, match=r"torch\.autocast.*or cast"):
        fastkto.fused_logprobs(H.bfloat16(), W, Y, backend="torch")
