"""Text-to-image models on disk and in memory: Stable Diffusion XL and 1.5 as diffusers/transformers parts.

DMD2 distils SDXL (a 4-step and a 1-step student) and SD1.5 (one step) (DMD2 Sec. 5.2). This module only moves
those models between disk and memory; the method itself is in :mod:`dmd2lab.t2i`:

- :func:`load_t2i_parts` — UNet, VAE, text encoder(s), tokenizer(s) and the noise scheduler from a diffusers
  pipeline folder (or a hub id resolved through the local hub cache), with one error that says which files are
  missing and how to get them;
- :func:`tiny_t2i_parts` — random parts of the same architectures, small enough for a CPU test, and
  :func:`save_t2i_parts` to write them as a pipeline folder, so tests go through the same loader as real weights;
- :func:`export_pipeline` / :func:`export_lora` — the student as a stock diffusers pipeline folder (the teacher's
  VAE and text encoders, the student's UNet, an LCMScheduler) or as LoRA weights for the teacher's pipeline, the
  two forms the released DMD2 SDXL models take.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

KINDS = ("sdxl", "sd15")
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}
#: Where the teachers DMD2 distils live on the hub (for the "how to get them" line of the errors).
HUB_IDS = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
PARTS = {"sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
         "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
#: The file stem of each model part's weights (diffusers models vs transformers models).
_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
            "text_encoder_2": "model"}


@dataclass
class T2IParts:
    """A text-to-image diffusion model as parts. ``text_encoders`` / ``tokenizers``: one (SD1.5) or two (SDXL:
    CLIP ViT-L and OpenCLIP ViT-bigG); ``scheduler``: the folder's own VP scheduler, which DMD2 only reads the noise
    table (alphas_cumprod, scaled-linear betas, 1000 steps) and the prediction type of; ``source``: where they were
    loaded from (None for built ones)."""

    kind: str
    unet: nn.Module
    vae: nn.Module
    text_encoders: tuple
    tokenizers: tuple
    scheduler: object
    source: str | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent (8 for SD's VAE: one per down block after the first)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the latents the UNet was trained at (SDXL: 4 x 128 x 128)."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels,) + size

    def to(self, device=None, dtype=None) -> "T2IParts":
        # Only the arguments given: diffusers warns about a dtype cast whenever ``dtype`` is passed, even as None.
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(**moves)
        return self


def _pipeline_class(kind: str):
    import diffusers
    _check_kind(kind)
    return getattr(diffusers, PIPELINES[kind])


def _check_kind(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown text-to-image kind {kind!r}; expected one of {', '.join(KINDS)}")


# ------------------------------------------------------------------------------------------------ loading
def missing_files(folder: str | Path, kind: str, variant: str | None = None) -> list[str]:
    """The files a diffusers pipeline folder of ``kind`` lacks (paths relative to it); [] when complete. Weights
    count in any form diffusers reads: safetensors or .bin, the ``variant`` (e.g. fp16) or not, sharded or whole."""
    _check_kind(kind)
    folder = Path(folder)
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    for part in PARTS[kind]:
        if part == "scheduler":
            found = [f"{part}/scheduler_config.json"]
        elif part.startswith("tokenizer"):
            # transformers writes tokenizer.json; the hub's SD repos hold the slow tokenizer's vocab + merges.
            fast, slow = folder / part / "tokenizer.json", [folder / part / n for n in ("vocab.json", "merges.txt")]
            if not (fast.is_file() or all(p.is_file() for p in slow)):
                missing.append(f"{part}/vocab.json + {part}/merges.txt (or {part}/tokenizer.json)")
            continue
        else:
            stem = _WEIGHTS[part]
            names = [f"{stem}{'.' + v if v else ''}{ext}" for v in dict.fromkeys([variant, None])
                     for ext in (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")]
            if not any((folder / part / n).is_file() for n in names):
                others = sorted(f.name for f in (folder / part).glob(f"{stem}.*.safetensors"))
                hint = f" (it has {others[0]}: pass variant={others[0].split('.')[1]!r})" if others else ""
                missing.append(f"{part}/{stem}{'.' + variant if variant else ''}.safetensors{hint}")
            found = [f"{part}/config.json"]
        missing += [f for f in found if not (folder / f).is_file()]
    return missing


def _how_to_get(kind: str, folder_hint: str) -> str:
    return (f"A {PIPELINES[kind]} folder holds {', '.join(p + '/' for p in PARTS[kind])} and model_index.json: "
            f"`huggingface-cli download {HUB_IDS[kind]} --local-dir {folder_hint}` on a machine with internet writes "
            "one (the fp16 weights alone: add --include '*.json' '*.txt' '*.fp16.safetensors', then load with "
            "variant='fp16'). Offline (HF_HUB_OFFLINE=1) only local folders and the local hub cache load.")


def _looks_like_path(name: str) -> bool:
    # A hub id is exactly "owner/name"; anything else that does not exist is a local folder the user meant.
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name


def resolve_folder(pretrained: str | Path, kind: str | None = None, variant: str | None = None) -> Path:
    """A local pipeline folder for ``pretrained``: the folder itself, or a hub id's snapshot in the local hub cache
    (downloaded when online; under HF_HUB_OFFLINE=1 a cache miss fails at once, with no network retries).
    FileNotFoundError says what to put where."""
    name = str(pretrained)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    hint_kind = kind or "sdxl"
    if _looks_like_path(name):
        raise FileNotFoundError(f"folder {path} does not exist. " + _how_to_get(hint_kind, str(path)))
    from huggingface_hub import snapshot_download
    subfolders = PARTS[kind] if kind else sorted(set(PARTS["sdxl"]) | set(PARTS["sd15"]))
    patterns = ["model_index.json"] + [f"{s}/*{ext}" for s in subfolders for ext in (".json", ".txt")]
    patterns += [f"{s}/*.{variant}.safetensors" if variant else f"{s}/*.safetensors" for s in subfolders]
    try:
        # snapshot_download honours HF_HUB_OFFLINE itself: offline it only looks in the cache, and fails at once.
        return Path(snapshot_download(name, allow_patterns=patterns,
                                      ignore_patterns=None if variant else ["*.fp16.*", "*.non_ema.*"]))
    except Exception as e:  # huggingface_hub raises many types (offline, unknown repo, gated, network)
        local = f"models/{name.split('/')[-1]}"
        raise FileNotFoundError(
            f"{name!r} is not a local folder, and as a hub id it could not be fetched ({type(e).__name__}: "
            f"{str(e)[:160]}). " + _how_to_get(hint_kind, local) + f" Then pass the folder ({local}).") from e


def folder_kind(folder: str | Path, kind: str | None = None) -> str:
    """The kind ('sdxl' / 'sd15') a pipeline folder holds, read from its model_index.json; checks ``kind`` if given."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        if kind is None:
            raise FileNotFoundError(f"folder {folder} lacks model_index.json, so it is no diffusers pipeline folder "
                                    "(pass kind='sdxl' / 'sd15' to list what else it lacks). "
                                    + _how_to_get("sdxl", str(folder)))
        _check_kind(kind)
        return kind
    pipeline = json.loads(index.read_text()).get("_class_name")
    found = {v: k for k, v in PIPELINES.items()}.get(pipeline)
    if found is None:
        raise ValueError(f"{index} describes a {pipeline}; DMD2's text-to-image teachers are "
                         f"{' or '.join(PIPELINES.values())}")
    if kind is not None and kind != found:
        raise ValueError(f"{folder} holds a {PIPELINES[found]} ({found!r}), not {kind!r}")
    return found


