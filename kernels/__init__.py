"""Triton kernels of ddpm_fast, installed as ddpm_fast.kernels. Plain functions of tensors and scalars: no model,
schedule or backend logic here (that is ddpm_fast/ops/). Importing needs triton; under TRITON_INTERPRET=1 the
kernels run on CPU tensors (the variable must be set before this package is imported)."""
import os

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the kernels' block sizes differ under the interpreter


def launch(kernel, grid, x):
    """kernel[grid] as the launchers run it: through torch.library.wrap_triton (what torch.compile traces into), on
    x's CUDA device (Triton launches on the current device, which need not be x's: a model on cuda:1 while cuda:0 is
    current). Under TRITON_INTERPRET=1 the interpreted kernel itself on CPU tensors (torch 2.13 lets wrap_triton pass
    it; torch 2.11, the GPU machine's, refuses it)."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    run = kernel[grid] if isinstance(kernel, InterpretedFunction) else torch.library.wrap_triton(kernel)[grid]
    if not x.is_cuda:
        return run

    def on_device(*args, **kwargs):
        with torch.cuda.device(x.device):
            return run(*args, **kwargs)
    return on_device
