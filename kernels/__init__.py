"""Triton kernels of ddpm_fast, installed as ddpm_fast.kernels. Plain functions of tensors and scalars: no model,
schedule or backend logic here (that is ddpm_fast/ops/). Importing needs triton; under TRITON_INTERPRET=1 the
kernels run on CPU tensors (the variable must be set before this package is imported)."""


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel) for a @triton.jit kernel (what torch.compile traces into); under
    TRITON_INTERPRET=1 the interpreted kernel itself, launched eagerly: torch 2.13 does this itself, torch 2.11 (the
    GPU machine's) refuses an interpreted kernel."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    return kernel if isinstance(kernel, InterpretedFunction) else torch.library.wrap_triton(kernel)
