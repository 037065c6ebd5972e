"""The pix2pix objective: one discriminator + generator step (LSGAN + λ·L1), the optimizer and
the learning-rate schedule. :mod:`ctsynth.train` runs the loop around them; ``ctsynth bench``
times the very same step."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gan_step(G, D, raw_D, opt_g, opt_d, cond: torch.Tensor, real: torch.Tensor,
             lambda_l1: float, amp: torch.autocast) -> torch.Tensor:
    """One discriminator and one generator update (pix2pix order). Returns detached losses
    (6,) in :data:`ctsynth.losses.LOSS_NAMES` order, on the device (no host sync).

    D: 0.5·[MSE(D(real,c), 1) + MSE(D(fake,c), 0)]  G: MSE(D(fake,c), 1) + λ·|fake - real|₁
    The G step calls the unwrapped D with its parameters frozen (no DDP sync, no D grads).
    """
    with amp:
        fake = G(cond)                                              # (B, 1, S, S)
        p_real = D(real, cond).float()                              # (B, 1, P, P)
        p_fake = D(fake.detach(), cond).float()                     # (B, 1, P, P)
    d_real = F.mse_loss(p_real, torch.ones_like(p_real))
    d_fake = F.mse_loss(p_fake, torch.zeros_like(p_fake))
    opt_d.zero_grad(set_to_none=True)
    (0.5 * (d_real + d_fake)).backward()
    opt_d.step()

    raw_D.requires_grad_(False)
    with amp:
        p_gen = raw_D(fake, cond).float()                           # (B, 1, P, P)
    g_adv = F.mse_loss(p_gen, torch.ones_like(p_gen))
    g_l1 = F.l1_loss(fake.float(), real)
    opt_g.zero_grad(set_to_none=True)
    (g_adv + lambda_l1 * g_l1).backward()
    opt_g.step()
    raw_D.requires_grad_(True)
    acc_real = (p_real.detach() > 0.5).float().mean()
    acc_fake = (p_fake.detach() < 0.5).float().mean()
    return torch.stack([g_adv, g_l1, d_real, d_fake, acc_real, acc_fake]).detach()


def make_optimizer(params, lr: float, betas: tuple[float, float], fused: bool = True) -> torch.optim.Adam:
    """Adam; ``fused`` (one kernel for all params) is measurably faster on CPU and GPU alike."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)


def lr_factor(step: int, cfg) -> float:
    """Linear decay to 0 from ``lr_decay_start`` (fraction of iterations); 1 without decay."""
    if cfg.lr_decay_start is None:
        return 1.0
    start = int(cfg.lr_decay_start * cfg.iterations)
    return 1.0 if step < start else max(0.0, 1.0 - (step - start) / max(1, cfg.iterations - start))
