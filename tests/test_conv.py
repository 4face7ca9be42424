"""The U-Net's convolutions (ops/conv.py): in CPU inference oneDNN with packed weights and the residual add fused,
channels_last out, equal to F.conv2d (+ the add) from either layout; the packed weights rebuilt when the weights
change; autograd, float16 autocast and other dtypes on F.conv2d; not an op of the backend registry (torch's
convolutions whichever backend is chosen); copies and pickles without the packed tensors."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast.ops import use_backend
from ddpm_fast.ops import conv as conv_ops
from ddpm_fast.ops.conv import PackedConv
from helpers import relative_error

pytestmark = pytest.mark.skipif(not conv_ops.MKLDNN, reason="torch was built without oneDNN (mkldnn)")

# (in, out, kernel, stride, padding, input shape): the U-Net's 3x3, its 1x1 shortcut, its stride-2 downsample
# (padded by the caller), an odd spatial size and one input channel (conv_in of a grey-level preset)
CASES = [(8, 16, 3, 1, 1, (3, 8, 7, 5)), (16, 8, 1, 1, 0, (2, 16, 6, 6)), (8, 8, 3, 2, 0, (2, 8, 9, 9)),
         (1, 8, 3, 1, 1, (4, 1, 16, 16))]


def make(cin, cout, kernel, stride, padding, seed=0):
    torch.manual_seed(seed)
    conv = PackedConv(cin, cout, kernel, stride=stride, padding=padding)
    with torch.no_grad():
        conv.bias.normal_()
    return conv


def reference(conv, x, residual=None):
    with torch.no_grad():
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    return y if residual is None else residual + y


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_packed_equals_conv2d_plus_the_add(case, layout, with_residual):
    cin, cout, kernel, stride, padding, shape = case
    conv = make(cin, cout, kernel, stride, padding)
    x = torch.randn(shape).contiguous(memory_format=layout)
    want = reference(conv, x)
    residual = torch.randn(want.shape).contiguous(memory_format=layout) if with_residual else None
    want = reference(conv, x, residual)
    with torch.inference_mode():
        got = conv(x, residual=residual)
    assert len(conv.packed) == 1  # it took the packed path
    assert got.shape == want.shape and relative_error(got, want) < 1e-6
    if residual is None or layout == torch.channels_last:  # whatever x's layout (an NCHW residual: added after)
        assert got.is_contiguous(memory_format=torch.channels_last)
    if with_residual:  # a residual in the other layout: added after, same values
        other = residual.contiguous(
            memory_format=torch.contiguous_format if layout == torch.channels_last else torch.channels_last)
        with torch.inference_mode():
            assert relative_error(conv(x, residual=other), want) < 1e-6


def test_weights_are_packed_once_and_again_after_they_change():
    conv = make(8, 8, 3, 1, 1)
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        conv(x)
        packed = next(iter(conv.packed.values()))
        conv(x)
        assert next(iter(conv.packed.values())) is packed and len(conv.packed) == 1
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # an optimizer step: the version counter moves
    with torch.inference_mode():
        got = conv(x)
    assert relative_error(got, reference(conv, x)) < 1e-6
    conv = conv.double().float()  # new storages
    with torch.inference_mode():
        assert relative_error(conv(x), reference(conv, x)) < 1e-6


def test_autograd_and_other_dtypes_run_conv2d_and_backends_do_not_apply():
    conv = make(8, 8, 3, 1, 1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    residual = torch.randn(2, 8, 6, 6)
    conv(x, residual=residual).square().sum().backward()  # grad enabled: F.conv2d, differentiable
    assert x.grad is not None and conv.weight.grad is not None and not conv.packed
    with torch.inference_mode():
        wide = copy.deepcopy(conv).double()
        assert wide(x.detach().double(), residual=residual.double()).dtype == torch.float64 and not wide.packed
    assert not conv.packed
    with torch.inference_mode():  # the registry's backends are our kernels: the convolution is torch's under each
        for backend in ("reference", "triton"):
            with use_backend(backend):
                assert relative_error(conv(x.detach()), reference(conv, x.detach())) < 1e-6
    assert len(conv.packed) == 1


def test_copies_and_pickles_without_the_packed_tensors():
    conv = make(8, 8, 3, 1, 1)
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        want = conv(x)
    for clone in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert not clone.packed and set(clone.state_dict()) == {"weight", "bias"}
        with torch.inference_mode():
            assert torch.equal(clone(x), want)


def test_a_conv_pickled_when_its_cache_was_named_packed_underscore_loads():
    """A PackedConv pickled before the cache attribute was renamed (_packed -> packed) loads with an empty cache."""
    conv = make(8, 8, 3, 1, 1)
    x = torch.randn(2, 8, 6, 6)
    state = conv.__getstate__()
    state["_packed"] = state.pop("packed")
    old = PackedConv.__new__(PackedConv)
    old.__setstate__(state)
    assert not old.packed and "_packed" not in old.__dict__
    with torch.inference_mode():
        assert torch.equal(old(x), conv(x))


def test_inference_tensor_weights():
    """Weights made inside inference_mode (no version counter) still run, keyed by their storage."""
    with torch.inference_mode():
        conv = make(8, 8, 3, 1, 1)
        x = torch.randn(2, 8, 6, 6)
        assert relative_error(conv(x), reference(conv, x)) < 1e-6


@pytest.mark.parametrize("with_residual", [False, True])
def test_bf16_autocast_and_bf16_models_pack_bf16_weights(with_residual):
    """Under bf16 autocast the packed path runs in bf16 (x cast as autocast would, the weights packed as bf16 once):
    bf16 out, within bf16 rounding of torch's autocast convolution; a bf16 model in bf16 the same. A float32
    residual is added after, with eager's promotion (float32 out)."""
    conv = make(8, 16, 3, 1, 1)
    x = torch.randn(2, 8, 6, 6)
    residual = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last) if with_residual else None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(conv, x, None if residual is None else residual.bfloat16())
        got = conv(x, residual=None if residual is None else residual.bfloat16())
        promoted = conv(x, residual=residual)
    assert len(conv.packed) == 1 and next(iter(conv.packed))[1] == torch.bfloat16
    assert got.dtype == want.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(got, want) < 1e-2  # bf16: 8 bits of mantissa, in the output and in the operands
    assert promoted.dtype == (torch.float32 if with_residual else torch.bfloat16)
    model = copy.deepcopy(conv).bfloat16()
    with torch.inference_mode():
        assert relative_error(model(x.bfloat16()), reference(model, x.bfloat16())) < 1e-2 and model.packed


def test_float16_autocast_gets_torch_convolutions():
    """float16 autocast: not a packed dtype, F.conv2d under autocast (float16 out, as torch's)."""
    conv = make(8, 8, 3, 1, 1)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        assert conv(torch.randn(2, 8, 6, 6)).dtype == torch.float16
    assert not conv.packed
