"""The sampler benches' baselines, as diffusers and improved-diffusion write them, on the same weights as ours.

eager_copy(model): a copy of a ddpm_fast U-Net whose norms and attention blocks run torch's GroupNorm and SiLU, 1x1
convs for q, k, v and proj_out, and a bmm softmax over all positions with the L x L scores held, and whose
convolutions are plain F.conv2d with the residual added after. The linear layers and everything else are the
U-Net's own.

eager_step: one step of Algorithm 2 as those loops write it: the network, then x0_hat, its clip, the posterior mean
and the noise as separate elementwise ops, with a torch.randn per step.

eager_train_step: one optimizer step of Algorithm 1 as improved-diffusion writes it: flips, t and eps from torch's
generator, x_t and the MSE as elementwise ops, backward, the norm clip, Adam, and the EMA one parameter at a time.
"""
import copy

import torch
import torch.nn.functional as F

from ddpm_fast import unet
from ddpm_fast.ops.conv import PackedConv, conv2d_reference


def _group_norm(self, x, add=None, act=False, dropout=0.0, seed=0, layer=0, sample_index=None, step=0):
    if add is not None:
        x = x + add[:, :, None, None]
    x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    x = F.silu(x) if act else x
    return F.dropout(x, dropout) if dropout else x  # torch's generator, as those codebases


def _attention(self, x):
    batch, channels, height, width = x.shape
    h = self.norm(x)
    q, k, v = (conv(h).reshape(batch, channels, height * width) for conv in (self.q, self.k, self.v))
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * channels ** -0.5, dim=-1)  # (B, queries, keys)
    h = torch.bmm(v, weights.transpose(1, 2)).reshape(batch, channels, height, width)
    return x + self.proj_out(h)


def _conv(self, x, residual=None):
    return conv2d_reference(x, self.weight, self.bias, self.stride, self.padding, residual)


def eager_copy(model: unet.UNet) -> unet.UNet:
    """A deep copy of `model` (weights, layout, mode) whose GroupNorm and AttnBlock modules run the code above, and
    whose convolutions are F.conv2d's (the U-Net's keep packed oneDNN weights on the CPU, ops/conv.py)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, unet.GroupNorm):
            module.forward = _group_norm.__get__(module)
        elif isinstance(module, unet.AttnBlock):
            module.forward = _attention.__get__(module)
        elif isinstance(module, PackedConv):
            module.forward = _conv.__get__(module)
    return model


def step_rows(diffusion, device) -> torch.Tensor:
    """(T, 5) float32 per code step: 1/sqrt(abar), sqrt(1/abar - 1), the posterior mean's two coefficients, sigma
    (0 at the last step), gathered from the diffusion's float64 tables as the baselines' schedulers precompute them."""
    tab = diffusion.tables
    sigma = (0.5 * tab["model_log_variance"]).exp()
    sigma[0] = 0.0
    rows = torch.stack([tab["sqrt_recip_alphas_cumprod"], tab["sqrt_recipm1_alphas_cumprod"],
                        tab["posterior_mean_coef1"], tab["posterior_mean_coef2"], sigma], dim=1)
    return rows.to(device=device, dtype=torch.float32)


def eager_step(model, x, t, row):
    """x_{t-1} from x_t: eps, x0_hat clipped, the posterior mean, plus sigma z. row: step_rows(...)[i]."""
    eps = model(x, t)
    x0 = (row[0] * x - row[1] * eps).clamp(-1, 1)
    mean = row[2] * x0 + row[3] * x
    return mean + row[4] * torch.randn_like(x)


def eager_loop(model, diffusion, n, shape, device, step=eager_step, memory_format=torch.contiguous_format):
    """Algorithm 2 over the diffusion's (respaced) steps with `step` (eager_step or its torch.compile)."""
    rows = step_rows(diffusion, device)
    x = torch.randn(n, *shape, device=device).contiguous(memory_format=memory_format)
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((n,), int(diffusion.timestep_map[i]), device=device)
        x = step(model, x, t, rows[i])
    return x.clamp(-1, 1)


def eager_train_step(model, optimizer, ema, x0, diffusion, grad_clip=1.0, ema_decay=0.9999):
    """One training step on the batch x0 ([-1, 1]); `ema` a list of tensors like model.parameters()."""
    n = x0.shape[0]
    flip = torch.rand(n, device=x0.device) < 0.5
    x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
    t = torch.randint(0, diffusion.num_timesteps, (n,), device=x0.device)
    noise = torch.randn_like(x0)
    tables = diffusion.tables_on(x0.device, torch.float32)
    x_t = (tables["sqrt_alphas_cumprod"][t][:, None, None, None] * x0
           + tables["sqrt_one_minus_alphas_cumprod"][t][:, None, None, None] * noise)
    loss = F.mse_loss(model(x_t, t), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    with torch.no_grad():
        for target, source in zip(ema, model.parameters()):
            target.mul_(ema_decay).add_(source, alpha=1 - ema_decay)
    return loss.detach()
