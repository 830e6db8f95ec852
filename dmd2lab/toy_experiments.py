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

from . import dmd, toy_metrics
from .diffusion import Denoiser, NoiseSchedule, edm_sampler
from .dmd import GANHead
from .objective import CriticWithHead, DenoiserObjective, DMD2Objective, DMD2Settings, RegressionObjective
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
    return teacher_pairs(teacher, n, steps, heun, seed)[1]


def teacher_pairs(teacher: Denoiser, n: int, steps: int = 100, heun: bool = True,
                  seed: int = 0) -> tuple[Tensor, Tensor]:
    """(z, y): n unit-normal noises and the teacher's deterministic ODE samples from them — DMD1's regression
    pairs, and what :func:`sample_teacher` returns the second half of."""
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return noise, edm_sampler(teacher, noise, steps, *TEACHER_SIGMAS, heun=heun)


STUDENT_TIMESTEPS = (999, 749, 499, 249)
"""DMD2's 4-step student timesteps (SDXL), read off the toy teacher's 1000-step table over TEACHER_SIGMAS."""


def student_sigmas(timesteps=STUDENT_TIMESTEPS) -> tuple[float, ...]:
    """The noise levels of a multi-step toy student: DMD2's timesteps mapped onto the teacher's geometric table
    (999/749/499/249 -> sigma 40, 4.2, 0.45, 0.047)."""
    table = NoiseSchedule.geometric(1000, *TEACHER_SIGMAS)
    return tuple(table.sigma(torch.tensor(timesteps)).tolist())


