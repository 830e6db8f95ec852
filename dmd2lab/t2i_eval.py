"""Evaluation of a text-to-image student the way DMD2 evaluates its SDXL and SD1.5 students (DMD2 Sec. 5.2).

DMD2 samples one image per caption of a COCO-2014 prompt set (10K captions for SDXL, 30K for SD1.5) and reports:

- FID against real COCO-2014 images (:func:`fid`): every image center-cropped to a square and resized to the
  evaluation resolution (512 for SDXL, 256 for SD1.5: ``--eval_res`` in DMD2's ``experiments/*/README.md``), then
  to the Inception's 299 x 299;
- patch FID (:func:`patch_fid`): FID on the 299 x 299 center crop of each image at its full resolution, with no
  resizing — the metric SDXL-Lightning (Lin et al. 2024) introduced to see the high-resolution detail a 1024² image
  loses when shrunk to 299² (DMD2's ``main/coco_eval/coco_evaluator.py``, ``compute_fid(..., patch_fid=True)``);
- CLIP score (:func:`clip_score`): the text-image alignment that FID ignores.

Sampling (:func:`generate_images`) goes through the stock diffusers pipeline a user would run: a student folder
(:func:`dmd2lab.t2i_models.export_pipeline`) with its LCMScheduler at the student's timesteps and guidance 0, a
teacher folder with its own scheduler, N steps and classifier-free guidance w, so the teacher baseline is sampled,
timed and scored the same way. All of it is offline: the Inception is the file :mod:`dmd2lab.image_metrics` finds
on disk, CLIP a local folder (:func:`load_clip`).

Images are uint8 tensors, 3 x H x W each (a stacked N x 3 x H x W tensor, a list, or a lazy :class:`ImageFolder`
of PNG/JPEG files), everywhere in this module: real COCO images come in many sizes, so nothing here needs a stack.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import t2i_models as tm
from .image_metrics import INCEPTION_SIZE, InceptionFeatures, fid_and_kid, sampling_speed

#: The 4-step SDXL student's timesteps (DMD2 Sec. 4.5); a student folder's ``dmd2lab_sampling.json`` overrides them.
STUDENT_TIMESTEPS = (999, 749, 499, 249)
#: Teacher baseline defaults: diffusers' 50 steps and the guidance each teacher is distilled with (DMD2 Sec. 5.2).
TEACHER_STEPS = 50
TEACHER_GUIDANCE = {"sdxl": 8.0, "sd15": 1.75}
#: The resolution DMD2 resizes whole images to before the Inception (its ``--eval_res``: SDXL 512, SD1.5 256).
EVAL_RES = {"sdxl": 512, "sd15": 256}
#: The CLIP model torchmetrics' CLIPScore defaults to; DMD2 reports OpenCLIP ViT-g/14 (laion2b_s12b_b42k), whose
#: transformers form is the hub repo laion/CLIP-ViT-g-14-laion2B-s12B-b42K.
CLIP_HUB_ID = "openai/clip-vit-large-patch14"
#: The prefix DMD2's CLIP score puts before each caption (after Hessel et al. 2021, "CLIPScore").
DMD2_CLIP_PREFIX = "A photo depicts "
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------------ prompts
def _clean(caption: str) -> str:
    # COCO captions carry stray newlines and double spaces; one line each keeps prompts.txt round-trippable.
    return " ".join(caption.split())


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Captions from a prompt file: plain text, one caption per line (blank lines skipped), or a COCO captions
    JSON (``captions_val2014.json``: ``{"annotations": [{"caption": ...}, ...]}``, in file order), or a JSON list of
    strings. Whitespace is collapsed to single spaces. ``limit``: the first ``limit`` captions (DMD2 evaluates SDXL
    on 10K COCO-2014 captions, SD1.5 on 30K). FileNotFoundError / ValueError for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist: pass a text file with one caption per line, or "
                                "COCO's annotations/captions_val2014.json (DMD2 evaluates on COCO-2014 captions)")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); a .json prompt file must be COCO captions "
                             '({"annotations": [{"caption": ...}]}) or a list of strings') from e
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            captions = [a.get("caption") if isinstance(a, dict) else None for a in data["annotations"]]
        elif isinstance(data, list):
            captions = data
        else:
            raise ValueError(f"{path} holds no captions: expected COCO captions JSON "
                             '({"annotations": [{"caption": ...}]}) or a JSON list of strings')
        bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
        if bad:
            raise ValueError(f"{path}: entry {bad[0]} has no caption string ({len(bad)} such entries)")
    else:
        captions = text.splitlines()
    prompts = [c for c in map(_clean, captions) if c]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no captions (it is empty or blank)")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    return prompts


# ------------------------------------------------------------------------------------------------- images
def _as_uint8_chw(image, name: str = "image") -> Tensor:
    """A 3 x H x W uint8 tensor from a uint8 tensor (1 or 3 channels; grey repeats to RGB) or a PIL image."""
    if not isinstance(image, Tensor):
        import numpy as np
        image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"{name} must be uint8 C x H x W with C = 1 or 3 (pixels 0..255); got {image.dtype} "
                         f"{tuple(image.shape)}")
    return image.expand(3, -1, -1)


def _pil(image: Tensor):
    from PIL import Image
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


class ImageFolder(Sequence):
    """The image files of a folder (PNG, JPEG, ...; sorted by name), read lazily as 3 x H x W uint8 RGB tensors, so
    10K COCO images or 1024² samples need not sit in memory at once (10K SDXL images are 31 GB as uint8)."""

    def __init__(self, folder: str | Path, limit: int | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder {self.folder} does not exist (for FID: the real COCO-2014 images, "
                                    "e.g. the val2014/ folder of COCO's val2014.zip, or generate_images' out_dir)")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not self.files:
            raise ValueError(f"image folder {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        from PIL import Image
        with Image.open(self.files[index]) as image:
            return _as_uint8_chw(image)


def write_images(images, out_dir: str | Path, prompts: Sequence[str] | None = None, start: int = 0) -> list[Path]:
    """PNG files ``{index:05d}.png`` (lossless, as FID needs) in ``out_dir``, numbered from ``start``; with
    ``prompts``, also ``prompts.txt``, one caption per image in the same order (:func:`read_prompts` reads it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"{start + i:05d}.png"
        _pil(_as_uint8_chw(image)).save(path)
        paths.append(path)
    if prompts is not None:
        (out_dir / "prompts.txt").write_text("".join(_clean(p) + "\n" for p in prompts), encoding="utf-8")
    return paths


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] (a diffusers pipeline's ``output_type="pt"``) -> uint8, rounded to the nearest level
    (as diffusers' ``numpy_to_pil`` and image files do; DMD2's script truncates, a bias of half a level)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------- generation
def load_pipeline(folder: str | Path, device=None, torch_dtype: torch.dtype | None = None,
                  variant: str | None = None):
    """The stock diffusers pipeline of an SDXL or SD1.5 folder (the kind read from its model_index.json; a student
    export or a teacher download), progress bar off. Missing parts raise one FileNotFoundError naming them all and
    saying how to get them (:func:`dmd2lab.t2i_models.missing_files`)."""
    from diffusers import DiffusionPipeline
    folder = tm.resolve_folder(folder)
    kind = tm.folder_kind(folder)
    missing = tm.missing_files(folder, kind, variant)
    if missing:
        raise FileNotFoundError(f"folder {folder} lacks {', '.join(missing)}. " + tm._how_to_get(kind, str(folder)))
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch_dtype, variant=variant)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def _kind_of(pipe) -> str:
    found = {v: k for k, v in tm.PIPELINES.items()}.get(type(pipe).__name__)
    if found is None:
        raise TypeError(f"expected a {' or '.join(tm.PIPELINES.values())}, got {type(pipe).__name__}")
    return found


