"""Objectives for :class:`dmd2lab.train.Trainer`: DMD2 distillation and denoiser (teacher) training.

They compose the pure losses of :mod:`dmd2lab.dmd` and nothing else; a backend supplies modules, a latent
sampler and a noise schedule, so every backend trains through the same two classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from . import dmd
from .diffusion import Denoiser, NoiseSchedule
from .train import Player


@dataclass
class DMD2Settings:
    """The distillation's loss settings (defaults: DMD2's ImageNet recipe, see DESIGN.md).

    ``dm_timesteps``: t range of the DM loss (None = DMD2's 0.02T..0.98T); ``critic_timesteps``: of the critic
    loss (None = whole table);
    ``critic_weighting``: 'edm' or 'eps' (see :func:`dmd2lab.dmd.denoising_weight`); ``regression_weight``:
    DMD1's regression loss on teacher pairs (0 = DMD2, which drops it)."""

    batch_size: int = 256
    dm_timesteps: tuple[int, int] | None = None
    critic_timesteps: tuple[int, int] | None = None
    critic_weighting: str = "edm"
    sigma_data: float = 0.5
    regression_weight: float = 0.0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        dmd.denoising_weight(torch.ones(1), self.critic_weighting)  # rejects unknown names early
        if self.regression_weight < 0:
            raise ValueError(f"regression_weight must be >= 0; got {self.regression_weight}")


class DMD2Objective:
    """DMD2's two players (Algorithm 1): the generator descends the DM loss (+ optionally DMD1's regression
    loss), the critic ("fake score") fits the generator's current samples by denoising score matching.

    ``fake`` is the critic module, or any Denoiser (e.g. the exact oracle), in which case there is no critic
    player. ``sample_latents(n, rng)`` draws generator inputs. ``regression_pairs`` = (z, y): teacher ODE
    noise -> sample pairs for DMD1's regression loss.
    """

    def __init__(self, generator: nn.Module, fake: Denoiser, real: Denoiser, schedule: NoiseSchedule,
                 sample_latents: Callable[[int, torch.Generator], Tensor], settings: DMD2Settings,
                 regression_pairs: tuple[Tensor, Tensor] | None = None):
        if settings.regression_weight > 0 and regression_pairs is None:
            raise ValueError("regression_weight > 0 needs regression_pairs=(noise, teacher_samples)")
        if isinstance(fake, nn.Module) and not any(p.requires_grad for p in fake.parameters()):
            raise ValueError(f"the critic {type(fake).__name__} has no trainable parameters, so it would never "
                             "learn the generator (a frozen copy of the teacher makes the DM gradient 0). Call "
                             ".requires_grad_(True) on it, or pass a plain function for a fixed fake score.")
        self.generator, self.fake, self.real, self.schedule = generator, fake, real, schedule
        self.sample_latents, self.settings, self.regression_pairs = sample_latents, settings, regression_pairs

    def players(self, lr_generator: float, lr_critic: float, ratio: int = 5, **kwargs) -> dict[str, Player]:
        """Generator every ``ratio`` steps, critic every step (TTUR); ``kwargs`` go to both Players, except
        ``ema_decay`` which only the generator gets."""
        if not isinstance(ratio, int) or ratio < 1:
            raise ValueError(f"TTUR ratio must be an integer >= 1 (critic updates per generator update); got "
                             f"{ratio!r}")
        ema = kwargs.pop("ema_decay", None)
        players = {"generator": Player(self.generator, lr_generator, every=ratio, ema_decay=ema, **kwargs)}
        if isinstance(self.fake, nn.Module):
            players["critic"] = Player(self.fake, lr_critic, every=1, **kwargs)
        return players

    def prepare(self, step: int, updating: list[str], rng: torch.Generator) -> dict:
        z = self.sample_latents(self.settings.batch_size, rng)
        with torch.set_grad_enabled("generator" in updating):
            return {"x": self.generator(z)}

    def loss(self, name: str, context: dict, rng: torch.Generator):
        s = self.settings
        if name == "critic":
            return dmd.fake_score_loss(self.fake, context["x"], self.schedule, s.critic_weighting,
                                       s.sigma_data, s.critic_timesteps, rng)
        loss, logs = dmd.distribution_matching_step(context["x"], self.real, self.fake, self.schedule,
                                                    s.dm_timesteps, rng)
        if s.regression_weight > 0:
            z, y = self.regression_pairs
            pick = torch.randint(0, z.shape[0], (s.batch_size,), generator=rng, device=rng.device).to(z.device)
            reg = dmd.regression_loss(self.generator(z[pick]), y[pick])
            logs["regression_loss"] = reg.detach()
            loss = loss + s.regression_weight * reg
        return loss, logs


class DenoiserObjective:
    """Denoising score matching on data samples: how our teachers are trained (EDM eq. 2)."""

    def __init__(self, denoiser: nn.Module, sample_data: Callable[[int, torch.Generator], Tensor],
                 schedule: NoiseSchedule, batch_size: int = 256, weighting: str = "edm", sigma_data: float = 0.5):
        self.denoiser, self.sample_data, self.schedule = denoiser, sample_data, schedule
        self.batch_size, self.weighting, self.sigma_data = batch_size, weighting, sigma_data

    def prepare(self, step: int, updating: list[str], rng: torch.Generator) -> dict:
        return {"x0": self.sample_data(self.batch_size, rng)}

    def loss(self, name: str, context: dict, rng: torch.Generator):
        return dmd.denoising_score_matching(self.denoiser, context["x0"], self.schedule, self.weighting,
                                            self.sigma_data, generator=rng)