def require_complete(folder: Path, kind: str, variant: str | None = None):
    """Raise one FileNotFoundError listing every file a pipeline folder lacks and how to get them."""
    missing = missing_files(folder, kind, variant)
    if missing:
        raise FileNotFoundError(f"folder {folder} lacks {', '.join(missing)}. " + _how_to_get(kind, str(folder)))


def load_t2i_parts(pretrained: str | Path, kind: str | None = None, torch_dtype: torch.dtype | None = None,
                   variant: str | None = None, device=None) -> T2IParts:
    """SDXL or SD1.5 parts from a diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder[_2]/``,
    ``tokenizer[_2]/``, ``scheduler/``, ``model_index.json``) or a hub id in the local hub cache. ``kind`` None
    reads it from model_index.json. Every part is frozen (``requires_grad_(False)``) and in eval mode: DMD2 copies
    the UNet for the generator and the critic itself. A folder with parts missing raises one FileNotFoundError that
    lists all of them and says how to download them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = resolve_folder(pretrained, kind, variant)
    kind = folder_kind(folder, kind)
    require_complete(folder, kind, variant)
    scheduler_class = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("_class_name")
    try:
        weights = dict(torch_dtype=torch_dtype, variant=variant)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **weights)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **weights)
        encoder_classes = (CLIPTextModel, CLIPTextModelWithProjection) if kind == "sdxl" else (CLIPTextModel,)
        names = ("text_encoder", "text_encoder_2")[:len(encoder_classes)]
        encoders = tuple(c.from_pretrained(folder, subfolder=n, **weights) for c, n in zip(encoder_classes, names))
        tokenizers = tuple(CLIPTokenizer.from_pretrained(folder, subfolder=n.replace("text_encoder", "tokenizer"))
                           for n in names)
        scheduler_cls = getattr(diffusers, scheduler_class or "DDPMScheduler")
        scheduler = scheduler_cls.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, AttributeError) as e:
        raise FileNotFoundError(f"{folder} has every file a {PIPELINES[kind]} needs but they did not load "
                                f"({type(e).__name__}: {str(e)[:300]}); a download may be incomplete or torn. "
                                + _how_to_get(kind, str(folder))) from e
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"{folder}/scheduler holds a {scheduler_class}, which has no VP noise table (alphas_cumprod); "
                         "DMD2 distils SD's DDPM-trained UNet: put a DDPM/DDIM/Euler/PNDM scheduler config there")
    parts = T2IParts(kind, unet, vae, encoders, tokenizers, scheduler, str(pretrained))
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    return parts.to(device) if device is not None else parts


# ------------------------------------------------------------------------------------------ tiny models
#: Scaled-linear betas of SD1.5 and SDXL (1000 steps, eps prediction): DMD2's teachers' noise process.
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")
#: The VAE latent scaling of each kind (latents = scaling_factor * VAE mean).
VAE_SCALING = {"sdxl": 0.13025, "sd15": 0.18215}


def tiny_tokenizer():
    """A CLIP BPE tokenizer over a-z (and digits) with a handful of merges: CLIP's algorithm, a toy vocabulary.
    Every merge's parts and result are in the vocabulary (BPE rejects a merge of unknown pieces); other characters
    become the unknown token. ``model_max_length`` 77, CLIP's context length."""
    from transformers import CLIPTokenizer
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    merges = ["t h", "th e</w>", "a n", "an d</w>", "o f</w>", "i n", "c a", "ca t</w>", "o n</w>"]
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab += ["".join(m.split()) for m in merges if "".join(m.split()) not in vocab]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)


