"""The generator gradients of the methods that followed DMD2, each a short function beside its equation.

- **f-distill** (Xu, Nie & Vahdat 2025, "One-step Diffusion Models with f-Divergence Distribution Matching",
  arXiv 2502.15681): the DM gradient of any f-divergence D_f(p_t || q_t) is DMD's score difference times a weight
  h(r) = f''(r) r^2 of the density ratio r = p_t / q_t between the teacher's and the generator's noised densities.
- **Decoupled DMD** (Liu et al. 2025, "CFG Augmentation as the Spear, Distribution Matching as the Shield",
  arXiv 2511.22677): with a classifier-free-guided teacher, DMD's gradient splits into a distribution-matching
  term and a "CFG augmentation" term, which can be switched and re-noised separately.
- **DP-DMD** (Wu et al. 2026, "Diversity-Preserved Distribution Matching Distillation", arXiv 2602.03139): a
  multi-step student's first step is trained to predict the teacher's target, with no DM gradient there; the later
  steps are trained by DMD.

Notation as in :mod:`dmd2lab.dmd`: x is a generator sample, x_t = x + sigma_t eps, and every score is written through
an x0-prediction (Tweedie: s(x_t) = (mu(x_t) - x_t) / sigma_t^2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dmd
from .diffusion import Denoiser

F_DIVERGENCES = ("reverse_kl", "forward_kl", "jensen_shannon")
"""The f-divergences :func:`f_divergence_weights` knows: reverse KL (f = -log r; DMD itself), forward KL
(f = r log r) and Jensen-Shannon (f = r log r - (1 + r) log((1 + r) / 2))."""


def f_divergence_weights(log_ratio: Tensor, divergence: str, normalize: bool = True) -> Tensor:
    """The per-sample weight h(r) = f''(r) r^2 of f-distill's gradient (arXiv 2502.15681, Thm. 1):

        grad_x D_f(p_t || q_t) = h(r(x_t)) (s_q(x_t) - s_p(x_t)),   r = p_t / q_t (teacher over generator),

    derived by moving each generator sample x along a displacement field: D_f = int q f(p/q) changes by
    E_q[h(r) (s_q - s_p) . delta]. Reverse KL: h = 1 (DMD); forward KL: h = r; Jensen-Shannon: h = r / (1 + r).
    ``log_ratio`` is log r per sample, shape (batch,). Forward KL and JS weigh up samples where the teacher has more
    mass than the generator (under-covered regions), which makes them less mode-seeking than reverse KL.

    ``normalize`` divides the weights by their batch mean, so the batch's total step is DMD's and only its sharing
    between samples changes (f-distill normalises its weights too, to tame their variance); forward KL's weights
    are then n * softmax(log r), computed without overflow however large r is. The weights go to
    :func:`dmd2lab.dmd.distribution_matching_loss`.
    """
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown f-divergence {divergence!r}; choose one of {', '.join(F_DIVERGENCES)}")
    if log_ratio.ndim != 1:
        raise ValueError(f"log_ratio must have shape (batch,); got {tuple(log_ratio.shape)}")
    log_ratio = log_ratio.detach().double()
    if divergence == "reverse_kl":
        return torch.ones_like(log_ratio)
    if divergence == "forward_kl":
        if normalize:
            return log_ratio.numel() * torch.softmax(log_ratio, dim=0)
        return log_ratio.exp()
    # r / (1 + r) = sigmoid(log r); normalised in log space, since every sigmoid of a batch can underflow to 0.
    if normalize:
        return log_ratio.numel() * torch.softmax(F.logsigmoid(log_ratio), dim=0)
    return torch.sigmoid(log_ratio)


def guided_x0(cond_x0: Tensor, uncond_x0: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) on x0-predictions: uncond + w (cond - uncond). Being linear,
    it is the guided score's x0 by Tweedie's formula: s_w = s_u + w (s_c - s_u)."""
    return uncond_x0 + guidance * (cond_x0 - uncond_x0)


def decoupled_dm_gradient(x: Tensor, fake_x0: Tensor, cond_x0: Tensor, uncond_x0: Tensor, guidance: float,
                          distribution_matching: bool = True, cfg_augmentation: bool = True) -> Tensor:
    """DMD's gradient with a guided teacher, split in two (Decoupled DMD, arXiv 2511.22677, Sec. 3):

        (mu_fake - mu_w) / n  =  (mu_fake - mu_cond) / n   -   (w - 1) (mu_cond - mu_uncond) / n
                                  distribution matching (DM)     CFG augmentation (CA)

    with mu_w = :func:`guided_x0` and n = mean |x - mu_w| (DMD's normaliser with the guided teacher), so with both
    terms on it is exactly :func:`dmd.distribution_matching_gradient` against the guided teacher. DM pulls the
    generator to the teacher's conditional distribution; CA pushes every sample up log p(c | x_t), whatever the
    generator's own distribution. Non-finite entries are set to 0, as in DMD's gradient."""
    if not (distribution_matching or cfg_augmentation):
        raise ValueError("decoupled_dm_gradient with both terms off is zero: switch on distribution_matching, "
                         "cfg_augmentation or both")
    if not (x.shape == fake_x0.shape == cond_x0.shape == uncond_x0.shape):
        raise ValueError(f"x, fake_x0, cond_x0 and uncond_x0 must have one shape; got {tuple(x.shape)}, "
                         f"{tuple(fake_x0.shape)}, {tuple(cond_x0.shape)}, {tuple(uncond_x0.shape)}")
    x, fake, cond, uncond = (v.detach().double() for v in (x, fake_x0, cond_x0, uncond_x0))
    normaliser = dmd.dm_normaliser(x, guided_x0(cond, uncond, guidance))
    grad = torch.zeros_like(x)
    if distribution_matching:
        grad = grad + (fake - cond)
    if cfg_augmentation:
        grad = grad - (guidance - 1) * (cond - uncond)
    return torch.nan_to_num(grad / normaliser, nan=0.0, posinf=0.0, neginf=0.0)


def first_step_target_loss(student_x0: Tensor, teacher: Denoiser, x: Tensor, sigma: Tensor) -> Tensor:
    """DP-DMD's loss for a multi-step student's FIRST step (arXiv 2602.03139): predict the teacher's own target at
    the step's input, || G(x, sigma_0) - mu_teacher(x, sigma_0) ||^2, with no DM gradient on that step. In
    x0-space; at a fixed sigma, v- and eps-prediction are affine in x0, so their losses differ only by a constant
    factor. The first step stays what the teacher makes of each input, so DMD's mode-seeking cannot narrow it; the
    later steps, trained by DMD, sharpen the result."""
    with torch.no_grad():
        target = teacher(x, sigma)
    return dmd.regression_loss(student_x0, target)
