"""Tests for dmd2lab.toy2d: the exact Gaussian-mixture toy, its datasets, MLPs and the oracle critic.

Oracles: autograd of log_prob, torch.distributions, single-Gaussian closed forms, Tweedie's formula, and
Monte Carlo estimates whose tolerances are set in units of their own standard error.
"""
import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

from dmd2lab.toy2d import (DATASETS, GaussianMixture, MLPDenoiser, MLPGenerator, OracleFakeDenoiser, grid,
                           make_dataset, ring)

torch.set_num_threads(1)

F64 = torch.float64


def random_mixture(k: int = 5, seed: int = 0) -> GaussianMixture:
    """A mixture with unequal (unnormalised) weights and unequal stds, one of them wide."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(k, 2, generator=g, dtype=F64)
    stds = 0.05 + torch.rand(k, generator=g, dtype=F64)
    weights = 0.1 + 3.0 * torch.rand(k, generator=g, dtype=F64)
    return GaussianMixture(means, stds, weights)


MIXTURES = {"ring": ring, "grid": grid, "random": random_mixture}


def query_points(n: int = 16, seed: int = 1, dtype=F64) -> torch.Tensor:
    return 2.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def per_sample_sigmas(n: int, seed: int = 2) -> torch.Tensor:
    # Log-uniform over [1e-2, 10], plus an exact 0 to exercise the sigma = 0 branch per sample.
    s = 10 ** (-2 + 3 * torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    s[0] = 0.0
    return s


SIGMAS = [0.0, 0.05, 0.5, 3.0, "vector"]


def resolve_sigma(sigma, n):
    return per_sample_sigmas(n) if sigma == "vector" else sigma


# --------------------------------------------------------------------------------------------------------------
# Scores, densities and denoisers against independent routes
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_score_equals_autograd_of_log_prob(name, sigma):
    mix = MIXTURES[name]()
    x = query_points().requires_grad_(True)
    sigma = resolve_sigma(sigma, x.shape[0])
    (auto,) = torch.autograd.grad(mix.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(mix.score(x.detach(), sigma), auto, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.5, 3.0])
def test_mixture_log_prob_matches_torch_distributions(sigma):
    """p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I) as a torch MixtureSameFamily."""
    mix = random_mixture()
    scale = (mix.stds ** 2 + sigma ** 2).sqrt()[:, None].expand(-1, 2)
    ref = MixtureSameFamily(Categorical(probs=mix.weights), Independent(Normal(mix.means, scale), 1))
    x = query_points()
    torch.testing.assert_close(mix.log_prob(x, sigma), ref.log_prob(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.5, 3.0])
def test_single_gaussian_log_prob_matches_multivariate_normal(sigma):
    m, s = torch.tensor([0.4, -1.3], dtype=F64), 0.7
    x = query_points()
    ref = MultivariateNormal(m, covariance_matrix=(s ** 2 + sigma ** 2) * torch.eye(2, dtype=F64))
    got = GaussianMixture(m[None], s).log_prob(x, sigma)
    torch.testing.assert_close(got, ref.log_prob(x), rtol=1e-12, atol=1e-12)


def test_single_gaussian_log_prob_with_per_sample_sigma():
    m, s = torch.tensor([0.4, -1.3], dtype=F64), 0.7
    x = query_points()
    sigma = per_sample_sigmas(x.shape[0])
    got = GaussianMixture(m[None], s).log_prob(x, sigma)
    for i in range(x.shape[0]):
        ref = MultivariateNormal(m, covariance_matrix=(s ** 2 + sigma[i] ** 2) * torch.eye(2, dtype=F64))
        torch.testing.assert_close(got[i], ref.log_prob(x[i]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.5, 3.0, "vector"])
def test_single_gaussian_denoise_closed_form(sigma):
    """E[x0 | x] for x0 ~ N(m, s^2 I): (s^2 x + sigma^2 m) / (s^2 + sigma^2)."""
    m, s = torch.tensor([0.4, -1.3], dtype=F64), 0.7
    x = query_points()
    sigma = resolve_sigma(sigma, x.shape[0])
    sig2 = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])[:, None] ** 2
    expected = (s ** 2 * x + sig2 * m) / (s ** 2 + sig2)
    torch.testing.assert_close(GaussianMixture(m[None], s).denoise(x, sigma), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0, "vector_positive"])
def test_denoise_is_tweedie(name, sigma):
    mix = MIXTURES[name]()
    x = query_points()
    if sigma == "vector_positive":
        sigma = per_sample_sigmas(x.shape[0])
        sigma[0] = 0.2
    sig2 = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])[:, None] ** 2
    torch.testing.assert_close(mix.denoise(x, sigma), x + sig2 * mix.score(x, sigma), rtol=1e-10, atol=1e-12)


def test_denoise_at_zero_noise_is_identity():
    """With no noise the posterior mean of x0 given x_0 = x0 is x itself, also for tiny sigma."""
    mix = random_mixture()
    x = query_points()
    torch.testing.assert_close(mix.denoise(x, 0.0), x, rtol=0, atol=1e-14)
    torch.testing.assert_close(mix.denoise(x, 1e-9), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [0.05, 0.5, "vector"])
def test_denoise_batched_dtype(dtype, sigma):
    mix = random_mixture()
    x = query_points(64, dtype=dtype)
    sigma = resolve_sigma(sigma, 64)
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.to(dtype)
    out = mix.denoise(x, sigma)
    assert out.dtype == dtype and out.shape == (64, 2)
    assert mix.score(x, sigma).dtype == dtype and mix.log_prob(x, sigma).dtype == dtype
    ref = mix.denoise(x.double(), torch.as_tensor(sigma, dtype=F64))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-12 if dtype == F64 else 2e-5)
    # Batched evaluation agrees with one-at-a-time evaluation.
    sig_vec = torch.as_tensor(sigma, dtype=dtype).expand(64)
    for i in (0, 17, 63):
        torch.testing.assert_close(out[i:i + 1], mix.denoise(x[i:i + 1], sig_vec[i:i + 1]))


def test_responsibilities_sum_to_one_and_pick_nearest_mode():
    mix = ring()
    x = mix.means + 0.01
    r = mix.responsibilities(x, 0.0)
    torch.testing.assert_close(r.sum(1), torch.ones(8, dtype=F64))
    assert torch.equal(r.argmax(1), torch.arange(8))


# --------------------------------------------------------------------------------------------------------------
# Monte Carlo: denoise is the posterior mean
# --------------------------------------------------------------------------------------------------------------

def _noised_draws(mix, n, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = mix.sample(n, generator=g, dtype=F64)
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64)
    return x0, x


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_denoise_residual_is_orthogonal_to_functions_of_x(sigma):
    """The posterior mean is characterised by E[(x0 - D(x)) f(x)] = 0 for every f. Each sample average below is
    tested against 0 at 4.5 of its own standard errors (a chance failure has probability < 1e-4 across all
    checks); a denoiser at the wrong noise level must violate at least one check by > 10 standard errors."""
    mix = random_mixture()
    n = 40_000
    x0, x = _noised_draws(mix, n, sigma, seed=3)
    feats = torch.stack([torch.ones(n, dtype=F64), x[:, 0], x[:, 1], torch.tanh(x[:, 0]), x[:, 0] * x[:, 1]], 1)

    def z_scores(d):
        prod = (x0 - d)[:, :, None] * feats[:, None, :]  # (n, dim, features)
        return prod.mean(0) / (prod.std(0) / math.sqrt(n))

    assert z_scores(mix.denoise(x, sigma)).abs().max() < 4.5
    assert z_scores(mix.denoise(x, 0.6 * sigma)).abs().max() > 10


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_exact_denoiser_has_lower_mse_than_perturbed_ones(sigma):
    """E|x0 - D(x)|^2 is minimal at the posterior mean. Perturbations: a constant shift by delta (expected MSE
    increase exactly |delta|^2 = 0.0025), a 5% scaling, and the denoiser at a wrong noise level. The margin
    (half of the expected increase of the shift) is ~10 standard errors of the cross term 2 delta.mean(x0-D)."""
    mix = random_mixture()
    x0, x = _noised_draws(mix, 40_000, sigma, seed=4)
    d = mix.denoise(x, sigma)
    mse = lambda pred: ((x0 - pred) ** 2).sum(1).mean().item()  # noqa: E731
    best = mse(d)
    delta = torch.tensor([0.03, -0.04], dtype=F64)
    assert mse(d + delta) - best > 0.5 * 0.0025
    assert mse(1.05 * d) - best > 1e-3
    assert mse(mix.denoise(x, 1.3 * sigma)) - best > 1e-3


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------

def test_sample_matches_component_weights_means_and_stds():
    """Components 40 apart (>= 20 stds) so each sample's component is its nearest mean without error. Every
    statistic is compared with its value at 5 standard errors."""
    means = torch.tensor([[-20.0, 0.0], [0.0, 20.0], [20.0, 0.0]], dtype=F64)
    stds = torch.tensor([0.3, 0.5, 1.0], dtype=F64)
    mix = GaussianMixture(means, stds, torch.tensor([2.0, 3.0, 5.0], dtype=F64))
    n = 30_000
    x = mix.sample(n, generator=torch.Generator().manual_seed(0), dtype=F64)
    k = torch.cdist(x, means).argmin(1)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    frac = torch.bincount(k, minlength=3).double() / n
    assert torch.all((frac - w).abs() < 5 * (w * (1 - w) / n).sqrt())
    for j in range(3):
        xj = x[k == j]
        nj = xj.shape[0]
        assert torch.all((xj.mean(0) - means[j]).abs() < 5 * stds[j] / math.sqrt(nj))
        # Var of the sample variance of a Gaussian is 2 s^4 / (n - 1).
        assert torch.all((xj.var(0) - stds[j] ** 2).abs() < 5 * stds[j] ** 2 * math.sqrt(2 / (nj - 1)))


def test_sample_reproducible_with_generator_and_dtype():
    mix = ring()
    a = mix.sample(100, generator=torch.Generator().manual_seed(7))
    b = mix.sample(100, generator=torch.Generator().manual_seed(7))
    c = mix.sample(100, generator=torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32 and a.shape == (100, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert mix.sample(5, dtype=F64).dtype == F64


def test_sample_never_draws_zero_weight_components():
    mix = GaussianMixture(torch.tensor([[-10.0, 0.0], [10.0, 0.0]], dtype=F64), 0.1,
                          torch.tensor([0.0, 1.0], dtype=F64))
    x = mix.sample(500, generator=torch.Generator().manual_seed(0))
    assert torch.all(x[:, 0] > 5)


# --------------------------------------------------------------------------------------------------------------
# Zero-width components (empirical distributions)
# --------------------------------------------------------------------------------------------------------------

def _sq_dist(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _empirical_posterior_mean(points, x, sigma):
    """Independent closed form: softmax_i(-|x - p_i|^2 / 2 sigma^2)-weighted average of the points."""
    logits = -_sq_dist(x, points) / (2 * sigma ** 2)
    return torch.softmax(logits, dim=1) @ points


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_zero_width_mixture_denoises_at_positive_sigma(sigma):
    points = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    emp = GaussianMixture(points, 0.0)
    x = query_points()
    torch.testing.assert_close(emp.denoise(x, sigma), _empirical_posterior_mean(points, x, sigma),
                               rtol=1e-10, atol=1e-12)
    assert torch.isfinite(emp.score(x, sigma)).all() and torch.isfinite(emp.log_prob(x, sigma)).all()


@pytest.mark.parametrize("method", ["log_prob", "score", "denoise", "responsibilities"])
def test_zero_width_mixture_at_zero_sigma_raises(method):
    emp = GaussianMixture(torch.zeros(3, 2, dtype=F64), 0.0)
    x = query_points(4)
    with pytest.raises(ValueError, match="sigma > 0"):
        getattr(emp, method)(x, 0.0)
    # ... also when only one sample in the batch has sigma = 0.
    with pytest.raises(ValueError, match="sigma > 0"):
        getattr(emp, method)(x, torch.tensor([0.1, 0.1, 0.0, 0.1], dtype=F64))


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 3), (5,), (5, 2, 1), (2, 5)])
def test_wrong_x_shape_raises(shape):
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 2\)"):
        ring().denoise(torch.zeros(shape, dtype=F64), 0.1)


@pytest.mark.parametrize("sigma", [-0.1, torch.tensor([0.1, -0.1, 0.2, 0.3], dtype=F64),
                                   torch.tensor([0.1, 0.2], dtype=F64), torch.full((4, 1), 0.1, dtype=F64)])
def test_bad_sigma_raises(sigma):
    with pytest.raises(ValueError, match="sigma"):
        ring().score(query_points(4), sigma)


@pytest.mark.parametrize("means, stds, weights, match", [
    (torch.zeros(4), 0.1, None, "means must have shape"),
    (torch.zeros(0, 2), 0.1, None, "means must have shape"),
    (torch.zeros(3, 2), torch.ones(4), None, r"stds must be a scalar or shape \(3,\)"),
    (torch.zeros(3, 2), torch.ones(3, 1), None, "stds"),
    (torch.zeros(3, 2), torch.tensor([0.1, -0.1, 0.1]), None, ">= 0"),
    (torch.zeros(3, 2), -0.1, None, "stds"),
    (torch.zeros(3, 2), 0.1, torch.ones(2), r"weights must have shape \(3,\)"),
    (torch.zeros(3, 2), 0.1, torch.tensor([1.0, -0.5, 1.0]), "weights.*>= 0"),
    (torch.zeros(3, 2), 0.1, torch.zeros(3), "not all 0"),
])
def test_bad_mixture_parameters_raise(means, stds, weights, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(means, stds, weights)


def test_weights_are_normalised():
    mix = GaussianMixture(torch.zeros(3, 2, dtype=F64), 0.1, torch.tensor([1.0, 2.0, 5.0], dtype=F64))
    torch.testing.assert_close(mix.weights, torch.tensor([0.125, 0.25, 0.625], dtype=F64))


def test_integer_means_keep_fractional_stds():
    """A natural hand-written mixture, GaussianMixture(torch.tensor([[0, 0], [3, 0]]), 0.5, weights): the
    constructor casts stds (and default weights) to the integer dtype of means, so the stds silently become 0
    (and, without explicit weights, the default 1/K weights become 0 and a misleading 'weights ... not all 0'
    ValueError is raised)."""
    mix = GaussianMixture(torch.tensor([[0, 0], [3, 0]]), 0.5, torch.tensor([1.0, 1.0]))
    assert torch.allclose(mix.stds.double(), torch.tensor([0.5, 0.5], dtype=F64))


def test_make_dataset_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        make_dataset("nope")
    msg = str(err.value)
    assert "nope" in msg and all(name in msg for name in ("ring", "grid", "tree"))


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------

def test_ring_has_eight_equal_modes_on_radius_two():
    mix = make_dataset("ring")
    assert mix.num_components == 8 and mix.dim == 2
    torch.testing.assert_close(mix.means.norm(dim=1), torch.full((8,), 2.0, dtype=F64))
    # Neighbouring modes are one chord 2 r sin(pi / 8) apart.
    chords = (mix.means - mix.means.roll(1, 0)).norm(dim=1)
    torch.testing.assert_close(chords, torch.full((8,), 4 * math.sin(math.pi / 8), dtype=F64))
    torch.testing.assert_close(mix.weights, torch.full((8,), 1 / 8, dtype=F64))
    torch.testing.assert_close(mix.stds, torch.full((8,), 0.1, dtype=F64))
    assert make_dataset("ring", modes=6, radius=3.0).means.norm(dim=1).allclose(torch.full((6,), 3.0, dtype=F64))


def test_grid_has_25_modes_centred_on_the_origin():
    mix = make_dataset("grid")
    assert mix.num_components == 25
    expected = {(float(i), float(j)) for i in range(-2, 3) for j in range(-2, 3)}
    assert {tuple(p) for p in mix.means.tolist()} == expected


def test_tree_builds_a_mirror_symmetric_branching_set():
    mix = make_dataset("tree")
    # Trunk 1.4 / 0.15 -> 9 points (8 kept), then 2 x 5, 4 x 3, 8 x 2 along the 0.7-shrinking branches.
    assert mix.num_components == 8 + 2 * 5 + 4 * 3 + 8 * 2 and mix.dim == 2
    assert torch.isfinite(mix.means).all()
    assert _sq_dist(mix.means, torch.tensor([[0.0, -0.6]], dtype=F64)).min() < 1e-24  # top of the trunk
    mirrored = mix.means * torch.tensor([-1.0, 1.0], dtype=F64)
    assert _sq_dist(mirrored, mix.means).min(1).values.max() < 1e-24
    assert isinstance(DATASETS["tree"](), GaussianMixture)


def test_inflated_widens_every_component():
    mix = random_mixture()
    wide = mix.inflated(0.2)
    torch.testing.assert_close(wide.stds, mix.stds + 0.2)
    assert torch.equal(wide.means, mix.means) and torch.equal(wide.weights, mix.weights)


# --------------------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------------------

def test_mlp_generator_shapes():
    torch.manual_seed(0)
    gen = MLPGenerator(noise_dim=3, data_dim=2, hidden=16, depth=2)
    out = gen(torch.randn(7, 3))
    assert out.shape == (7, 2) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_denoiser_shapes_dtypes_and_sigma_forms(dtype):
    torch.manual_seed(0)
    net = MLPDenoiser(hidden=16, depth=2)
    x = torch.randn(6, 2, dtype=dtype)
    out_scalar = net(x, 0.5)
    out_tensor = net(x, torch.tensor(0.5))
    out_vector = net(x, torch.full((6,), 0.5, dtype=F64))
    assert out_scalar.shape == (6, 2) and out_scalar.dtype == dtype
    assert net.features(x, 0.5).shape == (6, 16)
    torch.testing.assert_close(out_scalar, out_vector)
    torch.testing.assert_close(out_scalar, out_tensor)


def test_mlp_denoiser_per_sample_sigma_matches_rowwise_evaluation():
    torch.manual_seed(0)
    net = MLPDenoiser(hidden=16, depth=2)
    x = torch.randn(5, 2)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0])
    out = net(x, sigma)
    rows = torch.cat([net(x[i:i + 1], sigma[i].item()) for i in range(5)])
    torch.testing.assert_close(out, rows)
    assert not torch.allclose(out, net(x, 1.0))


def test_mlp_denoiser_edm_preconditioning_is_identity_at_tiny_sigma():
    """c_skip -> 1 and c_out ~ sigma as sigma -> 0, so D(x, 1e-6) = x up to ~1e-6 |F|."""
    torch.manual_seed(0)
    net = MLPDenoiser(hidden=16, depth=2)
    x = torch.randn(8, 2)
    torch.testing.assert_close(net(x, 1e-6), x, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Oracle critic
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.05, 0.7, "vector"])
def test_oracle_fake_denoiser_with_fixed_samples(sigma):
    points = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    calls = []

    def sampler(n):
        calls.append(n)
        return points.clone().requires_grad_(True)

    oracle = OracleFakeDenoiser(sampler, num_samples=50)
    x = query_points(12)
    sig = per_sample_sigmas(12) + 0.05 if sigma == "vector" else torch.full((12,), sigma, dtype=F64)
    out = oracle(x, sig)
    assert calls == [50]
    assert out.dtype == F64 and not out.requires_grad
    torch.testing.assert_close(out, GaussianMixture(points.double(), 0.0).denoise(x, sig), rtol=1e-12, atol=1e-12)
    # Independent closed form of the empirical posterior mean, one sigma per row.
    expected = torch.cat([_empirical_posterior_mean(points.double(), x[i:i + 1], sig[i]) for i in range(12)])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
