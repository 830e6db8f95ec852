"""Noise conventions, conversions between x0 / eps / score, and the teacher's samplers.

Every backend works in the variance-exploding ("VE", EDM) frame of Karras et al. 2022 (EDM, eq. 1):

    x_sigma = x0 + sigma * eps,        eps ~ N(0, I),

and every denoiser is a callable ``denoise(x_sigma, sigma) -> x0_hat`` with ``sigma`` of shape (batch,).
A variance-preserving ("VP", DDPM / Stable Diffusion) model with cumulative alphas ``a_t`` lives in the same
frame through ``x_vp = sqrt(a_t) * x_ve`` and ``sigma_t = sqrt((1 - a_t) / a_t)`` (EDM, Table 1), so the DMD2
losses never need to know which convention a backend uses.

Training-time noise levels are integer timesteps into a :class:`NoiseSchedule` table, as in DMD2's public code
(a 1000-entry table; the generator loss draws t in 20..980, the critic loss t in 0..999).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoise(x_sigma, sigma) -> x0_hat``: a posterior-mean estimate E[x0 | x_sigma], sigma of shape (batch,)."""


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample vector of shape (batch,) so it broadcasts against a tensor of ``ndim`` dims."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def per_sample_sigma(sigma, x: Tensor, dtype: torch.dtype | None = None, positive: bool = False) -> Tensor:
    """Noise levels as a (batch,) tensor on x's device, from a scalar or a (batch,) tensor; ValueError for another
    shape or a negative level (or, with ``positive``, a zero one). Without ``dtype`` a tensor keeps its dtype and
    a Python float becomes float64, not torch's default float32: the conversions promise float64 accuracy."""
    if dtype is None and not torch.is_tensor(sigma):
        dtype = torch.float64
    sigma = torch.as_tensor(sigma, device=x.device, dtype=dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or have shape (batch,) = ({x.shape[0]},); got shape {tuple(sigma.shape)}")
    if torch.any(sigma < 0) or (positive and torch.any(sigma == 0)):
        raise ValueError(f"sigma must be {'> 0' if positive else '>= 0'}; got min {sigma.min().item():.4g}")
    return sigma


def karras_sigmas(num: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The EDM noise levels (Karras et al. 2022, eq. 5), DESCENDING from sigma_max to sigma_min, float64."""
    if num < 1:
        raise ValueError(f"num must be >= 1; got {num}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if num == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, num, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


@dataclass(frozen=True)
class NoiseSchedule:
    """A table of VE noise levels indexed by integer timestep t = 0..T-1, ascending in t (float64)."""

    sigmas: Tensor

    def __post_init__(self):
        s = self.sigmas
        if s.ndim != 1 or s.numel() < 2:
            raise ValueError(f"sigmas must be a 1-D table of at least 2 levels; got shape {tuple(s.shape)}")
        if not torch.all(s > 0) or not torch.all(s[1:] > s[:-1]):
            raise ValueError("sigmas must be positive and strictly increasing in t")

    @classmethod
    def karras(cls, num: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> "NoiseSchedule":
        """DMD2's EDM table: 1000 Karras levels 0.002..80 (rho 7), so t = 20..980 spans sigma ~ 0.0032..72."""
        return cls(karras_sigmas(num, sigma_min, sigma_max, rho).flip(0))

    @classmethod
    def geometric(cls, num: int, sigma_min: float, sigma_max: float) -> "NoiseSchedule":
        """Log-uniform levels: a uniform integer t gives a log-uniform sigma (the toy's choice)."""
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
        return cls(torch.logspace(math.log10(sigma_min), math.log10(sigma_max), num, dtype=torch.float64))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> "NoiseSchedule":
        """A VP schedule's table in the VE frame: sigma_t = sqrt((1 - a_t) / a_t) (EDM, Table 1)."""
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        return cls(((1 - a) / a).sqrt())

    @classmethod
    def from_diffusers(cls, scheduler) -> "NoiseSchedule":
        """The VE table of a diffusers VP scheduler (DDPMScheduler, DDIMScheduler, ...)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod; pass a VP scheduler such as "
                            "diffusers.DDPMScheduler")
        return cls.from_alphas_cumprod(scheduler.alphas_cumprod)

    def __len__(self) -> int:
        return self.sigmas.numel()

    def sigma(self, t: Tensor) -> Tensor:
        """sigma[t] for integer timesteps t, returned on t's device in float64."""
        return self.sigmas.to(t.device)[t]

    def sample_timesteps(self, n: int, low: int = 0, high: int | None = None,
                         generator: torch.Generator | None = None, device=None) -> Tensor:
        """n integer timesteps uniform in [low, high] (both inclusive; high defaults to T-1)."""
        high = len(self) - 1 if high is None else high
        if not 0 <= low <= high < len(self):
            raise ValueError(f"timestep range [{low}, {high}] must lie within [0, {len(self) - 1}]")
        t = torch.randint(low, high + 1, (n,), generator=generator, device=getattr(generator, "device", None))
        return t.to(device) if device is not None else t


def add_noise(x0: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """x_sigma = x0 + sigma * eps (EDM eq. 1 in the VE frame)."""
    sigma = per_sample_sigma(sigma, x0)
    return x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise


def _in_float64(fn):
    """Run a conversion in float64 and return the dtype of its first argument (DMD2 converts in float64)."""
    def wrapped(x: Tensor, other: Tensor, sigma: Tensor) -> Tensor:
        s = append_dims(per_sample_sigma(sigma, x).double(), x.ndim)
        return fn(x.double(), other.double(), s).to(x.dtype)
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


@_in_float64
def x0_from_eps(x: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """x0 = x_sigma - sigma * eps."""
    return x - sigma * eps


@_in_float64
def eps_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_sigma - x0) / sigma."""
    return (x - x0) / sigma


@_in_float64
def score_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie's formula read backwards: grad log p_sigma(x) = (E[x0 | x] - x) / sigma^2."""
    return (x0 - x) / sigma ** 2


@_in_float64
def x0_from_score(x: Tensor, score: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie's formula: E[x0 | x_sigma] = x_sigma + sigma^2 * grad log p_sigma(x_sigma)."""
    return x + sigma ** 2 * score


def x0_from_vp_prediction(x_vp: Tensor, prediction: Tensor, alpha_cumprod: Tensor, kind: str) -> Tensor:
    """x0 from a VP model's output at x_vp = sqrt(a) x0 + sqrt(1-a) eps, for kind in {epsilon, v_prediction,
    sample} (the diffusers ``prediction_type`` names; v = sqrt(a) eps - sqrt(1-a) x0, Salimans & Ho 2022)."""
    a = append_dims(torch.as_tensor(alpha_cumprod, dtype=torch.float64, device=x_vp.device), x_vp.ndim)
    x, p = x_vp.double(), prediction.double()
    if kind == "epsilon":
        x0 = (x - (1 - a).sqrt() * p) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * p
    elif kind == "sample":
        x0 = p
    else:
        raise ValueError(f"unknown prediction type {kind!r}; expected 'epsilon', 'v_prediction' or 'sample'")
    return x0.to(x_vp.dtype)


def edm_sampler(denoise: Denoiser, noise: Tensor, num_steps: int, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0, heun: bool = True) -> Tensor:
    """Deterministic EDM sampler (Karras et al. 2022, Algorithm 1): Euler, or Heun's 2nd-order correction,
    on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma over the Karras grid plus a final 0.

    ``noise`` is standard normal; it is scaled to sigma_max here. Heun costs 2 * num_steps - 1 denoiser calls;
    one Euler step is the teacher's one-step output D(sigma_max * z, sigma_max).
    """
    sigmas = torch.cat([karras_sigmas(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    sigmas = sigmas.to(noise.device)
    x = noise * sigmas[0].to(noise.dtype)
    batch = noise.shape[0]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - denoise(x, s_cur.expand(batch))) / s_cur.to(x.dtype)
        x_next = x + (s_next - s_cur).to(x.dtype) * d_cur
        if heun and s_next > 0:
            d_next = (x_next - denoise(x_next, s_next.expand(batch))) / s_next.to(x.dtype)
            x_next = x + (s_next - s_cur).to(x.dtype) * (d_cur + d_next) / 2
        x = x_next
    return x


def sampler_evaluations(num_steps: int, heun: bool = True) -> int:
    """Number of denoiser calls (NFE) the EDM sampler makes."""
    return 2 * num_steps - 1 if heun else num_steps