def is_student(pipe, folder: str | Path | None = None) -> bool:
    """Whether a pipeline is a distilled student: its folder has ``dmd2lab_sampling.json``
    (:func:`~dmd2lab.t2i_models.export_pipeline`) or it samples with an LCMScheduler (DMD2's released models)."""
    from diffusers import LCMScheduler
    return tm.saved_timesteps(folder) is not None or isinstance(pipe.scheduler, LCMScheduler)


def sampling_arguments(pipe, folder: str | Path | None = None, timesteps: Sequence[int] | None = None,
                       num_inference_steps: int | None = None, guidance_scale: float | None = None) -> dict:
    """The sampler keywords of a pipeline call. A student: ``timesteps`` (default: its folder's
    ``dmd2lab_sampling.json``, else 999/749/499/249; ``folder`` None: the folder the pipeline was loaded from) and
    guidance 0, as DMD2 students take no CFG (the teacher's guidance is distilled in). A teacher: its own scheduler
    with ``num_inference_steps`` (default 50) and ``guidance_scale`` (default: the guidance it is distilled with, 8
    for SDXL and 1.75 for SD1.5; DMD2's evaluation script samples the SDXL teacher at 6 unless told otherwise)."""
    if folder is None:
        # from_pretrained records its folder: a loaded 1-step export still samples at its own timestep (399).
        loaded_from = Path(str(getattr(pipe.config, "_name_or_path", "") or ""))
        folder = loaded_from if str(loaded_from) and loaded_from.is_dir() else None
    if is_student(pipe, folder):
        if num_inference_steps is not None:
            raise ValueError("a student samples at its timesteps: pass timesteps=, not num_inference_steps=")
        if timesteps is None:
            timesteps = tm.saved_timesteps(folder) or STUDENT_TIMESTEPS
        return {"timesteps": [int(t) for t in timesteps],
                "guidance_scale": 0.0 if guidance_scale is None else float(guidance_scale)}
    if timesteps is not None:
        raise ValueError(f"{type(pipe.scheduler).__name__} is a teacher's scheduler: pass num_inference_steps= "
                         "(timesteps= is for a student's LCMScheduler)")
    kind = _kind_of(pipe)
    return {"num_inference_steps": TEACHER_STEPS if num_inference_steps is None else int(num_inference_steps),
            "guidance_scale": TEACHER_GUIDANCE[kind] if guidance_scale is None else float(guidance_scale)}


