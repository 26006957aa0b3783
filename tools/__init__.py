"""Developer tooling that is not part of the wheel: ``python -m tools.compile_check`` (the kernels compiled for
sm_80 and sm_90 on a machine without a GPU). Run from the repository root, as ``benchmarks``."""