def regression_warm_start(pairs: tuple[Tensor, Tensor], steps: int = 1000, lr: float = 1e-3, batch_size: int = 256,
                          seed: int = 0) -> MLPGenerator:
    """A one-step MLP generator fitted to teacher ODE pairs by DMD1's regression loss alone: a student that starts
    where the teacher's sampler is, as DMD2 starts its one-step SDXL generator."""
    torch.manual_seed(seed)
    generator = MLPGenerator(noise_dim=pairs[0].shape[1], data_dim=pairs[1].shape[1])
    players = {"generator": Player(generator, lr, weight_decay=0.0)}
    Trainer(RegressionObjective(generator, pairs, batch_size), players,
            TrainConfig(steps, seed=seed, log_every=max(steps // 20, 1))).fit()
    return generator


def _run_multistep(student: Denoiser, sigmas: tuple[float, ...], n: int, seed: int,
                   dim: int) -> tuple[list[Tensor], list[Tensor]]:
    """A multi-step student's inference from seeded noise, without grad: (x0 per step, input per step)."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return dmd.multistep_generate(student, torch.randn(n, dim, generator=rng), sigmas, rng)


def sample_multistep(student: Denoiser, sigmas: tuple[float, ...], n: int, seed: int = 0,
                     steps: int | None = None, dim: int = 2) -> Tensor:
    """n samples of a multi-step toy student (any denoiser, e.g. the teacher itself) after its first ``steps``
    steps (default all): the last x0 it predicts."""
    return _run_multistep(student, sigmas[:steps], n, seed, dim)[0][-1]


@dataclass
class Distillation:
    generator: nn.Module
    """The student (its EMA copy when EMA is on): z ~ N(0, I) -> x in one call, or a multi-step denoiser."""
    critic: nn.Module | None
    trainer: Trainer
    objective: DMD2Objective
    wall_s: float

    def sample(self, n: int, seed: int = 0, steps: int | None = None) -> Tensor:
        """n samples; a multi-step student runs its first ``steps`` steps (default all) and returns the last x0."""
        sigmas = self.objective.settings.student_sigmas
        if sigmas is None:
            with torch.no_grad():
                z = torch.randn(n, self.generator.noise_dim, generator=torch.Generator().manual_seed(seed))
                return self.generator(z)
        return sample_multistep(self.generator, sigmas, n, seed, steps, self.generator.data_dim)

    def step_inputs(self, n: int, seed: int = 0) -> list[Tensor]:
        """The inputs a multi-step student meets at each of its steps at inference."""
        if self.objective.settings.student_sigmas is None:
            raise ValueError("step_inputs needs a multi-step student (distill with student_sigmas)")
        return _run_multistep(self.generator, self.objective.settings.student_sigmas, n, seed,
                              self.generator.data_dim)[1]


def distill(teacher: Denoiser, data: GaussianMixture, critic: str = "learned", ratio: int = 5,
            generator_steps: int = 1000, lr_generator: float = 1e-3, lr_critic: float = 1e-3,
            batch_size: int = 256, ema_decay: float | None = 0.99, warmup_steps: int = 0, seed: int = 0,
            oracle_samples: int = 1024, regression_pairs: tuple[Tensor, Tensor] | None = None,
            regression_weight: float = 0.0, dm_weight: float = 1.0, gan_weights: tuple[float, float] = (0.0, 0.0),
            head_features: str = "critic", real_data: Tensor | None = None,
            student_sigmas: tuple[float, ...] | None = None, backward_simulation: bool = True,
            initial_generator: nn.Module | None = None,
            evaluate: Callable[[Trainer], dict[str, float]] | None = None, eval_every: int = 0,
            out_dir: str | Path | None = None) -> Distillation:
    """Distil ``teacher`` into a toy student with DMD2 (DM loss; no regression loss unless asked).

    ``critic``: "learned" — an MLP critic initialised from the teacher (a fresh one if the teacher is not a
    module) and trained every step, the generator every ``ratio`` steps (TTUR); "oracle" — the exact fake score
    of ``oracle_samples`` fresh generator samples at every call (no critic to train, so ratio is 1).
    ``generator_steps`` is the number of generator updates, so runs with different ratios are compared at an
    equal generator budget. The generator's lr defaults to 1e-3: a mode kept less than 5% of its mass in 3 of 36
    measured ring runs at 3e-3, in 1 of 50 at 1e-3 (docs/results.md).

    GAN (``gan_weights`` = generator / discriminator weight, both > 0): a :class:`dmd2lab.dmd.GANHead` reads the
    critic's bottleneck (``head_features="critic"``, DMD2) or the frozen teacher's (``"teacher"``), and
    discriminates ``real_data`` (a fixed data set; rows drawn at random each step) from generator samples.
    ``student_sigmas``: a multi-step student (a copy of the teacher), trained with ``backward_simulation`` or on
    ``real_data`` noised to its levels; the last 4 batches of inputs of each step are kept
    (``objective.recent_inputs``) to measure the training-inference mismatch. ``initial_generator``: a one-step generator to start from (copied, e.g.
    :func:`regression_warm_start`) instead of a fresh one.
    """
    if critic not in ("learned", "oracle"):
        raise ValueError(f"critic must be 'learned' or 'oracle'; got {critic!r}")
    if head_features not in ("critic", "teacher"):
        raise ValueError(f"head_features must be 'critic' or 'teacher'; got {head_features!r}")
    gan = any(w > 0 for w in gan_weights)
    if gan and not all(w > 0 for w in gan_weights):
        raise ValueError(f"gan_weights = (generator, discriminator) must both be > 0 to train a GAN, or both 0; "
                         f"got {gan_weights}")
    if real_data is None and (gan or (student_sigmas is not None and not backward_simulation)):
        raise ValueError("real_data (a tensor of data samples) is needed by the GAN and by a multi-step student "
                         "trained without backward simulation")
    if gan and critic != "learned":
        raise ValueError("the GAN head lives on a learned critic; use critic='learned' with gan_weights")
    if student_sigmas is not None and not isinstance(teacher, nn.Module):
        raise ValueError("a multi-step student starts as a copy of the teacher, so the teacher must be a module")
    if student_sigmas is not None and initial_generator is not None:
        raise ValueError("initial_generator is a one-step generator; a multi-step student starts from the teacher")
    if student_sigmas is not None and critic == "oracle":
        raise ValueError("the oracle critic samples a one-step generator; a multi-step student needs critic='learned'")
    if gan and head_features == "teacher" and not hasattr(teacher, "features"):
        raise ValueError("head_features='teacher' reads the teacher's bottleneck: the teacher must be a module with "
                         ".features(x, sigma), e.g. an MLPDenoiser")
    torch.manual_seed(seed)
    if student_sigmas is None:
        generator = MLPGenerator(data_dim=data.dim) if initial_generator is None else copy.deepcopy(initial_generator)
        sample_latents = lambda n, rng: torch.randn(n, generator.noise_dim, generator=rng)  # noqa: E731
    else:
        generator = copy.deepcopy(teacher).requires_grad_(True).train()
        sample_latents = lambda n, rng: torch.randn(n, data.dim, generator=rng)  # noqa: E731
    sigma_data = data_sigma(data)
    if critic == "oracle":
        fake = OracleFakeDenoiser(lambda n: generator(torch.randn(n, generator.noise_dim)), oracle_samples)
        ratio = 1
    elif isinstance(teacher, nn.Module):
        fake = copy.deepcopy(teacher).requires_grad_(True).train()
    else:
        fake = MLPDenoiser(data.dim, sigma_data=sigma_data)
    if gan:
        features = teacher.features if head_features == "teacher" else None
        fake = CriticWithHead(fake, GANHead(fake.feature_shape), features)
    sample_real = None
    if real_data is not None:
        sample_real = lambda n, rng: real_data[torch.randint(0, len(real_data), (n,), generator=rng)]  # noqa: E731
    settings = DMD2Settings(batch_size=batch_size, dm_timesteps=(0, 999), sigma_data=sigma_data,
                            dm_weight=dm_weight, regression_weight=regression_weight,
                            gan_generator_weight=gan_weights[0], gan_discriminator_weight=gan_weights[1],
                            student_sigmas=student_sigmas, backward_simulation=backward_simulation)
    objective = DMD2Objective(generator, fake, teacher, NoiseSchedule.geometric(1000, *DISTILL_SIGMAS),
                              sample_latents, settings, regression_pairs, sample_real,
                              keep_inputs=4 if student_sigmas is not None else 0)
    players = objective.players(lr_generator, lr_critic, ratio, ema_decay=ema_decay, weight_decay=0.0,
                                warmup_steps=warmup_steps)
    steps = generator_steps * ratio
    trainer = Trainer(objective, players, TrainConfig(steps, seed=seed, log_every=max(steps // 50, 1),
                                                      eval_every=eval_every), out_dir, evaluate)
    started = time.perf_counter()
    trainer.fit()
    return Distillation(trainer.module("generator"), fake if critic == "learned" else None, trainer, objective,
                        time.perf_counter() - started)


def evaluate_samples(samples: Tensor, data: GaussianMixture) -> dict[str, float]:
    """The exact metrics of :mod:`dmd2lab.toy_metrics` as one flat dict of finite numbers (``spread_ratio`` only
    when some sample lies near a mode)."""
    modes = toy_metrics.mode_statistics(samples, data)
    return {"nll": toy_metrics.negative_log_likelihood(samples, data), "mmd": toy_metrics.mmd(samples, data),
            "modes_covered": modes["modes_covered"], "weakest_mode_share": modes["weakest_mode_share"],
            "mass_tv": modes["mass_tv"], "outlier_fraction": modes["outlier_fraction"],
            # Undefined (NaN) when no sample lies near any mode: left out, so every value is a number.
            **({"spread_ratio": modes["spread_ratio"]} if math.isfinite(modes["spread_ratio"]) else {})}


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
        if not hasattr(generator, "noise_dim"):
            raise ValueError("critic_tracking samples a one-step generator z -> x; this run's student is multi-step")
        with torch.no_grad():
            reference = GaussianMixture(generator(torch.randn(num_reference, generator.noise_dim, generator=rng)), 0.0)
            points = generator(torch.randn(num_points, generator.noise_dim, generator=rng))
        return {"critic_error": toy_metrics.critic_error(critic, reference.denoise, points, generator=rng),
                "teacher_error": toy_metrics.critic_error(teacher, reference.denoise, points, generator=rng)}

    return evaluate


def loss_gradient_norms(run: Distillation, n: int = 1024, seed: int = 0) -> dict[str, float]:
    """Mean per-sample norm of the gradient that the DM loss and the generator's GAN loss each put on a sample x
    (before their weights), at the run's final generator and critic: the two scales the GAN weight balances."""
    objective, rng = run.objective, torch.Generator().manual_seed(seed)
    if not objective.settings.gan:
        raise ValueError("loss_gradient_norms compares the DM and GAN gradients: the run needs gan_weights > 0")
    x = run.sample(n, seed=seed).requires_grad_(True)
    dm, _ = dmd.distribution_matching_step(x, objective.real, objective.fake, objective.schedule,
                                           objective.settings.dm_timesteps, rng)
    gan = dmd.gan_generator_loss(dmd.gan_logits(objective.fake.logits, x, objective.schedule,
                                                objective.settings.gan_timesteps, rng))
    # Both losses are means over the batch: n * d(loss)/dx_i is sample i's own gradient.
    return {name: (n * torch.autograd.grad(loss, x)[0]).norm(dim=1).mean().item()
            for name, loss in (("dm", dm), ("gan", gan))}