@dataclass
class Generated:
    """What :func:`generate_images` returns: ``images`` uint8 N x 3 x H x W (on the CPU), ``prompts`` in the same
    order, ``speed`` (:func:`~dmd2lab.image_metrics.sampling_speed`'s dict: images_per_s, ms_per_image, ...),
    ``arguments`` the sampler keywords used, ``paths`` the PNG files written (empty without ``out_dir``)."""

    images: Tensor
    prompts: list[str]
    speed: dict
    arguments: dict
    paths: list[Path] = field(default_factory=list)


def generate_images(pipeline, prompts: Sequence[str], timesteps: Sequence[int] | None = None, *,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                    batch_size: int = 4, height: int | None = None, width: int | None = None,
                    out_dir: str | Path | None = None, device=None, torch_dtype: torch.dtype | None = None,
                    warmup_batches: int = 1) -> Generated:
    """One image per prompt through the stock diffusers pipeline of ``pipeline`` (a folder, or a pipeline already
    loaded), sampled as :func:`sampling_arguments` says (a student: LCMScheduler at its timesteps, guidance 0; a
    teacher: its own scheduler, N steps, guidance w).

    Image i's noise (the initial latents and every fresh draw of the sampler) comes from its own generator seeded
    ``seed + i``, so an image depends on its prompt and index only, not on ``batch_size`` (diffusers takes one
    generator per image). ``height`` / ``width`` default to the UNet's native size (SDXL 1024 x 1024).

    Timed with :func:`~dmd2lab.image_metrics.sampling_speed`: ``warmup_batches`` batches run first untimed (their
    images are thrown away: the timed pass redoes them), CUDA is synchronised around the clock; the speed covers the
    whole text-to-pixels pipeline (text encoders, UNet steps, VAE decoder), what a user waits for. PNG files are
    written to ``out_dir`` (:func:`write_images`) after the clock stops."""
    folder = None
    if isinstance(pipeline, (str, Path)):
        folder = tm.resolve_folder(pipeline)
        pipeline = load_pipeline(folder, device=device, torch_dtype=torch_dtype)
    elif device is not None:
        pipeline = pipeline.to(device)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arguments = sampling_arguments(pipeline, folder, timesteps, num_inference_steps, guidance_scale)
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    done: list[Tensor] = []
    calls = 0

    def sample(n: int) -> Tensor:
        nonlocal calls
        warm, calls = calls < warmup_batches, calls + 1
        start = 0 if warm else sum(len(b) for b in done)
        indices = range(start, min(start + n, len(prompts)))
        # CPU generators: the same noise on every device (diffusers moves it where the latents live).
        generators = [torch.Generator().manual_seed(seed + i) for i in indices]
        out = pipeline([prompts[i] for i in indices], generator=generators, output_type="pt", **size,
                       **arguments).images
        images = to_uint8(out).cpu()
        if not warm:
            done.append(images)
        return images

    speed = sampling_speed(sample, len(prompts), batch_size, pipeline.device, warmup_batches)
    images = torch.cat(done)
    paths = write_images(images, out_dir, prompts) if out_dir is not None else []
    return Generated(images, prompts, speed, arguments, paths)


