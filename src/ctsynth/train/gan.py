"""The pix2pix objective: one discriminator + generator step (LSGAN + λ·L1, optional feature
matching and spectral term), the optimizer and the learning-rate schedule. :mod:`ctsynth.train` runs
the loop around them; ``ctsynth bench`` times the very same step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from torch.utils.data import DataLoader

from ctsynth.data.noise import ring_index


@dataclass
class GanPair:
    """The two networks of one training and their optimisers. ``D`` is what the D step calls (the
    DDP-wrapped or compiled discriminator), ``raw_D`` the plain module the G step calls with its
    parameters frozen (no DDP sync, no D grads); the same object without DDP."""
    G: torch.nn.Module
    D: torch.nn.Module
    raw_D: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


@dataclass(frozen=True)
class LossWeights:
    """The generator loss's weights (``train.lambda_*``)."""
    l1: float = 100.0
    fm: float = 0.0
    spectral: float = 0.0

    @classmethod
    def of(cls, cfg) -> LossWeights:
        """From a :class:`ctsynth.core.config.TrainCfg`."""
        return cls(l1=cfg.lambda_l1, fm=cfg.lambda_fm, spectral=cfg.lambda_spectral)


def gan_step(nets: GanPair, cond: torch.Tensor, real: torch.Tensor, weights: LossWeights, amp: torch.autocast,
             fake_noise: torch.Tensor | None = None) -> torch.Tensor:
    """One discriminator and one generator update (pix2pix order). Returns detached losses
    (8,) in :data:`ctsynth.train.history.LOSS_NAMES` order, on the device (no host sync).

    D: 0.5·[MSE(D(real,c), 1) + MSE(D(fake,c), 0)]  G: MSE(D(fake,c), 1) + λ·|fake - real|₁ [+ λ_fm·FM]
    FM (pix2pixHD's feature matching, ``weights.fm`` > 0): the mean over D's blocks of
    |D_k(fake,c) - D_k(real,c)|₁, the real features taken from the D step's forward pass (detached).
    The G step calls the unwrapped D with its parameters frozen (no DDP sync, no D grads).
    ``fake_noise`` (``model.noise``, :mod:`ctsynth.data.noise`): D judges ``fake + fake_noise`` (clamped
    to the real slices' range), L1 the noise-free ``fake``.
    Spectral term (``weights.spectral`` > 0; Durall et al., CVPR 2020, "Watch your up-convolution"):
    |log P_gen(r) - log P_real(r)|₁ averaged over the radial frequencies r of the batch's mean power
    spectra (:func:`radial_log_spectrum`), on what D judges.
    """
    G, D, raw_D, opt_g, opt_d = nets.G, nets.D, nets.raw_D, nets.opt_g, nets.opt_d
    lambda_l1, lambda_fm, lambda_spectral = weights.l1, weights.fm, weights.spectral
    fm = lambda_fm > 0
    with amp:
        fake = G(cond)                                              # (B, 1, S, S)
        shown = fake if fake_noise is None else (fake.float() + fake_noise).clamp(-1, 1)
        p_real, f_real = _judge(D, real, cond, fm)                  # (B, 1, P, P), [block features]
        p_fake = D(shown.detach(), cond).float()                    # (B, 1, P, P)
    d_real = F.mse_loss(p_real, torch.ones_like(p_real))
    d_fake = F.mse_loss(p_fake, torch.zeros_like(p_fake))
    opt_d.zero_grad(set_to_none=True)
    (0.5 * (d_real + d_fake)).backward()
    opt_d.step()

    raw_D.requires_grad_(False)
    with amp:
        p_gen, f_gen = _judge(raw_D, shown, cond, fm)               # (B, 1, P, P), [block features]
    g_adv = F.mse_loss(p_gen, torch.ones_like(p_gen))
    g_l1 = F.l1_loss(fake.float(), real)
    loss_g = g_adv + lambda_l1 * g_l1
    g_fm = torch.zeros((), device=g_l1.device)
    if fm:
        g_fm = torch.stack([F.l1_loss(a.float(), b.detach().float()) for a, b in zip(f_gen, f_real)]).mean()
        loss_g = loss_g + lambda_fm * g_fm
    g_spec = torch.zeros((), device=g_l1.device)
    if lambda_spectral > 0:
        g_spec = (radial_log_spectrum(shown) - radial_log_spectrum(real)).abs().mean()
        loss_g = loss_g + lambda_spectral * g_spec
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    raw_D.requires_grad_(True)
    acc_real = (p_real.detach() > 0.5).float().mean()
    acc_fake = (p_fake.detach() < 0.5).float().mean()
    return torch.stack([g_adv, g_l1, g_fm, g_spec, d_real, d_fake, acc_real, acc_fake]).detach()


