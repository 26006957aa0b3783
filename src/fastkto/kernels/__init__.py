"""The primitive's implementations: one contract, one tile loop, three ways to make a tile.

    tiled.py          the backward: one loop over (vocabulary chunk, token chunk) tiles (``backward_loop``), its
                      tile plan and workspace, and the tile iterator the PyTorch forward shares
    torch_chunked.py  a tile maker from PyTorch ops (every device) and the chunked PyTorch forward; the math
    fused_logprob.py  a tile maker as a Triton kernel (CUDA, Triton's interpreter) and the Triton forward
    gemm_epilogue.py  a tile maker from a cuBLAS product and a Triton epilogue, and its forward (opt-in: "cublas")
    cpu_threads.py    CPU worker threads: vocabulary shards, one per thread, for both directions
    stats.py          the token statistics the forward carries along

An implementation is a module that satisfies ``Implementation``; ``IMPLEMENTATIONS`` names them. ``fastkto.logprob``
(``backend=``), ``fastkto.ops`` and the loss modules read that table, never a list of their own, so a new
implementation is one module here plus one line in the table (CONTRIBUTING.md, "A tile maker").
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .tiled import TileMaker

__all__ = ["Implementation", "Registration", "IMPLEMENTATIONS", "available", "load", "name_of", "auto_choice",
           "unavailable_on", "needs_cuda"]


class Implementation(Protocol):
    """What ``fastkto.ops`` calls. ``torch_chunked`` documents the arguments and the math; both directions take
    the scored rows compacted (``rows``) and labels as rows of this weight (a vocabulary shard's, when sharded).

    ``logprob_fwd(hidden, weight, bias, rows, labels, *, softcap, temperature, workspace_bytes, stats)``:
        (row_max, sum_exp, target_logit, *the extra partials of ``stats``), each (M,) float32.
    ``logprob_bwd(hidden, weight, bias, rows, labels, lse, grad, *, softcap, temperature, need_hidden,
    need_weight, need_bias, workspace_bytes, tile, grad_entropy, entropy)``: (grad_hidden (M, D) float32 compact,
    grad_weight, grad_bias), None where not needed: ``tiled.backward_loop`` with ``TILE_MAKER``.
    ``TILE_MAKER``: how the backward's dz tile is made (``tiled.TileMaker``); the memory plans read it too.
    """

    TILE_MAKER: TileMaker

    def logprob_fwd(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    rows: torch.Tensor | None, labels: torch.Tensor, *, softcap: float | None = None,
                    temperature: float = 1.0, workspace_bytes: int | None = None,
                    stats: int = 0) -> tuple[torch.Tensor, ...]: ...

    def logprob_bwd(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    rows: torch.Tensor | None, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, *,
                    softcap: float | None = None, temperature: float = 1.0, need_hidden: bool = True,
                    need_weight: bool = True, need_bias: bool = True, workspace_bytes: int | None = None,
                    tile: tuple[int, int] | None = None, grad_entropy: torch.Tensor | None = None,
                    entropy: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]: ...


@dataclass(frozen=True)
class Registration:
    """One row of ``IMPLEMENTATIONS``.

    ``module``: the module in this package, imported on first use. ``requires``: a package it imports, looked up
    (not imported) before it; without it the implementation is unavailable. ``auto(device, dtype)``: whether
    ``backend="auto"`` picks it for tensors of that device and dtype (the first row that does, in table order,
    wins). ``unavailable(device)``: why it cannot run on that device, or None.
    """

    module: str
    requires: str | None = None
    auto: Callable[[torch.device, torch.dtype], bool] = lambda device, dtype: False
    unavailable: Callable[[torch.device], str | None] = lambda device: None


def _triton_auto(device: torch.device, dtype: torch.dtype) -> bool:
    # bf16 tensor-core dots need sm_80 or newer
    return device.type == "cuda" and not (dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0))


def needs_cuda(name: str, interpreted: bool = False) -> Callable[[torch.device], str | None]:
    """An ``unavailable`` rule for implementation ``name``: CUDA tensors only; with ``interpreted`` also any device
    while Triton's interpreter is on (TRITON_INTERPRET=1 when triton was imported)."""

    def unavailable(device: torch.device) -> str | None:
        if device.type == "cuda":
            return None
        if not interpreted:
            return f"backend={name!r} needs CUDA tensors (got {device.type}). Use backend='torch' or 'auto'."
        from . import fused_logprob  # an import statement, not importlib: Dynamo traces this check

        if fused_logprob.INTERPRET:
            return None
        return (f"backend={name!r} needs CUDA tensors (got {device.type}); on the CPU it runs only under Triton's "
                "interpreter (TRITON_INTERPRET=1 set before triton is imported). Use backend='torch' or 'auto'.")

    return unavailable


# name -> implementation, in the order "auto" tries them (the last accepts every tensor)
IMPLEMENTATIONS: dict[str, Registration] = {
    "triton": Registration("fused_logprob", requires="triton", auto=_triton_auto,
                           unavailable=needs_cuda("triton", interpreted=True)),
    # opt-in until a GPU has timed it against "triton" (benchmarks/results/h200, docs/gpu-roofline.md)
    "cublas": Registration("gemm_epilogue", requires="triton", unavailable=needs_cuda("cublas", interpreted=True)),
    "torch": Registration("torch_chunked", auto=lambda device, dtype: True),
}

_FOUND: dict[str, bool] = {}  # looked up once: Dynamo reads a dict, but cannot trace the import machinery
_LOADED: dict[str, ModuleType] = {}


def available(name: str) -> bool:
    """Whether implementation ``name`` can be imported (its required package is installed)."""
    package = IMPLEMENTATIONS[name].requires
    if package is None:
        return True
    if package not in _FOUND:
        _FOUND[package] = importlib.util.find_spec(package) is not None
    return _FOUND[package]


def load(name: str) -> Implementation:
    """The module of implementation ``name`` (imported on first use)."""
    if name not in _LOADED:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {tuple(IMPLEMENTATIONS)}, got {name!r}")
        _LOADED[name] = importlib.import_module(f"{__name__}.{IMPLEMENTATIONS[name].module}")
    return _LOADED[name]


def name_of(module: ModuleType) -> str:
    """The table's name of an implementation module."""
    short = module.__name__.rsplit(".", 1)[-1]
    for name, reg in IMPLEMENTATIONS.items():
        if reg.module == short:
            return name
    raise ValueError(f"{module.__name__} is not an implementation in fastkto.kernels.IMPLEMENTATIONS")


def auto_choice(device: torch.device, dtype: torch.dtype) -> str:
    """The implementation ``backend="auto"`` means for tensors of ``device`` and ``dtype``."""
    for name, reg in IMPLEMENTATIONS.items():
        if available(name) and reg.auto(device, dtype):
            return name
    raise RuntimeError(f"no implementation in fastkto.kernels.IMPLEMENTATIONS accepts {device.type} {dtype} tensors")


def unavailable_on(name: str, device: torch.device) -> str | None:
    """Why implementation ``name`` cannot run on ``device`` (its package missing, the wrong device), or None."""
    reg = IMPLEMENTATIONS[name]
    if not available(name):
        return (f"backend={name!r} needs the {reg.requires} package; install it or use backend='torch'")
    return reg.unavailable(device)