# -------------------------------------------------------------------------------------------------- FID
def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the size x size center crop of a height x width image: torchvision's ``center_crop`` rule,
    round((H - size) / 2), which DMD2's evaluator uses (a 1024² image: rows and columns 362..660)."""
    if size > min(height, width):
        raise ValueError(f"a {size} x {size} crop does not fit a {height} x {width} image")
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def center_crop(image: Tensor, size: int) -> Tensor:
    """The size x size center crop of a C x H x W image (:func:`center_crop_box`)."""
    top, left = center_crop_box(image.shape[-2], image.shape[-1], size)
    return image[..., top:top + size, left:left + size]


def _resize(image: Tensor, size: int, resample) -> Tensor:
    if image.shape[-2:] == (size, size):
        return image
    import numpy as np
    return torch.from_numpy(np.array(_pil(image).resize((size, size), resample))).permute(2, 0, 1)


def fid_view(image, eval_res: int | None = 512) -> Tensor:
    """What whole-image FID sees of one image (3 x 299 x 299 uint8), DMD2's evaluator (after GigaGAN's): the largest
    center square, resized with Lanczos to ``eval_res`` (DMD2: 512 for SDXL, 256 for SD1.5; None skips it), then
    with PIL's antialiased bicubic to the Inception's 299 (clean-fid's resize; a plain bilinear tensor resize would
    alias when shrinking 1024 -> 299). Real and generated images take the same path."""
    from PIL import Image
    image = _as_uint8_chw(image)
    image = center_crop(image, min(image.shape[-2:]))
    if eval_res is not None:
        image = _resize(image, eval_res, Image.LANCZOS)
    return _resize(image, INCEPTION_SIZE, Image.BICUBIC)


def patch_view(image, size: int = INCEPTION_SIZE) -> tuple[Tensor, bool]:
    """What patch FID sees of one image: its 299 x 299 center crop at full resolution, no resizing (SDXL-Lightning's
    "FID-Patch", Lin et al. 2024, as DMD2's evaluator computes it). An image smaller than the patch on a side is
    not cropped but resized whole, as DMD2's evaluator does; the flag says so (the caller warns)."""
    from PIL import Image
    image = _as_uint8_chw(image)
    if min(image.shape[-2:]) < size:
        return _resize(image, INCEPTION_SIZE, Image.BICUBIC), True
    return _resize(center_crop(image, size), INCEPTION_SIZE, Image.BICUBIC), False


