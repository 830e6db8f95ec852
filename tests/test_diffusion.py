"""Tests for dmd2lab.diffusion: VE noise frame, noise schedules, x0/eps/score conversions and the EDM sampler.

The sampler is checked on a single Gaussian N(m, s^2 I), whose probability-flow ODE dx/dsigma = (x - D) / sigma
with D(x, sigma) = (s^2 x + sigma^2 m) / (s^2 + sigma^2) is linear, with the exact solution
x(sigma) = m + (x_T - m) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2).
"""
import math
from types import SimpleNamespace

import pytest
import torch

from dmd2lab.diffusion import (NoiseSchedule, add_noise, append_dims, edm_sampler, eps_from_x0, karras_sigmas,
                               sampler_evaluations, score_from_x0, x0_from_eps, x0_from_score,
                               x0_from_vp_prediction)

torch.set_num_threads(1)

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Karras / geometric / VP schedules
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num", [2, 7, 40])
def test_karras_sigmas_endpoints_and_monotonicity(num):
    s = karras_sigmas(num, 0.002, 80.0)
    assert s.dtype == F64 and s.shape == (num,)
    assert s[0].item() == pytest.approx(80.0, rel=1e-14)
    assert s[-1].item() == pytest.approx(0.002, rel=1e-12)
    assert torch.all(s[1:] < s[:-1])


def test_karras_sigmas_are_uniform_in_sigma_to_the_one_over_rho():
    s = karras_sigmas(12, 0.01, 50.0, rho=5.0)
    steps = (s ** (1 / 5)).diff()
    torch.testing.assert_close(steps, steps.mean().expand(11), rtol=1e-12, atol=0)


def test_karras_sigmas_rho_one_is_linear():
    torch.testing.assert_close(karras_sigmas(5, 1.0, 5.0, rho=1.0),
                               torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=F64), rtol=1e-14, atol=1e-14)


def test_karras_sigmas_single_step_is_sigma_max():
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0]


@pytest.mark.parametrize("num, lo, hi", [(0, 0.002, 80.0), (10, 0.0, 80.0), (10, -1.0, 80.0), (10, 80.0, 80.0),
                                         (10, 90.0, 80.0)])
def test_karras_sigmas_validation(num, lo, hi):
    with pytest.raises(ValueError):
        karras_sigmas(num, lo, hi)
    if num >= 1:
        with pytest.raises(ValueError, match="sigma_min"):
            NoiseSchedule.karras(num, lo, hi)


def test_karras_schedule_matches_dmd2_range():
    """DMD2's 1000-level EDM table: observed sigma[20] = 0.0032316 and sigma[980] = 72.054."""
    sched = NoiseSchedule.karras()
    assert len(sched) == 1000 and sched.sigmas.dtype == F64
    assert torch.all(sched.sigmas[1:] > sched.sigmas[:-1])
    t = torch.tensor([0, 20, 980, 999])
    s = sched.sigma(t)
    assert s.dtype == F64
    assert s[0].item() == pytest.approx(0.002, rel=1e-12) and s[3].item() == pytest.approx(80.0, rel=1e-12)
    assert s[1].item() == pytest.approx(0.0032, rel=0.02)
    assert s[2].item() == pytest.approx(72.0, rel=0.01)
    # Independent closed form of eq. 5 at t = 20 (index 979 of the descending ramp).
    ramp = 979 / 999
    expected = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[1].item() == pytest.approx(expected, rel=1e-12)


def test_geometric_schedule_is_log_uniform():
    sched = NoiseSchedule.geometric(50, 0.01, 20.0)
    assert len(sched) == 50 and sched.sigmas.dtype == F64
    log_steps = sched.sigmas.log().diff()
    torch.testing.assert_close(log_steps, log_steps.mean().expand(49), rtol=1e-9, atol=0)
    assert log_steps.mean().item() == pytest.approx(math.log(2000) / 49, rel=1e-6)
    assert sched.sigmas[0].item() == pytest.approx(0.01, rel=1e-6)
    assert sched.sigmas[-1].item() == pytest.approx(20.0, rel=1e-6)


def test_geometric_schedule_endpoints_are_float64_exact():
    sched = NoiseSchedule.geometric(10, 0.002, 80.0)
    assert sched.sigmas[0].item() == pytest.approx(0.002, rel=1e-12)
    assert sched.sigmas[-1].item() == pytest.approx(80.0, rel=1e-12)


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (-1.0, 1.0), (1.0, 1.0), (2.0, 1.0)])
def test_geometric_schedule_validation(lo, hi):
    with pytest.raises(ValueError, match="sigma_min"):
        NoiseSchedule.geometric(10, lo, hi)


