"""DMD2's losses, each a short function beside its equation.

Notation (DMD, Yin et al. 2024a; DMD2, Yin et al. 2024b, arXiv 2405.14867): G is the generator, x = G(z) its
sample, x_t = x + sigma_t * eps the sample noised at timestep t, mu_real and mu_fake the teacher's and the
critic's ("fake score") denoisers. Scores and denoisers are interchangeable by Tweedie's formula,
s(x_t) = (mu(x_t) - x_t) / sigma_t^2, so every loss here is written with x0-predictions.

All functions take tensors of any shape (batch first) and denoisers as callables, so the toy, image and
text-to-image backends share them unchanged.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .diffusion import Denoiser, NoiseSchedule, add_noise, append_dims

DM_TIMESTEP_FRACTIONS = (0.02, 0.98)
"""DMD2's timestep range for the distribution-matching loss: 0.02T..0.98T, i.e. 20..980 of a 1000-step table."""


def dm_timesteps(schedule: NoiseSchedule) -> tuple[int, int]:
    """DMD2's DM-loss timestep range for a schedule of any length (20..980 when T = 1000)."""
    lo, hi = DM_TIMESTEP_FRACTIONS
    return round(lo * len(schedule)), min(round(hi * len(schedule)), len(schedule) - 1)


def _per_sample_mean(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).mean(dim=1)


