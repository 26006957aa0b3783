"""Float64 references that materialize the logits: what every fastkto path is checked against."""

from __future__ import annotations

import torch

from fastkto import reference


def reference_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None):
    """log_softmax(z)[label] in float64 through the full logits; 0 where label == ignore_index
    (``fastkto.reference.logprobs`` in float64).

    Differentiable: call it on float64 leaf copies to get reference gradients from autograd.
    """
    return reference.logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                              softcap=softcap, dtype=torch.float64)


def reference_sequence_logps(hidden, weight, labels, *, average=False, ignore_index=-100, **kw):
    return reference.sequence_logps(hidden, weight, labels, average=average, ignore_index=ignore_index,
                                    dtype=torch.float64, **kw)


def leaf64(t):
    """A float64 leaf copy of t that requires grad (None stays None)."""
    return None if t is None else t.detach().double().requires_grad_(True)


def dz_rounding_amplification(hidden, weight, labels, upstream, *, bias=None, ignore_index=-100, temperature=1.0,
                              softcap=None):
    """How much rounding the logits' gradient dz (elementwise, relative u) can move each gradient, relative to
    that gradient's largest element: {"hidden": max|dz| @ |W| / max|dH|, "weight": ..., "bias": ...} in float64.

    A path that rounds dz to a 16-bit dtype before the GEMMs (as tensor-core kernels do) has a scaled gradient
    error up to u times this, beyond the output's own rounding; it is large where the gradient cancels (two
    likely tokens with close weight rows), which random inputs produce now and then.
    """
    h, w = hidden.detach().double(), weight.detach().double()
    a = (h @ w.T + (0 if bias is None else bias.detach().double())).requires_grad_()
    z = reference.transform_logits(a, softcap=softcap, temperature=temperature)
    logp = reference.label_logprobs(z, labels, ignore_index=ignore_index)
    (logp * upstream.double()).sum().backward()
    dz = a.grad.abs().reshape(-1, a.shape[-1])
    hh = h.abs().reshape(-1, h.shape[-1])
    dh, dw, db = a.grad.reshape(-1, a.shape[-1]) @ w, a.grad.reshape(-1, a.shape[-1]).T @ h.reshape(-1, h.shape[-1]), \
        a.grad.reshape(-1, a.shape[-1]).sum(0)
    return {"hidden": ((dz @ w.abs()).max() / dh.abs().max()).item(),
            "weight": ((dz.T @ hh).max() / dw.abs().max()).item(),
            "bias": (dz.sum(0).max() / db.abs().max()).item()}


def make_head(vocab, dim, *, bias=False):
    """A random (vocab, dim) float32 head weight scaled to O(1) logits, and a (vocab,) bias or None."""
    weight = torch.randn(vocab, dim) * (2.0 / dim**0.5)
    return weight, (0.5 * torch.randn(vocab) if bias else None)


GRAD_TOL = 1e-4  # float32 rounding of accumulated sums, relative to the largest reference entry


def assert_grads_close(got, want, tol=GRAD_TOL):
    """max |got - want| <= tol * max |want|: a float32 gradient against its float64 reference."""
    scale = want.abs().max().clamp(min=1e-30)
    err = ((got.double() - want) / scale).abs().max()
    assert err < tol, f"scaled gradient error {float(err):.3g}"
