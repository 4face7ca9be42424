"""The fused attention block: the C++ and Triton ops on folded weights against the paper's block in float64, forward
and every gradient, odd token counts, batch 1, more than one query block, float32 and bfloat16, gradcheck, opcheck,
torch.compile, bad input, the GPU refusal of the C++ op, and the U-Net wired to it (folded weights cached in inference
only). Triton runs under the CPU interpreter here (blocks of 16 queries and keys)."""
import pytest
import torch

import ddpm_fast
from ddpm_fast.ops import BackendUnavailable, use_backend
from ddpm_fast.ops import attention as att
from helpers import relative_error
from test_unet import randomize_

# (shape, groups): 3x5 tokens, batch 1 with one channel per group, 8x8 tokens at C = 64, three samples in one tile
# (12x12), 17x19 = 323 tokens (query blocks of 202 and 121: csrc/cpu/attention.cpp's tiling), one token
CASES = [((2, 8, 3, 5), 4), ((1, 16, 4, 4), 16), ((2, 64, 8, 8), 32), ((3, 32, 12, 12), 8), ((2, 8, 17, 19), 4),
         ((2, 16, 1, 1), 4)]
FUSED = ["cpp", "triton"]
NAMES = ["x", "norm_weight", "norm_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias"]


def inputs(shape, seed):
    """x and the block's parameters, all random (a zero proj_out, as at initialisation, would hide the attention)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    return [torch.randn(shape, generator=g), 1 + 0.3 * torch.randn(c, generator=g), 0.3 * torch.randn(c, generator=g),
            torch.randn(3 * c, c, generator=g) * c ** -0.5, 0.3 * torch.randn(3 * c, generator=g),
            torch.randn(c, c, generator=g) * c ** -0.5, 0.3 * torch.randn(c, generator=g)]


def run(tensors, groups, dtype, backend, grad_y):
    """(output, gradient of every input) of attention_block on copies of `tensors` in `dtype`."""
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in tensors]
    y = att.attention_block(*leaves, groups, 1e-6, backend=backend)
    y.backward(grad_y.to(dtype))
    return y.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("shape,groups", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_fused_equals_the_paper_block(backend, shape, groups, dtype):
    tensors = inputs(shape, 1)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    y_true, grads_true = run(tensors, groups, torch.float64, "reference", grad_y)
    y_same, grads_same = run(tensors, groups, dtype, "reference", grad_y)  # the reference's own error in dtype
    y, grads = run(tensors, groups, dtype, backend, grad_y)
    assert y.dtype == dtype and y.shape == shape

    def limit(same):  # float32 < 1e-5 (1e-4 for gradients, sums over tokens); bfloat16: twice the reference's + 1e-3
        return (1e-5 if dtype == torch.float32 else 2 * same + 1e-3)

    assert relative_error(y, y_true) < limit(relative_error(y_same, y_true))
    for name, got, same, want in zip(NAMES, grads, grads_same, grads_true):
        assert got.dtype == dtype, name
        if name == "qkv_bias":  # the key bias's gradient is zero in exact arithmetic (it cancels in the softmax)
            c = shape[1]
            assert got[c:2 * c].abs().max() < 1e-2 * got.abs().max() + 1e-6
            got, same, want = (torch.cat([t[:c], t[2 * c:]]) for t in (got, same, want))
        if want.abs().max() < 1e-9:  # one token: the attention is the identity and x's norm gets no gradient
            assert got.abs().max() < 1e-5, name
            continue
        bound = 1e-4 if dtype == torch.float32 else 2 * relative_error(same, want) + 1e-2
        assert relative_error(got, want) < bound, (name, relative_error(got, want))


@pytest.mark.parametrize("channels,side", [(64, 9), (128, 9), (256, 7), (512, 5)])
def test_triton_gpu_tiles_equal_the_paper_block(monkeypatch, channels, side):
    """The GPU's launch configurations (tiles of 16-64 queries and keys per head width, as launch_config gives them
    on a GPU), run by the interpreter: more than one query and key block wherever the tile allows."""
    from ddpm_fast.kernels import attention as kernels
    if not kernels.INTERPRETED:
        pytest.skip("the interpreter runs these tiles; on a GPU the other tests run them")
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    assert any(max(kernels.launch_config(channels, k)["BLOCK_M"], kernels.launch_config(channels, k)["BLOCK_N"]) > 16
               for k in ("forward", "backward_query", "backward_key"))
    shape = (2, channels, side, side)
    tensors = inputs(shape, 3)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    y_true, grads_true = run(tensors, 32, torch.float64, "reference", grad_y)
    y, grads = run(tensors, 32, torch.float32, "triton", grad_y)
    assert relative_error(y, y_true) < 1e-5
    for name, got, want in zip(NAMES, grads, grads_true):
        if name != "qkv_bias":  # (its key part is zero in exact arithmetic: see above)
            assert relative_error(got, want) < 1e-4, name


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck_float64(backend):
    tensors = [t.double().requires_grad_() for t in inputs((2, 4, 3, 3), 3)]
    # fast mode (random projections) for the interpreted Triton kernels: the full Jacobian takes ~40 s there
    assert torch.autograd.gradcheck(lambda *a: att.attention_block(*a, 2, 1e-5, backend=backend), tuple(tensors),
                                    fast_mode=backend == "triton")


def test_folded_weights_equal_the_unfolded_block():
    """fold_weights' algebra (module docstring) on the reference itself, in float64: no fused kernel involved."""
    x, nw, nb, wqkv, bqkv, wp, bp = (t.double() for t in inputs((2, 8, 3, 5), 4))
    f = att.fold_weights(wqkv, bqkv, wp, bp)
    h = torch.nn.functional.group_norm(x, 4, nw, nb, 1e-6).flatten(2)  # (B, C, L)
    g = f.score_weight @ h + f.score_bias[:, None]
    p = torch.softmax(g.transpose(1, 2) @ h, dim=-1)  # (B, queries, keys)
    y = x.flatten(2) + f.out_weight @ (h @ p.transpose(1, 2)) + f.out_bias[:, None]
    assert relative_error(y.view(x.shape), att.attention_block_reference(x, nw, nb, wqkv, bqkv, wp, bp, 4, 1e-6)) < 1e-13


