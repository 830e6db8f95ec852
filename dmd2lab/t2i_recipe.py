"""The text-to-image recipe (DMD2 Sec. 5.2): the functions behind ``dmd2lab prepare-t2i | distill-t2i | sample-t2i``.

- :class:`T2IRecipe` — :class:`~dmd2lab.t2i.T2IConfig` as a YAML section (``configs/sdxl.yaml``,
  ``configs/sd15.yaml``, section ``t2i``) plus where things live: the teacher (``pretrained``: a diffusers folder or
  a hub id), the prompt file (one caption per line) and the real-pair cache that ``prepare-t2i`` wrote. It is read
  by :func:`dmd2lab.image_recipe.load_config`, with the same strictness as the image recipes.
- :func:`distill_t2i` — build, run (resumable from the run folder), and export the student as a stock diffusers
  pipeline (``RUN/export``) and, for a LoRA student, as LoRA weights (``RUN/export_lora``).
- :func:`sample_t2i` — sample an exported student through stock diffusers and its LCMScheduler (DMD2 Sec. 4.5:
  predict x0, re-noise with fresh noise; guidance 0, the teacher's guidance being distilled in), writing PNGs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import distributed, t2i_data
from .image_recipe import output_folder, resolve_device
from .t2i import ConditioningTimestepGenerator, T2IConfig, T2IDistillation, add_lora, build_t2i_distillation, \
    student_timesteps
from .t2i_eval import generate_images, load_pipeline, read_prompts, write_images
from .t2i_models import (SAMPLING_FILE, export_lora, export_pipeline, folder_kind, lcm_scheduler,
                         load_t2i_parts, saved_timesteps)

@dataclass
class T2IRecipe(T2IConfig):
    """DMD2 text-to-image settings as a file and a command line see them: every :class:`T2IConfig` field (null =
    the paper's value for ``kind``), with ``prompts`` the path of a prompt file, and ``pretrained`` (a diffusers
    pipeline folder or hub id), ``variant`` (e.g. fp16 weights), ``cache`` (a ``prepare-t2i`` folder: the GAN's real
    pairs), ``cache_limit`` (load only its first N pairs: every rank holds the loaded pairs in memory, ~0.9 MB each
    for SDXL) and ``device``. Checked when built, so a bad setting fails before any model loads."""

    prompts: str = ""
    progress: bool = True
    pretrained: str = ""
    variant: str | None = None
    cache: str | None = None
    cache_limit: int | None = None
    device: str = "auto"

    def __post_init__(self):
        if not self.pretrained:
            raise ValueError("pretrained must name the teacher: a diffusers pipeline folder, or a hub id such as "
                             "stabilityai/stable-diffusion-xl-base-1.0 (in the local hub cache when offline)")
        if not self.prompts:
            raise ValueError("prompts must be the path of a prompt file (one prompt per line)")
        if self.cache_limit is not None and self.cache_limit < 1:
            raise ValueError(f"cache_limit must be >= 1 (pairs to load) or null (all); got {self.cache_limit}")
        config = self.t2i_config()  # T2IConfig's own checks, the prompt file's included
        if self.cache is None and (config.gan or not config.backward_simulation):
            raise ValueError("the GAN (and a student trained on noised real data) needs real image-caption pairs: set "
                             "cache to a folder made by `dmd2lab prepare-t2i`, or set gan_generator_weight and "
                             "gan_discriminator_weight to 0")

    def t2i_config(self) -> T2IConfig:
        """The library's config: these settings with the prompt file read."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(T2IConfig)}
        return T2IConfig(**dict(values, prompts=read_prompts(self.prompts)))


# ---------------------------------------------------------------------------------------------- distill
def distill_t2i(recipe: T2IRecipe, out_dir: str | Path) -> tuple[T2IDistillation, dict[str, Path]]:
    """Run (or resume, from ``out_dir``'s last checkpoint) DMD2 on a text-to-image teacher (Algorithm 1, Sec. 5.2)
    and export the student (:func:`export_student`). Returns the run and the export paths."""
    device = resolve_device(recipe.device)
    output_folder(out_dir)
    config = recipe.t2i_config()
    needs_real = config.gan or not config.backward_simulation
    if needs_real:  # a missing or mismatched cache fails before the teacher loads (minutes for SDXL)
        t2i_data.check_model(t2i_data.finished_index(recipe.cache), recipe.cache,
                             t2i_data.model_source(recipe.pretrained), recipe.kind)
    parts = load_t2i_parts(recipe.pretrained, recipe.kind, variant=recipe.variant, device=device)
    real = t2i_data.load_t2i_cache(recipe.cache, parts, recipe.cache_limit) if needs_real else (None, None)
    torch.manual_seed(config.seed)
    run = build_t2i_distillation(parts, config, *real, out_dir=out_dir)
    run.trainer.fit()
    paths = export_student(run, out_dir)
    if distributed.is_main():
        _write_run_summary(recipe, run, out_dir, paths)
    return run, paths


def export_student(run: T2IDistillation, out_dir: str | Path) -> dict[str, Path]:
    """Write ``out_dir/export`` (a stock diffusers pipeline with the student's UNet and an LCMScheduler) and, for a
    LoRA student, ``out_dir/export_lora`` (its adapters for the teacher's pipeline). Every rank calls it (a sharded
    student is gathered by all); the main rank writes."""
    paths = {"export": Path(out_dir) / "export"}
    if run.config.generator_lora:
        paths["export_lora"] = Path(out_dir) / "export_lora"
    unet = _student_for_export(run)
    if distributed.is_main():
        export_pipeline(unet, run.parts, paths["export"], run.timesteps)
        if "export_lora" in paths:
            export_lora(unet, paths["export_lora"], run.parts.kind)
    distributed.barrier()
    return paths


