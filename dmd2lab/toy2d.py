"""The exact toy: 2-D Gaussian mixtures whose noised densities, scores and denoisers are known in closed form.

Convolving a mixture sum_k w_k N(mu_k, s_k^2 I) with N(0, sigma^2 I) gives sum_k w_k N(mu_k, (s_k^2 + sigma^2) I),
so log p_sigma, its score and the posterior mean E[x0 | x_sigma] (Tweedie) are exact for every sigma. That makes
the teacher's score, the generator's score (the noised density of its samples) and every metric exact, the
oracles that the learned networks of DMD2 are measured against.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .diffusion import per_sample_sigma


class GaussianMixture:
    """An isotropic Gaussian mixture sum_k w_k N(mu_k, s_k^2 I), exact under Gaussian noise of any sigma.

    ``means`` (K, D), ``stds`` (K,) or a scalar (zero-width components are allowed and make an empirical
    distribution, usable at sigma > 0), ``weights`` (K,) (normalised here; default uniform). Computations run
    in the dtype of the query points x.
    """

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None):
        means = torch.as_tensor(means)
        if not means.is_floating_point():
            means = means.double()  # integer means would truncate the stds and weights cast to their dtype
        if means.ndim != 2 or means.shape[0] < 1:
            raise ValueError(f"means must have shape (components, dim); got {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=means.dtype).expand(k) if torch.as_tensor(stds).ndim == 0 \
            else torch.as_tensor(stds, dtype=means.dtype)
        if stds.shape != (k,) or torch.any(stds < 0):
            raise ValueError(f"stds must be a scalar or shape ({k},) with entries >= 0; got shape "
                             f"{tuple(stds.shape)}")
        weights = torch.full((k,), 1.0 / k, dtype=means.dtype) if weights is None \
            else torch.as_tensor(weights, dtype=means.dtype)
        if weights.shape != (k,) or torch.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"weights must have shape ({k},), be >= 0 and not all 0; got {weights}")
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def _noised_parts(self, x: Tensor, sigma) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample, per-component (mean, variance, log weight * N(x; mu_k, var_k I)) of p_sigma."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}); got {tuple(x.shape)}")
        sigma = per_sample_sigma(sigma, x, dtype=x.dtype)
        mu = self.means.to(x)
        var = self.stds.to(x)[None, :] ** 2 + sigma[:, None] ** 2
        if torch.any(var == 0):
            raise ValueError("this mixture has zero-width components: evaluate it at sigma > 0")
        sq = ((x[:, None, :] - mu[None, :, :]) ** 2).sum(-1)
        log_terms = self.weights.to(x).log()[None, :] - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return mu, var, log_terms

    def log_prob(self, x: Tensor, sigma=0.0) -> Tensor:
        """log p_sigma(x) of the mixture convolved with N(0, sigma^2 I); shape (batch,)."""
        return torch.logsumexp(self._noised_parts(x, sigma)[2], dim=1)

    def responsibilities(self, x: Tensor, sigma=0.0) -> Tensor:
        """Posterior component probabilities p(k | x_sigma); shape (batch, K)."""
        return torch.softmax(self._noised_parts(x, sigma)[2], dim=1)

    def score(self, x: Tensor, sigma) -> Tensor:
        """grad_x log p_sigma(x) = sum_k r_k(x) (mu_k - x) / (s_k^2 + sigma^2)."""
        mu, var, log_terms = self._noised_parts(x, sigma)
        r = torch.softmax(log_terms, dim=1)
        return torch.einsum("bk,bkd->bd", r / var, mu[None] - x[:, None])

    def denoise(self, x: Tensor, sigma) -> Tensor:
        """E[x0 | x_sigma] = sum_k r_k (s_k^2 x + sigma^2 mu_k) / (s_k^2 + sigma^2), equal to x + sigma^2 score
        (Tweedie) but written so that it stays exact as sigma -> 0."""
        mu, var, log_terms = self._noised_parts(x, sigma)
        r = torch.softmax(log_terms, dim=1)
        s2 = self.stds.to(x)[None, :] ** 2
        sigma2 = var - s2
        shrink = (r * s2 / var).sum(1, keepdim=True)
        return shrink * x + torch.einsum("bk,kd->bd", r * sigma2 / var, mu)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
        """n exact samples."""
        k = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means.double()[k] + self.stds.double()[k, None] * z).to(dtype)

    def inflated(self, extra_std: float) -> "GaussianMixture":
        """The same mixture with every component's std widened by ``extra_std`` (an imperfect teacher)."""
        return GaussianMixture(self.means, self.stds + extra_std, self.weights)


def ring(modes: int = 8, radius: float = 2.0, std: float = 0.1, weights=None) -> GaussianMixture:
    """``modes`` equal Gaussians evenly spaced on a circle."""
    angle = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
    return GaussianMixture(radius * torch.stack([angle.cos(), angle.sin()], 1), std, weights)


def grid(size: int = 5, spacing: float = 1.0, std: float = 0.1, weights=None) -> GaussianMixture:
    """A size x size grid of Gaussians centred on the origin."""
    axis = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2) * spacing
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    return GaussianMixture(torch.stack([gx.flatten(), gy.flatten()], 1), std, weights)


