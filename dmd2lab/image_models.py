"""Image denoisers on diffusers UNets, in the library's one convention ``D(x_sigma, sigma) -> x0`` (VE frame).

Three ways to get a teacher, each wrapped so that DMD2's losses never see the difference:

- :class:`EDMDenoiser` — a diffusers ``UNet2DModel`` with EDM preconditioning (Karras et al. 2022, Table 1),
  trained by our own ``dmd2lab train-teacher`` (EDM's loss, :func:`edm_sigmas`);
- :class:`VPDenoiser` — a pretrained diffusers VP model (e.g. a DDPM CIFAR-10 UNet) with its own scheduler:
  eps / v / x0 outputs are turned into x0 at the VP timestep whose noise level matches sigma;
- :func:`load_edm_pickle` — NVIDIA's EDM checkpoints (ImageNet-64) for users who have them and EDM's code
  locally; their networks already return x0 from (x, sigma), so only the class labels and features are adapted.

Every wrapper has ``features(x, sigma, ...)``: the bottleneck the GAN head reads (DMD2 Sec. 4.3): the UNet's
mid-block output (EDM's networks: the encoder's last block). The forward pass is cut right after it, so the head
costs an encoder, not a whole UNet.

The one-step generator (:class:`OneStepGenerator`) is a copy of the teacher evaluated at the largest noise level
on pure noise, as in DMD2: G(z) = D(sigma_max z, sigma_max).
"""
from __future__ import annotations

import copy
import json
import pickle
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .diffusion import append_dims, per_sample_sigma, x0_from_vp_prediction

#: Small conv-only UNets sized for each dataset (attention-free blocks are many times cheaper on a CPU; the paper's
#: ImageNet-64 network is EDM's ADM at ~296M parameters, which these presets do not pretend to be).
UNET_PRESETS: dict[str, dict] = {
    # 0.62M parameters, 180 MFLOP per image: one evaluation of 256 images takes ~1 s on one CPU core.
    "fmnist": dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(16, 32, 64),
                   down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                   layers_per_block=1, norm_num_groups=4, add_attention=False),
    "cifar10": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                    layers_per_block=2, norm_num_groups=32, attention_head_dim=64),
    "imagenet64": dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 768),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=2, norm_num_groups=32, attention_head_dim=64),
}


