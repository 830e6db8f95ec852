"""Tests for dmd2lab.image_data: tiny files in each dataset's real on-disk format, written here and read back.

Every image carries its own pixel pattern and a marker in one known channel and pixel, so ordering, channel
order and batch boundaries are checked value by value.
"""
import gzip
import os
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd2lab import image_data
from dmd2lab.image_data import (DATASETS, ImageData, from_model_range, load_images, real_sampler, search_dirs,
                                to_model_range)

torch.set_num_threads(1)


def pattern(n: int, channels: int, size: int, seed: int) -> np.ndarray:
    """n distinct uint8 images (n, C, H, W)."""
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """An IDX file: big-endian magic and dimensions, then the bytes; gzipped when the name ends in .gz."""
    raw = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_cifar_batch(path: Path, images: np.ndarray, labels) -> None:
    # Protocol 2 with bytes keys, as the Python 2 batches read with encoding="bytes".
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"batch", b"data": images.reshape(len(images), -1),
                     b"labels": list(labels), b"filenames": [b"x.png"] * len(images)}, f, protocol=2)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No default location of this machine can answer: env var unset, data/ and Debian's folder in tmp_path."""
    monkeypatch.delenv(image_data.DATA_ENV, raising=False)
    monkeypatch.setattr(image_data, "project_data_dir", lambda: tmp_path / "project" / "data")
    monkeypatch.setattr(image_data, "DEBIAN_FMNIST_DIR", tmp_path / "debian" / "fashion-mnist")
    return tmp_path


@pytest.fixture
def fmnist_root(isolated):
    """Train split gzipped directly in root; test split plain in torchvision's root/FashionMNIST/raw."""
    root = isolated / "fm"
    train, test = pattern(5, 1, 28, 0), pattern(3, 1, 28, 1)
    train[2, 0, 4, 7] = 0  # a pixel the 255 marker below can be told from
    write_idx(root / "train-images-idx3-ubyte.gz", 0x803, train[:, 0])
    write_idx(root / "train-labels-idx1-ubyte.gz", 0x801, np.array([3, 1, 4, 1, 5]))
    write_idx(root / "FashionMNIST/raw/t10k-images-idx3-ubyte", 0x803, test[:, 0])
    write_idx(root / "FashionMNIST/raw/t10k-labels-idx1-ubyte", 0x801, np.array([9, 0, 2]))
    return root, train, test


def test_fmnist_reads_gzipped_and_plain_idx_in_both_layouts(fmnist_root):
    root, train, test = fmnist_root
    data = load_images("fmnist", root=root)
    assert isinstance(data, ImageData) and len(data) == 5 and data.info is DATASETS["fmnist"]
    assert data.images.dtype == torch.uint8 and data.images.shape == (5, 1, 28, 28)
    assert torch.equal(data.images, torch.from_numpy(train))
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [3, 1, 4, 1, 5]
    test_data = load_images("fmnist", "test", root=str(root))
    assert torch.equal(test_data.images, torch.from_numpy(test)) and test_data.labels.tolist() == [9, 0, 2]
    limited = load_images("fmnist", root=root, limit=2)
    assert torch.equal(limited.images, torch.from_numpy(train[:2])) and limited.labels.tolist() == [3, 1]


def test_fmnist_found_through_env_var_then_debian_folder(isolated, monkeypatch):
    images = pattern(2, 1, 28, 2)
    debian = image_data.DEBIAN_FMNIST_DIR
    write_idx(debian / "train-images-idx3-ubyte.gz", 0x803, images[:, 0])
    write_idx(debian / "train-labels-idx1-ubyte.gz", 0x801, np.array([7, 8]))
    assert load_images("fmnist").labels.tolist() == [7, 8]
    env = isolated / "env"
    write_idx(env / "FashionMNIST/raw/train-images-idx3-ubyte", 0x803, images[:1, 0])
    write_idx(env / "FashionMNIST/raw/train-labels-idx1-ubyte", 0x801, np.array([6]))
    monkeypatch.setenv(image_data.DATA_ENV, str(env))
    assert load_images("fmnist").labels.tolist() == [6]  # the env var comes before Debian's folder