@pytest.mark.parametrize("table", [
    torch.tensor([1.0, 1.0, 2.0], dtype=F64),       # not strictly increasing
    torch.tensor([3.0, 2.0, 1.0], dtype=F64),       # descending
    torch.tensor([0.0, 1.0, 2.0], dtype=F64),       # not positive
    torch.tensor([-1.0, 1.0, 2.0], dtype=F64),
    torch.tensor([1.0, float("nan"), 2.0], dtype=F64),
    torch.tensor([1.0], dtype=F64),                 # too short
    torch.ones(2, 3, dtype=F64),                    # not 1-D
])
def test_noise_schedule_validation(table):
    with pytest.raises(ValueError, match="sigmas"):
        NoiseSchedule(table)


def _ddpm_alphas_cumprod(num=1000):
    betas = torch.linspace(1e-4, 0.02, num, dtype=F64)
    return torch.cumprod(1 - betas, 0)


def test_from_alphas_cumprod_matches_vp_forward_process():
    """sqrt(a) (x0 + sigma eps) must equal the DDPM forward process sqrt(a) x0 + sqrt(1 - a) eps."""
    a = _ddpm_alphas_cumprod()
    sched = NoiseSchedule.from_alphas_cumprod(a)
    assert len(sched) == 1000 and torch.all(sched.sigmas[1:] > sched.sigmas[:-1])
    t = torch.tensor([0, 1, 250, 500, 999])
    x0, eps = randn(5, 3, seed=1), randn(5, 3, seed=2)
    at = a[t][:, None]
    x_vp = at.sqrt() * add_noise(x0, sched.sigma(t), eps)
    torch.testing.assert_close(x_vp, at.sqrt() * x0 + (1 - at).sqrt() * eps, rtol=1e-12, atol=1e-12)


def test_from_diffusers_reads_alphas_cumprod_and_rejects_others():
    a = _ddpm_alphas_cumprod(100)
    sched = NoiseSchedule.from_diffusers(SimpleNamespace(alphas_cumprod=a.float()))
    torch.testing.assert_close(sched.sigmas, ((1 - a.float().double()) / a.float().double()).sqrt())
    with pytest.raises(TypeError, match="alphas_cumprod"):
        NoiseSchedule.from_diffusers(object())


# --------------------------------------------------------------------------------------------------------------
# Timesteps and noising
# --------------------------------------------------------------------------------------------------------------

def test_sample_timesteps_inclusive_range_and_reproducible():
    sched = NoiseSchedule.geometric(10, 0.01, 10.0)
    t = sched.sample_timesteps(600, 3, 5, generator=torch.Generator().manual_seed(0))
    assert t.shape == (600,) and t.dtype == torch.int64
    # Both ends are hit: missing one has probability 2 (2/3)^600.
    assert set(t.tolist()) == {3, 4, 5}
    again = sched.sample_timesteps(600, 3, 5, generator=torch.Generator().manual_seed(0))
    other = sched.sample_timesteps(600, 3, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, again) and not torch.equal(t, other)
    full = sched.sample_timesteps(2000, generator=torch.Generator().manual_seed(0))
    assert full.min().item() == 0 and full.max().item() == 9
    assert set(sched.sample_timesteps(20, 7, 7).tolist()) == {7}


@pytest.mark.parametrize("low, high", [(-1, 5), (0, 10), (6, 5), (10, 10)])
def test_sample_timesteps_bad_range_raises(low, high):
    with pytest.raises(ValueError, match="timestep range"):
        NoiseSchedule.geometric(10, 0.01, 10.0).sample_timesteps(4, low, high)