def test_no_score_matrix_of_all_queries_is_held():
    """The forward's saved tensors are O(N C L) and O(N L): the scores exist only per query block. At 32x32 tokens
    (L = 1024, C = 8) the (N, L, L) scores would be 32x x's size; the op's outputs stay within 4x of it."""
    x, *params = inputs((2, 8, 32, 32), 4)
    folded = att.fold_weights(*params[2:])
    outputs = torch.ops.ddpm_fast.attention_block(x, params[0], params[1], *folded, 4, 1e-6)
    assert max(t.numel() for t in outputs) <= 4 * x.numel()
    assert relative_error(outputs[0], att.attention_block_reference(x, *params, 4, 1e-6)) < 1e-5


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_opcheck(layout):
    x, nw, nb, *rest = inputs((2, 8, 3, 5), 5)
    folded = att.fold_weights(*rest)
    args = (x.contiguous(memory_format=layout).requires_grad_(), nw, nb, *folded, 4, 1e-6)
    torch.library.opcheck(torch.ops.ddpm_fast.attention_block.default, args)  # the fake's strides too
    out = torch.ops.ddpm_fast.attention_block(*args)
    torch.library.opcheck(torch.ops.ddpm_fast.attention_block_backward.default,
                          (torch.randn_like(x), args[0].detach(), nw, nb, *folded, *out[1:], 4))


@pytest.mark.parametrize("shape,groups", [c for c in CASES if c[0][2] * c[0][3] > 1], ids=str)
def test_cpp_runs_channels_last_in_its_layout(shape, groups):
    """channels_last x (the CPU sampler's layout) runs without a copy to contiguous: y comes back channels_last, and
    y and every gradient equal the contiguous run's."""
    tensors = inputs(shape, 6)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    want_y, want_grads = run(tensors, groups, torch.float32, "cpp", grad_y)
    x = tensors[0].contiguous(memory_format=torch.channels_last).requires_grad_()
    leaves = [x] + [t.clone().requires_grad_() for t in tensors[1:]]
    y = att.attention_block(*leaves, groups, 1e-6, backend="cpp")
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(grad_y)
    assert relative_error(y, want_y) < 1e-5
    for name, leaf, want in zip(NAMES, leaves, want_grads):
        assert relative_error(leaf.grad, want) < 1e-4, name


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph_equals_eager(backend):
    """(Triton on CUDA tensors: the CPU interpreter cannot run under torch.compile.)"""
    device = "cuda" if backend == "triton" else "cpu"
    tensors = [t.to(device) for t in inputs((2, 8, 4, 4), 6)]

    def loss(*a):
        return att.attention_block(*a, 4, 1e-6, backend=backend).square().sum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        value = fn(*leaves)
        value.backward()
        results.append([value] + [leaf.grad for leaf in leaves])
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-5)