def test_download_goes_through_torchvision_into_root_or_the_default_folder(isolated, monkeypatch):
    calls = []

    def fake_fashion_mnist(root, download):
        # Stands in for torchvision's downloader: records the call, writes the raw files where it would.
        calls.append((root, download))
        raw = Path(root) / "FashionMNIST" / "raw"
        write_idx(raw / "train-images-idx3-ubyte", 0x803, pattern(2, 1, 28, 6)[:, 0])
        write_idx(raw / "train-labels-idx1-ubyte", 0x801, np.array([4, 2]))

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(FashionMNIST=fake_fashion_mnist)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    root = isolated / "new"
    assert load_images("fmnist", root=root, download=True).labels.tolist() == [4, 2]
    assert load_images("fmnist", root=root, download=True).labels.tolist() == [4, 2]  # found: no second fetch
    monkeypatch.setenv(image_data.DATA_ENV, str(isolated / "env"))
    assert len(load_images("fmnist", download=True)) == 2
    assert calls == [(str(root), True), (str(isolated / "env" / "fashion-mnist"), True)]


def test_missing_dataset_lists_every_folder_and_the_fix(isolated, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        load_images("fmnist")
    assert f"${image_data.DATA_ENV}  (not set)" in str(err.value)
    env = isolated / "env"
    (env / "fashion-mnist").mkdir(parents=True)
    monkeypatch.setenv(image_data.DATA_ENV, str(env))
    with pytest.raises(FileNotFoundError) as err:
        load_images("fmnist", "test")
    message = str(err.value)
    expected = [env / "fashion-mnist", env / "fashion-mnist/FashionMNIST/raw", env / "FashionMNIST/raw",
                isolated / "project/data/fashion-mnist", isolated / "project/data/fashion-mnist/FashionMNIST/raw",
                isolated / "debian/fashion-mnist"]
    assert search_dirs("fmnist") == expected
    for folder in expected:
        assert str(folder) in message
    assert "missing t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]" in message  # the folder that exists
    assert "sudo apt-get install dataset-fashion-mnist" in message and "download=True" in message
    for name, folder in (("cifar10", "cifar10"), ("imagenet64", "imagenet64")):
        with pytest.raises(FileNotFoundError, match=str(isolated / "project/data" / folder)):
            load_images(name)


def test_explicit_root_is_the_only_place_looked_in(fmnist_root, monkeypatch):
    root, _, _ = fmnist_root
    monkeypatch.setenv(image_data.DATA_ENV, str(root.parent))
    with pytest.raises(FileNotFoundError) as err:
        load_images("fmnist", root=root / "elsewhere")
    assert str(root / "elsewhere") in str(err.value) and "not set" not in str(err.value)
    assert search_dirs("cifar10", root) == [root, root / "cifar-10-batches-py"]


def test_malformed_idx_files_name_the_file(fmnist_root):
    root, train, _ = fmnist_root
    labels = root / "train-labels-idx1-ubyte.gz"
    write_idx(labels, 0x803, np.array([[[1]]]))  # an image magic where a label magic belongs
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*magic 0x00000803, expected 0x00000801"):
        load_images("fmnist", root=root)
    labels.write_bytes(gzip.compress(struct.pack(">II", 0x801, 5) + bytes(4)))  # one label short
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*5 bytes of data, the file holds 4"):
        load_images("fmnist", root=root)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: not a readable gzip file"):
        load_images("fmnist", root=root)
    write_idx(labels, 0x801, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="holds 5 images but .* 3 labels"):
        load_images("fmnist", root=root)
    write_idx(root / "train-images-idx3-ubyte", 0x803, train[:3, 0, :27, :27])  # plain beats .gz; wrong size
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: images are 27x27, expected 28x28"):
        load_images("fmnist", root=root)


@pytest.fixture
def cifar_root(isolated):
    """All five train batches (1 to 5 images) and the test batch, each image with 200 at channel 2, row 3, col 5."""
    folder = isolated / "cifar" / "cifar-10-batches-py"
    batches = []
    for i, n in enumerate([1, 2, 3, 4, 5], start=1):
        images = pattern(n, 3, 32, 10 + i)
        images[:, 2, 3, 5] = 200
        labels = [(i + k) % 10 for k in range(n)]
        write_cifar_batch(folder / f"data_batch_{i}", images, labels)
        batches.append((images, labels))
    test = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    test[1, 2, 3, 5] = 200  # blue channel, y = 3, x = 5: the flat index is 2 * 1024 + 3 * 32 + 5
    write_cifar_batch(folder / "test_batch", test, [8, 9])
    return folder, batches, test


def test_cifar10_reads_pickled_batches_in_order_channel_major(cifar_root):
    folder, batches, test = cifar_root
    data = load_images("cifar10", root=folder.parent)
    assert data.images.shape == (15, 3, 32, 32) and data.images.dtype == torch.uint8
    assert torch.equal(data.images, torch.from_numpy(np.concatenate([b[0] for b in batches])))
    assert data.labels.tolist() == [label for b in batches for label in b[1]]
    test_data = load_images("cifar10", "test", root=folder)  # root may be the batches folder itself
    assert torch.equal(test_data.images, torch.from_numpy(test)) and test_data.labels.tolist() == [8, 9]
    assert test_data.images[1, 2, 3, 5] == 200 and test_data.images.sum() == 200
    with open(folder / "test_batch", "rb") as f:
        assert pickle.load(f, encoding="bytes")[b"data"][1, 2 * 1024 + 3 * 32 + 5] == 200


def test_cifar10_limit_stops_at_the_batches_it_needs(cifar_root):
    folder, batches, _ = cifar_root
    for i in (3, 4, 5):
        (folder / f"data_batch_{i}").unlink()
    data = load_images("cifar10", root=folder, limit=2)
    assert torch.equal(data.images, torch.from_numpy(np.concatenate([batches[0][0], batches[1][0][:1]])))
    assert data.labels.tolist() == [1, 2]
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        load_images("cifar10", root=folder)


def test_cifar10_pickle_that_would_run_code_is_refused(cifar_root, tmp_path):
    folder, _, _ = cifar_root
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        load_images("cifar10", "test", root=folder)
    assert not marker.exists()


@pytest.fixture
def imagenet_root(isolated):
    """Ten train batches (3, 4, then 1 or 2 images) and val_data, labels numbered from 1 as in the files."""
    root = isolated / "in64"
    root.mkdir()
    batches = []
    for i, n in enumerate([3, 4, 1, 1, 1, 1, 1, 1, 1, 2], start=1):
        images = pattern(n, 3, 64, 30 + i)
        labels = [1000 - i - k for k in range(n)]
        np.savez(root / f"train_data_batch_{i}.npz", data=images.reshape(n, -1), labels=labels,
                 mean=np.zeros(3 * 64 * 64))
        batches.append((images, labels))
    val = np.zeros((2, 3, 64, 64), dtype=np.uint8)
    val[0, 1, 63, 0] = 77  # green channel, bottom-left pixel
    np.savez(root / "val_data.npz", data=val.reshape(2, -1), labels=[1, 1000])
    return root, batches, val


def test_imagenet64_reads_npz_batches_and_numbers_labels_from_0(imagenet_root):
    root, batches, val = imagenet_root
    data = load_images("imagenet64", root=root)
    assert data.images.shape == (16, 3, 64, 64) and data.images.dtype == torch.uint8
    assert torch.equal(data.images, torch.from_numpy(np.concatenate([b[0] for b in batches])))
    assert data.labels.tolist() == [label - 1 for b in batches for label in b[1]]
    val_data = load_images("imagenet64", "test", root=root)
    assert val_data.labels.tolist() == [0, 999]
    assert val_data.images[0, 1, 63, 0] == 77 and val_data.images.sum() == 77
    assert torch.equal(val_data.images, torch.from_numpy(val))


def test_imagenet64_limit_reads_only_the_batches_it_needs(imagenet_root):
    root, batches, _ = imagenet_root
    data = load_images("imagenet64", root=root, limit=5)  # all of batch 1, the first 2 of batch 2
    assert torch.equal(data.images, torch.from_numpy(np.concatenate([batches[0][0], batches[1][0][:2]])))
    assert data.labels.tolist() == [998, 997, 996, 997, 996]
    for i in range(2, 11):
        (root / f"train_data_batch_{i}.npz").unlink()
    assert len(load_images("imagenet64", root=root, limit=3)) == 3
    with pytest.raises(FileNotFoundError, match="train_data_batch_2.npz is missing"):
        load_images("imagenet64", root=root, limit=4)
    with pytest.raises(ValueError, match="cannot be downloaded automatically"):
        load_images("imagenet64", "test", root=root / "empty", download=True)


def test_bad_arguments_are_named(isolated):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; valid: fmnist, cifar10, imagenet64"):
        load_images("mnist")
    with pytest.raises(ValueError, match="unknown split 'val'; valid: train, test"):
        load_images("fmnist", "val")
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_images("fmnist", limit=0)
    not_a_folder = isolated / "file.txt"
    not_a_folder.write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        load_images("cifar10", root=not_a_folder)


def test_dataset_table():
    assert [(i.channels, i.size, i.resolution, i.num_classes) for i in DATASETS.values()] == [
        (1, 28, 32, 10), (3, 32, 32, 10), (3, 64, 64, 1000)]
    for name, info in DATASETS.items():
        assert info.name == name and len(info.class_names) == info.num_classes
    assert DATASETS["cifar10"].class_names[0] == "airplane" and DATASETS["fmnist"].class_names[9] == "Ankle boot"


def test_model_range_round_trips_every_uint8_value_through_padding():
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(every, 16)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(from_model_range(x), every)
    images = torch.from_numpy(pattern(4, 1, 28, 3))
    padded = to_model_range(images, 32)
    assert padded.shape == (4, 1, 32, 32)
    border = torch.ones_like(padded, dtype=torch.bool)
    border[..., 2:30, 2:30] = False
    assert torch.all(padded[border] == -1.0)  # two black pixels on each side
    assert torch.equal(from_model_range(padded[..., 2:30, 2:30]), images)
    assert torch.equal(from_model_range(padded, size=28), images)
    odd = to_model_range(images, 31)  # the odd pixel of padding goes to the bottom and right
    assert torch.all(odd[..., :1, :] == -1) and torch.all(odd[..., -2:, :] == -1)
    assert torch.equal(from_model_range(odd, 28), images)


def test_model_range_edges():
    assert torch.equal(from_model_range(torch.tensor([-3.0, -1.0, 0.0, 0.999, 7.0])),
                       torch.tensor([0, 0, 128, 255, 255], dtype=torch.uint8))  # clamped; 127.5 rounds to even
    with pytest.raises(ValueError, match="smaller than the images"):
        to_model_range(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), 27)
    with pytest.raises(ValueError, match="expected uint8"):
        to_model_range(torch.zeros(1, 1, 28, 28), 32)
    with pytest.raises(ValueError, match="cannot crop"):
        from_model_range(torch.zeros(1, 1, 28, 28), 32)


