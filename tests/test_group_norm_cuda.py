"""The fused GroupNorm on a GPU: the CUDA kernels (csrc/cuda/group_norm.cu, backend "cpp") and the Triton kernels,
forward and gradients against the float64 reference on the CPU (every dtype, both layouts, add, SiLU, dropout), and
opcheck of both ops of each."""
import pytest
import torch

from ddpm_fast.ops.group_norm import group_norm_silu, group_norm_silu_reference
from ddpm_fast.ops.philox import STREAM_DROPOUT, stream_word
from helpers import relative_error

SEED, LAYER, STEP = 123, 5, 9
STREAM_WORD = stream_word(STREAM_DROPOUT, LAYER)  # as group_norm_silu builds it


def inputs(shape, dtype, seed):
    """x, weight, bias, add, grad_y in `dtype`, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *size: torch.randn(*size, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(*shape), make(shape[1]), make(shape[1]), make(*shape[:2]), make(*shape)


# groups of two or more channels: with one, d/d add is zero and has no relative error
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,groups", [((3, 12, 5, 9), 4), ((2, 64, 16, 16), 32), ((1, 8, 33, 31), 2)], ids=str)
def test_cuda_group_norm_equals_the_float64_reference(shape, groups, dtype, dropout, backend):
    x, w, b, add, dy = inputs(shape, dtype, sum(shape))
    index, counter2 = torch.arange(shape[0]), torch.full((shape[0],), STEP)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for act in (False, True):
        leaves = [t.double().requires_grad_() for t in (x, w, b, add)]
        ref = group_norm_silu_reference(*leaves[:3], groups, 1e-5, leaves[3], act, dropout, index, counter2, SEED,
                                        STREAM_WORD)
        ref.backward(dy.double())
        for layout in (torch.contiguous_format, torch.channels_last):
            on = [x.cuda().contiguous(memory_format=layout)] + [t.cuda() for t in (w, b, add)]
            on = [t.detach().requires_grad_() for t in on]
            y = group_norm_silu(*on[:3], groups, 1e-5, add=on[3], act=act, dropout=dropout, seed=SEED, layer=LAYER,
                                step=STEP, backend=backend)
            assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
            y.backward(dy.cuda())
            where = (act, str(layout))
            assert relative_error(y.detach().cpu(), ref.detach()) < tol, where
            assert torch.equal(y.detach().cpu() == 0, ref.detach() == 0), where  # the same dropout mask
            for name, got, want in zip(("x", "weight", "bias", "add"), on, leaves):
                assert got.grad.dtype == dtype, (name, *where)
                assert relative_error(got.grad.cpu(), want.grad) < tol, (name, *where)


@pytest.mark.gpu
@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_cuda_group_norm_ops_pass_opcheck(suffix):
    from ddpm_fast.ops import group_norm

    group_norm.triton_ops()  # registers the Triton ops
    ops = torch.ops.ddpm_fast
    x, w, b, add, dy = (t.cuda() for t in inputs((2, 8, 5, 5), torch.float32, 1))
    index, counter2 = torch.arange(2, device="cuda"), torch.full((2,), STEP, device="cuda")
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        for a in (add, None):
            fwd = (xx, w, b, a, 4, 1e-5, True, 0.3, index, counter2, SEED, STREAM_WORD)
            torch.library.opcheck(getattr(ops, 'group_norm_silu' + suffix).default, fwd)
            grads = tuple(t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                          else t for t in fwd)
            # the autograd registration too
            torch.library.opcheck(getattr(ops, 'group_norm_silu' + suffix).default, grads)
            _, shift, rstd = getattr(ops, 'group_norm_silu' + suffix)(*fwd)
            torch.library.opcheck(getattr(ops, 'group_norm_silu_backward' + suffix).default,
                                  (dy, xx, w, b, a, shift, rstd, 4, True, 0.3, index, counter2, SEED, STREAM_WORD))