def test_bad_input_names_the_reason():
    x, nw, nb, wqkv, bqkv, wp, bp = inputs((2, 8, 3, 3), 7)
    with pytest.raises(ValueError, match=r"qkv_weight must have shape \(24, 8\)"):
        att.attention_block(x, nw, nb, wqkv[:8], bqkv, wp, bp, 4, 1e-6, backend="cpp")
    with pytest.raises(ValueError, match="cannot be split into 3 groups"):
        att.attention_block(x, nw, nb, wqkv, bqkv, wp, bp, 3, 1e-6, backend="cpp")
    with pytest.raises(RuntimeError, match=r"score_weight must have shape \[8, 8\]"):  # the C++ op checks on its own
        torch.ops.ddpm_fast.attention_block(x, nw, nb, wp[:4], bp, wp, bp, 4, 1e-6)
    with pytest.raises(RuntimeError, match="x must have shape \\(N, C, H, W\\)"):
        torch.ops.ddpm_fast.attention_block(x[0], nw, nb, wp, bp, wp, bp, 4, 1e-6)


@pytest.mark.gpu
def test_cpp_backend_on_cuda_is_refused_and_the_default_is_triton():
    tensors = [t.cuda() for t in inputs((2, 8, 3, 3), 8)]
    with pytest.raises(BackendUnavailable, match="runs on CPU tensors only"):
        att.attention_block(*tensors, 4, 1e-6, backend="cpp")
    assert att.ORDER["cuda"][0] == "triton"
    # tf32 products on the GPU: within 1e-3 (kernels/attention.py)
    assert relative_error(att.attention_block(*tensors, 4, 1e-6),
                          att.attention_block_reference(*tensors, 4, 1e-6)) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("shape,groups", [((2, 256, 16, 16), 32), ((2, 512, 8, 8), 32), ((3, 64, 5, 7), 8)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_on_cuda_equals_the_paper_block(shape, groups, dtype):
    """The GPU kernels at the cifar10 preset's head width (256), the 256x256 checkpoints' (512) and an odd token
    count: forward and every gradient against float64, tf32 allowed (2e-3; 16-bit: twice its reference's + 1e-2)."""
    tensors = [t.cuda() for t in inputs(shape, 9)]
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(10)).cuda()
    y_true, grads_true = run(tensors, groups, torch.float64, "reference", grad_y)
    y_same, grads_same = run(tensors, groups, dtype, "reference", grad_y)
    y, grads = run(tensors, groups, dtype, "triton", grad_y)
    low = dtype != torch.float32
    assert relative_error(y, y_true) < (2 * relative_error(y_same, y_true) + 1e-2 if low else 2e-3)
    for name, got, same, want in zip(NAMES, grads, grads_same, grads_true):
        if name == "qkv_bias":
            c = shape[1]
            got, same, want = (torch.cat([t[:c], t[2 * c:]]) for t in (got, same, want))
        bound = 2 * relative_error(same, want) + 1e-2 if low else 2e-3
        assert relative_error(got, want) < bound, (name, relative_error(got, want))


# ---------------------------------------------------------------------------------------------------- the U-Net
def tiny_net(seed):
    return randomize_(ddpm_fast.UNet(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                     attn_resolutions=(4,), dropout=0.0, num_groups=4), seed=seed)


@pytest.mark.parametrize("backend", FUSED)
def test_unet_with_the_fused_block_equals_the_reference_block(backend):
    net = tiny_net(4).train()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 500, 999])
    results = {}
    for name in ["reference", backend]:
        net.zero_grad()
        with use_backend(name):
            out = net(x, t)
            out.square().mean().backward()
        results[name] = (out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()})
    (ref_out, ref_grads), (out, grads) = results["reference"], results[backend]
    assert relative_error(out, ref_out) < 1e-5
    for name, grad in grads.items():
        if ref_grads[name].abs().max() > 1e-8:  # (the key biases: zero in exact arithmetic)
            assert relative_error(grad, ref_grads[name]) < 1e-4, name


def test_unet_folds_once_in_inference_and_on_every_call_in_training():
    net = tiny_net(5).eval()
    blocks = [m for m in net.modules() if isinstance(m, ddpm_fast.unet.AttnBlock)]
    block, n = blocks[0], len(blocks)  # the down path's, the middle's and the up path's
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    calls = []
    original = att.fold_weights

    def counting(*args):
        calls.append(1)
        return original(*args)

    att.fold_weights = counting
    try:
        with torch.inference_mode():
            first = net(x, t)
            net(x, t)
        assert len(calls) == n  # cached
        with torch.no_grad():
            block.q.weight.mul_(1.5)  # an in-place change: the cache must notice
            changed = net(x, t)
        assert len(calls) == n + 1 and relative_error(changed, first) > 1e-4  # that block refolded
        with use_backend("reference"):
            assert relative_error(net(x, t), changed) < 1e-5
        net.train()
        net(x, t).sum().backward()
        net(x, t).sum().backward()
        assert len(calls) == 3 * n + 1  # training: folded on every call, inside autograd
        assert block.q.weight.grad is not None and block.q.weight.grad.abs().max() > 0
    finally:
        att.fold_weights = original