def _tiny_text_encoder(cls, tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return cls(config)


def tiny_t2i_parts(kind: str = "sdxl", seed: int = 0, latent_size: int = 16) -> T2IParts:
    """Random parts with SDXL's or SD1.5's architecture at toy width (~1M UNet parameters; one DMD2 step on a CPU
    core well under a second): what tests and the quick lab distil. The wiring is the real one: SDXL has two CLIP
    encoders whose penultimate states concatenate to the UNet's cross-attention width, and a "text_time" added
    embedding of width 6 x addition_time_embed_dim (the six size/crop numbers) + encoder 2's projection (the pooled
    text). The schedulers are those the hub folders ship (SDXL: Euler, SD1.5: PNDM) with SD's scaled-linear betas."""
    _check_kind(kind)
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        if kind == "sdxl":
            encoders = (_tiny_text_encoder(CLIPTextModel, tokenizer, 32, 32),
                        _tiny_text_encoder(CLIPTextModelWithProjection, tokenizer, 32, 32))
            time_dim = 8
            text = dict(cross_attention_dim=sum(e.config.hidden_size for e in encoders),
                        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                        projection_class_embeddings_input_dim=6 * time_dim + encoders[1].config.projection_dim)
            scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
        else:
            encoders = (_tiny_text_encoder(CLIPTextModel, tokenizer, 32, 32),)
            text = dict(cross_attention_dim=encoders[0].config.hidden_size)
            scheduler = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
        unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, norm_num_groups=16, **text)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=8, sample_size=2 * latent_size, scaling_factor=VAE_SCALING[kind])
    tokenizers = (tokenizer,) * len(encoders)
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    return T2IParts(kind, unet, vae, encoders, tokenizers, scheduler)


def pipeline_from_parts(parts: T2IParts, unet: nn.Module | None = None, scheduler=None):
    """A stock diffusers pipeline (StableDiffusionXLPipeline / StableDiffusionPipeline) of the parts, optionally with
    another UNet (the student) and scheduler."""
    cls = _pipeline_class(parts.kind)
    common = dict(vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0],
                  unet=parts.unet if unet is None else unet,
                  scheduler=parts.scheduler if scheduler is None else scheduler)
    if parts.kind == "sdxl":
        return cls(text_encoder_2=parts.text_encoders[1], tokenizer_2=parts.tokenizers[1], **common)
    return cls(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)


def save_t2i_parts(parts: T2IParts, folder: str | Path) -> Path:
    """Write parts as a diffusers pipeline folder (the layout :func:`load_t2i_parts` reads and the hub uses)."""
    folder = Path(folder)
    pipeline_from_parts(parts).save_pretrained(str(folder), safe_serialization=True)
    return folder


