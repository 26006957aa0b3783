"""The two implementations of the primitive, with one contract (see ``torch_chunked.py``):

- ``torch_chunked``: chunked PyTorch, every device; always importable.
- ``fused_logprob``: Triton kernels for CUDA (and Triton's interpreter); imported only when used.
"""
