"""Toy experiments the labs call, one function each: train a teacher, sample it, distil a one-step student,
and score samples with the exact metrics. All randomness flows from the ``seed`` argument.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from . import toy_metrics
from .diffusion import Denoiser, NoiseSchedule, edm_sampler
from .objective import DenoiserObjective, DMD2Objective, DMD2Settings
from .toy2d import GaussianMixture, MLPDenoiser, MLPGenerator, OracleFakeDenoiser
from .train import Player, TrainConfig, Trainer

TEACHER_SIGMAS = (0.005, 40.0)
"""Noise range the toy teacher is trained on and sampled over (data std ~1.4, so 40 is pure noise)."""

DISTILL_SIGMAS = (0.05, 10.0)
"""Log-uniform noise range of the toy's DM and critic losses; it beat the image-scale Karras range here."""


def data_sigma(data: GaussianMixture) -> float:
    """The mixture's exact per-coordinate standard deviation (EDM's sigma_data)."""
    w, mu, s2 = data.weights.double(), data.means.double(), data.stds.double() ** 2
    mean = (w[:, None] * mu).sum(0)
    var = (w[:, None] * (s2[:, None] + mu ** 2)).sum(0) - mean ** 2
    return math.sqrt(var.mean().item())


def train_teacher(data: GaussianMixture, steps: int = 1500, batch_size: int = 256, lr: float = 2e-3,
                  hidden: int = 64, seed: int = 0, out_dir: str | Path | None = None) -> MLPDenoiser:
    """A learned teacher: an MLP denoiser fitted to the data by denoising score matching (EDM weighting),
    noise levels log-uniform over TEACHER_SIGMAS. Returned frozen in eval mode."""
    torch.manual_seed(seed)
    teacher = MLPDenoiser(data.dim, hidden=hidden, sigma_data=data_sigma(data))
    objective = DenoiserObjective(teacher, lambda n, rng: data.sample(n, rng),
                                  NoiseSchedule.geometric(1000, *TEACHER_SIGMAS), batch_size, "edm",
                                  teacher.sigma_data)
    players = {"denoiser": Player(teacher, lr, weight_decay=0.0, warmup_steps=min(100, steps))}
    Trainer(objective, players, TrainConfig(steps, seed=seed, log_every=max(steps // 20, 1)), out_dir).fit()
    return teacher.requires_grad_(False).eval()


def sample_teacher(teacher: Denoiser, n: int, steps: int = 100, heun: bool = True, seed: int = 0) -> Tensor:
    """n teacher samples from the EDM sampler over TEACHER_SIGMAS (Heun: 2 * steps - 1 evaluations)."""
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return edm_sampler(teacher, noise, steps, *TEACHER_SIGMAS, heun=heun)


@dataclass
class Distillation:
    generator: nn.Module
    """The student (its EMA copy when EMA is on): z ~ N(0, I) -> x in one call."""
    critic: nn.Module | None
    trainer: Trainer
    wall_s: float

    def sample(self, n: int, seed: int = 0) -> Tensor:
        noise = torch.randn(n, self.generator.noise_dim, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return self.generator(noise)


def distill_one_step(teacher: Denoiser, data: GaussianMixture, critic: str = "learned", ratio: int = 5,
                     generator_steps: int = 1000, lr_generator: float = 1e-3, lr_critic: float = 1e-3,
                     batch_size: int = 256, ema_decay: float | None = 0.99, warmup_steps: int = 0, seed: int = 0,
                     oracle_samples: int = 1024, regression_pairs: tuple[Tensor, Tensor] | None = None,
                     regression_weight: float = 0.0,
                     evaluate: Callable[[Trainer], dict[str, float]] | None = None, eval_every: int = 0,
                     out_dir: str | Path | None = None) -> Distillation:
    """Distil ``teacher`` into a one-step MLP generator with DMD2 (DM loss; no regression loss unless asked).

    ``critic``: "learned" — an MLP critic initialised from the teacher (a fresh one if the teacher is not a
    module) and trained every step, the generator every ``ratio`` steps (TTUR); "oracle" — the exact fake score
    of ``oracle_samples`` fresh generator samples at every call (no critic to train, so ratio is 1).
    ``generator_steps`` is the number of generator updates, so runs with different ratios are compared at an
    equal generator budget. The generator's lr defaults to 1e-3: a mode kept less than 5% of its mass in 3 of 36
    measured ring runs at 3e-3, in 1 of 50 at 1e-3 (docs/results.md).
    """
    if critic not in ("learned", "oracle"):
        raise ValueError(f"critic must be 'learned' or 'oracle'; got {critic!r}")
    torch.manual_seed(seed)
    generator = MLPGenerator(data_dim=data.dim)
    sigma_data = data_sigma(data)
    if critic == "oracle":
        fake = OracleFakeDenoiser(lambda n: generator(torch.randn(n, generator.noise_dim)), oracle_samples)
        ratio = 1
    elif isinstance(teacher, nn.Module):
        fake = copy.deepcopy(teacher).requires_grad_(True).train()
    else:
        fake = MLPDenoiser(data.dim, sigma_data=sigma_data)
    settings = DMD2Settings(batch_size=batch_size, dm_timesteps=(0, 999), sigma_data=sigma_data,
                            regression_weight=regression_weight)
    objective = DMD2Objective(generator, fake, teacher, NoiseSchedule.geometric(1000, *DISTILL_SIGMAS),
                              lambda n, rng: torch.randn(n, generator.noise_dim, generator=rng), settings,
                              regression_pairs)
    players = objective.players(lr_generator, lr_critic, ratio, ema_decay=ema_decay, weight_decay=0.0,
                                warmup_steps=warmup_steps)
    steps = generator_steps * ratio
    trainer = Trainer(objective, players, TrainConfig(steps, seed=seed, log_every=max(steps // 50, 1),
                                                      eval_every=eval_every), out_dir, evaluate)
    started = time.perf_counter()
    trainer.fit()
    return Distillation(trainer.module("generator"), fake if critic == "learned" else None, trainer,
                        time.perf_counter() - started)


def evaluate_samples(samples: Tensor, data: GaussianMixture) -> dict[str, float]:
    """The exact metrics of :mod:`dmd2lab.toy_metrics` as one flat dict of numbers."""
    modes = toy_metrics.mode_statistics(samples, data)
    return {"nll": toy_metrics.negative_log_likelihood(samples, data), "mmd": toy_metrics.mmd(samples, data),
            "modes_covered": modes["modes_covered"], "weakest_mode_share": modes["weakest_mode_share"],
            "mass_tv": modes["mass_tv"],
            "outlier_fraction": modes["outlier_fraction"]}


def critic_tracking(teacher: Denoiser, num_reference: int = 2048, num_points: int = 256,
                    seed: int = 0) -> Callable[[Trainer], dict[str, float]]:
    """An ``evaluate`` hook for a learned-critic distillation: the critic's error against the exact fake score
    (the noised density of ``num_reference`` current generator samples), beside the frozen teacher's error
    against the same reference — how much the critic has learned about the generator that the teacher has
    not. Its randomness is its own, derived from (seed, step): evaluating never changes the training run, and a
    resumed run measures the same numbers."""

    def evaluate(trainer: Trainer) -> dict[str, float]:
        rng = torch.Generator().manual_seed(seed * 1_000_003 + trainer.step)
        generator, critic = trainer.players["generator"].module, trainer.players["critic"].module
        with torch.no_grad():
            reference = GaussianMixture(generator(torch.randn(num_reference, generator.noise_dim, generator=rng)), 0.0)
            points = generator(torch.randn(num_points, generator.noise_dim, generator=rng))
        return {"critic_error": toy_metrics.critic_error(critic, reference.denoise, points, generator=rng),
                "teacher_error": toy_metrics.critic_error(teacher, reference.denoise, points, generator=rng)}

    return evaluate