def _student_for_export(run: T2IDistillation) -> nn.Module | None:
    """The student UNet (EMA weights when kept) whole, on the main rank: the module itself in one unsharded
    process; otherwise rebuilt from the gathered state (:func:`unet_from_state`)."""
    if distributed.world_size() == 1 and not run.trainer.fsdp:
        return run.student_unet()
    state = run.trainer.full_state("generator")
    return unet_from_state(run, state) if distributed.is_main() else None


def unet_from_state(run: T2IDistillation, state: dict) -> nn.Module:
    """A CPU UNet of the teacher's architecture (with the run's LoRA when the student has one) holding a gathered
    generator state: built on the meta device and filled by assignment, so no second copy of SDXL's 2.6B weights
    is ever initialised."""
    prefix = "denoiser.unet." if isinstance(run.generator, ConditioningTimestepGenerator) else "unet."
    with torch.device("meta"):
        unet = type(run.parts.unet).from_config(run.parts.unet.config)
    if run.config.generator_lora:
        add_lora(unet, run.config.lora_rank, run.config.lora_alpha)
    unet.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, assign=True)
    return unet.eval()


def _write_run_summary(recipe: T2IRecipe, run: T2IDistillation, out_dir, paths: dict[str, Path]):
    """``out_dir/run.json``: the recipe, how far the run got, and where the exports are."""
    complete = run.trainer.step == run.config.steps
    if not complete:
        print(f"stopped by time_limit_s ({run.config.time_limit_s:g} s) at step {run.trainer.step}/{run.config.steps};"
              " the export is that step's student; run the same command again to resume")
    summary = {"recipe": dataclasses.asdict(recipe), "steps": run.trainer.step, "complete": complete,
               "timesteps": list(run.timesteps), "exports": {k: str(v) for k, v in paths.items()}}
    (Path(out_dir) / "run.json").write_text(json.dumps(summary, indent=2))


# ---------------------------------------------------------------------------------------------- sample
def sampling_timesteps(model: Path, steps: int | None = None, timesteps: Sequence[int] | None = None
                       ) -> tuple[int, ...]:
    """The timesteps to sample an exported student at: ``timesteps`` as given; ``steps`` K: the folder's own when
    it has K of them (a 1-step SDXL student's is 399, not 999), else T-1, T-1-T/K, ... (DMD2 Sec. 4.5); neither: the
    folder's own (``dmd2lab_sampling.json``, written by the export)."""
    saved = saved_timesteps(model)
    if timesteps:
        chosen = tuple(int(t) for t in timesteps)
        if steps is not None and steps != len(chosen):
            raise ValueError(f"--steps {steps} but {len(chosen)} --timesteps given; pass one of them")
    elif steps is not None:
        chosen = saved if saved is not None and len(saved) == steps else student_timesteps(steps)
    elif saved is not None:
        chosen = saved
    else:
        raise ValueError(f"{model} has no {SAMPLING_FILE} (distill-t2i writes it into RUN/export); pass --steps K or "
                         "--timesteps, e.g. --timesteps 999 749 499 249")
    if not all(0 <= t < 1000 for t in chosen) or list(chosen) != sorted(set(chosen), reverse=True):
        raise ValueError(f"timesteps must be distinct, in 0..999 and decreasing; got {list(chosen)}")
    return chosen


def check_student_folder(model: str | Path) -> Path:
    """``model`` if it is an SDXL / SD1.5 pipeline folder; an error naming the folder to pass otherwise."""
    model = Path(model)
    if (model / "export" / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {model} is a distill-t2i run folder; pass its export: {model / 'export'}")
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {model} is no exported student: pass the RUN/export folder that "
                                "`dmd2lab distill-t2i --out RUN` writes (it holds model_index.json, unet/, vae/, ...)")
    folder_kind(model)  # an SDXL or SD1.5 pipeline, or a clear error
    return model


def load_student_pipeline(model: str | Path, timesteps: Sequence[int], device):
    """An exported student as its stock pipeline (StableDiffusionXLPipeline / StableDiffusionPipeline) with an
    LCMScheduler for ``timesteps``, on ``device``."""
    from diffusers import LCMScheduler
    pipe = load_pipeline(check_student_folder(model), device)
    if not isinstance(pipe.scheduler, LCMScheduler):  # e.g. a teacher folder: sample it the DMD2 way anyway
        pipe.scheduler = lcm_scheduler(pipe.scheduler, tuple(timesteps))
    return pipe


def sample_t2i(model: str | Path, prompts_file: str | Path, out_dir: str | Path, steps: int | None = None,
               timesteps: Sequence[int] | None = None, seed: int = 0, device: str = "auto", batch_size: int = 4
               ) -> list[Path]:
    """One PNG per prompt of ``prompts_file`` (``out_dir/00000.png``, ...), plus ``metadata.jsonl`` pairing each file
    with its prompt (Hugging Face imagefolder's layout). Image i's noise comes from ``seed + i`` whatever the batch
    size; guidance 0 (DMD2's students distil the teacher's guidance)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
    prompts = read_prompts(prompts_file)
    model, out_dir = check_student_folder(model), Path(out_dir)
    output_folder(out_dir)
    chosen = sampling_timesteps(model, steps, timesteps)
    pipe = load_student_pipeline(model, chosen, resolve_device(device))
    generated = generate_images(pipe, prompts, chosen, seed=seed, batch_size=batch_size, warmup_batches=0)
    paths = write_images(generated.images, out_dir)
    rows = [json.dumps({"file_name": p.name, "text": text}) for p, text in zip(paths, prompts)]
    (out_dir / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return paths