def edm_sigmas(n: int, generator: torch.Generator, p_mean: float = -1.2, p_std: float = 1.2,
               device=None) -> Tensor:
    """Training noise levels of an EDM teacher: ln sigma ~ N(P_mean, P_std^2) (EDM Table 1, "training")."""
    gen_device = getattr(generator, "device", None)
    normal = torch.randn(n, generator=generator, device=gen_device, dtype=torch.float64)
    return (normal * p_std + p_mean).exp().to(device if device is not None else gen_device)


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the bottleneck is computed."""


@contextmanager
def _stop_after(module: nn.Module, store: list):
    def hook(_module, _inputs, output):
        store.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def bottleneck(run: Callable[[], object], module: nn.Module) -> Tensor:
    """The output of ``module`` during ``run()``, with the rest of the forward pass skipped (the hook stops it):
    the GAN head needs only the encoder and middle of a UNet. Gradients flow as through any forward pass."""
    store: list[Tensor] = []
    with _stop_after(module, store):
        try:
            run()
        except _Stop:
            pass
    if not store:
        raise RuntimeError(f"{type(module).__name__} never ran in the forward pass, so it has no features to read")
    return store[0]


class EDMDenoiser(nn.Module):
    """A diffusers ``UNet2DModel`` F with EDM preconditioning (Karras et al. 2022, eq. 7 and Table 1):

        D(x, sigma) = c_skip x + c_out F(c_in x, c_noise),
        c_skip = s_d^2 / (sigma^2 + s_d^2),  c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
        c_in = 1 / sqrt(sigma^2 + s_d^2),    c_noise = ln(sigma) / 4,

    so F sees unit-variance inputs and targets at every noise level. ``class_labels`` (N,) int64 for a
    class-conditional UNet (``num_class_embeds`` in its config). The preconditioning runs in float32 whatever the
    autocast: bf16 would round sigma ~ 80 and x / sigma visibly."""

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.unet, self.sigma_data = unet, float(sigma_data)

    @classmethod
    def from_config(cls, unet_config: dict, sigma_data: float = 0.5) -> "EDMDenoiser":
        from diffusers import UNet2DModel
        return cls(UNet2DModel(**unet_config), sigma_data)

    @property
    def num_classes(self) -> int | None:
        return self.unet.config.num_class_embeds

    def _coefficients(self, x: Tensor, sigma) -> tuple[Tensor, ...]:
        sigma = per_sample_sigma(sigma, x, dtype=torch.float32, positive=True)
        s2, d2 = sigma ** 2, self.sigma_data ** 2
        c_skip, c_out = d2 / (s2 + d2), sigma * self.sigma_data / (s2 + d2).sqrt()
        c_in = 1 / (s2 + d2).sqrt()
        return tuple(append_dims(c, x.ndim) for c in (c_skip, c_out, c_in)) + (sigma.log() / 4,)

    def _check_inputs(self, x: Tensor, class_labels: Tensor | None):
        # Checked here because the UNet's own errors (a conv's weight shape, a skip connection's size) name neither
        # the input nor what it should be.
        channels, size = self.unet.config.in_channels, 2 ** (len(self.unet.config.block_out_channels) - 1)
        if x.ndim != 4 or x.shape[1] != channels or x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(f"x must be a batch of {channels}-channel images (N, {channels}, H, W), H and W multiples "
                             f"of {size}, for this denoiser; got shape {tuple(x.shape)}. Images of the denoiser's own "
                             f"dataset fit: image_shape(denoiser) = {image_shape(self)}")
        if self.num_classes and class_labels is None:
            raise ValueError(f"this denoiser is class-conditional ({self.num_classes} classes): pass class_labels")
        if not self.num_classes and class_labels is not None:
            raise ValueError("this denoiser is unconditional; it takes no class_labels")
        if class_labels is not None and class_labels.shape != (x.shape[0],):
            raise ValueError(f"class_labels must have shape ({x.shape[0]},); got {tuple(class_labels.shape)}")

    def forward(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        self._check_inputs(x, class_labels)
        c_skip, c_out, c_in, c_noise = self._coefficients(x, sigma)
        x32 = x.float()
        out = self.unet(c_in * x32, c_noise, class_labels=class_labels).sample
        return (c_skip * x32 + c_out * out.float()).to(x.dtype)

    def features(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        """The mid-block output of F at (c_in x, c_noise): DMD2's GAN-head input (Sec. 4.3)."""
        self._check_inputs(x, class_labels)
        _, _, c_in, c_noise = self._coefficients(x, sigma)
        return bottleneck(lambda: self.unet(c_in * x.float(), c_noise, class_labels=class_labels),
                          self.unet.mid_block)

    def config(self) -> dict:
        return {"kind": "edm", "unet": dict(self.unet.config), "sigma_data": self.sigma_data}


