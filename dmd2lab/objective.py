"""Objectives for :class:`dmd2lab.train.Trainer`: DMD2 distillation and denoiser (teacher) training.

They compose the pure losses of :mod:`dmd2lab.dmd` and nothing else; a backend supplies modules, a latent
sampler and a noise schedule, so every backend trains through the same two classes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from . import dmd, followups
from .diffusion import Denoiser, NoiseSchedule, add_noise
from .train import Player


@dataclass
class DMD2Settings:
    """The distillation's loss settings (defaults: DMD2's ImageNet recipe, see DESIGN.md).

    ``dm_timesteps``: t range of the DM loss (None = DMD2's 0.02T..0.98T); ``critic_timesteps``: of the critic
    loss (None = whole table); ``critic_weighting``: 'edm' or 'eps' (see :func:`dmd2lab.dmd.denoising_weight`);
    ``dm_weight``: the DM loss's weight (0 = a GAN-only ablation); ``regression_weight``: DMD1's regression loss
    on teacher pairs (0 = DMD2, which drops it); ``gan_generator_weight`` / ``gan_discriminator_weight``: the
    GAN loss (0 / 0 = no GAN; DMD2 ImageNet: 3e-3 / 1e-2), inputs re-noised over ``gan_timesteps`` (None =
    whole table); ``student_sigmas``: the noise levels of a multi-step student, largest first (None = a one-step
    generator from latents), trained on ``backward_simulation`` inputs or else on noised real data.

    Follow-ups (:mod:`dmd2lab.followups`): ``divergence``: the f-divergence the DM loss descends (f-distill;
    "reverse_kl" = DMD), its density ratio given to :class:`DMD2Objective` or read off the GAN head's logit (then
    the discriminator may train with ``gan_generator_weight`` 0); ``first_step_target_prediction``: DP-DMD — a
    multi-step student's first step learns the teacher's prediction and the DM loss trains the later steps only."""

    batch_size: int = 256
    dm_timesteps: tuple[int, int] | None = None
    critic_timesteps: tuple[int, int] | None = None
    critic_weighting: str = "edm"
    sigma_data: float = 0.5
    dm_weight: float = 1.0
    regression_weight: float = 0.0
    gan_generator_weight: float = 0.0
    gan_discriminator_weight: float = 0.0
    gan_timesteps: tuple[int, int] | None = None
    student_sigmas: tuple[float, ...] | None = None
    backward_simulation: bool = True
    divergence: str = "reverse_kl"
    first_step_target_prediction: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        dmd.denoising_weight(torch.ones(1), self.critic_weighting)  # rejects unknown names early
        for name in ("dm_weight", "regression_weight", "gan_generator_weight", "gan_discriminator_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.divergence not in followups.F_DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of "
                             f"{', '.join(followups.F_DIVERGENCES)}")
        if self.divergence != "reverse_kl" and self.dm_weight == 0:
            raise ValueError(f"divergence={self.divergence!r} weights the DM loss, which is off (dm_weight = 0)")
        ratio_reader = self.divergence != "reverse_kl" and self.gan_discriminator_weight > 0
        if self.gan and not (self.gan_discriminator_weight > 0 and (self.gan_generator_weight > 0 or ratio_reader)):
            raise ValueError("the GAN needs both gan_generator_weight and gan_discriminator_weight > 0 (a "
                             "discriminator that never learns, or one nobody reads, is not a GAN; the generator "
                             "weight may be 0 only when an f-divergence reads the discriminator's density ratio); "
                             f"got {self.gan_generator_weight} / {self.gan_discriminator_weight}")
        if self.dm_weight == 0 and not self.gan and self.regression_weight == 0:
            raise ValueError("the generator has no loss: dm_weight, regression_weight and the GAN weights are all 0")
        if self.gan_timesteps is not None and not self.gan:
            raise ValueError("gan_timesteps is set but the GAN is off; set the GAN weights or drop gan_timesteps")
        if self.student_sigmas is None and not self.backward_simulation:
            raise ValueError("backward_simulation=False only applies to a multi-step student; set student_sigmas")
        if self.student_sigmas is not None and self.regression_weight > 0:
            raise ValueError("regression_weight regresses a one-step generator G(z) on teacher pairs; a multi-step "
                             "student (student_sigmas) takes (x, sigma): use one or the other")
        if self.student_sigmas is not None:
            sigmas = tuple(float(s) for s in self.student_sigmas)
            if not sigmas or not all(s > 0 for s in sigmas) or not all(a > b for a, b in zip(sigmas, sigmas[1:])):
                raise ValueError(f"student_sigmas must be positive and strictly decreasing; got {self.student_sigmas}")
            self.student_sigmas = sigmas
        if ratio_reader and self.gan_timesteps is not None and (
                self.dm_timesteps is None or not (self.gan_timesteps[0] <= self.dm_timesteps[0]
                                                  and self.dm_timesteps[1] <= self.gan_timesteps[1])):
            raise ValueError("the f-divergence reads the discriminator's ratio wherever the DM loss samples t, so the "
                             f"head must be trained there too: gan_timesteps {self.gan_timesteps} must contain "
                             f"dm_timesteps {self.dm_timesteps} (or leave gan_timesteps None: the whole table)")
        if self.first_step_target_prediction and (self.student_sigmas is None or len(self.student_sigmas) < 2):
            raise ValueError("first_step_target_prediction (DP-DMD) trains the first of several student steps; "
                             "set student_sigmas to at least two noise levels")

    @property
    def gan(self) -> bool:
        return self.gan_generator_weight > 0 or self.gan_discriminator_weight > 0


def ttur_players(generator: nn.Module, fake: Callable, lr_generator: float, lr_critic: float, ratio: int,
                 **kwargs) -> dict[str, Player]:
    """DMD2's two time-scale update rule as players: the generator every ``ratio`` steps, the critic (when ``fake``
    is a module; a fixed fake score has none) every step. ``kwargs`` go to both, except ``ema_decay`` (generator)."""
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"TTUR ratio must be an integer >= 1 (critic updates per generator update); got {ratio!r}")
    ema = kwargs.pop("ema_decay", None)
    players = {"generator": Player(generator, lr_generator, every=ratio, ema_decay=ema, **kwargs)}
    if isinstance(fake, nn.Module):
        players["critic"] = Player(fake, lr_critic, every=1, **kwargs)
    return players


class CriticWithHead(nn.Module):
    """The critic and its GAN head as one module, so one player (one optimizer) trains both, as in DMD2.

    It is still a denoiser (``forward`` is the critic's); ``logits(x_t, sigma)`` is the head on ``features``, the
    critic's bottleneck by default (``critic.features``). Passing another network's features (e.g. a frozen
    teacher's) gives a head that does not share the critic's body."""

    def __init__(self, critic: nn.Module, head: nn.Module, features: Callable[[Tensor, Tensor], Tensor] | None = None):
        super().__init__()
        if features is None and not hasattr(critic, "features"):
            raise ValueError(f"{type(critic).__name__} has no .features(x, sigma); pass the features function "
                             "the GAN head should read (e.g. a UNet's mid-block output)")
        self.critic, self.head = critic, head
        # A plain attribute, so another network's features (a frozen teacher's) never join this player's
        # optimizer or checkpoint.
        self.__dict__["_features"] = features

    def forward(self, x: Tensor, sigma, **conditions) -> Tensor:
        return self.critic(x, sigma, **conditions)

    def logits(self, x: Tensor, sigma, **conditions) -> Tensor:
        features = self._features if self._features is not None else self.critic.features
        return self.head(features(x, sigma, **conditions))


def bind(fn: Callable, conditions: dict) -> Callable:
    """``fn`` with the conditioning keywords fixed (class labels, text embeddings), so the DMD2 losses, which call
    denoisers as ``D(x_t, sigma)``, never see them; ``fn`` itself when there are none."""
    return functools.partial(fn, **conditions) if conditions else fn


def concat_conditions(a: dict, b: dict) -> dict:
    """Two batches' conditioning keywords joined along the batch, nested dicts too (SDXL's added_cond_kwargs)."""
    return {k: concat_conditions(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]]) for k, v in a.items()}


def select_conditions(conditions: dict, index: Tensor) -> dict:
    """Rows ``index`` of every tensor of a conditions dict, nested dicts too."""
    return {k: select_conditions(v, index) if isinstance(v, dict) else v[index.to(v.device)]
            for k, v in conditions.items()}


def batch_sizes(conditions: dict) -> set[int]:
    """The batch sizes (first dimensions) found in a conditions dict, nested dicts too: {n} when consistent."""
    return set().union(*(batch_sizes(v) if isinstance(v, dict) else {v.shape[0]} for v in conditions.values()))


class DMD2Objective:
    """DMD2's two players (Algorithm 1): the generator descends the DM loss (+ the GAN loss, + optionally DMD1's
    regression loss); the critic ("fake score") fits the generator's current samples by denoising score
    matching (+ the discriminator's GAN loss, through its head).

    ``fake`` is the critic module (a :class:`CriticWithHead` when the GAN is on), or any Denoiser (e.g. the exact
    oracle), in which case there is no critic player. ``sample_latents(n, rng)`` draws generator inputs (for a
    multi-step student: standard normal noise of the data's shape); ``sample_real(n, rng)`` draws real data
    (needed by the GAN and by a multi-step student trained without backward simulation).
    ``sample_conditions(n, rng) -> dict`` makes the distillation conditional (DMD2 ImageNet-64: class labels; text
    to image: prompt embeddings): its keywords go to the generator, the teacher and the critic alike for each
    generator sample, and ``sample_real`` must then return (real data, the real data's own conditions dict).
    ``regression_pairs`` = (z, y): teacher ODE noise -> sample pairs for DMD1's regression loss.
    ``log_density_ratio(x_t, sigma)`` -> log p_t / q_t per sample, for an f-divergence other than reverse KL (None =
    the GAN head's logit, the optimal discriminator's estimate of that log ratio).
    ``recent_inputs`` keeps the last ``keep_inputs`` batches of student inputs per step (multi-step students; 0 =
    none, the default) on the CPU, so the inputs seen in training can be compared with those met at inference; a
    diagnostic, not checkpointed (with ``first_step_target_prediction`` the DM loss never draws step 0, so it has
    no key 0).
    """

    def __init__(self, generator: nn.Module, fake: Denoiser, real: Denoiser, schedule: NoiseSchedule,
                 sample_latents: Callable[[int, torch.Generator], Tensor], settings: DMD2Settings,
                 regression_pairs: tuple[Tensor, Tensor] | None = None,
                 sample_real: Callable[[int, torch.Generator], Tensor] | None = None, keep_inputs: int = 0,
                 log_density_ratio: Callable[[Tensor, Tensor], Tensor] | None = None,
                 sample_conditions: Callable[[int, torch.Generator], dict] | None = None):
        if settings.regression_weight > 0 and regression_pairs is None:
            raise ValueError("regression_weight > 0 needs regression_pairs=(noise, teacher_samples)")
        if isinstance(fake, nn.Module) and not any(p.requires_grad for p in fake.parameters()):
            raise ValueError(f"the critic {type(fake).__name__} has no trainable parameters, so it would never "
                             "learn the generator (a frozen copy of the teacher makes the DM gradient 0). Call "
                             ".requires_grad_(True) on it, or pass a plain function for a fixed fake score.")
        if settings.gan and not isinstance(fake, CriticWithHead):
            raise ValueError("the GAN loss needs a discriminator: pass fake=CriticWithHead(critic, GANHead(...))")
        if not isinstance(keep_inputs, int) or keep_inputs < 0:
            raise ValueError(f"keep_inputs must be an integer >= 0 (batches of student inputs kept per step); got "
                             f"{keep_inputs!r}")
        needs_real = settings.gan or (settings.student_sigmas is not None and not settings.backward_simulation)
        if needs_real and sample_real is None:
            raise ValueError("the GAN loss and a multi-step student trained on noised real data need "
                             "sample_real=(n, rng) -> real data samples")
        reads_discriminator = settings.divergence != "reverse_kl" and log_density_ratio is None
        if reads_discriminator and settings.gan_discriminator_weight == 0:
            raise ValueError(f"divergence={settings.divergence!r} needs the density ratio p_t/q_t: pass "
                             "log_density_ratio, or train a discriminator (gan_discriminator_weight > 0) whose "
                             "logit estimates it")
        if log_density_ratio is not None and settings.divergence == "reverse_kl":
            raise ValueError("log_density_ratio is only read by an f-divergence other than reverse KL; set "
                             "settings.divergence or drop log_density_ratio")
        if settings.gan and settings.gan_generator_weight == 0 and not reads_discriminator:
            raise ValueError("the discriminator trains but nothing reads it: set gan_generator_weight > 0, or let "
                             "the f-divergence read its ratio (log_density_ratio=None)")
        self.log_density_ratio = fake.logits if reads_discriminator else log_density_ratio
        self.generator, self.fake, self.real, self.schedule = generator, fake, real, schedule
        self.sample_latents, self.settings = sample_latents, settings
        self.sample_real, self.keep_inputs = sample_real, keep_inputs
        if sample_conditions is not None and settings.regression_weight > 0:
            raise ValueError("regression_weight (DMD1's loss on unconditional teacher pairs) does not take "
                             "sample_conditions; use one or the other")
        self.sample_conditions = sample_conditions
        self.recent_inputs: dict[int, list[Tensor]] = {}
        self.regression = (RegressionObjective(generator, regression_pairs, settings.batch_size)
                           if settings.regression_weight > 0 else None)

    def players(self, lr_generator: float, lr_critic: float, ratio: int = 5, **kwargs) -> dict[str, Player]:
        """Generator every ``ratio`` steps, critic every step (TTUR); ``kwargs`` go to both Players, except
        ``ema_decay`` which only the generator gets."""
        return ttur_players(self.generator, self.fake, lr_generator, lr_critic, ratio, **kwargs)

    def _real_batch(self, n: int, rng: torch.Generator) -> tuple[Tensor, dict]:
        real = self.sample_real(n, rng)
        if self.sample_conditions is None:
            return real, {}
        if not (isinstance(real, tuple) and len(real) == 2 and isinstance(real[1], dict)):
            raise TypeError("with sample_conditions, sample_real must return (real data, its conditions dict)")
        return real

    def prepare(self, step: int, updating: list[str], rng: torch.Generator,
                shared: torch.Generator | None = None) -> dict:
        s = self.settings
        z = self.sample_latents(s.batch_size, rng)
        conditions = self.sample_conditions(z.shape[0], rng) if self.sample_conditions is not None else {}
        context = {}
        if s.gan:
            context["real"], context["real_conditions"] = self._real_batch(z.shape[0], rng)
        if s.student_sigmas is None:
            context["conditions"] = conditions
            with torch.set_grad_enabled("generator" in updating):
                context["x"] = self.generator(z, **conditions)
            return context
        # DP-DMD: the DM loss trains steps 1.. only; step 0 learns the teacher's prediction on every update.
        first = 1 if s.first_step_target_prediction else 0
        # One k for the whole global batch (DMD2), from the stream every micro-batch and rank of the step shares: the
        # ranks then run the same number of generator passes (FSDP's gathers must pair up across ranks).
        shared = rng if shared is None else shared
        k = int(torch.randint(first, len(s.student_sigmas), (), generator=shared, device=shared.device))
        if s.backward_simulation:
            student_input = dmd.backward_simulation(bind(self.generator, conditions), z, s.student_sigmas, k, rng)
        else:
            # The student's input is a real sample noised, so it is conditioned on that sample's own conditions.
            real, conditions = self._real_batch(z.shape[0], rng)
            student_input = add_noise(real, s.student_sigmas[k], z)
        context["conditions"] = conditions
        if self.keep_inputs:
            kept = self.recent_inputs.setdefault(k, [])
            kept.append(student_input.detach().cpu())
            del kept[:-self.keep_inputs]
        sigma = torch.full((z.shape[0],), s.student_sigmas[k], device=z.device)
        with torch.set_grad_enabled("generator" in updating):
            context["x"] = self.generator(student_input, sigma, **conditions)
        if s.first_step_target_prediction and "generator" in updating:
            noise = torch.randn(z.shape, generator=rng, device=z.device, dtype=z.dtype)
            first_input = noise * s.student_sigmas[0]
            first_sigma = torch.full((z.shape[0],), s.student_sigmas[0], device=z.device)
            context["first_step"] = (first_input, first_sigma, self.generator(first_input, first_sigma, **conditions))
        return context

    def loss(self, name: str, context: dict, rng: torch.Generator):
        s = self.settings
        if name == "critic":
            return self._critic_loss(context, rng)
        conditions = context["conditions"]
        real, fake = bind(self.real, conditions), bind(self.fake, conditions)
        if s.dm_weight > 0:
            weighting = None
            if s.divergence != "reverse_kl":
                log_ratio = bind(self.log_density_ratio, conditions)
                weighting = lambda x_t, sigma: followups.f_divergence_weights(  # noqa: E731
                    log_ratio(x_t, sigma).reshape(x_t.shape[0]), s.divergence)
            loss, logs = dmd.distribution_matching_step(context["x"], real, fake, self.schedule,
                                                        s.dm_timesteps, rng, weighting)
            loss = s.dm_weight * loss
        else:
            loss, logs = context["x"].new_zeros(()), {}
        if s.gan_generator_weight > 0:
            gan = dmd.gan_generator_loss(dmd.gan_logits(bind(self.fake.logits, conditions), context["x"], self.schedule,
                                                        s.gan_timesteps, rng))
            logs["gan_generator_loss"] = gan.detach()
            loss = loss + s.gan_generator_weight * gan
        if "first_step" in context:
            first_input, first_sigma, first_x0 = context["first_step"]
            first = followups.first_step_target_loss(first_x0, real, first_input, first_sigma)
            logs["first_step_loss"] = first.detach()
            loss = loss + first
        if self.regression is not None:
            reg, reg_logs = self.regression.loss("generator", self.regression.prepare(0, ["generator"], rng), rng)
            logs.update(reg_logs)
            loss = loss + s.regression_weight * reg
        return loss, logs

    def _critic_loss(self, context: dict, rng: torch.Generator):
        s = self.settings
        loss, logs = dmd.fake_score_loss(bind(self.fake, context["conditions"]), context["x"], self.schedule,
                                         s.critic_weighting, s.sigma_data, s.critic_timesteps, rng)
        if s.gan:
            # One head call on real and fake together: each sample is re-noised independently either way.
            both = torch.cat([context["real"], context["x"].detach()])
            conditions = concat_conditions(context["real_conditions"], context["conditions"])
            real_logits, fake_logits = dmd.gan_logits(bind(self.fake.logits, conditions), both, self.schedule,
                                                      s.gan_timesteps, rng).chunk(2)
            gan = dmd.gan_discriminator_loss(real_logits, fake_logits)
            logs.update(gan_discriminator_loss=gan.detach(),
                        discriminator_accuracy=0.5 * ((real_logits > 0).float().mean()
                                                      + (fake_logits < 0).float().mean()).detach())
            loss = loss + s.gan_discriminator_weight * gan
        return loss, logs


class GuidedDMDObjective:
    """Decoupled DMD (:func:`dmd2lab.followups.decoupled_dm_gradient`) for a class-conditional one-step generator
    G(z, c) and a classifier-free-guided teacher: the generator descends the distribution-matching term, the CFG
    augmentation term, or both (= DMD with a guided real score, as DMD2 distils SDXL with guidance 8).

    ``real(x_t, sigma, labels)`` is the teacher (labels None: unconditional); ``fake(x_t, sigma, labels)`` the fake
    score: a module (then a critic player fits it to the generator's samples, as in DMD2) or a fixed callable such
    as the toy's exact :class:`dmd2lab.toy2d.ClassOracleFakeDenoiser`. ``sample_latents(n, rng)`` -> (z, labels).
    ``ca_timesteps``: re-noise the CA term at its own t range (Decoupled DMD's separate schedules); None = the DM
    term's draw, which makes both terms together exactly DMD's gradient with the guided teacher."""

    def __init__(self, generator: nn.Module, fake: Callable, real: Callable, schedule: NoiseSchedule,
                 sample_latents: Callable[[int, torch.Generator], tuple[Tensor, Tensor]], guidance: float,
                 distribution_matching: bool = True, cfg_augmentation: bool = True, batch_size: int = 256,
                 dm_timesteps: tuple[int, int] | None = None, ca_timesteps: tuple[int, int] | None = None,
                 critic_weighting: str = "edm", sigma_data: float = 0.5):
        if not (distribution_matching or cfg_augmentation):
            raise ValueError("the generator has no loss: switch on distribution_matching, cfg_augmentation or both")
        if not guidance >= 1:
            raise ValueError(f"guidance must be >= 1 (1 = no guidance, where the CA term is 0); got {guidance}")
        if ca_timesteps is not None and not (distribution_matching and cfg_augmentation):
            raise ValueError("ca_timesteps gives the CA term its own schedule beside the DM term's; with one term "
                             "on, set that term's range with dm_timesteps")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.generator, self.fake, self.real, self.schedule = generator, fake, real, schedule
        self.sample_latents, self.guidance, self.batch_size = sample_latents, guidance, batch_size
        self.terms = {"distribution_matching": distribution_matching, "cfg_augmentation": cfg_augmentation}
        self.dm_timesteps, self.ca_timesteps = dm_timesteps, ca_timesteps
        self.critic_weighting, self.sigma_data = critic_weighting, sigma_data

    def players(self, lr_generator: float, lr_critic: float, ratio: int = 5, **kwargs) -> dict[str, Player]:
        """As :meth:`DMD2Objective.players`: the critic (when ``fake`` is a module) every step, the generator every
        ``ratio`` steps."""
        return ttur_players(self.generator, self.fake, lr_generator, lr_critic, ratio, **kwargs)

    def prepare(self, step: int, updating: list[str], rng: torch.Generator,
                shared: torch.Generator | None = None) -> dict:
        z, labels = self.sample_latents(self.batch_size, rng)
        with torch.set_grad_enabled("generator" in updating):
            return {"x": self.generator(z, labels), "labels": labels}

    def _gradient(self, x: Tensor, labels: Tensor, timesteps, rng: torch.Generator, **terms) -> Tensor:
        low, high = timesteps if timesteps is not None else dmd.dm_timesteps(self.schedule)
        sigma = self.schedule.sigma(self.schedule.sample_timesteps(x.shape[0], low, high, rng, device=x.device))
        with torch.no_grad():
            x_t = add_noise(x.detach(), sigma, torch.randn(x.shape, generator=rng, device=x.device, dtype=x.dtype))
            cond, uncond = self.real(x_t, sigma, labels), self.real(x_t, sigma, None)
            fake = self.fake(x_t, sigma, labels) if terms.get("distribution_matching", True) else cond
        return followups.decoupled_dm_gradient(x, fake, cond, uncond, self.guidance, **terms)

    def loss(self, name: str, context: dict, rng: torch.Generator):
        x, labels = context["x"], context["labels"]
        if name == "critic":
            loss, logs = dmd.fake_score_loss(lambda x_t, sigma: self.fake(x_t, sigma, labels), x, self.schedule,
                                             self.critic_weighting, self.sigma_data, None, rng)
            return loss, logs
        if self.ca_timesteps is None:
            grad = self._gradient(x, labels, self.dm_timesteps, rng, **self.terms)
        else:
            grad = (self._gradient(x, labels, self.dm_timesteps, rng, cfg_augmentation=False)
                    + self._gradient(x, labels, self.ca_timesteps, rng, distribution_matching=False))
        loss = dmd.gradient_loss(x, grad)
        return loss, {"guided_dm_loss": loss.detach()}


class RegressionObjective:
    """DMD1's regression loss alone (DMD eq. 9) on teacher ODE pairs (z, y): the warm start DMD2 gives its
    one-step SDXL generator before distribution matching, and a cheap way to start any one-step student near the
    teacher. ``distance`` is per-sample, shape (batch,) (DMD: LPIPS on images). ``labels`` (one per pair) make it
    a class-conditional generator's warm start, G(z, label); ``conditions`` (a conditions dict with one row per pair,
    e.g. each pair's prompt embeddings) a text-conditional one's, G(z, **conditions)."""

    def __init__(self, generator: nn.Module, pairs: tuple[Tensor, Tensor], batch_size: int = 256,
                 distance: Callable[[Tensor, Tensor], Tensor] = dmd.mean_squared_distance,
                 labels: Tensor | None = None, conditions: dict | None = None):
        z, y = pairs
        if z.shape[0] != y.shape[0] or z.shape[0] < 1:
            raise ValueError(f"pairs must be (noise, teacher samples) with one non-zero length; got {z.shape[0]} "
                             f"and {y.shape[0]}")
        if labels is not None and labels.shape != (z.shape[0],):
            raise ValueError(f"labels must give one class per pair, shape ({z.shape[0]},); got {tuple(labels.shape)}")
        if labels is not None and conditions is not None:
            raise ValueError("give each pair a class label or a conditions dict, not both")
        if conditions is not None and batch_sizes(conditions) != {z.shape[0]}:
            raise ValueError(f"conditions must have one row per pair ({z.shape[0]}); got batch sizes "
                             f"{sorted(batch_sizes(conditions))}")
        self.generator, self.pairs, self.batch_size, self.distance = generator, pairs, batch_size, distance
        self.labels, self.conditions = labels, conditions

    def prepare(self, step: int, updating: list[str], rng: torch.Generator,
                shared: torch.Generator | None = None) -> dict:
        z, y = self.pairs
        pick = torch.randint(0, z.shape[0], (self.batch_size,), generator=rng, device=rng.device).to(z.device)
        inputs = (z[pick],) if self.labels is None else (z[pick], self.labels[pick])
        conditions = select_conditions(self.conditions, pick) if self.conditions is not None else {}
        return {"inputs": inputs, "conditions": conditions, "y": y[pick]}

    def loss(self, name: str, context: dict, rng: torch.Generator):
        loss = dmd.regression_loss(self.generator(*context["inputs"], **context["conditions"]), context["y"],
                                   self.distance)
        return loss, {"regression_loss": loss.detach()}


class DenoiserObjective:
    """Denoising score matching on data samples: how our teachers are trained (EDM eq. 2). Noise levels come from
    the schedule's table (t uniform), or from ``sigma_sampler(n, rng)`` (EDM's log-normal,
    :func:`dmd2lab.image_models.edm_sigmas`). ``sample_data`` may return (x0, conditions dict) for a conditional
    denoiser (class labels)."""

    def __init__(self, denoiser: nn.Module, sample_data: Callable[[int, torch.Generator], Tensor],
                 schedule: NoiseSchedule, batch_size: int = 256, weighting: str = "edm", sigma_data: float = 0.5,
                 sigma_sampler: Callable[[int, torch.Generator], Tensor] | None = None):
        self.denoiser, self.sample_data, self.schedule = denoiser, sample_data, schedule
        self.batch_size, self.weighting, self.sigma_data = batch_size, weighting, sigma_data
        self.sigma_sampler = sigma_sampler

    def prepare(self, step: int, updating: list[str], rng: torch.Generator,
                shared: torch.Generator | None = None) -> dict:
        return {"x0": self.sample_data(self.batch_size, rng)}

    def loss(self, name: str, context: dict, rng: torch.Generator):
        x0, conditions = context["x0"] if isinstance(context["x0"], tuple) else (context["x0"], {})
        denoiser = bind(self.denoiser, conditions)
        if self.sigma_sampler is None:
            return dmd.denoising_score_matching(denoiser, x0, self.schedule, self.weighting,
                                                self.sigma_data, generator=rng)
        sigma = self.sigma_sampler(x0.shape[0], rng).to(x0.device)
        noise = torch.randn(x0.shape, generator=rng, device=rng.device, dtype=x0.dtype).to(x0.device)
        loss = dmd.denoising_loss(denoiser(add_noise(x0, sigma, noise), sigma), x0, sigma, self.weighting,
                                  self.sigma_data)
        return loss, {"denoising_loss": loss.detach()}
