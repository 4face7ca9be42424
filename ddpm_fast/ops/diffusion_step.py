"""The fused per-step ops of diffusion: forward noising, L_simple (with its backward) and the reverse step.

Each op reads one row of a coefficient table per sample (coef[t[b]]), so the kernels know nothing of schedules;
ddpm_fast/diffusion.py builds the tables (float64 math, stored in the accumulation dtype). Noise is drawn inside the
kernels from Philox (docs/design.md, "Random numbers"): counter (e // 4, sample_index[b], step[b], stream | layer << 8)
for the sample's logical element e, so it equals `philox.randn` of the same keys on every backend and layout.

Dtypes: inputs float32, bfloat16, float16 or float64; the accumulation and output dtype is float32 (float64 for
float64 inputs); the reverse step's state x_t is float32 (or float64), its eps any of the four.
"""
from __future__ import annotations

import torch

from ddpm_fast import checks
from ddpm_fast.kernels.layout import acc_dtype, runnable
from ddpm_fast.ops import philox, registry
from ddpm_fast.ops.philox import STREAM_REVERSE, STREAM_TRAIN_EPS, philox_normal_reference

IMPLEMENTED = ("reference", "cpp", "triton")
Q_SAMPLE_COLUMNS = 2  # sqrt(abar), sqrt(1 - abar)
STEP_COLUMNS = 5  # a = sqrt(1/abar), b = sqrt(1/abar - 1), c_x0, c_xt, sigma
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------- references
def per_sample(values: torch.Tensor, like_x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against like_x."""
    return values.view(-1, *([1] * (like_x.dim() - 1)))


def _reference_noise(x: torch.Tensor, sample_index, step, seed: int, stream_word: int) -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty_like(x, dtype=torch.float32)
    return philox_normal_reference(sample_index, step, seed, stream_word, x.numel() // x.shape[0]).view(x.shape)


def q_sample_reference(x0, t, coef, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, in the accumulation dtype."""
    acc = acc_dtype(x0.dtype)
    row = coef[t]
    return per_sample(row[:, 0], x0) * x0.to(acc) + per_sample(row[:, 1], x0) * noise.to(acc)


def q_sample_philox_reference(x0, t, coef, sample_index, step, seed, stream_word):
    eps = _reference_noise(x0, sample_index, step, seed, stream_word).to(acc_dtype(x0.dtype))
    return q_sample_reference(x0, t, coef, eps), eps


def simple_loss_reference(eps_pred, eps):
    """mean over each sample of (eps_pred - eps)^2: (B,)."""
    acc = acc_dtype(eps_pred.dtype)
    return ((eps_pred.to(acc) - eps.to(acc)) ** 2).flatten(1).mean(1)


def reverse_step_reference(x_t, eps, t, coef, sample_index, step, seed, stream_word, clip, write_x0, nonfinite_t=None):
    """x0_hat = a x_t - b eps (clipped to [-1, 1] if clip); x_{t-1} = c_x0 x0_hat + c_xt x_t + sigma z, with z from
    Philox and no noise where t == 0 (or sigma == 0); nonfinite_t, if given, becomes the largest of itself and the
    t of every sample whose x_{t-1} is not all finite."""
    a, b, coef_x0, coef_xt, sigma = (per_sample(column, x_t) for column in coef[t].unbind(1))
    x0_hat = a * x_t - b * eps.to(x_t.dtype)
    if clip:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    z = _reference_noise(x_t, sample_index, step, seed, stream_word).to(x_t.dtype)
    noisy = per_sample((t != 0) & (coef[t, 4] != 0), x_t)
    x_prev = coef_x0 * x0_hat + coef_xt * x_t + torch.where(noisy, sigma, torch.zeros_like(sigma)) * z
    if nonfinite_t is not None and x_prev.numel():
        bad = ~torch.isfinite(x_prev.flatten(1)).all(1)
        nonfinite_t.copy_(torch.maximum(nonfinite_t, torch.where(bad, t, -1).max()))
    return x_prev, (x0_hat if write_x0 else x_t.new_empty(0))


# ---------------------------------------------------------------------------------------------------- triton
def _register_triton_ops():
    """The Triton kernels as ops of their own (ddpm_fast::*_triton), so torch.compile traces into them."""
    from ddpm_fast.kernels import diffusion_step as kernels

    @torch.library.triton_op("ddpm_fast::q_sample_triton", mutates_args=())
    def q_sample_triton(x0: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return kernels.q_sample(x0, t, coef, noise)

    @torch.library.triton_op("ddpm_fast::q_sample_philox_triton", mutates_args=())
    def q_sample_philox_triton(x0: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, sample_index: torch.Tensor,
                               step: torch.Tensor, seed: int, stream_word: int) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.q_sample_philox(x0, t, coef, sample_index, step, seed, stream_word)

    @torch.library.triton_op("ddpm_fast::simple_loss_triton", mutates_args=())
    def simple_loss_triton(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return kernels.simple_loss(eps_pred, eps)

    @torch.library.triton_op("ddpm_fast::simple_loss_backward_triton", mutates_args=())
    def simple_loss_backward_triton(grad: torch.Tensor, eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return kernels.simple_loss_backward(grad, eps_pred, eps)

    @torch.library.triton_op("ddpm_fast::reverse_step_triton", mutates_args=("nonfinite_t",))
    def reverse_step_triton(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, coef: torch.Tensor,
                            sample_index: torch.Tensor, step: torch.Tensor, seed: int, stream_word: int, clip: bool,
                            write_x0: bool, nonfinite_t: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.reverse_step(x_t, eps, t, coef, sample_index, step, seed, stream_word, clip, write_x0,
                                    nonfinite_t)

    ops = {"q_sample": q_sample_triton, "q_sample_philox": q_sample_philox_triton, "simple_loss": simple_loss_triton,
           "simple_loss_backward": simple_loss_backward_triton, "reverse_step": reverse_step_triton}
    _register_autograd(ops, simple_loss_backward_triton)
    return ops


_triton_ops = None


def triton_ops() -> dict:
    """The Triton ops, registered with torch.library on first use (triton is imported only then)."""
    global _triton_ops
    if _triton_ops is None:
        _triton_ops = _register_triton_ops()
    return _triton_ops


def _cpp() -> dict:
    # only called once choose() picked "cpp", so _C is loaded; no availability check here, which Dynamo cannot trace
    ops = torch.ops.ddpm_fast
    return {name: getattr(ops, name) for name in
            ("q_sample", "q_sample_philox", "simple_loss", "simple_loss_backward", "reverse_step")}


# ---------------------------------------------------------------------------------------------------- autograd
def _register_autograd(ops: dict, loss_backward_op) -> None:
    """Gradients of the noising (for x0 and the given noise) and of L_simple (for eps_pred, eps) through the same
    backend's kernels. The reverse step is for sampling and has none."""

    def q_sample_setup(ctx, inputs, output):
        x0, t, coef = inputs[:3]
        ctx.save_for_backward(t, coef)
        ctx.dtypes = (x0.dtype, inputs[3].dtype if len(inputs) == 4 else None)

    def q_sample_backward(ctx, grad):
        t, coef = ctx.saved_tensors
        row = coef[t]
        grad_x0 = (grad * per_sample(row[:, 0], grad)).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_noise = None
        if ctx.dtypes[1] is not None and ctx.needs_input_grad[3]:
            grad_noise = (grad * per_sample(row[:, 1], grad)).to(ctx.dtypes[1])
        return grad_x0, None, None, grad_noise

    def q_sample_philox_backward(ctx, grad, _grad_eps):
        return q_sample_backward(ctx, grad)[:3] + (None, None, None, None)

    def loss_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def loss_backward(ctx, grad):
        eps_pred, eps = ctx.saved_tensors
        grad_pred = loss_backward_op(grad.contiguous(), eps_pred, eps)
        grad_eps = (-grad_pred).to(eps.dtype) if ctx.needs_input_grad[1] else None
        return grad_pred if ctx.needs_input_grad[0] else None, grad_eps

    torch.library.register_autograd(ops["q_sample"], q_sample_backward, setup_context=q_sample_setup)
    torch.library.register_autograd(ops["q_sample_philox"], q_sample_philox_backward, setup_context=q_sample_setup)
    torch.library.register_autograd(ops["simple_loss"], loss_backward, setup_context=loss_setup)


# ---------------------------------------------------------------------------------------------------- fake impls
def _register_cpp_extras() -> None:
    """Fake (meta) impls and autograd of the C++ ops (only when _C is loaded)."""
    if registry.cpp_module()[0] is None:
        return

    def out_like(x, dtype=None):
        return torch.empty_like(runnable(x), dtype=dtype)

    @torch.library.register_fake("ddpm_fast::q_sample")
    def _(x0, t, coef, noise):
        return out_like(x0, acc_dtype(x0.dtype))

    @torch.library.register_fake("ddpm_fast::q_sample_philox")
    def _(x0, t, coef, sample_index, step, seed, stream_word):
        return out_like(x0, acc_dtype(x0.dtype)), out_like(x0, acc_dtype(x0.dtype))

    @torch.library.register_fake("ddpm_fast::simple_loss")
    def _(eps_pred, eps):
        return eps_pred.new_empty((eps_pred.shape[0],), dtype=acc_dtype(eps_pred.dtype))

    @torch.library.register_fake("ddpm_fast::simple_loss_backward")
    def _(grad, eps_pred, eps):
        return out_like(eps_pred)

    @torch.library.register_fake("ddpm_fast::reverse_step")
    def _(x_t, eps, t, coef, sample_index, step, seed, stream_word, clip, write_x0, nonfinite_t=None):
        return out_like(x_t), (out_like(x_t) if write_x0 else x_t.new_empty(0))

    _register_autograd({name: f"ddpm_fast::{name}" for name in ("q_sample", "q_sample_philox", "simple_loss")},
                       torch.ops.ddpm_fast.simple_loss_backward)


_register_cpp_extras()


# ---------------------------------------------------------------------------------------------------- checks
def _check_data(op: str, name: str, x, dtypes=_FLOATS) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype not in dtypes or x.dim() < 1:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} must be a ({allowed}) tensor of shape (B, ...), got {checks.describe(x)}")
    return x


def _check_match(op: str, name: str, y, x: torch.Tensor, x_name: str) -> torch.Tensor:
    _check_data(op, name, y)
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"{op}: {name} must have the shape and device of {x_name} ({tuple(x.shape)} on {x.device}), "
                         f"got {checks.describe(y)}")
    return y


def _check_vector(op: str, name: str, v, x: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    if not isinstance(v, torch.Tensor) or v.dtype != torch.int64 or v.shape != (batch,) or v.device != x.device:
        raise ValueError(f"{op}: {name} must be an int64 tensor of shape ({batch},) on {x.device}, "
                         f"got {checks.describe(v)}")
    return v


def _check_table(op: str, coef, columns: int, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(coef, torch.Tensor) or coef.dim() != 2 or coef.shape[1] != columns or coef.shape[0] < 1 \
            or coef.dtype != dtype or coef.device != x.device:
        raise ValueError(f"{op}: coef must be a {dtype} table of shape (T, {columns}) on {x.device}, "
                         f"got {checks.describe(coef)}")
    return coef


# ---------------------------------------------------------------------------------------------------- public
def q_sample(x0: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, noise: torch.Tensor, *,
             backend: str | None = None) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise in one pass (differentiable for x0 and noise).

    :param x0, noise: (B, ...) of one float dtype. :param t: (B,) int64, rows of coef.
    :param coef: (T, 2) [sqrt(abar), sqrt(1 - abar)] in float32 (float64 for float64 x0).
    :return: x_t (B, ...) float32 (float64 for float64 x0).
    """
    _check_data("q_sample", "x0", x0)
    _check_match("q_sample", "noise", noise, x0, "x0")
    if noise.dtype != x0.dtype:
        raise ValueError(f"q_sample: noise must have x0's dtype {x0.dtype}, got {noise.dtype}")
    _check_vector("q_sample", "t", t, x0)
    _check_table("q_sample", coef, Q_SAMPLE_COLUMNS, acc_dtype(x0.dtype), x0)
    chosen = registry.choose("q_sample", x0.device, IMPLEMENTED, backend)
    if chosen == "reference":
        return q_sample_reference(x0, t, coef, noise)
    return (_cpp() if chosen == "cpp" else triton_ops())["q_sample"](x0, t, coef, noise)


def q_sample_philox(x0: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, sample_index: torch.Tensor,
                    step: torch.Tensor, *, seed: int, stream: int = STREAM_TRAIN_EPS,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q_sample with eps drawn in the same pass: eps[b] = philox.randn(sample_index[b], step[b], stream).

    :param sample_index, step: (B,) int64 counter words c1, c2 (taken mod 2^32).
    :return: (x_t, eps), both float32 (float64 for float64 x0); x_t differentiable for x0.
    """
    _check_data("q_sample_philox", "x0", x0)
    _check_vector("q_sample_philox", "t", t, x0)
    _check_table("q_sample_philox", coef, Q_SAMPLE_COLUMNS, acc_dtype(x0.dtype), x0)
    _check_vector("q_sample_philox", "sample_index", sample_index, x0)
    _check_vector("q_sample_philox", "step", step, x0)
    seed, word = checks.seed(seed), philox.stream_word(stream)
    chosen = registry.choose("q_sample_philox", x0.device, IMPLEMENTED, backend)
    if chosen == "reference":
        return q_sample_philox_reference(x0, t, coef, sample_index, step, seed, word)
    return (_cpp() if chosen == "cpp" else triton_ops())["q_sample_philox"](x0, t, coef, sample_index, step, seed,
                                                                          word)


def simple_loss(eps_pred: torch.Tensor, eps: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """L_simple per sample: the mean over each sample of (eps_pred - eps)^2, differentiable for eps_pred and eps.

    :param eps_pred, eps: (B, ...) float tensors of one shape (dtypes may differ, e.g. bf16 prediction, float32 eps).
    :return: (B,) float32 (float64 for float64 eps_pred).
    """
    _check_data("simple_loss", "eps_pred", eps_pred)
    _check_match("simple_loss", "eps", eps, eps_pred, "eps_pred")
    if eps_pred.numel() == 0 and eps_pred.shape[0] > 0:
        raise ValueError(f"simple_loss: samples must have at least one element, got shape {tuple(eps_pred.shape)}")
    chosen = registry.choose("simple_loss", eps_pred.device, IMPLEMENTED, backend)
    if chosen == "reference":
        return simple_loss_reference(eps_pred, eps)
    return (_cpp() if chosen == "cpp" else triton_ops())["simple_loss"](eps_pred, eps)


def reverse_step(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, coef: torch.Tensor,
                 sample_index: torch.Tensor, step: torch.Tensor, *, seed: int, clip: bool = True,
                 write_x0: bool = False, stream: int = STREAM_REVERSE, nonfinite_t: torch.Tensor | None = None,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One reverse step x_t -> x_{t-1} in one pass, its noise drawn inside (DDPM or DDIM, by the table's rows).

    :param x_t: (B, ...) float32 (float64 on CPU for checks): the sampler's state.
    :param eps: (B, ...) the model's prediction, any float dtype.
    :param t: (B,) int64 rows of coef. :param coef: (T, 5) [a, b, c_x0, c_xt, sigma] in x_t's dtype
        (Diffusion.step_table builds it); x0_hat = a x_t - b eps, x_{t-1} = c_x0 x0_hat + c_xt x_t + sigma z.
    :param sample_index, step: (B,) int64 counter words of z (the global sample index, the original timestep).
    :param clip: clip x0_hat to [-1, 1]. :param write_x0: also return x0_hat.
    :param nonfinite_t: a 0-d int64 tensor on x_t's device, or None: set in the same pass to the largest of itself
        and the t of every sample whose x_{t-1} holds a NaN or inf (the sampler's flag: start it at -1; set by the
        step itself, no pass over memory of its own, no host sync).
    :return: (x_{t-1}, x0_hat or None), in x_t's dtype and layout.
    """
    op = "reverse_step"
    _check_data(op, "x_t", x_t, (torch.float32, torch.float64))
    _check_match(op, "eps", eps, x_t, "x_t")
    _check_vector(op, "t", t, x_t)
    _check_table(op, coef, STEP_COLUMNS, x_t.dtype, x_t)
    _check_vector(op, "sample_index", sample_index, x_t)
    _check_vector(op, "step", step, x_t)
    if nonfinite_t is not None and (not isinstance(nonfinite_t, torch.Tensor) or nonfinite_t.dtype != torch.int64
                                    or nonfinite_t.dim() != 0 or nonfinite_t.device != x_t.device):
        raise ValueError(f"{op}: nonfinite_t must be a 0-d int64 tensor on {x_t.device}, "
                         f"got {checks.describe(nonfinite_t)}")
    seed, word = checks.seed(seed), philox.stream_word(stream)
    chosen = registry.choose(op, x_t.device, IMPLEMENTED, backend)
    args = (x_t, eps, t, coef, sample_index, step, seed, word, bool(clip), bool(write_x0), nonfinite_t)
    if chosen == "reference":
        x_prev, x0_hat = reverse_step_reference(*args)
    else:
        x_prev, x0_hat = (_cpp() if chosen == "cpp" else triton_ops())["reverse_step"](*args)
    return x_prev, (x0_hat if write_x0 else None)
