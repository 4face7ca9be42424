"""Triton kernels of ddpm_fast, installed as ddpm_fast.kernels. Plain functions of tensors and scalars: no model,
schedule or backend logic here (that is ddpm_fast/ops/). Importing needs triton; under TRITON_INTERPRET=1 the
kernels run on CPU tensors (the variable must be set before this package is imported)."""
