"""DMD2 for text-to-image (DMD2 Sec. 5.2): SDXL and SD1.5 teachers distilled through the library's one
:class:`~dmd2lab.objective.DMD2Objective` and :class:`~dmd2lab.train.Trainer`.

The text backend supplies what every backend supplies (DESIGN.md, "The shape"):

- conditioning — :class:`TextConditioner` turns prompts into the UNet's keywords, a conditions dict
  ``{"encoder_hidden_states": ..., "added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}}`` (SD1.5: the first
  key only) that the objective hands to generator, teacher, critic and GAN head alike;
- the real score — the teacher UNet as a denoiser in the library's VE convention (:class:`TextDenoiser`) with
  classifier-free guidance (:func:`guided_teacher`; guidance 8 for SDXL, 1.75 for SD1.5);
- the fake score — a trainable copy of the teacher, in full or as a LoRA on its attention projections
  (:func:`add_lora`), with DMD2's GAN head on its mid-block output;
- the generator — a copy of the teacher used as a K-step student at timesteps 999/749/499/249 (Sec. 4.5), or a
  one-step generator on pure noise at a fixed conditioning timestep (:class:`ConditioningTimestepGenerator`);
- :func:`build_t2i_distillation` wires them with the paper's settings (:class:`T2IConfig`).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import dmd
from .diffusion import NoiseSchedule, edm_sampler, per_sample_sigma, x0_from_vp_prediction
from .dmd import GANHead
from .image_models import VPDenoiser, bottleneck
from .objective import (CriticWithHead, DMD2Objective, DMD2Settings, RegressionObjective, batch_sizes, bind,
                        concat_conditions, select_conditions)
from .t2i_models import KINDS, T2IParts, export_lora, export_pipeline
from .train import Player, Trainer, TrainConfig, latest_checkpoint

#: The paper's settings per teacher (DMD2 Sec. 5.2 and its appendix; DESIGN.md "The method"). SDXL: batch 128,
#: lr 5e-7, TTUR 5, GAN 5e-3 / 1e-2, guidance 8, a 4-step student (the 1-step one uses t = 399). SD1.5: batch
#: 2048, TTUR 10, GAN 1e-3 / 1e-2, guidance 1.75, one step (its lr 5e-7 is the GAN phase's, after a no-GAN phase
#: at 1e-5). SD1.5's one step reads pure noise at t = 999, the last timestep, as DMD1's did (DESIGN.md does not
#: list it; an assumption to check against the paper's appendix).
PAPER_DEFAULTS = {
    "sdxl": dict(lr=5e-7, ratio=5, guidance=8.0, gan_generator_weight=5e-3, gan_discriminator_weight=1e-2,
                 student_steps=4, conditioning_timestep=399, batch_size=128),
    "sd15": dict(lr=5e-7, ratio=10, guidance=1.75, gan_generator_weight=1e-3, gan_discriminator_weight=1e-2,
                 student_steps=1, conditioning_timestep=999, batch_size=2048),
}
#: The attention projections a LoRA adapts (diffusers' names in every transformer block of the UNet).
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


# ------------------------------------------------------------------------------------------ conditioning
def sdxl_time_ids(n: int, original_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0),
                  target_size: tuple[int, int] | None = None, device=None) -> Tensor:
    """SDXL's size-and-crop conditioning (Podell et al. 2023, Sec. 2.2), (n, 6): original (height, width), crop
    (top, left), target (height, width). DMD2 generates at 1024 x 1024 uncropped: (1024, 1024, 0, 0, 1024, 1024)."""
    target_size = original_size if target_size is None else target_size
    row = [float(v) for v in (*original_size, *crop_top_left, *target_size)]
    return torch.tensor([row] * n, device=device)


class TextConditioner:
    """Prompts -> the UNet's conditioning keywords, as diffusers' SD pipelines compute them (frozen, no grad):

    - SDXL: the penultimate hidden states of both CLIP encoders concatenated along the width
      (``encoder_hidden_states``), encoder 2's projected pooled output (``text_embeds``) and the size/crop
      ``time_ids`` of ``image_size`` (default: the UNet's native size, 1024 x 1024 for SDXL);
    - SD1.5: the last hidden state of its one encoder.

    :meth:`unconditional` is the guidance's unconditional input: SDXL zero embeddings (DMD2's choice, and what SDXL's
    pipeline uses when no negative prompt is given, ``force_zeros_for_empty_prompt``), keeping the time ids; SD1.5 the
    empty prompt's embeddings."""

    def __init__(self, parts: T2IParts, image_size: tuple[int, int] | None = None):
        self.kind, self.encoders, self.tokenizers = parts.kind, parts.text_encoders, parts.tokenizers
        _, h, w = parts.latent_shape
        self.image_size = tuple(image_size) if image_size else (h * parts.vae_scale_factor, w * parts.vae_scale_factor)
        self._empty: dict | None = None

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict:
        """The conditions dict of a batch of prompts (float32, on the encoders' device). Never under autocast: the
        generator's prompts are encoded inside the training loop's bf16 autocast, the cached real captions outside
        it, and the GAN head must not learn to tell the two precisions apart."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts; wrap a single prompt in a list")
        with torch.autocast(self.device.type, enabled=False):
            return self._encode(list(prompts))

    def _encode(self, prompts: list[str]) -> dict:
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            # SDXL reads the penultimate layer (Podell et al. 2023); SD1.5 the last one.
            states.append(out.hidden_states[-2] if self.kind == "sdxl" else out.last_hidden_state)
            pooled = getattr(out, "text_embeds", None)
        conditions = {"encoder_hidden_states": torch.cat(states, dim=-1).float()}
        if self.kind == "sdxl":
            conditions["added_cond_kwargs"] = {
                "text_embeds": pooled.float(),
                "time_ids": sdxl_time_ids(len(prompts), self.image_size, device=self.device)}
        return conditions

    def unconditional(self, conditions: dict) -> dict:
        """The unconditional counterpart of a conditions batch, for classifier-free guidance."""
        if self.kind == "sdxl":
            added = conditions["added_cond_kwargs"]
            return {"encoder_hidden_states": torch.zeros_like(conditions["encoder_hidden_states"]),
                    "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]),
                                          "time_ids": added["time_ids"]}}
        if self._empty is None:
            self._empty = self.encode([""])
        n = conditions["encoder_hidden_states"].shape[0]
        return {k: v.to(conditions[k].device).expand(n, *v.shape[1:]) for k, v in self._empty.items()}


def prompt_sampler(conditioner: TextConditioner, prompts: Sequence[str]) -> Callable[[int, torch.Generator], dict]:
    """``sample_conditions(n, rng)`` for :class:`DMD2Objective`: n prompts drawn uniformly (with replacement) from
    ``prompts`` and encoded; DMD2 trains on captions alone for the generator side (Sec. 5.2)."""
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")

    def sample(n: int, rng: torch.Generator) -> dict:
        pick = torch.randint(0, len(prompts), (n,), generator=rng, device=rng.device).tolist()
        return conditioner.encode([prompts[i] for i in pick])
    return sample


def _structure(conditions: dict) -> dict:
    return {k: _structure(v) if isinstance(v, dict) else tuple(v.shape[1:]) for k, v in conditions.items()}


def pair_sampler(latents: Tensor, conditions: dict, device=None
                 ) -> Callable[[int, torch.Generator], tuple[Tensor, dict]]:
    """``sample_real(n, rng)`` over real (latent, conditions) pairs held as tensors: the GAN's real images (DMD2
    Sec. 4.3; for text: VAE latents of captioned images, ``scaling_factor`` applied, with their own captions'
    embeddings and size/crop ids). Drawn uniformly with replacement; moved to ``device``."""
    n_real = latents.shape[0]
    if batch_sizes(conditions) != {n_real}:
        raise ValueError(f"every real conditions tensor must have one row per latent ({n_real}); got batch sizes "
                         f"{sorted(batch_sizes(conditions))}")
    device = latents.device if device is None else torch.device(device)

    def sample(n: int, rng: torch.Generator) -> tuple[Tensor, dict]:
        pick = torch.randint(0, n_real, (n,), generator=rng, device=rng.device).cpu()
        chosen = select_conditions(conditions, pick)
        return latents[pick.to(latents.device)].to(device), _to(chosen, device)
    return sample


def _to(conditions: dict, device) -> dict:
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device) for k, v in conditions.items()}


# --------------------------------------------------------------------------------------------- denoisers
class TextDenoiser(VPDenoiser):
    """An SD UNet2DConditionModel (eps prediction on the VP scheduler's scaled-linear table) as a text-conditioned
    x0 denoiser in the VE frame, D(x, sigma, encoder_hidden_states, added_cond_kwargs) (:class:`VPDenoiser`'s
    conversion: x_vp = sqrt(a_t) x at the timestep t whose sigma_t equals sigma). Inputs are cast to the UNet's
    dtype, so a bf16 teacher takes float32 latents; ``features`` is the mid-block output (1280 channels on SD), the
    GAN head's input (DMD2 Sec. 4.3)."""

    def _call(self, x: Tensor, sigma, encoder_hidden_states: Tensor, added_cond_kwargs: dict | None):
        x_vp, t, alpha = self._vp_input(x, sigma)
        dtype = self.unet.dtype
        added = None if added_cond_kwargs is None else {k: v.to(dtype) for k, v in added_cond_kwargs.items()}
        states = encoder_hidden_states.to(dtype)

        def run():
            # A float32 timestep: the UNet embeds it continuously; in bf16, 998.6 would round to 1000.
            return self.unet(x_vp.to(dtype), t.float(), encoder_hidden_states=states, added_cond_kwargs=added,
                             return_dict=False)[0]
        return x_vp, alpha, run

    def forward(self, x: Tensor, sigma, encoder_hidden_states: Tensor, added_cond_kwargs: dict | None = None
                ) -> Tensor:
        x_vp, alpha, run = self._call(x, sigma, encoder_hidden_states, added_cond_kwargs)
        out = run()[:, :x.shape[1]].to(x.dtype)
        return x0_from_vp_prediction(x_vp, out, alpha, self.prediction_type)

    def features(self, x: Tensor, sigma, encoder_hidden_states: Tensor, added_cond_kwargs: dict | None = None
                 ) -> Tensor:
        _, _, run = self._call(x, sigma, encoder_hidden_states, added_cond_kwargs)
        return bottleneck(run, self.unet.mid_block)

    def config(self) -> dict:
        return {"kind": "t2i", "source": self.source}


class GuidedDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser: x0 = uncond + w (cond - uncond), the DM loss's
    real score (DMD2 Sec. 5.2; DMD eq. 7 with the guided teacher, so guidance is distilled into the student).

    DMD2's code combines the eps predictions; we combine x0 predictions, which is the same thing: at one (x_t, t)
    x0 = (x_vp - sqrt(1 - a_t) eps) / sqrt(a_t) is affine in eps with a coefficient shared by both branches, so
    eps-space and x0-space guidance give identical x0 (and identical scores, by Tweedie). Both branches run as one
    batch of 2n; the combination is in float64 (DMD2 converts in float64)."""

    def __init__(self, denoiser: Callable, guidance: float, unconditional: Callable[[dict], dict]):
        if not guidance >= 1:
            raise ValueError(f"guidance must be >= 1 (1 = the conditional teacher alone); got {guidance}")
        self.denoiser, self.guidance, self.unconditional = denoiser, float(guidance), unconditional

    def __call__(self, x: Tensor, sigma, **conditions) -> Tensor:
        if self.guidance == 1:
            return self.denoiser(x, sigma, **conditions)
        sigma = per_sample_sigma(sigma, x)
        both = concat_conditions(self.unconditional(conditions), conditions)
        uncond, cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).double().chunk(2)
        return (uncond + self.guidance * (cond - uncond)).to(x.dtype)


def guided_teacher(teacher: Callable, guidance: float, unconditional: Callable[[dict], dict]) -> GuidedDenoiser:
    """The guided real score (see :class:`GuidedDenoiser`); ``unconditional`` maps a conditions batch to its
    unconditional counterpart (:meth:`TextConditioner.unconditional`)."""
    return GuidedDenoiser(teacher, guidance, unconditional)


def add_lora(unet: nn.Module, rank: int = 64, alpha: float = 8.0,
             target_modules: Sequence[str] = ATTENTION_PROJECTIONS) -> nn.Module:
    """Freeze ``unet`` and add a peft LoRA (Hu et al. 2021; rank 64, alpha 8 by default) to its attention
    projections: W x + (alpha / rank) B A x, only A and B trainable. B starts at zero, so the adapted UNet starts
    exactly as the teacher, as DMD2 initialises both its players. In place; returns ``unet``."""
    from peft import LoraConfig
    if rank < 1 or not alpha > 0:
        raise ValueError(f"LoRA needs rank >= 1 and alpha > 0; got rank {rank}, alpha {alpha}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                                init_lora_weights=True))
    return unet


def trainable_text_denoiser(teacher: TextDenoiser, lora: bool = False, rank: int = 64, alpha: float = 8.0,
                            gradient_checkpointing: bool = False) -> TextDenoiser:
    """A copy of the teacher to train, in float32 (the optimiser's state and lr 5e-7 updates need it even when the
    teacher runs in bf16): every weight trainable, or (``lora``) only a LoRA on the frozen copy."""
    net = copy.deepcopy(teacher)
    net.unet.float()  # the UNet only: the denoiser's float64 noise table must stay float64
    if lora:
        add_lora(net.unet, rank, alpha)
    else:
        net.requires_grad_(True)
    if gradient_checkpointing:
        net.unet.enable_gradient_checkpointing()
    return net.train()


class ConditioningTimestepGenerator(nn.Module):
    """DMD2's one-step text-to-image generator: the student UNet on pure noise z ~ N(0, I) labelled timestep t
    (SDXL: 399, after a regression warm start, :func:`regression_warm_start`; SD1.5: 999), x = its x0-prediction
    (DMD2 Sec. 5.2).

    In the VE frame the VP input z at t is x_ve = z / sqrt(a_t) = z sqrt(1 + sigma_t^2), so G(z) =
    D(z sqrt(1 + sigma_t^2), sigma_t) — exactly what a stock LCMScheduler pipeline with ``timesteps=[t]`` computes."""

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, timestep: int):
        super().__init__()
        if not 0 <= timestep < len(schedule):
            raise ValueError(f"conditioning timestep must lie in 0..{len(schedule) - 1}; got {timestep}")
        self.denoiser, self.timestep = denoiser, int(timestep)
        self.sigma = float(schedule.sigmas[timestep])

    def forward(self, z: Tensor, **conditions) -> Tensor:
        sigma = torch.full((z.shape[0],), self.sigma, device=z.device)
        return self.denoiser(z * math.sqrt(1 + self.sigma ** 2), sigma, **conditions)


def student_timesteps(steps: int, table_size: int = 1000) -> tuple[int, ...]:
    """A K-step student's timesteps, largest first: T-1, T-1-T/K, ... (DMD2 Sec. 4.5: 999/749/499/249 for K = 4),
    the rule of :func:`dmd2lab.image_recipe.student_sigmas`."""
    if not 1 <= steps <= table_size:
        raise ValueError(f"student steps must lie in 1..{table_size}; got {steps}")
    return tuple(table_size - 1 - k * (table_size // steps) for k in range(steps))


# ------------------------------------------------------------------------------------------------ recipe
@dataclass
class T2IConfig:
    """DMD2 text-to-image settings. ``None`` fields take the paper's value for ``kind`` (:data:`PAPER_DEFAULTS`).

    ``student_steps`` > 1: a K-step student at :func:`student_timesteps` trained with backward simulation (or, with
    ``backward_simulation`` False, on noised real latents); 1: a one-step generator at ``conditioning_timestep``.
    ``critic_lora`` / ``generator_lora``: train a LoRA (``lora_rank``, ``lora_alpha``) instead of the whole UNet, at
    ``lora_lr`` (5e-5 with rank 64, alpha 8: DMD2's LoRA setting; the adapter starts at B = 0 and its change of the
    weights, (alpha / rank) B A, is scaled by 1/8, so at the full model's 5e-7 it would barely leave the teacher).
    ``critic_lr`` None = the generator's lr (DMD2 uses one lr for both), or ``lora_lr`` for a LoRA critic.
    ``image_size``: the (height, width) the size/crop ids claim (None: the UNet's native size).
    ``warm_start_steps`` > 0 (one-step generator only): first fit the generator to ``warm_start_pairs`` teacher ODE
    pairs (``warm_start_ode_steps`` Heun steps of the guided teacher each) with DMD1's regression loss at
    ``warm_start_lr``, as DMD2 starts its one-step SDXL (Sec. 5.2); skipped when the run resumes from a checkpoint.
    ``gradient_accumulation``, ``fsdp``, ``fsdp_min_params``: the training loop's scale settings
    (:class:`~dmd2lab.train.TrainConfig`; docs/scaling.md): ``batch_size`` is one micro-batch, so the global batch is
    batch_size x ranks x gradient_accumulation (SDXL's 128 = 2 x 8 GPUs x 8)."""

    kind: str = "sdxl"
    prompts: list[str] = field(default_factory=list)
    steps: int = 20000  # critic steps; SDXL's run is ~20K
    batch_size: int | None = None
    lr: float | None = None
    critic_lr: float | None = None
    ratio: int | None = None
    guidance: float | None = None
    dm_weight: float = 1.0
    gan_generator_weight: float | None = None
    gan_discriminator_weight: float | None = None
    student_steps: int | None = None
    conditioning_timestep: int | None = None
    backward_simulation: bool = True
    critic_lora: bool = False
    generator_lora: bool = False
    lora_rank: int = 64
    lora_alpha: float = 8.0
    lora_lr: float = 5e-5
    image_size: tuple[int, int] | None = None
    warmup_steps: int = 500
    grad_clip: float = 10.0
    ema_decay: float | None = None
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    mixed_precision: str = "no"
    progress: bool = False
    time_limit_s: float = 0.0
    gradient_accumulation: int = 1
    fsdp: bool | None = None
    fsdp_min_params: int | None = None
    warm_start_pairs: int = 0
    warm_start_steps: int = 0
    warm_start_lr: float = 1e-5
    warm_start_ode_steps: int = 25

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        for name, value in PAPER_DEFAULTS[self.kind].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.critic_lr is None:
            self.critic_lr = self.lora_lr if self.critic_lora else self.lr
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of strings (the captions the generator is asked for)")
        if self.student_steps < 1:
            raise ValueError(f"student_steps must be >= 1; got {self.student_steps}")
        if self.student_steps == 1 and not self.backward_simulation:
            raise ValueError("backward_simulation=False only applies to a multi-step student (student_steps > 1)")
        if not self.guidance >= 1:
            raise ValueError(f"guidance must be >= 1; got {self.guidance}")
        if self.warm_start_steps and (self.student_steps != 1 or self.warm_start_pairs < 1):
            raise ValueError("the regression warm start (warm_start_steps > 0) is the one-step generator's "
                             "(student_steps=1) and needs warm_start_pairs >= 1 teacher ODE pairs; got "
                             f"student_steps={self.student_steps}, warm_start_pairs={self.warm_start_pairs}")
        for name in ("lr", "critic_lr", "lora_lr", "warm_start_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")

    @property
    def gan(self) -> bool:
        return self.gan_generator_weight > 0 or self.gan_discriminator_weight > 0


@dataclass
class T2IDistillation:
    """A built DMD2 text-to-image distillation: ``trainer.fit()`` runs it; the pieces are kept for labs and export."""

    trainer: Trainer
    generator: nn.Module
    critic: CriticWithHead
    real: GuidedDenoiser
    conditioner: TextConditioner
    parts: T2IParts
    config: T2IConfig
    timesteps: tuple[int, ...]
    schedule: NoiseSchedule
    warm_start_log: list[dict] = field(default_factory=list)

    @property
    def objective(self) -> DMD2Objective:
        return self.trainer.objective

    def student_unet(self, ema: bool = True) -> nn.Module:
        """The student's UNet (its EMA copy when there is one and ``ema``)."""
        net = self.trainer.module("generator", ema)
        return (net.denoiser if isinstance(net, ConditioningTimestepGenerator) else net).unet

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str], seed: int = 0) -> Tensor:
        """Student latents for ``prompts`` (DMD2 Sec. 4.5 inference: predict x0, re-noise with fresh noise)."""
        g = torch.Generator().manual_seed(seed)
        device = self.conditioner.device
        z = torch.randn((len(prompts),) + self.parts.latent_shape, generator=g).to(device)
        conditions = self.conditioner.encode(prompts)
        generator = self.trainer.module("generator")
        if isinstance(generator, ConditioningTimestepGenerator):
            return generator(z, **conditions)
        sigmas = [float(self.schedule.sigmas[t]) for t in self.timesteps]
        fresh = torch.Generator(device=device).manual_seed(seed + 1)
        return dmd.multistep_generate(bind(generator, conditions), z, sigmas, fresh)[0][-1]

    def export(self, out_dir) -> object:
        """The student as a stock diffusers pipeline folder (:func:`~dmd2lab.t2i_models.export_pipeline`)."""
        return export_pipeline(self.student_unet(), self.parts, out_dir, self.timesteps)

    def export_lora(self, out_dir) -> object:
        """A LoRA-trained student's adapters (:func:`~dmd2lab.t2i_models.export_lora`)."""
        return export_lora(self.student_unet(), out_dir, self.parts.kind)


def build_t2i_distillation(parts: T2IParts, config: T2IConfig, real_latents: Tensor | None = None,
                           real_conditions: dict | None = None, out_dir=None) -> T2IDistillation:
    """DMD2 (Algorithm 1) on a text-to-image teacher: generator and critic copies of the teacher UNet (in full or
    LoRA), the guided teacher as the real score, the critic's eps loss over the whole 0..999 table and the DM loss
    over 20..980 on the teacher's own VP table, the GAN head on the critic's mid-block. Real (latent, conditions)
    pairs feed the GAN's real side (and a K-step student without backward simulation); the generator side draws
    prompts from ``config.prompts``. Runs on the device the parts are on.

    A K-step student's first input is sigma_999 z as everywhere in the library
    (:func:`dmd2lab.dmd.backward_simulation`), i.e. the VP input sqrt(1 - a_999) z = 0.9976 z, where a stock
    LCMScheduler feeds z itself: a 0.24% scale gap, left as is. The one-step generator has no such gap
    (:class:`ConditioningTimestepGenerator`)."""
    teacher = TextDenoiser(parts.unet, parts.scheduler, parts.source).eval().requires_grad_(False)
    device = next(parts.unet.parameters()).device
    conditioner = TextConditioner(parts, config.image_size)
    real = guided_teacher(teacher, config.guidance, conditioner.unconditional)
    schedule = NoiseSchedule.from_diffusers(parts.scheduler)
    timesteps = (student_timesteps(config.student_steps, len(schedule)) if config.student_steps > 1
                 else (config.conditioning_timestep,))
    network = trainable_text_denoiser(teacher, config.generator_lora, config.lora_rank, config.lora_alpha,
                                      config.gradient_checkpointing)
    generator = (ConditioningTimestepGenerator(network, schedule, config.conditioning_timestep)
                 if config.student_steps == 1 else network)
    critic_net = trainable_text_denoiser(teacher, config.critic_lora, config.lora_rank, config.lora_alpha,
                                         config.gradient_checkpointing)
    probe = conditioner.encode([""])
    with torch.no_grad():
        feature_shape = critic_net.features(torch.zeros((1,) + parts.latent_shape, device=device), 1.0,
                                            **probe).shape[1:]
    critic = CriticWithHead(critic_net, GANHead(feature_shape).to(device))
    settings = DMD2Settings(
        batch_size=config.batch_size, critic_weighting="eps", dm_weight=config.dm_weight,
        gan_generator_weight=config.gan_generator_weight, gan_discriminator_weight=config.gan_discriminator_weight,
        student_sigmas=tuple(float(schedule.sigmas[t]) for t in timesteps) if config.student_steps > 1 else None,
        backward_simulation=config.backward_simulation)
    needs_real = config.gan or not config.backward_simulation
    sample_real = None
    if needs_real:
        if real_latents is None or real_conditions is None:
            raise ValueError("the GAN loss (and a student trained on noised real data) needs real pairs: pass "
                             "real_latents (VAE latents x scaling_factor) and real_conditions (their captions' "
                             "conditions dict, TextConditioner.encode), or set both GAN weights to 0")
        if tuple(real_latents.shape[1:]) != parts.latent_shape or _structure(real_conditions) != _structure(probe):
            raise ValueError(f"real pairs must match the teacher: latents {parts.latent_shape} (got "
                             f"{tuple(real_latents.shape[1:])}), conditions {_structure(probe)} (got "
                             f"{_structure(real_conditions)})")
        sample_real = pair_sampler(real_latents, real_conditions, device)
    shape = parts.latent_shape
    latents = lambda n, rng: torch.randn((n,) + shape, generator=rng, device=rng.device).to(device)  # noqa: E731
    objective = DMD2Objective(generator, critic, real, schedule, latents, settings, sample_real=sample_real,
                              sample_conditions=prompt_sampler(conditioner, config.prompts))
    players = objective.players(config.lora_lr if config.generator_lora else config.lr, config.critic_lr,
                                config.ratio, warmup_steps=config.warmup_steps, grad_clip=config.grad_clip,
                                ema_decay=config.ema_decay)
    warm_start_log = []
    if config.warm_start_steps and (out_dir is None or latest_checkpoint(out_dir) is None):
        # Before the training loop takes the generator (and, under FSDP, shards it); a resumed run's generator comes
        # from its checkpoint instead.
        pairs = teacher_ode_pairs(real, conditioner, config.prompts, parts.latent_shape, schedule,
                                  config.warm_start_pairs, config.warm_start_ode_steps, config.seed)
        warm_start_log = regression_warm_start(generator, pairs, config.warm_start_steps, config.warm_start_lr,
                                               seed=config.seed)
    train_config = TrainConfig(steps=config.steps, seed=config.seed, log_every=config.log_every,
                               checkpoint_every=config.checkpoint_every, progress=config.progress,
                               mixed_precision=config.mixed_precision, time_limit_s=config.time_limit_s,
                               gradient_accumulation=config.gradient_accumulation, fsdp=config.fsdp,
                               fsdp_min_params=config.fsdp_min_params)
    return T2IDistillation(Trainer(objective, players, train_config, out_dir), generator, critic, real, conditioner,
                           parts, config, timesteps, schedule, warm_start_log)


# ------------------------------------------------------------------------------------- the one-step warm start
@torch.no_grad()
def teacher_ode_pairs(real: Callable, conditioner: TextConditioner, prompts: Sequence[str],
                      latent_shape: tuple[int, ...], schedule: NoiseSchedule, n: int, num_steps: int = 25,
                      seed: int = 0, batch_size: int = 8) -> tuple[Tensor, Tensor, dict]:
    """(z, y, conditions): n noises, the guided teacher's (``real``) deterministic ODE sample from each (EDM's Heun
    sampler over the teacher's own sigma range, ``num_steps`` steps) and the conditions of the prompt each was made
    for (``prompts`` in turn). DMD2's one-step SDXL starts from DMD1's regression on such pairs (Sec. 5.2): its
    generator on pure noise at t = 399 is far from the teacher's many-step map."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n,) + tuple(latent_shape), generator=g).to(conditioner.device)
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    ys, batches = [], []
    for start in range(0, n, batch_size):
        batches.append(conditioner.encode(chosen[start:start + batch_size]))
        ys.append(edm_sampler(bind(real, batches[-1]), z[start:start + batch_size], num_steps,
                              float(schedule.sigmas[0]), float(schedule.sigmas[-1])))
    return z, torch.cat(ys), functools.reduce(concat_conditions, batches)


def regression_warm_start(generator: nn.Module, pairs: tuple[Tensor, Tensor, dict], steps: int, lr: float = 1e-5,
                          batch_size: int = 4, seed: int = 0) -> list[dict]:
    """Fit a one-step generator to teacher ODE pairs with DMD1's regression loss (DMD eq. 9; mean squared error on
    latents, where DMD used LPIPS on images) before distribution matching; returns the loss log. In place, with an
    optimizer of its own."""
    if not isinstance(generator, ConditioningTimestepGenerator):
        raise ValueError("the regression warm start is for the one-step generator (student_steps=1); a K-step student "
                         "starts as the teacher itself")
    z, y, conditions = pairs
    objective = RegressionObjective(generator, (z, y), batch_size, conditions=conditions)
    trainer = Trainer(objective, {"generator": Player(generator, lr)},
                      TrainConfig(steps=steps, seed=seed, log_every=max(steps // 20, 1), fsdp=False))
    return trainer.fit()


@torch.no_grad()
def first_dm_update(run: T2IDistillation, prompts: Sequence[str], sigma: float = 2.0, seed: int = 0) -> dict:
    """The DM update of the untrained distillation, fake - real = critic - guided teacher, against
    -(w - 1)(mu_c - mu_u): with critic and generator copies of the teacher, DMD2's first update on a guided teacher is
    exactly the CFG augmentation term (Decoupled DMD's name for it). Returns the largest relative difference and the update's mean
    size, at noise level ``sigma`` on noised random latents."""
    g = torch.Generator().manual_seed(seed)
    device = run.conditioner.device
    conditions = run.conditioner.encode(list(prompts))
    x = torch.randn((len(prompts),) + run.parts.latent_shape, generator=g).to(device) * math.sqrt(1 + sigma ** 2)
    sigmas = torch.full((len(prompts),), float(sigma), device=device)
    update = run.critic(x, sigmas, **conditions).double() - run.real(x, sigmas, **conditions).double()
    teacher = run.real.denoiser
    cond = teacher(x, sigmas, **conditions).double()
    uncond = teacher(x, sigmas, **run.conditioner.unconditional(conditions)).double()
    augmentation = -(run.config.guidance - 1) * (cond - uncond)
    return {"relative_error": float((update - augmentation).abs().max() / augmentation.abs().max()),
            "update_abs_mean": float(update.abs().mean())}
