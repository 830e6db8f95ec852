"""Image datasets for the image backend: Fashion-MNIST, CIFAR-10 and ImageNet 64x64, read from their own files.

Each dataset is read in the format its authors distribute, with no torchvision dataset class involved:
Fashion-MNIST as IDX files (plain or gzipped), CIFAR-10 as the Python pickle batches, ImageNet 64x64
(Chrabaszcz et al. 2017, arXiv 1707.08819) as the npz batches. Images stay uint8 at their native size
(ImageNet-64 train is 15 GB that way, 60 GB as float32); ``real_sampler`` converts only the batch it draws to
the model's float range [-1, 1], padded to the model's resolution.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

DATA_ENV = "DMD2LAB_DATA"
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    ``size`` is the native height = width; ``resolution`` the model's input size (Fashion-MNIST is padded from
    28 to 32 so that a UNet halving its resolution three times gets whole feature maps).
    """

    name: str
    channels: int
    size: int
    resolution: int
    num_classes: int
    class_names: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "fmnist": DatasetInfo("fmnist", 1, 28, 32, 10, (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
    "cifar10": DatasetInfo("cifar10", 3, 32, 32, 10, (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
    "imagenet64": DatasetInfo("imagenet64", 3, 64, 64, 1000, tuple(f"class_{i}" for i in range(1000))),
}

# Folder of each dataset under $DMD2LAB_DATA and data/, and the sub-folder torchvision's downloader writes to.
_FOLDERS = {"fmnist": "fashion-mnist", "cifar10": "cifar10", "imagenet64": "imagenet64"}
_TORCHVISION_SUBDIRS = {"fmnist": Path("FashionMNIST", "raw"), "cifar10": Path("cifar-10-batches-py")}

_HINTS = {
    "fmnist": "sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu), or, where the internet can be reached, "
              "load_images('fmnist', root=DIR, download=True)",
    "cifar10": "where the internet can be reached, load_images('cifar10', root=DIR, download=True) (it runs "
               "torchvision.datasets.CIFAR10(DIR, download=True)); later loads pass root=DIR, or put "
               "cifar-10-batches-py in $DMD2LAB_DATA/cifar10",
    "imagenet64": "download Imagenet64_train_part1.zip, Imagenet64_train_part2.zip and Imagenet64_val.zip from "
                  "https://image-net.org/download-images (needs an account) and unzip them into one folder, "
                  "then pass root=FOLDER or put them in $DMD2LAB_DATA/imagenet64",
}

_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # unsigned bytes, 3 and 1 dimensions


@dataclass(frozen=True, eq=False)  # field-wise == would compare whole tensors; identity is what it can mean
class ImageData:
    """A loaded split: ``images`` uint8 (N, C, H, W) at native size, ``labels`` int64 (N,) from 0."""

    name: str
    images: Tensor
    labels: Tensor
    info: DatasetInfo

    def __post_init__(self):
        info = self.info
        expected = (info.channels, info.size, info.size)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or tuple(self.images.shape[1:]) != expected:
            raise ValueError(f"{self.name}: images must be uint8 (N, {', '.join(map(str, expected))}); got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (self.images.shape[0],):
            raise ValueError(f"{self.name}: labels must be int64 ({self.images.shape[0]},); got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]


def project_data_dir() -> Path:
    """The project's ``data/`` folder: the checkout's when dmd2lab runs from one, else ``./data``."""
    checkout = Path(__file__).resolve().parents[1]
    return checkout / "data" if (checkout / "pyproject.toml").is_file() else Path.cwd() / "data"


def search_dirs(name: str, root: str | Path | None = None) -> list[Path]:
    """The folders ``load_images`` looks in for dataset ``name``, in order.

    An explicit ``root`` is the only place looked in (directly and in torchvision's layout under it), so a wrong
    path fails instead of quietly loading a copy found elsewhere. Without one: ``$DMD2LAB_DATA/<folder>``,
    ``$DMD2LAB_DATA`` as a torchvision root, ``data/<folder>``, and for Fashion-MNIST Debian's package.
    """
    _check_name(name)
    sub = _TORCHVISION_SUBDIRS.get(name)

    def with_layouts(base: Path) -> list[Path]:
        return [base, base / sub] if sub else [base]

    if root is not None:
        return with_layouts(Path(root).expanduser())
    dirs = []
    env = os.environ.get(DATA_ENV)
    if env:
        dirs += with_layouts(Path(env).expanduser() / _FOLDERS[name])
        if sub:
            dirs.append(Path(env).expanduser() / sub)
    dirs += with_layouts(project_data_dir() / _FOLDERS[name])
    if name == "fmnist":
        dirs.append(DEBIAN_FMNIST_DIR)
    return dirs


def load_images(name: str, split: str = "train", root: str | Path | None = None, limit: int | None = None,
                download: bool = False) -> ImageData:
    """Load the first ``limit`` images (all if None) of split ``"train"`` or ``"test"`` of dataset ``name``.

    ImageNet-64's "test" is its validation set (its release has no test split). ``download=True`` fetches
    Fashion-MNIST or CIFAR-10 through torchvision into ``root`` (or the first default folder) when no copy is
    found; ImageNet-64 cannot be downloaded without an account. A missing dataset raises FileNotFoundError
    listing every folder looked in and how to get it.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None; got {limit!r}")
    if root is not None and Path(root).expanduser().exists() and not Path(root).expanduser().is_dir():
        raise NotADirectoryError(f"root must be a folder holding the {name} files; {root} is not a folder")
    dirs = search_dirs(name, root)
    folder = _find_folder(name, split, dirs)
    if folder is None and download:
        folder = _find_folder(name, split, search_dirs(name, _download(name, root)))
    if folder is None:
        raise FileNotFoundError(_missing_message(name, split, dirs, searched_env=root is None))
    images, labels = _READERS[name](folder, split, limit)
    return ImageData(name, images, labels, DATASETS[name])


def to_model_range(images_uint8: Tensor, resolution: int) -> Tensor:
    """uint8 images (..., H, W) -> float32 in [-1, 1], padded with -1 (black) to resolution x resolution.

    The padding is centred, its odd pixel (if any) going to the bottom and right, as ``from_model_range``
    crops it back.
    """
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"to_model_range expected uint8 images (0..255, as load_images returns them); got "
                         f"{images_uint8.dtype}: float images in [0, 1] need (x * 255).round().to(torch.uint8) "
                         "first, and float images already in [-1, 1] need no conversion")
    h, w = images_uint8.shape[-2:]
    if resolution < max(h, w):
        raise ValueError(f"resolution {resolution} is smaller than the images ({h}x{w}); they are padded, "
                         f"never cropped")
    # Times the float32 reciprocal, which CUDA's division by a scalar uses anyway: the same bits on every device,
    # and 0 -> -1, 255 -> 1 still exact.
    x = images_uint8.float() * (1.0 / 127.5) - 1.0
    top, left = (resolution - h) // 2, (resolution - w) // 2
    return F.pad(x, (left, resolution - w - left, top, resolution - h - top), value=-1.0)


def from_model_range(x: Tensor, size: int | None = None) -> Tensor:
    """Model-range images (..., H, W) -> uint8, centre-cropped to size x size first when ``size`` is given."""
    if size is not None:
        h, w = x.shape[-2:]
        if size > min(h, w):
            raise ValueError(f"cannot crop {h}x{w} images to {size}x{size}")
        top, left = (h - size) // 2, (w - size) // 2
        x = x[..., top:top + size, left:left + size]
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def real_sampler(data: ImageData, resolution: int | None = None, device: str | torch.device = "cpu",
                 with_labels: bool = False) -> Callable[[int, torch.Generator], Tensor | tuple[Tensor, Tensor]]:
    """A function ``sample(n, rng)`` drawing n images uniformly with replacement, in model range on ``device``.

    Indices come from ``rng`` alone (on its own device, so a CUDA generator works), so equal generator states
    give equal batches. Only the drawn batch is converted, after moving it to ``device`` as uint8 (4x fewer
    bytes to copy than float32). ``resolution`` defaults to the dataset's model resolution.
    """
    resolution = data.info.resolution if resolution is None else resolution
    if len(data) == 0:
        raise ValueError(f"{data.name}: no images to sample from")
    if resolution < data.info.size:
        raise ValueError(f"resolution {resolution} is smaller than {data.name}'s {data.info.size}x{data.info.size}")

    def sample(n: int, rng: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
        idx = torch.randint(len(data), (n,), generator=rng, device=rng.device).cpu()
        x = to_model_range(data.images[idx].to(device), resolution)
        return (x, data.labels[idx].to(device)) if with_labels else x

    return sample


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


def _required_files(name: str, split: str) -> list[str]:
    """The files that mark a folder as holding the split (later batches are checked when read)."""
    if name == "fmnist":
        prefix = "train" if split == "train" else "t10k"
        return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    return [_batch_files(name, split)[0]]


def _batch_files(name: str, split: str) -> list[str]:
    if name == "cifar10":
        return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return [f"train_data_batch_{i}.npz" for i in range(1, 11)] if split == "train" else ["val_data.npz"]


def _existing(folder: Path, file: str) -> Path | None:
    """``folder/file`` if it exists; IDX files may also be gzipped (``.gz``), as Debian and the authors ship them."""
    for candidate in (folder / file, folder / f"{file}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_folder(name: str, split: str, dirs: list[Path]) -> Path | None:
    """The first of ``dirs`` holding the split's required files, or None."""
    for folder in dirs:
        if all(_existing(folder, f) for f in _required_files(name, split)):
            return folder
    return None


def _missing_message(name: str, split: str, dirs: list[Path], searched_env: bool) -> str:
    """Why no folder matched, folder by folder, and how to get the dataset."""
    gz = "[.gz]" if name == "fmnist" else ""
    lines = [f"{name} ({split} split) not found. Looked in, in order:"]
    if searched_env and not os.environ.get(DATA_ENV):
        lines.append(f"  ${DATA_ENV}  (not set)")
    for folder in dirs:
        if not folder.is_dir():
            lines.append(f"  {folder}  (no such folder)")
        else:
            missing = [f + gz for f in _required_files(name, split) if not _existing(folder, f)]
            lines.append(f"  {folder}  (missing {', '.join(missing)})")
    lines.append(f"To get it: {_HINTS[name]}.")
    return "\n".join(lines)


def _download(name: str, root: str | Path | None) -> Path:
    """Fetch the dataset with torchvision into ``root`` (default: the first default folder); return that root."""
    if name == "imagenet64":
        raise ValueError(f"imagenet64 cannot be downloaded automatically: {_HINTS[name]}")
    if root is not None:
        target = Path(root).expanduser()
    else:
        env = os.environ.get(DATA_ENV)
        target = (Path(env).expanduser() if env else project_data_dir()) / _FOLDERS[name]
    try:
        from torchvision import datasets
    except ImportError as e:
        raise ImportError(f"download=True needs torchvision (pip install torchvision): {e}") from e
    target.mkdir(parents=True, exist_ok=True)
    if name == "fmnist":
        datasets.FashionMNIST(str(target), download=True)  # writes both splits to target/FashionMNIST/raw
    else:
        datasets.CIFAR10(str(target), download=True)  # unpacks both splits to target/cifar-10-batches-py
    return target


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes: big-endian magic, one big-endian uint32 per dimension, then the bytes."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = f"0x{int.from_bytes(raw[:4], 'big'):08x}" if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise ValueError(f"{path}: not an IDX file of {ndim}-D unsigned bytes: magic {found}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise ValueError(f"{path}: header says {'x'.join(map(str, dims))} = {math.prod(dims)} bytes of data, "
                         f"the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_fmnist(folder: Path, split: str, limit: int | None) -> tuple[Tensor, Tensor]:
    image_file, label_file = (_existing(folder, f) for f in _required_files("fmnist", split))
    images, labels = _read_idx(image_file, _IDX_IMAGES), _read_idx(label_file, _IDX_LABELS)
    size = DATASETS["fmnist"].size
    if images.shape[1:] != (size, size):
        raise ValueError(f"{image_file}: images are {images.shape[1]}x{images.shape[2]}, expected {size}x{size}")
    if len(images) != len(labels):
        raise ValueError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
    # Copies: frombuffer's arrays are read-only views of the whole file.
    images, labels = images[:limit, None].copy(), labels[:limit].astype(np.int64)
    _check_labels(labels, 10, label_file)
    return torch.from_numpy(images), torch.from_numpy(labels)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle may otherwise run any code when loaded."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode")}  # Python 3 writes bytes into protocol-2 pickles through _codecs.encode

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch: a pickled dict whose b"data" is (N, 3072) uint8, channel-major RGB 32x32."""
    with open(path, "rb") as f:
        try:
            batch = _ArrayUnpickler(f, encoding="bytes").load()  # the batches were pickled by Python 2
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (expected a dict with b'data' and b'labels')")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
        raise ValueError(f"{path}: expected uint8 data (N, 3072) and N labels; got {data.dtype} {data.shape} "
                         f"and {labels.shape[0]} labels")
    _check_labels(labels, 10, path)
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar10(folder: Path, split: str, limit: int | None) -> tuple[Tensor, Tensor]:
    images, labels, count = [], [], 0
    for file in _batch_files("cifar10", split):
        if limit is not None and count >= limit:
            break
        data, lab = _read_cifar_batch(_batch_path(folder, file, "cifar10"))
        images.append(data)
        labels.append(lab)
        count += len(lab)
    return (torch.from_numpy(np.concatenate(images)[:limit]),
            torch.from_numpy(np.concatenate(labels)[:limit]))


def _read_imagenet64(folder: Path, split: str, limit: int | None) -> tuple[Tensor, Tensor]:
    # Labels first: their counts size one uint8 tensor that each batch is copied into, so loading all of train
    # peaks at 15 GB plus one batch, not the 30 GB that concatenating the batches would take.
    paths, labels, count = [], [], 0
    for file in _batch_files("imagenet64", split):
        if limit is not None and count >= limit:
            break
        paths.append(_batch_path(folder, file, "imagenet64"))
        with np.load(paths[-1]) as batch:
            labels.append(np.asarray(batch["labels"], dtype=np.int64) - 1)  # the files number classes from 1
        _check_labels(labels[-1], 1000, paths[-1])
        count += len(labels[-1])
    total = count if limit is None else min(count, limit)
    images = torch.empty((total, 3, 64, 64), dtype=torch.uint8)
    start = 0
    for path, lab in zip(paths, labels):
        with np.load(path) as batch:
            data = batch["data"]
        if data.dtype != np.uint8 or data.shape != (len(lab), 3 * 64 * 64):
            raise ValueError(f"{path}: expected uint8 data ({len(lab)}, 12288); got {data.dtype} {data.shape}")
        n = min(len(lab), total - start)
        images[start:start + n] = torch.from_numpy(data[:n].reshape(n, 3, 64, 64))
        start += n
    return images, torch.from_numpy(np.concatenate(labels)[:total])


def _batch_path(folder: Path, file: str, name: str) -> Path:
    """``folder/file``, or a FileNotFoundError saying the folder is incomplete and how to read what is there."""
    path = folder / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {name} batches are read in order until limit= images are "
                                f"loaded; add it, or pass a limit that the batches before it cover")
    return path


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1} "
                         f"(after numbering from 0)")


_READERS = {"fmnist": _read_fmnist, "cifar10": _read_cifar10, "imagenet64": _read_imagenet64}
