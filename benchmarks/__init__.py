"""Benchmarks of fastkto against the naive implementation and the peers (TRL, Liger-Kernel, Cut Cross-Entropy).

The main job is ``python -m benchmarks.run`` (see benchmarks/README.md); ``benchmarks.memory_model`` prints the
loss-head memory of 30B-class models; ``benchmarks/gpu_check.sh OUTDIR`` is the whole check on a CUDA machine.
"""