class VPDenoiser(nn.Module):
    """A pretrained diffusers VP model (DDPM-style UNet + its scheduler) as an x0 denoiser in the VE frame.

    x_ve = x0 + sigma eps is the VP input sqrt(a_t) x_ve at the timestep whose sigma_t = sqrt((1 - a_t)/a_t)
    equals sigma (EDM Table 1); t is interpolated linearly in log sigma between the table's entries (the UNet takes
    a float timestep), then the model's ``prediction_type`` output (eps / v / x0) is turned into x0. Models with a
    learned variance (twice the output channels) have it dropped."""

    def __init__(self, unet: nn.Module, scheduler, source: str | None = None):
        super().__init__()
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod; a VP scheduler (DDPM/DDIM) is needed")
        self.unet, self.source = unet, source
        self.prediction_type = scheduler.config.prediction_type
        a = scheduler.alphas_cumprod.double()
        self.register_buffer("log_sigmas", ((1 - a) / a).sqrt().log(), persistent=False)

    @property
    def num_classes(self) -> int | None:
        return self.unet.config.num_class_embeds

    def timestep(self, sigma: Tensor) -> Tensor:
        """The fractional timestep whose noise level is sigma (clamped to the table's range)."""
        log_sigma = sigma.double().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        upper = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[upper - 1], self.log_sigmas[upper]
        return (upper - 1).double() + (log_sigma - lo) / (hi - lo)

    def _vp_input(self, x: Tensor, sigma) -> tuple[Tensor, Tensor, Tensor]:
        sigma = per_sample_sigma(sigma, x, dtype=torch.float64, positive=True)
        alpha = 1 / (1 + sigma ** 2)
        return (x.double() * append_dims(alpha.sqrt(), x.ndim)).to(x.dtype), self.timestep(sigma), alpha

    def forward(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        x_vp, t, alpha = self._vp_input(x, sigma)
        out = self.unet(x_vp, _timestep_dtype(t, x), class_labels=class_labels).sample
        out = out[:, :x.shape[1]]
        return x0_from_vp_prediction(x_vp, out, alpha, self.prediction_type)

    def features(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        x_vp, t, _ = self._vp_input(x, sigma)
        return bottleneck(lambda: self.unet(x_vp, _timestep_dtype(t, x), class_labels=class_labels),
                          self.unet.mid_block)

    def config(self) -> dict:
        return {"kind": "vp", "source": self.source}


def _timestep_dtype(t: Tensor, x: Tensor) -> Tensor:
    # At least float32: in bf16 a timestep of 998.6 would round to 1000.
    return t.to(torch.promote_types(x.dtype, torch.float32))


def load_vp_teacher(path_or_id: str, subfolder: str | None = None) -> tuple[VPDenoiser, object]:
    """A diffusers VP model (UNet2DModel + scheduler) from a local folder or hub id, e.g. a DDPM CIFAR-10 32x32
    pipeline folder (``unet/`` and ``scheduler/`` inside). Returns (denoiser, scheduler). Absent weights raise an
    error that says which folder and files are expected."""
    from diffusers import DDPMScheduler, UNet2DModel

    def load(cls, folder):
        # A pipeline folder keeps the parts in unet/ and scheduler/; a bare model repo (google/ddpm-cifar10-32
        # on the hub) keeps both configs at its root.
        try:
            return cls.from_pretrained(path_or_id, subfolder=folder)
        except (OSError, ValueError) as first:
            try:
                return cls.from_pretrained(path_or_id)
            except (OSError, ValueError):
                raise first from None

    try:
        unet = load(UNet2DModel, subfolder or "unet")
        scheduler = load(DDPMScheduler, "scheduler")
    except (OSError, ValueError) as e:
        # Say which case it is: a folder that lacks files, or a name that is no folder here (a hub id, which offline
        # cannot download, or a mistyped path).
        folder = Path(path_or_id).expanduser().resolve()
        where = (f"The folder {folder} exists; put in it" if folder.is_dir() else
                 f"There is no folder {folder}; a hub id loads only online (not with HF_HUB_OFFLINE=1), so make that "
                 f"folder (`huggingface-cli download {path_or_id} --local-dir {folder}` on a machine with internet) "
                 "and put in it")
        raise FileNotFoundError(
            f"could not load a diffusers VP model from {path_or_id!r} ({type(e).__name__}: {str(e)[:200]}). {where} "
            "a diffusers pipeline (unet/config.json + unet/diffusion_pytorch_model.safetensors and "
            "scheduler/scheduler_config.json) or a model with config.json, the weights and scheduler_config.json at "
            "its root.") from e
    return VPDenoiser(unet, scheduler, str(path_or_id)), scheduler


class EDMPickleDenoiser(nn.Module):
    """NVIDIA EDM's ``EDMPrecond`` network (already x0 = D(x, sigma, class_labels)) in our interface: integer class
    labels become the one-hot rows it takes, and ``features`` reads the output of its encoder's last block (8x8x768
    for ImageNet-64: DMD2's GAN-head input)."""

    def __init__(self, net: nn.Module, source: str | None = None, edm_code: str | None = None):
        super().__init__()
        self.net, self.source, self.edm_code = net, source, edm_code
        self.num_classes = int(getattr(net, "label_dim", 0)) or None

    def _one_hot(self, x: Tensor, class_labels: Tensor | None) -> Tensor | None:
        if self.num_classes is None:
            return None
        if class_labels is None:
            raise ValueError(f"this EDM network is class-conditional ({self.num_classes} classes): pass class_labels")
        return torch.nn.functional.one_hot(class_labels, self.num_classes).to(x.dtype)

    def forward(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        sigma = per_sample_sigma(sigma, x, dtype=torch.float32, positive=True)
        return self.net(x, sigma, self._one_hot(x, class_labels)).to(x.dtype)

    def features(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        sigma = per_sample_sigma(sigma, x, dtype=torch.float32, positive=True)
        last_encoder_block = list(self.net.model.enc.values())[-1]
        return bottleneck(lambda: self.net(x, sigma, self._one_hot(x, class_labels)), last_encoder_block)

    def config(self) -> dict:
        return {"kind": "edm_pickle", "source": self.source, "edm_code": self.edm_code}


def load_edm_pickle(path: str | Path, edm_code: str | Path) -> EDMPickleDenoiser:
    """NVIDIA EDM's network pickle (e.g. ``edm-imagenet-64x64-cond-adm.pkl``), which unpickles only with EDM's own
    code (``torch_utils``, ``dnnlib``, ``training``) importable: ``edm_code`` is a local clone of
    github.com/NVlabs/edm, put on ``sys.path`` for the load. We read the ``ema`` network. Its licence (CC BY-NC-SA)
    is the user's to accept; nothing of it is copied here."""
    path, edm_code = Path(path), Path(edm_code)
    if not path.is_file():
        raise FileNotFoundError(f"EDM network pickle {path} not found: download e.g. edm-imagenet-64x64-cond-adm.pkl "
                                "from NVIDIA's EDM release (nvlabs-fi-cdn.nvidia.com/edm/pretrained/) and pass its path")
    if not (edm_code / "torch_utils").is_dir():
        raise FileNotFoundError(f"{edm_code} holds no torch_utils/ folder: pass a local clone of github.com/NVlabs/edm "
                                "as edm_code (its pickles need that code to load)")
    sys.path.insert(0, str(edm_code))
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, ModuleNotFoundError, AttributeError, EOFError) as e:
        raise ValueError(f"{path} did not unpickle with the EDM code in {edm_code} ({type(e).__name__}: {e}); pass "
                         "an EDM network pickle and a complete clone of github.com/NVlabs/edm (dnnlib/, torch_utils/, "
                         "training/)") from e
    finally:
        sys.path.remove(str(edm_code))
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"{path} is not an EDM network pickle (expected a dict with an 'ema' network)")
    return EDMPickleDenoiser(without_dropout(data["ema"]).eval().requires_grad_(False), str(path), str(edm_code))


def without_dropout(net: nn.Module) -> nn.Module:
    """``net`` with every dropout rate set to 0, in place: EDM's ImageNet-64 network was trained with dropout 0.1,
    which its blocks apply whenever the module is in train mode; DMD2 fine-tunes the generator and critic copies with
    dropout 0 (the distillation would otherwise see a different network each call)."""
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "label_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return net


class OneStepGenerator(nn.Module):
    """DMD2's one-step image generator: G(z) = D(sigma z, sigma) at the largest noise level sigma (the teacher's
    network, initialised from its weights). ``class_labels`` conditions a class-conditional network."""

    def __init__(self, denoiser: nn.Module, sigma: float):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"the generator's noise level must be > 0; got {sigma}")
        self.denoiser, self.sigma = denoiser, float(sigma)

    def forward(self, z: Tensor, class_labels: Tensor | None = None) -> Tensor:
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        return self.denoiser(z * self.sigma, torch.full((z.shape[0],), self.sigma, device=z.device), **kwargs)


def trainable_copy(denoiser: nn.Module) -> nn.Module:
    """A deep copy with every parameter trainable: DMD2 initialises the generator and the critic from the teacher."""
    return copy.deepcopy(denoiser).requires_grad_(True).train()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ files
def save_denoiser(denoiser: nn.Module, path: str | Path, metadata: dict | None = None,
                  tensors: dict[str, Tensor] | None = None) -> Path:
    """Write a denoiser (any wrapper here) as one safetensors file: its weights (or ``tensors``, its whole state
    gathered from FSDP shards), and its ``config()`` (how to rebuild it: a UNet config, or the pretrained source it
    was loaded from) plus ``metadata`` (how it was made, its metrics) as JSON in the header. Written to a temporary
    name and renamed, so a crash mid-write never leaves a torn file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"dmd2lab_config": json.dumps(denoiser.config(), default=list),
              "dmd2lab_metadata": json.dumps(metadata or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in (tensors or denoiser.state_dict()).items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> tuple[dict, dict]:
    """(config, metadata) stored in a denoiser file by :func:`save_denoiser`."""
    path = _existing(path)
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for a file in another format or a torn one
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); sample and evaluate "
                         "take the .safetensors files that train-teacher and distill write") from e
    if "dmd2lab_config" not in header:
        raise ValueError(f"{path} was not written by dmd2lab's save_denoiser (no dmd2lab_config in its header)")
    return json.loads(header["dmd2lab_config"]), json.loads(header.get("dmd2lab_metadata", "{}"))


def load_denoiser(path: str | Path, device="cpu") -> nn.Module:
    """A denoiser from a file written by :func:`save_denoiser` (eval mode, no grad): rebuilt from its UNet config,
    or from the pretrained source it was distilled from (which must still be there), then given the file's
    weights."""
    from safetensors.torch import load_file
    config, _ = read_metadata(path)
    if config["kind"] == "edm":
        denoiser = EDMDenoiser.from_config(config["unet"], config["sigma_data"])
    elif config["kind"] == "vp":
        denoiser = load_vp_teacher(config["source"])[0]
    elif config["kind"] == "edm_pickle":
        denoiser = load_edm_pickle(config["source"], config["edm_code"])
    else:
        raise ValueError(f"{path}: unknown denoiser kind {config['kind']!r} in its header (expected edm, vp or "
                         "edm_pickle); pass a file written by dmd2lab's save_denoiser (train-teacher, distill)")
    tensors = load_file(str(path))
    expected = denoiser.state_dict()
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{path}: its weights do not fit the network its header describes ({len(missing)} missing, "
                         f"e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}); was it written by another "
                         "version of dmd2lab? Re-export it with save_denoiser.")
    denoiser.load_state_dict(tensors)
    return denoiser.to(device).eval().requires_grad_(False)


def load_teacher(source: str | Path, device="cpu", edm_code: str | Path | None = None) -> nn.Module:
    """A teacher from any of the three sources: our ``.safetensors`` file, NVIDIA EDM's ``.pkl`` (with
    ``edm_code``, a local clone of their code), or a diffusers VP model folder / hub id."""
    source = str(source)
    if source.endswith(".pkl"):
        if edm_code is None:
            raise ValueError(f"{source} is an EDM pickle: also give edm_code, a local clone of github.com/NVlabs/edm")
        return load_edm_pickle(source, edm_code).to(device)
    if source.endswith(".safetensors"):
        return load_denoiser(source, device)
    denoiser, _ = load_vp_teacher(source)
    return denoiser.to(device).eval().requires_grad_(False)


def image_shape(denoiser: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images a denoiser takes."""
    if isinstance(denoiser, EDMPickleDenoiser):
        return (denoiser.net.img_channels, denoiser.net.img_resolution, denoiser.net.img_resolution)
    config = denoiser.unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    return (config.in_channels, size, size)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found. The shipped Fashion-MNIST models live in data/ (see "
                                "data/README.md for the commands that made them); `dmd2lab train-teacher` and "
                                "`dmd2lab distill` write new ones.")
    return path


def flops_per_image(model: Callable[[Tensor], Tensor], example: Tensor) -> float:
    """Forward FLOPs per image of ``model(example)`` counted by torch's FLOP counter (matmuls and convolutions),
    for MFU estimates: measured on the model, not guessed."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(example)
    return counter.get_total_flops() / example.shape[0]