def tree(depth: int = 3, std: float = 0.06, spacing: float = 0.15) -> GaussianMixture:
    """A branching tree: a trunk that forks in two ``depth`` times, each branch 0.7 times its parent's length
    and turned 30 degrees, drawn as small Gaussians every ``spacing`` along the branches (thin, curved
    structure that a generator must place its mass on exactly)."""
    points = []

    def branch(start: Tensor, angle: float, length: float, level: int):
        end = start + length * torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
        n = max(2, int(length / spacing))
        points.append(start + torch.linspace(0, 1, n, dtype=torch.float64)[1:, None] * (end - start))
        if level < depth:
            for turn in (-math.pi / 6, math.pi / 6):
                branch(end, angle + turn, 0.7 * length, level + 1)

    branch(torch.tensor([0.0, -2.0], dtype=torch.float64), math.pi / 2, 1.4, 0)
    return GaussianMixture(torch.cat(points), std)


DATASETS: dict[str, Callable[..., GaussianMixture]] = {"ring": ring, "grid": grid, "tree": tree}


def make_dataset(name: str, **kwargs) -> GaussianMixture:
    """One of the named mixtures: ring (8 modes), grid (5 x 5) or tree."""
    if name not in DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](**kwargs)


def _mlp(inputs: int, hidden: int, depth: int, outputs: int, activation: type[nn.Module]) -> nn.Sequential:
    layers, width = [], inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, outputs))


class MLPGenerator(nn.Module):
    """A one-step generator z -> x. ReLU: on the toy a SiLU generator stalled far from the modes."""

    def __init__(self, noise_dim: int = 2, data_dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.noise_dim = noise_dim
        self.net = _mlp(noise_dim, hidden, depth, data_dim, nn.ReLU)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class MLPDenoiser(nn.Module):
    """A noise-conditioned denoiser D(x, sigma) with EDM preconditioning (Karras et al. 2022, Table 1):

        D(x, sigma) = c_skip x + c_out F(c_in x, c_noise),   c_noise = log(sigma) / 4,

    so the network F sees unit-variance inputs and targets at every sigma. F is an MLP whose hidden layers are
    scaled and shifted by an embedding of c_noise (FiLM): on the toy, simply concatenating the embedding to x
    left the denoiser 10-20x less accurate at mid noise levels for the same cost. ``features`` returns F's last
    hidden layer, the "bottleneck" a GAN head can read.
    """

    def __init__(self, data_dim: int = 2, hidden: int = 64, depth: int = 3, sigma_data: float = 1.0,
                 embedding_dim: int = 32):
        super().__init__()
        self.sigma_data, self.data_dim = sigma_data, data_dim
        self.register_buffer("frequencies", 2 * math.pi * torch.logspace(-1.5, 0.5, embedding_dim // 2))
        self.embed = nn.Sequential(nn.Linear(embedding_dim, hidden), nn.SiLU())
        self.inp = nn.Linear(data_dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        # Every layer's scale and shift from one matmul: on CPU these tiny nets are bound by autograd overhead.
        self.film = nn.Linear(hidden, 2 * hidden * depth)
        self.out = nn.Linear(hidden, data_dim)

    @property
    def feature_shape(self) -> tuple[int]:
        """Shape of one sample's ``features`` (the bottleneck a GAN head reads)."""
        return (self.out.in_features,)

    def features(self, x: Tensor, sigma) -> Tensor:
        return self._features(x, per_sample_sigma(sigma, x, dtype=torch.float32, positive=True))

    def _features(self, x: Tensor, sigma: Tensor) -> Tensor:
        angle = (sigma.log() / 4)[:, None] * self.frequencies
        emb = self.embed(torch.cat([angle.sin(), angle.cos()], 1))
        h = self.inp(x.float() / (sigma[:, None] ** 2 + self.sigma_data ** 2).sqrt())
        modulation = self.film(emb).chunk(2 * len(self.layers), dim=1)
        for layer, scale, shift in zip(self.layers, modulation[0::2], modulation[1::2]):
            h = layer(F.silu(h)) * (1 + scale) + shift
        return F.silu(h)

    def forward(self, x: Tensor, sigma) -> Tensor:
        sigma = per_sample_sigma(sigma, x, dtype=torch.float32, positive=True)
        sd2 = self.sigma_data ** 2
        c_skip = (sd2 / (sigma ** 2 + sd2))[:, None]
        c_out = (sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt())[:, None]
        return (c_skip * x.float() + c_out * self.out(self._features(x, sigma))).to(x.dtype)


class OracleFakeDenoiser:
    """The exact fake score: the posterior mean under the noised density of a fresh sample of generator outputs,
    (1/N) sum_i N(x_i, sigma^2 I). With ``sample`` drawing N new generator samples (no grad) at every call, it
    stands in for a perfectly trained critic, and it is the reference a learned critic is measured against."""

    def __init__(self, sample: Callable[[int], Tensor], num_samples: int = 2048):
        self.sample, self.num_samples = sample, num_samples

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        with torch.no_grad():
            reference = GaussianMixture(self.sample(self.num_samples).detach().to(x.dtype), 0.0)
            return reference.denoise(x, sigma)
