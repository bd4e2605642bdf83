"""Triton kernels of dbc_fast (installed as ``dbc_fast.kernels``).

``masked_pool`` and ``contrastive`` each hold the Triton kernels, their Python wrappers and their registration
as torch.library custom ops (``dbc_fast::triton_*``) with fake kernels and autograd. Importing them needs triton;
the ops run on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before
import). Use them through ``dbc_fast.ops`` with ``backend="triton"``.
"""