def _normal_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def distribution_matching_gradient(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """The per-sample DMD gradient direction with respect to x (DMD eq. 7-8; DMD2 eq. 2):

        grad = (mu_fake(x_t) - mu_real(x_t)) / mean_{C,H,W} |x - mu_real(x_t)|

    It equals the score difference (s_fake - s_real)(x_t) * sigma_t^2 times DMD's weight
    w_t = 1 / mean|x - mu_real(x_t)|, which makes the gradient's scale the same at every noise level. Entries
    that are not finite (e.g. a zero normaliser) are set to 0, so one bad sample cannot poison the batch.
    """
    if not (x.shape == real_x0.shape == fake_x0.shape):
        raise ValueError(f"x, real_x0 and fake_x0 must have one shape; got {tuple(x.shape)}, "
                         f"{tuple(real_x0.shape)}, {tuple(fake_x0.shape)}")
    x, real_x0, fake_x0 = x.detach().double(), real_x0.detach().double(), fake_x0.detach().double()
    grad = (fake_x0 - real_x0) / dm_normaliser(x, real_x0)
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dm_normaliser(x: Tensor, real_x0: Tensor) -> Tensor:
    """DMD's per-sample gradient normaliser 1 / w_t = mean_{C,H,W} |x - mu_real(x_t)| (DMD eq. 8), shaped to
    broadcast against x."""
    return append_dims(_per_sample_mean((x - real_x0).abs()), x.ndim)


def distribution_matching_loss(x: Tensor, real_x0: Tensor, fake_x0: Tensor, weights: Tensor | None = None) -> Tensor:
    """The DMD2 generator loss whose gradient with respect to x is ``distribution_matching_gradient / x.numel()``:

        L_DM = 0.5 * mean((x - stopgrad(x - grad))^2)

    Descending it moves each sample toward the teacher's denoised estimate and away from the critic's, i.e.
    up the real score and down the fake one: the reverse-KL gradient of DMD eq. 7. ``weights`` (batch,) scale each
    sample's gradient: f-distill's density-ratio weights (:func:`dmd2lab.followups.f_divergence_weights`) turn it
    into the gradient of another f-divergence; None is DMD.
    """
    grad = distribution_matching_gradient(x, real_x0, fake_x0)
    if weights is not None:
        if weights.shape != (x.shape[0],):
            raise ValueError(f"weights must have shape (batch,) = ({x.shape[0]},); got {tuple(weights.shape)}")
        grad = append_dims(weights.detach().to(grad), x.ndim) * grad
    return gradient_loss(x, grad)


def gradient_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 * mean((x - stopgrad(x - grad))^2): a loss whose gradient with respect to x is ``grad / x.numel()``, the
    way DMD applies a gradient it computes directly rather than by differentiating a loss."""
    # In float64: in float32, x - (x - grad) loses the low bits of grad when grad << x.
    x64 = x.double()
    target = (x64 - grad.detach().double()).detach()
    return (0.5 * torch.mean((x64 - target) ** 2)).to(x.dtype)


def distribution_matching_step(x: Tensor, real: Denoiser, fake: Denoiser, schedule: NoiseSchedule,
                               timesteps: tuple[int, int] | None = None,
                               generator: torch.Generator | None = None,
                               weighting: Callable[[Tensor, Tensor], Tensor] | None = None
                               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Draw t uniformly in ``timesteps`` (default: :func:`dm_timesteps`) and fresh noise, noise the generator
    sample, ask both denoisers (no grad) for x0, and return the DM loss with diagnostics (DMD2 Algorithm 1,
    generator update). ``weighting(x_t, sigma)`` -> per-sample weights (f-distill; see
    :func:`distribution_matching_loss`)."""
    low, high = timesteps if timesteps is not None else dm_timesteps(schedule)
    t = schedule.sample_timesteps(x.shape[0], low, high, generator=generator, device=x.device)
    sigma = schedule.sigma(t)
    with torch.no_grad():
        x_t = add_noise(x.detach(), sigma, _normal_like(x, generator))
        real_x0, fake_x0 = real(x_t, sigma), fake(x_t, sigma)
        weights = weighting(x_t, sigma) if weighting is not None else None
    loss = distribution_matching_loss(x, real_x0, fake_x0, weights)
    gap = _per_sample_mean((fake_x0 - real_x0).double() ** 2).sqrt()
    logs = {"dm_loss": loss.detach(), "real_fake_gap": gap.mean()}
    if weights is not None:
        logs["dm_largest_sample_weight"] = weights.max().detach()
    return loss, logs


def denoising_weight(sigma: Tensor, weighting: str, sigma_data: float = 0.5) -> Tensor:
    """Per-sample weight lambda(sigma) on the x0-regression error ||D(x_sigma) - x0||^2.

    - "edm": 1/sigma^2 + 1/sigma_data^2 (EDM eq. 8 with Table 1's lambda; DMD2's ImageNet critic);
    - "eps": 1/sigma^2, i.e. the plain epsilon MSE of DDPM (DMD2's text-to-image critic);
    - "x0":  1, plain x0 regression.
    """
    if weighting == "edm":
        return 1 / sigma ** 2 + 1 / sigma_data ** 2
    if weighting == "eps":
        return 1 / sigma ** 2
    if weighting == "x0":
        return torch.ones_like(sigma)
    raise ValueError(f"unknown weighting {weighting!r}; expected 'edm', 'eps' or 'x0'")


def denoising_loss(pred_x0: Tensor, x0: Tensor, sigma: Tensor, weighting: str = "edm",
                   sigma_data: float = 0.5) -> Tensor:
    """Denoising score matching (Vincent 2011; EDM eq. 2): mean over the batch of lambda(sigma) times the
    per-sample mean squared x0 error. Its minimiser is the posterior mean E[x0 | x_sigma]."""
    if pred_x0.shape != x0.shape:
        raise ValueError(f"pred_x0 and x0 must have one shape; got {tuple(pred_x0.shape)} and {tuple(x0.shape)}")
    weight = denoising_weight(sigma.to(pred_x0.dtype), weighting, sigma_data)
    return torch.mean(weight * _per_sample_mean((pred_x0 - x0) ** 2))


def denoising_score_matching(denoiser: Denoiser, x0: Tensor, schedule: NoiseSchedule,
                             weighting: str = "edm", sigma_data: float = 0.5,
                             timesteps: tuple[int, int] | None = None,
                             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Train a denoiser on clean samples x0: draw t uniformly over ``timesteps`` (default: the whole table),
    noise, and regress x0. Used for teachers (on data) and for the critic (on generator samples)."""
    low, high = timesteps if timesteps is not None else (0, len(schedule) - 1)
    t = schedule.sample_timesteps(x0.shape[0], low, high, generator=generator, device=x0.device)
    sigma = schedule.sigma(t)
    x_t = add_noise(x0, sigma, _normal_like(x0, generator))
    loss = denoising_loss(denoiser(x_t, sigma), x0, sigma, weighting, sigma_data)
    return loss, {"denoising_loss": loss.detach()}


def fake_score_loss(critic: Denoiser, x: Tensor, schedule: NoiseSchedule, weighting: str = "edm",
                    sigma_data: float = 0.5, timesteps: tuple[int, int] | None = None,
                    generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The critic's loss (DMD2 Algorithm 1, fake-score update): denoising score matching on the generator's
    samples with the generator detached, so the critic tracks the generator's noised distribution."""
    loss, _ = denoising_score_matching(critic, x.detach(), schedule, weighting, sigma_data, timesteps, generator)
    return loss, {"critic_loss": loss.detach()}


def mean_squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean squared distance, shape (batch,)."""
    return _per_sample_mean((a - b) ** 2)


def regression_loss(student_x: Tensor, teacher_x: Tensor,
                    distance: Callable[[Tensor, Tensor], Tensor] = mean_squared_distance) -> Tensor:
    """DMD1's regression loss (DMD eq. 9): E[ l(G(z), y) ] over precomputed teacher ODE pairs (z, y), with y
    the teacher's deterministic sample from the same noise z. DMD uses LPIPS on images; any per-sample
    distance of shape (batch,) can be passed. DMD2 drops this loss (Sec. 4.1)."""
    if student_x.shape != teacher_x.shape:
        raise ValueError(f"student and teacher samples must have one shape; got {tuple(student_x.shape)} and "
                         f"{tuple(teacher_x.shape)}")
    return distance(student_x, teacher_x.detach()).mean()


# ---------------------------------------------------------------------------------------------- GAN loss (Sec. 4.3)
def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """The generator's non-saturating GAN loss (DMD2 eq. 5, generator side): mean softplus(-D(x_fake)),
    i.e. -log sigmoid(D): the generator is pushed to where the discriminator sees real data."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's GAN loss (DMD2 eq. 5): mean softplus(D(x_fake)) + mean softplus(-D(x_real)), the
    binary cross-entropy of calling real images real and generator samples fake."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def gan_logits(classify: Callable[[Tensor, Tensor], Tensor], x: Tensor, schedule: NoiseSchedule,
               timesteps: tuple[int, int] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Discriminator logits on x re-noised at a random timestep per sample (the "diffusion GAN" input DMD2 uses:
    t uniform over ``timesteps``, default the whole table; ``(0, 0)`` gives the table's smallest noise).
    ``classify(x_t, sigma)`` is the head on the critic's bottleneck features. Gradients flow into x (the
    generator's GAN loss) and into ``classify`` (the discriminator's)."""
    low, high = timesteps if timesteps is not None else (0, len(schedule) - 1)
    t = schedule.sample_timesteps(x.shape[0], low, high, generator=generator, device=x.device)
    sigma = schedule.sigma(t)
    return classify(add_noise(x, sigma, _normal_like(x, generator)), sigma).reshape(x.shape[0])


class GANHead(nn.Module):
    """DMD2's discriminator head on the critic's bottleneck features (Sec. 4.3), one logit per sample.

    - image features (C, H, W) — a UNet's mid-block output: [4x4 conv stride 2, GroupNorm, SiLU] while the map is
      larger than 4x4, then a conv over the whole remaining map + GroupNorm + SiLU, and a 1x1 conv to one logit;
    - vector features (C,) — the toy's MLP bottleneck: Linear, SiLU, Linear to one logit.
    """

    def __init__(self, feature_shape: Sequence[int], hidden: int | None = None):
        super().__init__()
        feature_shape = tuple(int(s) for s in feature_shape)
        if len(feature_shape) == 1:
            (channels,) = feature_shape
            width = hidden or channels
            self.net = nn.Sequential(nn.Linear(channels, width), nn.SiLU(), nn.Linear(width, 1))
        elif len(feature_shape) == 3:
            channels, height, width_px = feature_shape
            if height != width_px:
                raise ValueError(f"GANHead expects square feature maps; got {height}x{width_px}: crop or pool the "
                                 "features to a square map before the head")
            width = hidden or channels
            layers, size, c_in = [], height, channels
            while size > 4:
                layers += [nn.Conv2d(c_in, width, 4, stride=2, padding=1), _group_norm(width), nn.SiLU()]
                size, c_in = size // 2, width
            layers += [nn.Conv2d(c_in, width, size, stride=size), _group_norm(width), nn.SiLU(),
                       nn.Conv2d(width, 1, 1)]
            self.net = nn.Sequential(*layers)
        else:
            raise ValueError(f"GANHead takes (C,) or (C, H, W) features; got shape {feature_shape}")
        self.feature_shape = feature_shape

    def forward(self, features: Tensor) -> Tensor:
        if tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(f"GANHead was built for features of shape {self.feature_shape}; got "
                             f"{tuple(features.shape[1:])}")
        return self.net(features).reshape(features.shape[0])


def _group_norm(channels: int) -> nn.GroupNorm:
    # Up to 32 groups (DMD2: 768 channels -> 24 per group), but never fewer than 4 channels per group: on the
    # head's last 1x1 map a group of one channel normalises to a constant and the logit stops depending on x.
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, channels)


# ---------------------------------------------------------------------------- multi-step students (Sec. 4.5)
def multistep_generate(student: Denoiser, noise: Tensor, sigmas: Sequence[float],
                       generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Sample a K-step student (DMD2 Sec. 4.5, inference): start at x = sigmas[0] * noise (pure noise at the
    largest sigma), predict x0 = G(x, sigma_k), re-noise it with FRESH noise to sigma_{k+1}, and repeat; the last
    prediction is the sample. Returns (the x0 predicted at every step, the input met at every step)."""
    if len(sigmas) < 1:
        raise ValueError("multistep_generate needs at least one noise level in sigmas (largest first)")
    x, predictions, inputs = noise * float(sigmas[0]), [], []
    for k, sigma in enumerate(sigmas):
        inputs.append(x)
        predictions.append(student(x, torch.full((x.shape[0],), float(sigma), device=x.device)))
        if k + 1 < len(sigmas):
            x = add_noise(predictions[-1], float(sigmas[k + 1]), _normal_like(x, generator))
    return predictions, inputs


def backward_simulation(student: Denoiser, noise: Tensor, sigmas: Sequence[float], k: int,
                        generator: torch.Generator | None = None) -> Tensor:
    """The input of student step ``k`` exactly as inference meets it (DMD2 Sec. 4.5, backward simulation): run
    the student's first k steps from fresh noise WITHOUT grad, then re-noise its last x0 with ``noise`` to
    sigmas[k]; k = 0 is pure noise, sigmas[0] * noise. Training the k-th step on these inputs, instead of on
    noised real data, removes the mismatch between the inputs seen in training and at inference."""
    if not 0 <= k < len(sigmas):
        raise ValueError(f"step k must lie in 0..{len(sigmas) - 1}; got {k}")
    if k == 0:
        return noise * float(sigmas[0])
    with torch.no_grad():
        predictions, _ = multistep_generate(student, _normal_like(noise, generator), sigmas[:k], generator)
    return add_noise(predictions[-1].detach(), float(sigmas[k]), noise)