# ------------------------------------------------------------------------------------------------ export
def lcm_scheduler(scheduler, timesteps: tuple[int, ...]):
    """An LCMScheduler on the teacher's noise table, the sampler stock diffusers runs DMD2's released students with:
    at each step it takes the UNet's x0 prediction and re-noises it with fresh noise to the next timestep (DMD2 Sec.
    4.5's inference), its consistency-boundary skip term being ~0 away from t = 0. ``original_inference_steps`` =
    the student's step count makes its default K-step schedule T-1, T-1-T/K, ... = the training timesteps (999/749/
    499/249 for K = 4; with the default 50 it would be 999/759/499/259, and passing ``timesteps=`` would warn). A
    one-step SDXL student (t = 399) is the exception: its default schedule is [999], so it must be called with
    ``timesteps=[399]`` (its export's dmd2lab_sampling.json says so; diffusers warns, harmlessly)."""
    from diffusers import LCMScheduler
    # Only the settings LCMScheduler takes: the teacher's sampler-specific ones (Euler's sigma options) would be
    # saved with the export and warned about at every load.
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in scheduler.config.items() if k in accepted}
    return LCMScheduler.from_config(config, original_inference_steps=len(timesteps))


def is_lora(unet: nn.Module) -> bool:
    """Whether a UNet carries peft LoRA adapters (``unet.add_adapter``)."""
    return bool(getattr(unet, "peft_config", None))


def merged_unet(unet: nn.Module) -> nn.Module:
    """A plain UNet (deep copy) with any LoRA adapters folded into its weights, so it saves and loads as a stock
    UNet2DConditionModel; the UNet itself when it has none."""
    if not is_lora(unet):
        return unet
    merged = copy.deepcopy(unet)
    merged.fuse_lora()    # W <- W + (alpha / r) B A
    merged.unload_lora()  # drop the adapter modules, keeping the fused weights
    return merged


#: Written beside an exported student's parts: the timesteps it samples at (stock pipelines read no such thing).
SAMPLING_FILE = "dmd2lab_sampling.json"


def export_pipeline(student_unet: nn.Module, teacher: T2IParts | str | Path, out_dir: str | Path,
                    timesteps: tuple[int, ...] = (999, 749, 499, 249)) -> Path:
    """Write the student as a stock diffusers pipeline folder: the teacher's VAE, text encoders and tokenizers, the
    student's UNet (LoRA adapters merged) and an LCMScheduler (:func:`lcm_scheduler`) — the form of DMD2's released
    full-UNet models. ``timesteps``, the student's (1-step SDXL: (399,)), also go to ``dmd2lab_sampling.json`` beside
    the parts: sample with ``pipe(prompt, timesteps=[...], guidance_scale=0)`` (DMD2 students take no CFG: the
    teacher's guidance is distilled in)."""
    parts = teacher if isinstance(teacher, T2IParts) else load_t2i_parts(teacher)
    out_dir = Path(out_dir)
    unet = merged_unet(student_unet)
    pipe = pipeline_from_parts(parts, unet=unet, scheduler=lcm_scheduler(parts.scheduler, timesteps))
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / SAMPLING_FILE).write_text(json.dumps(
        {"timesteps": list(timesteps), "guidance_scale": 0.0, "scheduler": "LCMScheduler",
         "teacher": parts.source}, indent=2))
    return out_dir


def saved_timesteps(folder: str | Path | None) -> tuple[int, ...] | None:
    """The timesteps an exported student samples at (its ``dmd2lab_sampling.json``), None for any other folder."""
    path = Path(folder) / SAMPLING_FILE if folder is not None else None
    return tuple(json.loads(path.read_text())["timesteps"]) if path is not None and path.is_file() else None


def export_lora(student_unet: nn.Module, out_dir: str | Path, kind: str) -> Path:
    """Write a LoRA-trained student's adapters as ``pytorch_lora_weights.safetensors``, for the teacher's own
    pipeline: ``pipe.load_lora_weights(out_dir)`` (then ``pipe.fuse_lora()`` and an LCMScheduler) — the form of
    DMD2's released SDXL LoRA. The adapter config (rank, alpha) is stored with it: without it diffusers loads the
    weights with alpha = rank, scaling the update by r / alpha (8x at DMD2's rank 64, alpha 8). Only the student
    has a LoRA worth shipping; a LoRA critic is a training device."""
    if not is_lora(student_unet):
        raise ValueError("this UNet has no LoRA adapters (it was trained in full, generator_lora=False): export it "
                         "with export_pipeline; a LoRA export needs a LoRA-trained student")
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    if len(student_unet.peft_config) != 1:
        raise ValueError(f"the UNet has several adapters {sorted(student_unet.peft_config)}; export one at a time")
    (name, config), = student_unet.peft_config.items()
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(student_unet, adapter_name=name))
    _pipeline_class(kind).save_lora_weights(str(out_dir), unet_lora_layers=layers,
                                            unet_lora_adapter_metadata=config.to_dict())
    return Path(out_dir)