def test_real_sampler_is_deterministic_and_draws_from_the_data():
    n = 6
    images = torch.from_numpy(pattern(n, 1, 28, 4))
    data = ImageData("fmnist", images, torch.arange(n), DATASETS["fmnist"])  # label i marks image i
    sample = real_sampler(data, with_labels=True)
    x, y = sample(50, torch.Generator().manual_seed(0))
    assert x.shape == (50, 1, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.dtype == torch.int64 and len(set(y.tolist())) == n  # with replacement, 50 draws hit all 6
    assert torch.equal(x, to_model_range(images[y], 32))
    x2, y2 = sample(50, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(real_sampler(data)(50, torch.Generator().manual_seed(1)), x)
    assert real_sampler(data, resolution=28)(3, torch.Generator().manual_seed(0)).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="smaller than"):
        real_sampler(data, resolution=16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_real_sampler_with_a_cuda_generator():
    data = ImageData("fmnist", torch.from_numpy(pattern(5, 1, 28, 5)), torch.arange(5), DATASETS["fmnist"])
    sample = real_sampler(data, device="cuda", with_labels=True)
    x, y = sample(8, torch.Generator(device="cuda").manual_seed(0))
    assert x.device.type == "cuda" and y.device.type == "cuda"
    assert torch.equal(x.cpu(), to_model_range(data.images[y.cpu()], 32))
    assert torch.equal(x, sample(8, torch.Generator(device="cuda").manual_seed(0))[0])
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    assert torch.equal(to_model_range(every.cuda(), 16).cpu(), to_model_range(every, 16))  # same bits as on CPU


def test_image_data_checks_its_tensors():
    info = DATASETS["cifar10"]
    with pytest.raises(ValueError, match="images must be uint8"):
        ImageData("cifar10", torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), info)
    with pytest.raises(ValueError, match="labels must be int64"):
        ImageData("cifar10", torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), info)


def test_real_debian_fashion_mnist():
    if not (image_data.DEBIAN_FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    for split, n in (("train", 60000), ("test", 10000)):
        data = load_images("fmnist", split, root=image_data.DEBIAN_FMNIST_DIR)
        assert data.images.shape == (n, 1, 28, 28) and data.images.dtype == torch.uint8
        assert data.labels.shape == (n,) and data.labels.min() == 0 and data.labels.max() == 9
        assert torch.equal(data.labels.bincount(), torch.full((10,), n // 10))  # both splits are balanced
