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
from .objective import (CriticWithHead, DenoiserObjective, DMD2Objective, DMD2Settings, GuidedDMDObjective,
                        RegressionObjective)
from .toy2d import (ClassConditionalMixture, ClassOracleFakeDenoiser, GaussianMixture, MLPDenoiser, MLPGenerator,
                    OracleFakeDenoiser, OracleLogDensityRatio, by_label)
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
                          seed: int = 0, labels: Tensor | None = None, num_classes: int | None = None) -> MLPGenerator:
    """A one-step MLP generator fitted to teacher ODE pairs by DMD1's regression loss alone: a student that starts
    where the teacher's sampler is, as DMD2 starts its one-step SDXL generator. ``labels`` (one per pair, e.g. from
    :func:`class_teacher_pairs`) make it class-conditional over ``num_classes`` (default: the largest label + 1)."""
    torch.manual_seed(seed)
    if labels is None and num_classes:
        raise ValueError("num_classes is for a class-conditional warm start: pass labels too")
    if labels is not None:
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        if int(labels.max()) >= num_classes or int(labels.min()) < 0:
            raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {int(labels.min())}..{int(labels.max())}")
    num_classes = num_classes or 0
    generator = MLPGenerator(noise_dim=pairs[0].shape[1], data_dim=pairs[1].shape[1], num_classes=num_classes)
    players = {"generator": Player(generator, lr, weight_decay=0.0)}
    Trainer(RegressionObjective(generator, pairs, batch_size, labels=labels), players,
            TrainConfig(steps, seed=seed, log_every=max(steps // 20, 1))).fit()
    return generator


def class_teacher_pairs(data: ClassConditionalMixture, n: int, steps: int = 100,
                        seed: int = 0) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """((z, y), labels): labels drawn from the class prior and the EXACT conditional teacher's deterministic ODE
    sample y from each noise z (EDM Heun over TEACHER_SIGMAS, no guidance): a labelled warm start's pairs."""
    rng = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(data.prior, n, replacement=True, generator=rng)
    noise = torch.randn(n, data.marginal.dim, generator=rng)
    y = by_label(labels, torch.empty_like(noise), lambda c, rows: edm_sampler(
        data.classes[c].denoise, noise[rows].double(), steps, *TEACHER_SIGMAS).float())
    return (noise, y), labels


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
            initial_generator: nn.Module | None = None, divergence: str = "reverse_kl",
            density_ratio: str = "exact", first_step_target_prediction: bool = False,
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

    Follow-ups (:mod:`dmd2lab.followups`): ``divergence`` — f-distill's f-divergence for a one-step generator, its
    density ratio ``"exact"`` (the data's noised density over that of ``oracle_samples`` fresh generator samples) or
    ``"discriminator"`` (the GAN head's logit; ``gan_weights`` = (0, d) trains the head without a generator GAN
    loss); ``first_step_target_prediction`` — DP-DMD for a multi-step student.
    """
    if critic not in ("learned", "oracle"):
        raise ValueError(f"critic must be 'learned' or 'oracle'; got {critic!r}")
    if head_features not in ("critic", "teacher"):
        raise ValueError(f"head_features must be 'critic' or 'teacher'; got {head_features!r}")
    if density_ratio not in ("exact", "discriminator"):
        raise ValueError(f"density_ratio must be 'exact' or 'discriminator'; got {density_ratio!r}")
    gan = any(w > 0 for w in gan_weights)
    ratio_from_head = divergence != "reverse_kl" and density_ratio == "discriminator"
    if gan and not (gan_weights[1] > 0 and (gan_weights[0] > 0 or ratio_from_head)):
        raise ValueError(f"gan_weights = (generator, discriminator) must both be > 0 to train a GAN, or both 0 "
                         f"((0, d) trains only the discriminator, for density_ratio='discriminator'); got {gan_weights}")
    if density_ratio == "discriminator" and divergence == "reverse_kl":
        raise ValueError("density_ratio='discriminator' weighs an f-divergence, but reverse KL (DMD) reads no ratio: "
                         "set divergence to 'forward_kl' or 'jensen_shannon'")
    if ratio_from_head and not gan:
        raise ValueError("density_ratio='discriminator' reads the GAN head: set gan_weights = (0, d) or (g, d)")
    if divergence != "reverse_kl" and student_sigmas is not None:
        raise ValueError("the f-divergence weights are for a one-step generator here; drop student_sigmas")
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
                            student_sigmas=student_sigmas, backward_simulation=backward_simulation,
                            divergence=divergence, first_step_target_prediction=first_step_target_prediction)
    log_ratio = None
    if divergence != "reverse_kl" and density_ratio == "exact":
        log_ratio = OracleLogDensityRatio(data, lambda n: generator(torch.randn(n, generator.noise_dim)),
                                          oracle_samples)
    objective = DMD2Objective(generator, fake, teacher, NoiseSchedule.geometric(1000, *DISTILL_SIGMAS),
                              sample_latents, settings, regression_pairs, sample_real,
                              keep_inputs=4 if student_sigmas is not None else 0, log_density_ratio=log_ratio)
    players = objective.players(lr_generator, lr_critic, ratio, ema_decay=ema_decay, weight_decay=0.0,
                                warmup_steps=warmup_steps)
    steps = generator_steps * ratio
    trainer = Trainer(objective, players, TrainConfig(steps, seed=seed, log_every=max(steps // 50, 1),
                                                      eval_every=eval_every), out_dir, evaluate)
    started = time.perf_counter()
    trainer.fit()
    return Distillation(trainer.module("generator"), fake if critic == "learned" else None, trainer, objective,
                        time.perf_counter() - started)


@dataclass
class GuidedDistillation:
    generator: MLPGenerator
    """(z, label) -> x in one call (its EMA copy when EMA is on)."""
    trainer: Trainer
    objective: GuidedDMDObjective
    wall_s: float

    def sample(self, n: int, label: int, seed: int = 0) -> Tensor:
        """n samples of one class."""
        return sample_labelled(self.generator, n, label, seed)


def sample_labelled(generator: MLPGenerator, n: int, label: int, seed: int = 0) -> Tensor:
    """n samples of one class from a class-conditional one-step generator, from seeded noise."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return generator(torch.randn(n, generator.noise_dim, generator=rng), torch.full((n,), label, dtype=torch.long))


def distill_guided(data: ClassConditionalMixture, guidance: float, distribution_matching: bool = True,
                   cfg_augmentation: bool = True, generator_steps: int = 400, lr: float = 1e-3,
                   batch_size: int = 256, ema_decay: float | None = 0.99, seed: int = 0, oracle_samples: int = 512,
                   ca_timesteps: tuple[int, int] | None = None,
                   initial_generator: MLPGenerator | None = None) -> GuidedDistillation:
    """Decoupled DMD on the exact labelled toy: a class-conditional one-step generator distilled from the exact
    classifier-free-guided teacher (the data's own conditional and unconditional denoisers), with the exact fake
    score (:class:`dmd2lab.toy2d.ClassOracleFakeDenoiser`), so what differs between runs is only which of the two
    terms of :func:`dmd2lab.followups.decoupled_dm_gradient` the generator follows. ``initial_generator``: a
    labelled generator to start from (copied; e.g. :func:`regression_warm_start` on :func:`class_teacher_pairs`)."""
    if initial_generator is not None and initial_generator.num_classes != data.num_classes:
        raise ValueError(f"initial_generator takes {initial_generator.num_classes} classes but the data has "
                         f"{data.num_classes}: warm-start it with num_classes={data.num_classes}")
    torch.manual_seed(seed)
    generator = (MLPGenerator(data_dim=data.marginal.dim, num_classes=data.num_classes)
                 if initial_generator is None else copy.deepcopy(initial_generator))
    fake = ClassOracleFakeDenoiser(
        lambda n, c: generator(torch.randn(n, generator.noise_dim), torch.full((n,), c, dtype=torch.long)),
        oracle_samples)
    prior = data.prior

    def sample_latents(n, rng):
        return (torch.randn(n, generator.noise_dim, generator=rng),
                torch.multinomial(prior, n, replacement=True, generator=rng))

    objective = GuidedDMDObjective(generator, fake, data.denoise, NoiseSchedule.geometric(1000, *DISTILL_SIGMAS),
                                   sample_latents, guidance, distribution_matching, cfg_augmentation, batch_size,
                                   dm_timesteps=(0, 999), ca_timesteps=ca_timesteps)
    players = objective.players(lr, lr, ratio=1, ema_decay=ema_decay, weight_decay=0.0)
    trainer = Trainer(objective, players, TrainConfig(generator_steps, seed=seed,
                                                      log_every=max(generator_steps // 50, 1)))
    started = time.perf_counter()
    trainer.fit()
    return GuidedDistillation(trainer.module("generator"), trainer, objective, time.perf_counter() - started)


def evaluate_guided(samples: Tensor, label: int, data: ClassConditionalMixture, guidance: float) -> dict[str, float]:
    """One class's samples scored exactly: ``own_share``, the share of its on-mode samples that sit on the class's
    own components (those where its label is the likeliest; guidance raises it), the mass error ``mass_tv`` against
    CFG's target at scale ``guidance`` (:meth:`ClassConditionalMixture.guided`), the ``outlier_fraction`` (samples
    near no mode: artefacts), and the NLL under the class's own unguided density."""
    modes = toy_metrics.mode_statistics(samples, data.guided(label, guidance))
    own = data.joint.argmax(0) == label
    on_modes = modes["mass"].sum()
    return {"own_share": (modes["mass"][own].sum() / on_modes).item() if on_modes > 0 else 0.0,
            "mass_tv": modes["mass_tv"], "outlier_fraction": modes["outlier_fraction"],
            "nll": toy_metrics.negative_log_likelihood(samples, data.classes[label])}


def evaluate_samples(samples: Tensor, data: GaussianMixture) -> dict[str, float]:
    """The exact metrics of :mod:`dmd2lab.toy_metrics` as one flat dict of finite numbers (``spread_ratio`` and
    ``allocation_tv`` only when some sample lies near a mode)."""
    modes = toy_metrics.mode_statistics(samples, data)
    return {"nll": toy_metrics.negative_log_likelihood(samples, data), "mmd": toy_metrics.mmd(samples, data),
            "modes_covered": modes["modes_covered"], "weakest_mode_share": modes["weakest_mode_share"],
            "mass_tv": modes["mass_tv"], "outlier_fraction": modes["outlier_fraction"],
            # Undefined (NaN) when no sample lies near any mode: left out, so every value is a number.
            **{k: modes[k] for k in ("spread_ratio", "allocation_tv") if math.isfinite(modes[k])}}


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


def density_ratio_agreement(run: Distillation, data: GaussianMixture, sigmas=(0.1, 0.3, 1.0, 3.0), n: int = 1024,
                            reference: int = 4096, seed: int = 0) -> dict[float, dict[str, Tensor | float]]:
    """How well a run's discriminator estimates the density ratio f-distill weighs by: at each noise level, the GAN
    head's logit against the EXACT log p_t / q_t (the data's noised density over that of ``reference`` fresh
    generator samples) at ``n`` points, half noised data and half noised generator samples (what the discriminator
    is trained on). Per sigma: the points' ``exact`` and ``estimate`` (tensors), their Pearson ``correlation`` and
    the ``rmse`` of the estimate."""
    if not isinstance(run.objective.fake, CriticWithHead):
        raise ValueError("density_ratio_agreement reads the GAN head: distil with gan_weights")
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # The generator the discriminator was trained against: the raw one, not its EMA copy.
        generator = run.trainer.players["generator"].module
        generated = generator(torch.randn(reference + n // 2, generator.noise_dim, generator=rng))
        # One fixed reference for every sigma, so the levels are compared on one picture of q.
        exact_ratio = OracleLogDensityRatio(data, lambda _: generated[:reference].double(), reference)
        clean = torch.cat([data.sample(n - n // 2, rng), generated[reference:]])
        out = {}
        for s in sigmas:
            x_t = clean + s * torch.randn(clean.shape, generator=rng)
            sigma = torch.full((n,), float(s))
            exact = exact_ratio(x_t.double(), sigma.double()).float()
            estimate = run.objective.fake.logits(x_t, sigma).reshape(n)
            out[float(s)] = {"exact": exact, "estimate": estimate,
                             "correlation": torch.corrcoef(torch.stack([exact, estimate]))[0, 1].item(),
                             "rmse": (estimate - exact).pow(2).mean().sqrt().item()}
    return out
