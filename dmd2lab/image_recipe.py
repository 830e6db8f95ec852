"""The image recipes: train an EDM teacher, distil it with DMD2, sample, evaluate — the functions behind
``dmd2lab train-teacher | distill | sample | eval`` and lab 05.

Settings are plain dataclasses (:class:`TeacherConfig`, :class:`DistillConfig`); a YAML file
(``configs/<dataset>.yaml``, sections ``teacher`` and ``distill``), CLI ``--set name=value`` pairs and papermill
parameters all map onto their fields the same way (:func:`load_config`), and an unknown name is an error.

DMD2's ImageNet-64 recipe (DESIGN.md) is the default: a one-step generator and a critic both initialised from the
teacher, the generator evaluated at sigma_max = 80 on pure noise, the critic trained with EDM's weighting over the
whole 1000-level Karras table, DM loss over t in 20..980, GAN head on the critic's mid-block with weights
3e-3 / 1e-2 and independently re-noised inputs, TTUR ratio 5, AdamW (0.9, 0.999) wd 0.01, 500-step warm-up,
gradient clip 10. The dataset configs scale batch, learning rate and steps to their model size.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from . import dmd, image_data, image_metrics, labs
from .diffusion import NoiseSchedule, add_noise, edm_sampler, sampler_evaluations
from .dmd import GANHead
from . import distributed
from .image_models import (UNET_PRESETS, EDMDenoiser, OneStepGenerator, VPDenoiser, edm_sigmas, image_shape,
                           load_denoiser, load_teacher, read_metadata, save_denoiser, trainable_copy)
from .objective import CriticWithHead, DenoiserObjective, DMD2Objective, DMD2Settings, bind
from .train import Player, Trainer, TrainConfig


@dataclass
class RunSettings:
    """How a training run runs, the same for teachers and distillation: seed, device, precision and speed options,
    a wall-clock limit (0 = none), progress bar, and scale: micro-batches accumulated per step, FSDP (None: as the
    launcher's accelerate config says) and its shard size (docs/scaling.md; ``batch_size`` is per micro-batch).
    Logging and checkpoint periods are each recipe's own."""

    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "no"
    channels_last: bool = False
    compile: bool = False
    time_limit_s: float = 0.0
    progress: bool = True
    gradient_accumulation: int = 1
    fsdp: bool | None = None
    fsdp_min_params: int | None = None


@dataclass
class TeacherConfig(RunSettings):
    """An EDM teacher on a dataset (EDM eq. 2, log-normal noise levels, EMA of the weights). The optimiser is the
    training loop's: AdamW with weight decay 0.01 and gradient clipping at 10 (EDM itself uses Adam, no clipping)."""

    dataset: str = "fmnist"
    data_root: str | None = None
    unet: str = "fmnist"
    class_conditional: bool = False
    steps: int = 20000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 500
    ema_decay: float = 0.999
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    log_every: int = 100
    checkpoint_every: int = 1000


@dataclass
class DistillConfig(RunSettings):
    """DMD2 for an image generator (defaults: DMD2's ImageNet-64 settings, DESIGN.md): one step, or a
    ``student_steps``-step student at timesteps T-1, T-1-T/K, ... with backward simulation (DMD2 Sec. 4.5)."""

    dataset: str = "fmnist"
    data_root: str | None = None
    teacher: str = "data/fmnist_teacher.safetensors"
    edm_code: str | None = None
    steps: int = 5000
    batch_size: int = 64
    lr: float = 2e-5
    ratio: int = 5
    warmup_steps: int = 500
    grad_clip: float = 10.0
    ema_decay: float | None = None
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    schedule_size: int = 1000
    gan_generator_weight: float = 3e-3
    gan_discriminator_weight: float = 1e-2
    dm_weight: float = 1.0
    student_steps: int = 1
    backward_simulation: bool = True
    log_every: int = 50
    checkpoint_every: int = 500
    eval_every: int = 0
    eval_images: int = 1000
    classifier: str | None = None


CONFIG_KINDS = {"teacher": TeacherConfig, "distill": DistillConfig}
#: A YAML file's sections: the image recipes' ``teacher`` and ``distill``, and the text-to-image recipe's ``t2i``
#: (:class:`dmd2lab.t2i_recipe.T2IRecipe`, imported when asked for: it imports this module).
CONFIG_SECTIONS = (*CONFIG_KINDS, "t2i")


def config_class(kind: str) -> type:
    """The settings dataclass of a config section."""
    if kind == "t2i":
        from .t2i_recipe import T2IRecipe
        return T2IRecipe
    return CONFIG_KINDS[kind]


def load_config(kind: str, path: str | Path | None = None, overrides: dict | None = None):
    """A :class:`TeacherConfig`, :class:`DistillConfig` or (``kind`` 't2i') text-to-image recipe from the ``kind``
    section of a YAML file, then ``overrides`` (CLI ``--set``, papermill parameters). Unknown names and wrong types
    are errors that name the field and list the valid ones."""
    cls = config_class(kind)
    values: dict = {}
    if path is not None:
        values.update(_yaml_section(kind, Path(path)))
    values.update(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        run = [f.name for f in dataclasses.fields(RunSettings) if f.name in fields]
        valid = [name for name in fields if name not in run] + run  # the recipe's own settings first
        raise ValueError(f"unknown {kind} setting(s) {unknown}; valid: {', '.join(valid)}")
    for name, value in values.items():
        values[name] = _checked_type(cls, fields[name], value)
    config = cls(**values)
    if isinstance(config, RunSettings):
        _validate(config)  # the text-to-image recipe checks itself when built
    return config


def _yaml_section(kind: str, path: Path) -> dict:
    import yaml
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; the shipped ones are configs/fmnist.yaml, "
                                "configs/cifar10.yaml, configs/imagenet64.yaml (images) and configs/sdxl.yaml, "
                                "configs/sd15.yaml (text-to-image)")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # the parser's own error is a multi-line traceback that names no fix
        raise ValueError(f"{path} is not valid YAML ({' '.join(str(e).split())}); fix the line it names, "
                         "e.g. as configs/fmnist.yaml writes its settings") from e
    # Unknown sections first: a misspelt 'techer:' is then named, not reported as a missing 'teacher:'.
    unknown_sections = sorted(set(loaded) - set(CONFIG_SECTIONS)) if isinstance(loaded, dict) else []
    if unknown_sections:
        raise ValueError(f"{path}: unknown section(s) {unknown_sections}; the sections are "
                         f"{', '.join(CONFIG_SECTIONS)}")
    if not isinstance(loaded, dict) or not isinstance(loaded.get(kind), dict):
        raise ValueError(f"{path}: expected a mapping with a '{kind}:' section of settings (sections: "
                         f"{', '.join(CONFIG_SECTIONS)}){_other_recipe_hint(loaded, kind)}")
    return loaded[kind]


def _other_recipe_hint(loaded, kind: str) -> str:
    """The likely mix-up, named: a text-to-image recipe given to an image command, or the other way round."""
    if not isinstance(loaded, dict) or not loaded:
        return ""
    if "t2i" in loaded:
        return "; it is a text-to-image recipe: run it with `dmd2lab distill-t2i`"
    return "; it is an image recipe: run it with `dmd2lab distill` or `dmd2lab train-teacher`" if kind == "t2i" else ""


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _checked_type(cls, f: dataclasses.Field, value):
    """``value`` if it fits the field's annotation (``int``, ``float``, ``str``, ``bool``, ``tuple[...]`` of those,
    optionally ``| None``); ints become floats for float fields, lists tuples for tuple fields."""
    kinds = [k.strip() for k in str(f.type).split("|")]
    if value is None and "None" in kinds:
        return None
    base = next(k for k in kinds if k != "None")
    if base == "float" and isinstance(value, str):
        # YAML 1.1 reads 2e-6 (no dot) as a string; take it as the number it spells.
        try:
            value = float(value)
        except ValueError:
            pass
    if base.startswith("tuple["):  # e.g. image_size: [1024, 1024] (YAML has lists, not tuples)
        items = [k.strip() for k in base[len("tuple["):-1].split(",")]
        ok = isinstance(value, (list, tuple)) and len(value) == len(items) and all(
            _fits(v, k) for v, k in zip(value, items))
        if not ok:
            raise ValueError(f"{cls.__name__}.{f.name} must be a list [{', '.join(items)}]"
                             f"{' or null' if 'None' in kinds else ''}; got {value!r}")
        return tuple(float(v) if k == "float" else v for v, k in zip(value, items))
    if base == "str" and isinstance(value, bool):
        raise ValueError(f"{cls.__name__}.{f.name} must be str; got {value!r}: YAML reads unquoted no/yes/off/on as "
                         f"booleans, so quote it ({f.name}: \"no\" in a file, --set {f.name}='\"no\"' on a "
                         "command line)")
    if not _fits(value, base):
        raise ValueError(f"{cls.__name__}.{f.name} must be {base}{' or null' if 'None' in kinds else ''}; "
                         f"got {value!r} ({type(value).__name__})")
    return float(value) if base == "float" else value


def _fits(value, base: str) -> bool:
    return isinstance(value, _TYPES[base]) and (base == "bool" or not isinstance(value, bool))


def _validate(config):
    """Every check that needs no file, so a bad setting fails before a dataset or a model is loaded."""
    _train_config(config)  # the loop's own checks (mixed_precision, time_limit_s, checkpoint_every, ...)
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0; got {config.lr}")
    if config.ema_decay is not None and not 0 < config.ema_decay < 1:
        raise ValueError(f"ema_decay must lie in (0, 1) or be null; got {config.ema_decay}")
    if config.dataset not in image_data.DATASETS:
        raise ValueError(f"unknown dataset {config.dataset!r}; expected one of {sorted(image_data.DATASETS)}")
    for name in ("steps", "batch_size", "log_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1; got {getattr(config, name)}")
    if isinstance(config, TeacherConfig):
        if config.unet not in UNET_PRESETS:
            raise ValueError(f"unknown unet preset {config.unet!r}; expected one of {sorted(UNET_PRESETS)}")
        # Known from the names alone, so a mismatch fails before the dataset is loaded.
        unet, info = UNET_PRESETS[config.unet], image_data.DATASETS[config.dataset]
        if unet["in_channels"] != info.channels or unet["sample_size"] != info.resolution:
            raise ValueError(f"unet preset {config.unet!r} takes {unet['in_channels']}x{unet['sample_size']}^2 images "
                             f"but {config.dataset} is {info.channels}x{info.resolution}^2; pick the matching preset "
                             f"(unet={config.dataset})")
    if isinstance(config, DistillConfig):
        if config.student_steps < 1:
            raise ValueError(f"student_steps must be >= 1 (1 = DMD2's one-step generator); got {config.student_steps}")
        if config.student_steps == 1 and not config.backward_simulation:
            raise ValueError("backward_simulation=false only applies to a multi-step student (student_steps > 1)")
        if config.ratio < 1:
            raise ValueError(f"ratio (TTUR: critic updates per generator update) must be >= 1; got {config.ratio}")
        if not 0 < config.sigma_min < config.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {config.sigma_min}, {config.sigma_max}")


def resolve_device(device: str) -> torch.device:
    """The labs' device rule (:func:`dmd2lab.labs.resolve_device`: 'auto' -> cuda when visible, else cpu; a named
    device must be usable) as a torch.device; under torchrun / accelerate launch, this rank's device, in the
    launch's process group (:func:`dmd2lab.distributed.process_device`)."""
    if distributed.launched():
        return distributed.process_device(device)
    return torch.device(labs.resolve_device(device))


def output_folder(path: str | Path | None) -> None:
    """Fail at once if an output folder is an existing file: the training loop would otherwise find out at its first
    log write, after the data, the models and some steps."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise NotADirectoryError(f"output folder {path} (--out) is a file; pass a folder (created if missing) or "
                                 "move the file away")


def _prepare_module(module: torch.nn.Module, config) -> torch.nn.Module:
    if config.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if config.compile:
        module.compile()  # in place: state_dict keys and checkpoints stay those of the plain module
    return module


# --------------------------------------------------------------------------------------------- teacher
def train_teacher(config: TeacherConfig, out_dir: str | Path) -> tuple[EDMDenoiser, Path]:
    """Train an EDM teacher (resumable from ``out_dir``'s checkpoints); writes ``out_dir/teacher.safetensors``
    (the EMA weights) and returns (teacher, its path)."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    output_folder(out_dir)
    data = image_data.load_images(config.dataset, "train", config.data_root)
    info = data.info
    unet = dict(UNET_PRESETS[config.unet], num_class_embeds=info.num_classes if config.class_conditional else None)
    denoiser = _prepare_module(EDMDenoiser.from_config(unet, config.sigma_data).to(device), config)
    sampler = labelled_sampler(data, device) if config.class_conditional else image_data.real_sampler(
        data, info.resolution, device)
    objective = DenoiserObjective(
        denoiser, sampler, NoiseSchedule.karras(), config.batch_size, "edm", config.sigma_data,
        sigma_sampler=lambda n, rng: edm_sigmas(n, rng, config.p_mean, config.p_std))
    trainer = Trainer(objective, {"teacher": Player(denoiser, config.lr, warmup_steps=config.warmup_steps,
                                                    ema_decay=config.ema_decay)},
                      _train_config(config), out_dir)
    trainer.fit()
    return trainer.module("teacher"), save_player(trainer, "teacher", Path(out_dir) / "teacher.safetensors",
                                                  _run_metadata("teacher", trainer, config, device))


def labelled_sampler(data, device) -> Callable[[int, torch.Generator], tuple[Tensor, dict]]:
    """Real images with their labels as conditioning keywords: (x, {"class_labels": y})."""
    draw = image_data.real_sampler(data, data.info.resolution, device, with_labels=True)

    def sample(n: int, rng: torch.Generator) -> tuple[Tensor, dict]:
        images, labels = draw(n, rng)
        return images, {"class_labels": labels.to(device)}
    return sample


def _run_metadata(role: str, trainer: Trainer, config, device: torch.device, **extra) -> dict:
    """What a model file records of the run that made it; says so when a time limit stopped the run early."""
    complete = trainer.step == config.steps
    if not complete and distributed.is_main():
        print(f"stopped by time_limit_s ({config.time_limit_s:g} s) at step {trainer.step}/{config.steps}; the model "
              "written is that step's (its file says complete: false); run the same command again to resume")
    return {"role": role, "dataset": config.dataset, **extra, "steps": trainer.step, "complete": complete,
            "config": dataclasses.asdict(config), "train_seconds": trainer.history[-1]["elapsed_s"],
            "device": _device_name(device)}


def _train_config(config) -> TrainConfig:
    return TrainConfig(steps=config.steps, seed=config.seed, log_every=config.log_every,
                       eval_every=getattr(config, "eval_every", 0), checkpoint_every=config.checkpoint_every,
                       progress=config.progress, mixed_precision=config.mixed_precision,
                       time_limit_s=config.time_limit_s, gradient_accumulation=config.gradient_accumulation,
                       fsdp=config.fsdp, fsdp_min_params=config.fsdp_min_params)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# -------------------------------------------------------------------------------------------- distill
@dataclass
class Distillation:
    """A built DMD2 image distillation: the trainer, and the pieces a lab or a script looks at."""

    trainer: Trainer
    generator: OneStepGenerator
    critic: CriticWithHead
    teacher: EDMDenoiser
    config: DistillConfig
    data: object = field(repr=False, default=None)
    sigmas: tuple[float, ...] = ()

    def sample(self, n: int, seed: int = 0, batch_size: int = 256) -> Tensor:
        """n student samples (model range) from fixed noise."""
        return student_samples(student_network(self.generator), self.sigmas, n, seed, batch_size)


def build_distillation(config: DistillConfig, out_dir: str | Path | None = None,
                       generator_init: str | Path | None = None, data=None,
                       evaluate: Callable[[Trainer], dict[str, float]] | None = None) -> Distillation:
    """DMD2 on images (Algorithm 1) from a teacher file: generator and critic are copies of the teacher (or the
    generator of ``generator_init``, e.g. a shipped student to continue), the GAN head reads the critic's mid-block.
    ``data`` (an :class:`~dmd2lab.image_data.ImageData`) replaces the config's dataset, e.g. a subset;
    ``evaluate(trainer) -> metrics`` replaces the config's classifier-FID evaluation (every ``eval_every`` steps).
    ``trainer.fit()`` runs it and resumes from ``out_dir``'s last checkpoint."""
    device = resolve_device(config.device)
    output_folder(out_dir)
    torch.manual_seed(config.seed)
    teacher = load_teacher(config.teacher, device, config.edm_code)
    if str(config.teacher).endswith(".safetensors") and read_metadata(config.teacher)[1].get("complete") is False:
        warnings.warn(f"teacher {config.teacher} is an unfinished run (stopped by its time limit); distilling it "
                      "distils that unfinished teacher")
    data = image_data.load_images(config.dataset, "train", config.data_root) if data is None else data
    info = data.info
    shape = image_shape(teacher)
    if shape != (info.channels, info.resolution, info.resolution):
        raise ValueError(f"teacher {config.teacher} makes {shape} images but {config.dataset} is "
                         f"{(info.channels, info.resolution, info.resolution)}; use a teacher of this dataset")
    student = load_denoiser(generator_init, device) if generator_init else teacher
    schedule, critic_weighting = teacher_schedule(teacher, config)
    sigmas = student_sigmas(schedule, config.student_steps)
    network = _prepare_module(trainable_copy(student), config)
    # One step: G(z) = D(sigma_max z, sigma_max). K steps (DMD2 Sec. 4.5): the denoiser itself, G(x_k, sigma_k).
    generator = OneStepGenerator(network, sigmas[0]) if len(sigmas) == 1 else network
    critic_net = _prepare_module(trainable_copy(teacher), config)
    probe = {"class_labels": torch.zeros(1, dtype=torch.long, device=device)} if teacher.num_classes else {}
    with torch.no_grad():
        feature_shape = critic_net.features(torch.zeros((1,) + shape, device=device), 1.0, **probe).shape[1:]
    critic = CriticWithHead(critic_net, GANHead(feature_shape).to(device))
    gan = config.gan_generator_weight > 0 or config.gan_discriminator_weight > 0
    settings = DMD2Settings(batch_size=config.batch_size, critic_weighting=critic_weighting,
                            sigma_data=getattr(teacher, "sigma_data", 0.5),
                            dm_weight=config.dm_weight, gan_generator_weight=config.gan_generator_weight,
                            gan_discriminator_weight=config.gan_discriminator_weight,
                            student_sigmas=sigmas if len(sigmas) > 1 else None,
                            backward_simulation=config.backward_simulation)
    # A class-conditional teacher (DMD2 ImageNet-64) gives a class-conditional generator, critic and GAN head:
    # every generator sample gets a uniformly drawn label, every real image its own.
    classes = teacher.num_classes
    if classes:
        real = labelled_sampler(data, device)
        conditions = lambda n, rng: {"class_labels": torch.randint(  # noqa: E731
            0, classes, (n,), generator=rng, device=rng.device).to(device)}
    else:
        real, conditions = image_data.real_sampler(data, info.resolution, device), None
    latents = lambda n, rng: torch.randn((n,) + shape, generator=rng, device=rng.device).to(device)  # noqa: E731
    objective = DMD2Objective(
        generator, critic, teacher, schedule, latents, settings,
        sample_real=real if gan or not settings.backward_simulation else None, sample_conditions=conditions)
    players = objective.players(config.lr, config.lr, config.ratio, warmup_steps=config.warmup_steps,
                                grad_clip=config.grad_clip, ema_decay=config.ema_decay)
    if evaluate is None and config.eval_every:
        if not config.classifier:
            raise ValueError("eval_every > 0 measures classifier FID: set classifier to a classifier file "
                             "(data/fmnist_classifier.safetensors) or eval_every to 0")
        evaluate = _fid_evaluator(config, device, sigmas)
    trainer = Trainer(objective, players, _train_config(config), out_dir, evaluate=evaluate)
    return Distillation(trainer, generator, critic, teacher, config, data, sigmas)


def student_network(generator) -> torch.nn.Module:
    """The denoiser a student file holds: the one-step generator's network, or the K-step student itself."""
    return generator.denoiser if isinstance(generator, OneStepGenerator) else generator


def student_sigmas(schedule: NoiseSchedule, steps: int) -> tuple[float, ...]:
    """A K-step student's noise levels, largest first, at timesteps T-1, T-1-T/K, ... of the schedule: DMD2's
    999/749/499/249 for K = 4 and T = 1000; (sigma_max,) for the one-step generator."""
    T = len(schedule)
    return tuple(float(schedule.sigmas[T - 1 - k * (T // steps)]) for k in range(steps))


def teacher_schedule(teacher, config: DistillConfig) -> tuple[NoiseSchedule, str]:
    """The noise table DMD2 draws its timesteps from, and the critic's loss weighting: EDM teachers use the 1000-level
    Karras table with EDM's weighting (DMD2 ImageNet-64); a pretrained VP model its own scheduler's table with the
    epsilon loss (DMD2's text models), so t never leaves the range it was trained on."""
    if isinstance(teacher, VPDenoiser):
        return NoiseSchedule(teacher.log_sigmas.exp().cpu()), "eps"
    return NoiseSchedule.karras(config.schedule_size, config.sigma_min, config.sigma_max), "edm"


def distill(config: DistillConfig, out_dir: str | Path, generator_init: str | Path | None = None
            ) -> tuple[Distillation, Path]:
    """Run (or resume) DMD2 distillation and write ``out_dir/student.safetensors`` (the generator's denoiser,
    EMA weights when ``ema_decay`` is set)."""
    run = build_distillation(config, out_dir, generator_init)
    run.trainer.fit()
    meta = _run_metadata("student", run.trainer, config, resolve_device(config.device), sigmas=list(run.sigmas))
    return run, save_player(run.trainer, "generator", Path(out_dir) / "student.safetensors", meta)


def save_player(trainer: Trainer, name: str, path: Path, metadata: dict) -> Path:
    """Write a trained player's network (its EMA weights when kept; a one-step generator's denoiser) as a model
    file. Every rank calls it (a sharded player is gathered by all); the main rank writes."""
    module = trainer.module(name)
    network = student_network(module)
    prefix = "denoiser." if network is not module else ""
    tensors = {k[len(prefix):]: v for k, v in trainer.full_state(name).items() if k.startswith(prefix)}
    if distributed.is_main():
        save_denoiser(network, path, metadata, tensors)
    distributed.barrier()
    return path


def fitting_classifier(path: str | Path, reference: Tensor, dataset: str):
    """The feature classifier at ``path`` on the reference images' device, if it reads images with their number of
    channels (the shipped one is Fashion-MNIST's: grey)."""
    classifier = image_metrics.load_classifier(path).to(reference.device)
    if classifier.config["channels"] != reference.shape[1]:
        raise ValueError(f"classifier {path} reads {classifier.config['channels']}-channel images but {dataset} has "
                         f"{reference.shape[1]}; measure this dataset with the Inception FID instead")
    return classifier


def _fid_evaluator(config: DistillConfig, device, sigmas: tuple[float, ...]) -> Callable[[Trainer], dict[str, float]]:
    test = image_data.load_images(config.dataset, "test", config.data_root, limit=config.eval_images)
    reference = image_data.to_model_range(test.images, test.info.resolution).to(device)
    classifier = fitting_classifier(config.classifier, reference, config.dataset)

    def evaluate(trainer: Trainer) -> dict[str, float]:
        # The EMA copy when there is one: the weights the student file will hold.
        samples = student_samples(student_network(trainer.module("generator")), sigmas, config.eval_images, seed=0)
        return {"classifier_fid": image_metrics.classifier_fid(reference, samples, classifier)}
    return evaluate


# ----------------------------------------------------------------------------------------- sampling
def student_samples(student: Callable, sigmas, n: int, seed: int = 0, batch_size: int = 256) -> Tensor:
    """n samples of a K-step student (a denoiser; DMD2 Sec. 4.5: predict x0, re-noise it with fresh noise to the next
    level) from the noise (and labels) of ``seed``; K = 1 is the one-step generator D(sigma_max z, sigma_max)."""
    noise, conditions = fixed_noise(n, image_shape(student), seed, _device_of(student), student.num_classes)
    fresh = torch.Generator(device=noise.device).manual_seed(seed + 1)
    with torch.no_grad():
        return torch.cat([dmd.multistep_generate(bind(student, c), z, sigmas, fresh)[0][-1]
                          for z, c in _batches(noise, conditions, batch_size)])


def teacher_samples(teacher: Callable, n: int, num_steps: int, seed: int = 0, batch_size: int = 256,
                    sigma_max: float = 80.0) -> Tensor:
    """n samples of EDM's deterministic Heun sampler with ``num_steps`` steps (2 num_steps - 1 evaluations; 1 step =
    the teacher's one-step output D(sigma_max z, sigma_max)), from the noise (and labels) of ``seed``."""
    noise, conditions = fixed_noise(n, image_shape(teacher), seed, _device_of(teacher), teacher.num_classes)
    with torch.no_grad():
        return torch.cat([edm_sampler(bind(teacher, c), z, num_steps, sigma_max=sigma_max)
                          for z, c in _batches(noise, conditions, batch_size)])


def fixed_noise(n: int, shape: tuple[int, ...], seed: int, device, num_classes: int | None = None
                ) -> tuple[Tensor, dict]:
    """Standard normal noise (and uniform class labels when ``num_classes``) drawn on the CPU from ``seed``, so every
    device and model sees the same noise. Returns (noise, conditioning keywords)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n,) + tuple(shape), generator=g).to(device)
    if not num_classes:
        return noise, {}
    return noise, {"class_labels": torch.randint(0, num_classes, (n,), generator=g).to(device)}


def _batches(noise: Tensor, conditions: dict, batch_size: int):
    for start in range(0, noise.shape[0], batch_size):
        yield noise[start:start + batch_size], {k: v[start:start + batch_size] for k, v in conditions.items()}


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def load_student(path: str | Path, device="cpu") -> tuple[Callable[[int, int], Tensor], tuple[float, ...], dict]:
    """A student file as (sample(n, seed), its noise levels, its metadata)."""
    _, meta = read_metadata(path)
    if meta.get("role") != "student":
        raise ValueError(f"{path} is not a student (its role is {meta.get('role')!r}); sample a teacher with "
                         "teacher_samples")
    denoiser = load_denoiser(path, device)
    sigmas = tuple(meta["sigmas"])
    return lambda n, seed: student_samples(denoiser, sigmas, n, seed), sigmas, meta


def evaluate_models(models: dict[str, tuple[Callable[[int, int], Tensor], int]], reference: Tensor,
                    classifier=None, inception: torch.nn.Module | None = None, num_images: int = 1000,
                    seed: int = 0, speed_images: int = 64, batch_size: int = 64, speed_repeats: int = 1
                    ) -> tuple[dict[str, dict], dict[str, Tensor]]:
    """For each name -> (sample(n, seed), network evaluations per image): ``num_images`` samples from the noise of
    ``seed`` (the same noise for every model), their classifier FID against ``reference`` (and Inception FID/KID if
    ``inception``), and images/s measured the same way for all (:func:`~dmd2lab.image_metrics.sampling_speed` on
    ``speed_images`` images in batches of ``batch_size``, after a warm-up batch; the fastest of ``speed_repeats``
    timed passes). Returns (rows, samples)."""
    if classifier is None and inception is None:
        raise ValueError("evaluate_models needs a feature network: a classifier, an Inception, or both")
    rows, samples = {}, {}
    device = reference.device
    for name, (sample, nfe) in models.items():
        started = time.perf_counter()
        images = sample(num_images, seed).clamp(-1, 1)  # as the images would be saved
        row = {"nfe": nfe, "sample_seconds": time.perf_counter() - started}
        if classifier is not None:
            row["classifier_fid"] = image_metrics.classifier_fid(reference, images, classifier)
        if inception is not None:
            row.update(image_metrics.fid_and_kid(reference, images, inception))
        row.update(image_metrics.sampling_speed(lambda n: sample(n, seed + 1), speed_images, batch_size, device,
                                                repeats=speed_repeats))
        rows[name], samples[name] = row, images
    return rows, samples


def write_json(path: str | Path, values: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, default=str))


def default_steps(meta: dict) -> int:
    """A student samples in its own steps; a teacher with EDM's 18 Heun steps (35 evaluations) unless told."""
    return len(meta["sigmas"]) if meta.get("role") == "student" else 18


def file_sampler(path: str | Path, num_steps: int | None, device) -> tuple[Callable[[int, int], Tensor], int, dict]:
    """(sample(n, seed), evaluations per image, metadata) for a model file: a student's one step, or a teacher's
    Heun sampler with ``num_steps`` (default :func:`default_steps`)."""
    _, meta = read_metadata(path)
    num_steps = default_steps(meta) if num_steps is None else num_steps
    if num_steps < 1:
        raise ValueError(f"--steps must be >= 1; got {num_steps}")
    if meta.get("role") == "student":
        sample, sigmas, _ = load_student(path, device)
        if num_steps != len(sigmas):
            raise ValueError(f"{path} is a {len(sigmas)}-step student; sample it with --steps {len(sigmas)} (or leave "
                             "--steps out)")
        return sample, len(sigmas), meta
    teacher = load_denoiser(path, device)
    return lambda n, seed: teacher_samples(teacher, n, num_steps, seed), sampler_evaluations(num_steps), meta


def sample_to_files(model: str | Path, out: str | Path, num: int, num_steps: int | None = None, seed: int = 0,
                    device: str = "auto", batch_size: int = 256) -> Path:
    """Sample ``num`` images, write a PNG grid to ``out`` and the images (uint8, native size) beside it as .pt."""
    from torchvision.utils import save_image
    out = Path(out)
    if out.is_dir():  # checked before sampling, which may take minutes
        raise IsADirectoryError(f"--out {out} is a folder; pass the PNG file to write, e.g. {out / 'samples.png'}")
    output_folder(out.parent)
    sample, _, meta = file_sampler(model, num_steps, resolve_device(device))
    images = torch.cat([sample(min(batch_size, num - i), seed + i) for i in range(0, num, batch_size)]).cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, str(out), nrow=max(1, int(num ** 0.5)))
    size = image_data.DATASETS[meta.get("dataset", "fmnist")].size
    torch.save(image_data.from_model_range(images, size), out.with_suffix(".pt"))
    return out


def evaluate_file(model: str | Path, classifier: str | Path, num: int, num_steps: int | None = None,
                  seed: int = 0, device: str = "auto", batch_size: int = 256, data_root: str | None = None,
                  inception: bool = False, reference: int | None = None) -> dict:
    """Classifier FID (and Inception FID/KID) of ``num`` samples of a model file against the first ``reference``
    test images (None: all of them), and its sampling speed."""
    device = resolve_device(device)
    if classifier is None and not inception:
        raise ValueError("nothing to measure with: give --classifier (Fashion-MNIST) or --inception")
    if inception:
        image_metrics.inception_path()  # a missing Inception file fails here, not after the model and data load
    sample, nfe, meta = file_sampler(model, num_steps, device)
    test = image_data.load_images(meta.get("dataset", "fmnist"), "test", data_root, limit=reference)
    reference = image_data.to_model_range(test.images, test.info.resolution).to(device)
    features = fitting_classifier(classifier, reference, meta.get("dataset")) if classifier is not None else None
    rows, _ = evaluate_models({"model": (sample, nfe)}, reference, features,
                              image_metrics.InceptionFeatures(device=device) if inception else None, num, seed,
                              speed_images=min(num, 4 * batch_size), batch_size=batch_size)
    return {"model": str(model), "role": meta.get("role"), "num_images": num, "reference_images": len(test),
            "seed": seed, "device": _device_name(device), **rows["model"]}


def train_feature_classifier(out: str | Path, data_root: str | None = None, steps: int = 3000, seed: int = 0,
                             device: str = "auto") -> Path:
    """Train and save the Fashion-MNIST feature classifier that classifier FID reads, with its test accuracy."""
    device = resolve_device(device)
    started = time.perf_counter()
    train = image_data.load_images("fmnist", "train", data_root)
    test = image_data.load_images("fmnist", "test", data_root)
    # The images stay on the CPU: the classifier's batches are drawn there (one seed on every device).
    to_model = lambda d: image_data.to_model_range(d.images, d.info.resolution)  # noqa: E731
    classifier = image_metrics.train_classifier(to_model(train), train.labels, steps=steps, seed=seed,
                                                device=device, progress=True)
    test_accuracy = image_metrics.accuracy(classifier, to_model(test), test.labels)
    meta = {"test_accuracy": f"{test_accuracy:.4f}", "steps": str(steps), "seed": str(seed),
            "train_seconds": f"{time.perf_counter() - started:.1f}", "device": _device_name(device)}
    image_metrics.save_classifier(classifier, out, meta)
    return Path(out)


def dm_gradient_pictures(x: Tensor, real: Callable, fake: Callable, sigma: float, seed: int = 0) -> dict[str, Tensor]:
    """What the DM loss sees for generator samples ``x`` at one noise level (DMD2 eq. 2): x_t = x + sigma eps, the
    teacher's and the critic's x0 at x_t, and the update direction real_x0 - fake_x0 that the DM loss moves x
    along."""
    noise, _ = fixed_noise(x.shape[0], tuple(x.shape[1:]), seed, x.device)
    sigmas = torch.full((x.shape[0],), float(sigma), device=x.device)
    with torch.no_grad():
        x_t = add_noise(x, sigmas, noise)
        real_x0, fake_x0 = real(x_t, sigmas), fake(x_t, sigmas)
    return {"x": x, "x_t": x_t, "real_x0": real_x0, "fake_x0": fake_x0, "update": real_x0 - fake_x0}