@pytest.mark.parametrize("shape", [(4, 2), (4, 3, 5, 5)])
def test_add_noise_per_sample_sigma(shape):
    x0, eps = randn(*shape, seed=1), randn(*shape, seed=2)
    sigma = torch.tensor([0.0, 0.1, 1.0, 80.0], dtype=F64)
    out = add_noise(x0, sigma, eps)
    for i in range(4):
        torch.testing.assert_close(out[i], x0[i] + sigma[i].item() * eps[i], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(add_noise(x0, torch.tensor(0.5), eps), x0 + 0.5 * eps)


@pytest.mark.parametrize("sigma", [torch.ones(3), torch.ones(5), torch.ones(4, 1), torch.ones(1)])
def test_add_noise_wrong_sigma_shape_raises(sigma):
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        add_noise(torch.zeros(4, 2), sigma, torch.zeros(4, 2))


def test_add_noise_negative_sigma_raises():
    with pytest.raises(ValueError, match=">= 0"):
        add_noise(torch.zeros(4, 2), torch.tensor([0.1, -0.2, 0.3, 0.4]), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=">= 0"):
        x0_from_eps(torch.zeros(4, 2), torch.zeros(4, 2), torch.tensor(-1.0))


def test_append_dims():
    assert append_dims(torch.zeros(4), 4).shape == (4, 1, 1, 1)
    assert append_dims(torch.zeros(4), 1).shape == (4,)


# --------------------------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 2), (6, 3, 4, 4)])
@pytest.mark.parametrize("sigma", ["vector", "scalar"])
def test_conversions_round_trip(shape, sigma):
    x0, eps = randn(*shape, seed=1), randn(*shape, seed=2)
    if sigma == "vector":
        sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 10.0, 80.0], dtype=F64)
    else:
        sigma = torch.tensor(0.7, dtype=F64)
    x = add_noise(x0, sigma, eps)
    torch.testing.assert_close(x0_from_eps(x, eps, sigma), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_from_x0(x, x0, sigma), eps, rtol=1e-9, atol=1e-9)
    score = score_from_x0(x, x0, sigma)
    # The conditional score of x given x0 is -eps / sigma.
    sig = append_dims(torch.as_tensor(sigma, dtype=F64).expand(shape[0]), len(shape))
    torch.testing.assert_close(score, -eps / sig, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_from_score(x, score, sigma), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.0, 0.05, 1.0, 30.0])
def test_x0_from_score_is_tweedie_on_a_single_gaussian(sigma):
    """x0 ~ N(m, s^2 I): score of p_sigma is -(x - m)/(s^2 + sigma^2), posterior mean (s^2 x + sigma^2 m)/(...)."""
    m, s = torch.tensor([0.3, -1.1], dtype=F64), 0.6
    x = 3 * randn(8, 2)
    score = -(x - m) / (s ** 2 + sigma ** 2)
    expected = (s ** 2 * x + sigma ** 2 * m) / (s ** 2 + sigma ** 2)
    sig = torch.full((8,), sigma, dtype=F64)
    torch.testing.assert_close(x0_from_score(x, score, sig), expected, rtol=1e-12, atol=1e-12)
    if sigma > 0:
        torch.testing.assert_close(score_from_x0(x, expected, sig), score, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", [x0_from_score, score_from_x0, lambda x, noise, s: add_noise(x, s, noise)],
                         ids=["x0_from_score", "score_from_x0", "add_noise"])
def test_python_float_sigma_is_not_rounded_to_float32(fn):
    x, other = randn(4, 2, seed=1), randn(4, 2, seed=2)
    torch.testing.assert_close(fn(x, other, 0.7), fn(x, other, torch.full((4,), 0.7, dtype=F64)),
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("fn", [x0_from_eps, eps_from_x0, score_from_x0, x0_from_score])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_conversions_return_the_dtype_of_x(fn, dtype):
    x, other = randn(4, 2, seed=1).to(dtype), randn(4, 2, seed=2).to(torch.float32)
    sigma = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    out = fn(x, other, sigma)
    assert out.dtype == dtype and out.shape == (4, 2)
    ref = fn(x.double(), other.double(), sigma)
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=0, atol=0)


def test_conversions_compute_in_float64():
    """x + sigma^2 score with sigma = 1e20 and score = 1e-30 (float32): sigma^2 = 1e40 overflows float32, so a
    float32 computation gives inf; in float64 the answer 1e10 is representable and returned in float32."""
    x = torch.zeros(1, 2)
    score = torch.full((1, 2), 1e-30)
    sigma = torch.tensor([1e20], dtype=F64)
    naive = x + sigma.float()[:, None] ** 2 * score
    assert torch.isinf(naive).all()  # the scenario does need float64
    out = x0_from_score(x, score, sigma)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 2), 1e10), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("shape", [(5, 2), (5, 3, 4, 4)])
def test_x0_from_vp_prediction(kind, dtype, tol, shape):
    x0, eps = randn(*shape, seed=1), randn(*shape, seed=2)
    a = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.01], dtype=F64)
    ab = append_dims(a, len(shape))
    x_vp = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    pred = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}[kind]
    out = x0_from_vp_prediction(x_vp.to(dtype), pred.to(dtype), a, kind)
    assert out.dtype == dtype and out.shape == shape
    torch.testing.assert_close(out.double(), x0, rtol=tol, atol=tol)


def test_x0_from_vp_prediction_scalar_alpha():
    x0, eps = randn(3, 2, seed=1), randn(3, 2, seed=2)
    x_vp = math.sqrt(0.3) * x0 + math.sqrt(0.7) * eps
    torch.testing.assert_close(x0_from_vp_prediction(x_vp, eps, 0.3, "epsilon"), x0, rtol=1e-12, atol=1e-12)


