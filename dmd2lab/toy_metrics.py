"""Exact metrics of generator samples against a known Gaussian mixture.

- ``negative_log_likelihood``: mean -log p(x) under the true density. Alone it misleads: samples packed too
  tightly around the mode centres score better than the data itself (DMD1's regression loss does this), so it
  is always read beside a two-sample distance.
- ``mode_statistics``: per-mode mass (a sample counts for mode k when k is its most likely component and it lies
  within ``radius`` component stds of the mean), modes covered, the total-variation error of the mass, and the
  within-mode spread relative to the true one (1 = right width; < 1 = samples packed around the mode centres).
- ``mmd``: maximum mean discrepancy with a sum of Gaussian kernels; the data side is in closed form (a Gaussian
  kernel against a Gaussian mixture integrates exactly), so only the generator side carries sampling noise.
- ``two_sample_mmd``: the same kernel between two sample sets, neither known in closed form.
- ``critic_error``: how far a learned fake denoiser is from the exact one at a fixed set of noise levels.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .diffusion import Denoiser, add_noise
from .toy2d import GaussianMixture

MMD_BANDWIDTHS = (0.05, 0.2, 1.0)
"""Kernel widths: within-mode spread (the toy's stds are 0.1), mode placement, and mass between modes."""


def negative_log_likelihood(samples: Tensor, data: GaussianMixture) -> float:
    """Mean negative log-density of the samples under the true mixture (nats per sample)."""
    return -data.log_prob(samples.double()).mean().item()


def mode_statistics(samples: Tensor, data: GaussianMixture, radius: float = 3.0,
                    min_fraction: float = 0.2) -> dict[str, object]:
    """Mass per mode, modes covered (mass >= ``min_fraction`` of the mode's weight), the weakest mode's mass as a
    fraction of its weight, the fraction of samples near no mode, the total-variation distance between the
    measured masses (plus the 'near no mode' bin) and the true weights, ``allocation_tv``: the same distance for the
    samples near a mode only (how the generator shares its on-mode mass between the modes, outliers aside; NaN
    when no sample is near a mode), and ``spread_ratio``: the RMS distance of
    the samples near a mode to its mean over the true RMS (sqrt(dim) * std); exact ring samples give 0.97 (the
    3-std window trims the tails)."""
    x = samples.double()
    owner = data.responsibilities(x).argmax(1)
    dist = (x - data.means.double()[owner]).norm(dim=1)
    near = dist <= radius * data.stds.double()[owner]
    mass = torch.bincount(owner[near], minlength=data.num_components).double() / x.shape[0]
    weights = data.weights.double()
    outliers = 1 - mass.sum()
    on_modes = mass / mass.sum() if mass.sum() > 0 else torch.full_like(mass, math.nan)
    scaled = (dist[near] / data.stds.double()[owner[near]]) ** 2 / data.dim
    return {
        "mass": mass,
        "spread_ratio": scaled.mean().sqrt().item() if near.any() else float("nan"),
        "modes_covered": int((mass >= min_fraction * weights).sum()),
        "weakest_mode_share": (mass[weights > 0] / weights[weights > 0]).min().item(),
        "outlier_fraction": outliers.item(),
        "mass_tv": 0.5 * ((mass - weights).abs().sum() + outliers).item(),
        "allocation_tv": 0.5 * (on_modes - weights).abs().sum().item(),
    }


def _gaussian_kernel_mean(x: Tensor, means: Tensor, var: Tensor, h2: float, dim: int) -> Tensor:
    """E_{y ~ N(mean_k, var_k I)} exp(-|x - y|^2 / 2h^2) for every (x, k): a Gaussian integral in closed form."""
    sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    total = h2 + var[None, :]
    return (h2 / total) ** (dim / 2) * torch.exp(-0.5 * sq / total)


def mmd(samples: Tensor, data: GaussianMixture, bandwidths=MMD_BANDWIDTHS) -> float:
    """Unbiased squared MMD between the samples and the mixture, with k = sum_h exp(-|x - y|^2 / 2h^2); the
    data terms E k(x, y) and E k(y, y') are exact. Returned as 1000 * MMD^2 (it can dip below 0 by sampling
    noise when the samples are as good as the data)."""
    x = samples.double()
    n = x.shape[0]
    if n < 2:
        raise ValueError("mmd needs at least 2 samples")
    mu, var, w, d = data.means.double(), data.stds.double() ** 2, data.weights.double(), data.dim
    # Each distinct pair once (pdist), kernel in float32 and summed in float64: the n^2 exps dominate the cost.
    sq_pairs = (torch.pdist(x) ** 2).float()
    pair_var = var[:, None] + var[None, :]
    pair_sq = ((mu[:, None, :] - mu[None, :, :]) ** 2).sum(-1)
    total = 0.0
    for h in bandwidths:
        h2 = h * h
        k_xx = torch.exp(sq_pairs * (-0.5 / h2)).sum(dtype=torch.float64) * 2 / (n * (n - 1))
        k_xy = (_gaussian_kernel_mean(x, mu, var, h2, d) * w).sum(1).mean()
        # E k(y, y') with y ~ component j, y' ~ component k: a Gaussian with variance var_j + var_k.
        k_yy = (w[:, None] * w[None] * (h2 / (h2 + pair_var)) ** (d / 2)
                * torch.exp(-0.5 * pair_sq / (h2 + pair_var))).sum()
        total += (k_xx - 2 * k_xy + k_yy).item()
    return 1000 * total


def two_sample_mmd(x: Tensor, y: Tensor, bandwidths=MMD_BANDWIDTHS) -> float:
    """Unbiased squared MMD between two sample sets (the kernel of :func:`mmd`), times 1000: for comparisons
    where neither side has a closed form, e.g. the inputs a multi-step student saw in training against those it
    meets at inference. About 0 (either sign) when both come from one distribution."""
    x, y = x.double().reshape(x.shape[0], -1), y.double().reshape(y.shape[0], -1)
    n, m = x.shape[0], y.shape[0]
    if min(n, m) < 2:
        raise ValueError(f"two_sample_mmd needs at least 2 samples on each side; got {n} and {m}")
    sq_xx, sq_yy, sq_xy = torch.pdist(x) ** 2, torch.pdist(y) ** 2, torch.cdist(x, y) ** 2
    total = 0.0
    for h in bandwidths:
        k = lambda sq: torch.exp(sq * (-0.5 / (h * h)))  # noqa: E731
        total += (k(sq_xx).sum() * 2 / (n * (n - 1)) + k(sq_yy).sum() * 2 / (m * (m - 1))
                  - 2 * k(sq_xy).mean()).item()
    return 1000 * total


def critic_error(critic: Denoiser, oracle: Denoiser, samples: Tensor,
                 sigmas=(0.05, 0.1, 0.2, 0.5, 1.0, 2.0), generator: torch.Generator | None = None) -> float:
    """Mean over the noise levels of E |critic(x_sigma) - oracle(x_sigma)|^2 / sigma^2 at generator samples:
    the squared score error scaled by sigma^2, so each level counts alike."""
    with torch.no_grad():
        errors = []
        for s in sigmas:
            sigma = torch.full((samples.shape[0],), float(s), dtype=torch.float64)
            noise = torch.randn(samples.shape, generator=generator, dtype=samples.dtype)
            x_t = add_noise(samples, sigma, noise)
            diff = critic(x_t, sigma).double() - oracle(x_t, sigma).double()
            errors.append((diff ** 2).sum(1).mean().item() / s ** 2)
    return math.fsum(errors) / len(errors)