class Uint8Inception(nn.Module):
    """The FID Inception (:class:`~dmd2lab.image_metrics.InceptionFeatures`) on uint8 images: converted to its
    [-1, 1] range batch by batch, so a set of 10K 299² views stays 2.7 GB of uint8 instead of 11 GB of float32. The
    conversion is lossless (the Inception re-quantises to the same 8-bit levels)."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception
        self.num_features = getattr(inception, "num_features", InceptionFeatures.num_features)

    def forward(self, images: Tensor) -> Tensor:
        return self.inception(images.float() / 127.5 - 1)


def _stack(views) -> Tensor:
    views = list(views)
    if len(views) < 2:
        raise ValueError(f"FID needs at least 2 images per set (a covariance), got {len(views)}")
    return torch.stack(views)


def _fid(real: Tensor, fake: Tensor, inception: nn.Module | None, batch_size: int) -> dict[str, float]:
    inception = InceptionFeatures() if inception is None else inception
    return fid_and_kid(real, fake, Uint8Inception(inception), batch_size=batch_size)


def fid(real_images, fake_images, inception: nn.Module | None = None, eval_res: int | None = 512,
        batch_size: int = 64) -> dict[str, float]:
    """FID (and KID, free from the same features) between real and generated images, each seen through
    :func:`fid_view` (square center crop, ``eval_res``, 299), on the standard offline FID Inception
    (:func:`~dmd2lab.image_metrics.fid_and_kid`; ``inception`` None loads it: FileNotFoundError says how to get
    it). DMD2 Sec. 5.2: 10K COCO-2014 captions vs. COCO-2014 images at eval_res 512 for SDXL; 30K at 256 for SD1.5.
    Returns ``fid``, ``kid_mean``, ``kid_std``. FID is biased upward at small N: compare numbers at equal N only."""
    real = _stack(fid_view(x, eval_res) for x in real_images)
    fake = _stack(fid_view(x, eval_res) for x in fake_images)
    return _fid(real, fake, inception, batch_size)


def patch_fid(real_images, fake_images, inception: nn.Module | None = None, size: int = INCEPTION_SIZE,
              batch_size: int = 64) -> dict[str, float]:
    """Patch FID (DMD2 Sec. 5.2, after SDXL-Lightning): :func:`fid` on the ``size`` x ``size`` (299) center crop of
    every image at full resolution (:func:`patch_view`), so the Inception sees 1024² detail unshrunk. Real COCO
    images (~640 x 480) are cropped the same way, unresized."""
    small = 0
    views = {}
    for name, images in (("real", real_images), ("fake", fake_images)):
        out = []
        for image in images:
            view, resized = patch_view(image, size)
            out.append(view)
            small += resized
        views[name] = _stack(out)
    if small:
        warnings.warn(f"patch FID: {small} image(s) smaller than {size} x {size} were resized whole instead of "
                      "cropped (as DMD2's evaluator does); their patches show no full-resolution detail")
    return _fid(views["real"], views["fake"], inception, batch_size)


# ----------------------------------------------------------------------------------------------- CLIP score
def _clip_how_to_get(folder: str) -> str:
    return (f"Put a transformers CLIP model there (config.json, model.safetensors, the tokenizer and "
            f"preprocessor_config.json): `huggingface-cli download {CLIP_HUB_ID} --local-dir {folder}` on a machine "
            "with internet (torchmetrics' default CLIP; DMD2 reports OpenCLIP ViT-g/14: "
            "laion/CLIP-ViT-g-14-laion2B-s12B-b42K). Only local folders load: nothing is downloaded here.")


def clip_missing_files(folder: str | Path) -> list[str]:
    """The files a transformers CLIP folder lacks for :func:`load_clip`; [] when complete."""
    folder = Path(folder)
    wanted = {
        "config.json": ["config.json"],
        "model.safetensors": ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                              "pytorch_model.bin.index.json"],
        "tokenizer.json (or vocab.json + merges.txt)": ["tokenizer.json", ("vocab.json", "merges.txt")],
        "preprocessor_config.json": ["preprocessor_config.json", "processor_config.json"],
    }

    def present(option) -> bool:  # one file, or a tuple of files that must all be there
        return all((folder / n).is_file() for n in (option if isinstance(option, tuple) else (option,)))
    return [label for label, options in wanted.items() if not any(present(o) for o in options)]


def load_clip(folder: str | Path, device=None, torch_dtype: torch.dtype | None = None):
    """(CLIPModel, CLIPProcessor) from a local transformers CLIP folder, in eval mode. Never touches the network
    (fails at once offline): a missing folder or files raise FileNotFoundError naming the folder and what to put
    there."""
    from transformers import CLIPModel, CLIPProcessor
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP folder {path} does not exist. " + _clip_how_to_get(str(path)))
    missing = clip_missing_files(path)
    if missing:
        raise FileNotFoundError(f"CLIP folder {path} lacks {', '.join(missing)}. " + _clip_how_to_get(str(path)))
    try:
        # ``dtype`` (transformers >= 4.56; ``torch_dtype`` is deprecated in 5) only when asked: float32 otherwise.
        weights = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = CLIPModel.from_pretrained(str(path), local_files_only=True, **weights)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"CLIP folder {path} has the files but they did not load ({type(e).__name__}: "
                                f"{str(e)[:300]}). " + _clip_how_to_get(str(path))) from e
    model.eval().requires_grad_(False)
    return (model.to(device) if device is not None else model), processor


def _embedding(output) -> Tensor:
    # transformers 4 returns the projected embedding; 5 a BaseModelOutputWithPooling holding it as pooler_output.
    return output if isinstance(output, Tensor) else output.pooler_output


@torch.inference_mode()
def clip_similarities(images, prompts: Sequence[str], clip, batch_size: int = 32, prefix: str = "") -> Tensor:
    """Cosine similarity (float64, one per image) between CLIP's image embedding of image i and its text embedding
    of ``prefix + prompts[i]``. ``clip``: a folder (:func:`load_clip`) or a (CLIPModel, CLIPProcessor) pair. Images
    go through the processor (shortest side resized, center crop, CLIP's normalisation); captions are truncated to
    CLIP's context (77 tokens)."""
    model, processor = load_clip(clip) if isinstance(clip, (str, Path)) else clip
    prompts = list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"clip score pairs images with prompts: got {len(images)} images and {len(prompts)} prompts")
    if not prompts:
        raise ValueError("clip score needs at least one image")
    device = next(model.parameters()).device
    max_length = model.config.text_config.max_position_embeddings
    scores = []
    for first in range(0, len(prompts), batch_size):
        chunk = range(first, min(first + batch_size, len(prompts)))
        pixels = processor(images=[_as_uint8_chw(images[i]) for i in chunk], return_tensors="pt",
                           input_data_format="channels_first")["pixel_values"]
        text = processor(text=[prefix + prompts[i] for i in chunk], return_tensors="pt", padding=True,
                         truncation=True, max_length=max_length)
        image_embeds = _embedding(model.get_image_features(pixel_values=pixels.to(device, model.dtype)))
        text_embeds = _embedding(model.get_text_features(input_ids=text["input_ids"].to(device),
                                                         attention_mask=text["attention_mask"].to(device)))
        scores.append(F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1).cpu())
    return torch.cat(scores)


def clip_score(images, prompts: Sequence[str], clip, batch_size: int = 32, prefix: str = "") -> float:
    """CLIP score as torchmetrics' CLIPScore defines it: max(100 x mean cosine similarity, 0) over the (image,
    prompt) pairs (:func:`clip_similarities`), the clip at 0 applied to the mean. Computed here rather than through
    torchmetrics because torchmetrics 1.9 loads CLIP by hub id only (online) and expects ``get_image_features`` to
    return a tensor, which transformers 5 no longer does.

    DMD2's table reports the mean cosine itself (0.3x, not 3x.x) with OpenCLIP ViT-g/14 and each caption prefixed
    with "A photo depicts " (:data:`DMD2_CLIP_PREFIX`): ``clip_similarities(..., prefix=DMD2_CLIP_PREFIX).mean()``
    with that model reproduces its protocol (up to its resize to 256 before CLIP's own preprocessing)."""
    mean = clip_similarities(images, prompts, clip, batch_size, prefix).mean().item()
    return max(100.0 * mean, 0.0)
