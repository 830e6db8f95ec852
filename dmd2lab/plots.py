"""Figures the labs draw; each takes an Axes (or makes one) so a widget can redraw it."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from torch import Tensor

from .toy2d import GaussianMixture


def _axes(ax):
    return ax if ax is not None else plt.subplots(figsize=(4, 4))[1]


def plot_samples(samples: Tensor, data: GaussianMixture | None = None, title: str = "", ax=None, lim: float = 3.2):
    """Scatter of 2-D samples over the true mixture's 2-sigma circles."""
    ax = _axes(ax)
    if data is not None:
        for mu, s in zip(data.means.tolist(), data.stds.tolist()):
            ax.add_patch(plt.Circle(mu, 2 * s, fill=False, color="0.6", lw=0.8))
    x = samples.detach().cpu().float()
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title, xticks=[], yticks=[])
    return ax


def score_difference_field(data: GaussianMixture, generator_samples: Tensor, sigma: float, lim: float = 3.0,
                           resolution: int = 21) -> tuple[Tensor, Tensor]:
    """Grid points and the exact s_real - s_fake at noise level sigma: the teacher's score minus the score of
    the generator's noised sample distribution. Its direction is where DMD moves a sample (DMD eq. 7)."""
    axis = torch.linspace(-lim, lim, resolution, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    fake = GaussianMixture(generator_samples.detach().double().cpu(), 0.0)
    return grid, data.score(grid, sigma) - fake.score(grid, sigma)


def plot_score_difference(data: GaussianMixture, generator_samples: Tensor, sigma: float, ax=None,
                          lim: float = 3.0, resolution: int = 21):
    """Generator samples with the exact score-difference field at sigma drawn over them: arrows of one length
    show the direction a sample is pushed, their colour the size of the push, log10 |sigma^2 (s_real - s_fake)|
    (the distance between the two denoised estimates)."""
    ax = _axes(ax)
    grid, field = score_difference_field(data, generator_samples, sigma, lim, resolution)
    push = sigma ** 2 * field.norm(dim=1)
    direction = field / field.norm(dim=1, keepdim=True).clamp_min(1e-30)
    plot_samples(generator_samples, data, ax=ax, lim=lim + 0.2)
    arrows = ax.quiver(grid[:, 0], grid[:, 1], direction[:, 0], direction[:, 1], push.clamp_min(1e-6).log10(),
                       cmap="viridis", angles="xy", scale_units="xy", scale=1 / (0.8 * 2 * lim / (resolution - 1)),
                       width=0.005)
    ax.figure.colorbar(arrows, ax=ax, shrink=0.7, label="log10 push")
    ax.set_title(f"s_real - s_fake at sigma = {sigma:.2g}")
    return ax


def plot_history(history: list[dict], keys: list[str], ax=None, logy: bool = True):
    """Logged training curves (Trainer.history) against the step."""
    ax = ax if ax is not None else plt.subplots(figsize=(5, 3))[1]
    steps = [row["step"] for row in history]
    for key in keys:
        ax.plot(steps, [row.get(key, float("nan")) for row in history], label=key)
    ax.set(xlabel="step", yscale="log" if logy else "linear")
    ax.legend()
    return ax


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], ax=None, xlabel: str = "step",
                ylabel: str = "", logy: bool = True, title: str = ""):
    """Several labelled (x, y) curves on one Axes, e.g. one run per TTUR ratio against generator steps."""
    ax = ax if ax is not None else plt.subplots(figsize=(5, 3))[1]
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, marker=".")
    ax.set(xlabel=xlabel, ylabel=ylabel, yscale="log" if logy else "linear", title=title)
    ax.legend(fontsize=8)
    return ax


def plot_mode_mass(masses: dict[str, Tensor], weights: Tensor, ax=None, title: str = "mass per mode"):
    """Grouped bars: each run's sample mass per mixture component beside the true weights (black ticks)."""
    ax = ax if ax is not None else plt.subplots(figsize=(6, 3))[1]
    k, width = len(weights), 0.8 / max(len(masses), 1)
    for i, (label, mass) in enumerate(masses.items()):
        ax.bar([j + (i - (len(masses) - 1) / 2) * width for j in range(k)], mass.tolist(), width, label=label)
    ax.scatter(range(k), weights.tolist(), marker="_", s=300, color="black", label="true", zorder=3)
    ax.set(xlabel="mode", ylabel="mass", title=title, xticks=range(k))
    ax.legend(fontsize=8, ncol=2)
    return ax


def plot_ratio_agreement(agreement: dict, ax=None, title: str = "discriminator vs exact log density ratio"):
    """Scatter of a discriminator's logit against the exact log p_t / q_t, one colour per noise level (the output of
    :func:`dmd2lab.toy_experiments.density_ratio_agreement`), over the line of perfect agreement."""
    ax = _axes(ax)
    low, high = 0.0, 0.0
    for sigma, row in agreement.items():
        exact, estimate = row["exact"].clamp(-20, 20), row["estimate"].clamp(-20, 20)
        ax.scatter(exact, estimate, s=3, alpha=0.4, label=f"sigma {sigma:g}: r = {row['correlation']:.2f}")
        low, high = min(low, exact.min().item(), estimate.min().item()), max(high, exact.max().item(),
                                                                           estimate.max().item())
    ax.plot([low, high], [low, high], color="black", lw=0.8)
    ax.set(xlabel="exact log p_t/q_t (clipped to +-20)", ylabel="discriminator logit", title=title)
    ax.legend(markerscale=4, fontsize=8)
    return ax


def show_images(images: Tensor, nrow: int = 8, ax=None, title: str = ""):
    """A grid of images in model range [-1, 1] (N x C x H x W, C = 1 or 3)."""
    from torchvision.utils import make_grid
    ax = ax if ax is not None else plt.subplots(figsize=(4, 4))[1]
    grid = make_grid(((images.detach().float().cpu().clamp(-1, 1) + 1) / 2), nrow=nrow, padding=1, pad_value=1.0)
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray" if images.shape[1] == 1 else None)
    ax.set(xticks=[], yticks=[], title=title)
    return ax


def plot_dm_gradient_images(pictures: dict[str, Tensor], sigma: float, axes=None):
    """One row per image: the generator sample x, its noised x_t, the teacher's and the critic's denoised x0, and the
    DM update direction real_x0 - fake_x0 (DMD2 eq. 2: where the DM loss moves x), drawn on a symmetric colour scale."""
    names = ["x", "x_t", "real_x0", "fake_x0", "update"]
    rows = pictures["x"].shape[0]
    if axes is None:
        axes = plt.subplots(rows, len(names), figsize=(1.6 * len(names), 1.6 * rows), squeeze=False)[1]
    update_scale = float(pictures["update"].abs().max()) or 1.0
    titles = ["generator x", f"x_t (sigma {sigma:.3g})", "teacher x0", "critic x0", "real - fake"]
    for r in range(rows):
        for c, name in enumerate(names):
            image = pictures[name][r].detach().float().cpu()
            if name == "update":  # colour images: the update summed over channels, on one signed scale
                axes[r][c].imshow(image.mean(0), cmap="RdBu_r", vmin=-update_scale, vmax=update_scale)
            elif image.shape[0] == 3:
                axes[r][c].imshow(((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0))
            else:
                axes[r][c].imshow(image[0].clamp(-1, 1), cmap="gray", vmin=-1, vmax=1)
            axes[r][c].set(xticks=[], yticks=[])
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=8)
    return axes