def test_x0_from_vp_prediction_unknown_kind_raises():
    with pytest.raises(ValueError, match="v_prediction"):
        x0_from_vp_prediction(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0.5, 0.5]), "flow")


# --------------------------------------------------------------------------------------------------------------
# EDM sampler
# --------------------------------------------------------------------------------------------------------------

GAUSS_MEAN = torch.tensor([0.7, -1.2, 0.3], dtype=F64)
GAUSS_STD = 0.5


def gaussian_denoiser(x, sigma):
    assert sigma.shape == (x.shape[0],)
    sig2 = sigma.to(x.dtype)[:, None] ** 2
    m = GAUSS_MEAN.to(x.dtype)
    return (GAUSS_STD ** 2 * x + sig2 * m) / (GAUSS_STD ** 2 + sig2)


def ode_gain_error(num_steps, heun, dtype=F64, sigma_max=80.0):
    """Per-sample relative error of the sampler's x_0 - m against the exact m + (x_T - m) s / sqrt(s^2 + sT^2)."""
    z = randn(64, 3, seed=5).to(dtype)
    out = edm_sampler(gaussian_denoiser, z, num_steps, sigma_max=sigma_max, heun=heun)
    assert out.dtype == dtype and out.shape == z.shape
    x_t = sigma_max * z.double()
    exact = GAUSS_MEAN + (x_t - GAUSS_MEAN) * GAUSS_STD / math.sqrt(GAUSS_STD ** 2 + sigma_max ** 2)
    return (out.double() - GAUSS_MEAN) / (exact - GAUSS_MEAN) - 1


def test_heun_matches_closed_form_gaussian_flow():
    """Observed: Heun with 40 steps returns m + c (x_T - m) with c 0.98% above the exact gain s / sqrt(s^2 +
    80^2), identically for every sample (the ODE is linear); tolerance 1.5%. 160 steps: 0.056% (tol 0.1%)."""
    err = ode_gain_error(40, heun=True)
    assert err.abs().max() < 0.015
    assert (err.max() - err.min()) < 1e-9  # the same gain for every sample, as the ODE is linear
    assert ode_gain_error(160, heun=True).abs().max() < 1e-3


def test_heun_is_second_order_and_euler_first_order():
    """Halving the step size divides Heun's error by ~4 (observed 4.47, 4.23) and Euler's by ~2 (1.99, 1.98)."""
    heun = [ode_gain_error(n, heun=True).abs().max().item() for n in (20, 40, 80)]
    euler = [ode_gain_error(n, heun=False).abs().max().item() for n in (20, 40, 80)]
    for coarse, fine in zip(heun, heun[1:]):
        assert 3.5 < coarse / fine < 5.0
    for coarse, fine in zip(euler, euler[1:]):
        assert 1.8 < coarse / fine < 2.2


@pytest.mark.parametrize("num_steps", [20, 40, 80])
def test_euler_is_worse_than_heun_at_equal_steps(num_steps):
    assert ode_gain_error(num_steps, heun=False).abs().max() > 3 * ode_gain_error(num_steps, heun=True).abs().max()


def test_heun_in_float32():
    err = ode_gain_error(40, heun=True, dtype=torch.float32)
    assert err.abs().max() < 0.015


def test_one_euler_step_is_the_denoiser_at_sigma_max():
    z = randn(8, 3, seed=3)
    out = edm_sampler(gaussian_denoiser, z, 1, heun=True)
    torch.testing.assert_close(out, gaussian_denoiser(80.0 * z, torch.full((8,), 80.0, dtype=F64)))


@pytest.mark.parametrize("num_steps", [1, 2, 5, 18])
@pytest.mark.parametrize("heun", [True, False])
def test_sampler_evaluations_counts_denoiser_calls(num_steps, heun):
    sigmas_seen = []

    def counting(x, sigma):
        sigmas_seen.append(sigma[0].item())
        return gaussian_denoiser(x, sigma)

    edm_sampler(counting, randn(4, 3), num_steps, heun=heun)
    assert len(sigmas_seen) == sampler_evaluations(num_steps, heun)
    assert sampler_evaluations(num_steps, heun) == (2 * num_steps - 1 if heun else num_steps)
    # Only noise levels of the Karras grid are queried, and never sigma = 0.
    grid = karras_sigmas(num_steps).tolist()
    assert all(min(abs(s - g) for g in grid) < 1e-12 for s in sigmas_seen)
    assert sigmas_seen[0] == pytest.approx(80.0)