def radial_log_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Log of the batch's mean power spectrum averaged over rings of radius r = 1 .. S/2 (DC left
    out): ``(S/2,)`` for images ``(B, C, S, S)``, in fp32 (FFT outside autocast); differentiable."""
    x = images.float()
    x = x - x.mean((-2, -1), keepdim=True)
    power = torch.fft.rfft2(x, norm="ortho").abs().square().mean((0, 1))          # (S, S/2+1)
    size = images.shape[-1]
    rings = ring_index(size)[:, :size // 2 + 1]                                    # the rfft half's rings
    ring = torch.tensor(rings, device=x.device).clamp(max=size // 2).flatten()     # corners join the last
    total = torch.zeros(size // 2 + 1, device=x.device).index_add(0, ring, power.flatten())
    count = torch.zeros(size // 2 + 1, device=x.device).index_add(0, ring, torch.ones_like(power.flatten()))
    return torch.log(total[1:] / count[1:] + 1e-10)


def _judge(D, image: torch.Tensor, cond: torch.Tensor, features: bool) -> tuple[torch.Tensor, list | None]:
    """D's patch scores (fp32) and, when ``features``, its block activations (else None)."""
    if not features:
        return D(image, cond).float(), None
    scores, feats = D(image, cond, features=True)
    return scores.float(), feats


def make_ema(G: torch.nn.Module, decay: float) -> AveragedModel | None:
    """The generator's exponential moving average (``train.ema`` > 0; None when 0): after every step
    W_ema <- decay * W_ema + (1 - decay) * W, BatchNorm statistics included (``use_buffers``), as
    progressive GANs and StyleGAN keep the generator they sample from (Karras et al. 2018; Yazici et
    al. 2019, "The unusual effectiveness of averaging in GAN training"). ``.module`` is the average;
    its BatchNorm statistics are averaged too, until :func:`recalibrate_bn` measures them afresh."""
    if decay <= 0:
        return None
    return AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def recalibrate_bn(model: torch.nn.Module, dataset, batch_size: int, channels_last: bool = False) -> None:
    """Recompute ``model``'s BatchNorm running statistics as the plain mean over one ordered pass of
    ``dataset``'s conditions (items ``(condition, ...)``): the weight average's own statistics, which
    the average of the live model's statistics is not (SWA's ``update_bn``, Izmailov et al. 2018)."""
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    update_bn((item[0].to(device).contiguous(memory_format=mem) for item in loader), model)


def make_optimizer(params, lr: float, betas: tuple[float, float], fused: bool = True) -> torch.optim.Adam:
    """Adam; ``fused`` (one kernel for all params) is measurably faster on CPU and GPU alike."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)


def lr_factor(step: int, cfg) -> float:
    """Linear decay to 0 from ``lr_decay_start`` (fraction of iterations); 1 without decay."""
    if cfg.lr_decay_start is None:
        return 1.0
    start = int(cfg.lr_decay_start * cfg.iterations)
    return 1.0 if step < start else max(0.0, 1.0 - (step - start) / max(1, cfg.iterations - start))


def learning_rates(step: int, cfg) -> tuple[float, float]:
    """(generator, discriminator) learning rates at ``step`` (:func:`lr_factor` applied)."""
    return cfg.lr_g * lr_factor(step, cfg), cfg.lr_d * lr_factor(step, cfg)
