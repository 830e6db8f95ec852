"""Tests for the toy pieces labs 02-04 use: the two-sample MMD and within-mode spread, the regression warm start,
multi-step sampling, gradient-norm measurement, and bitwise resume of a GAN + multi-step distillation.

Oracles: the closed-form MMD of toy_metrics (a large exact sample turns the two-sample MMD into it), samples of a
known width, a linear map a regression must recover, and an uninterrupted run of the same seed.
"""
import math

import pytest
import torch

from dmd2lab import toy2d, toy_experiments as tx, toy_metrics
from dmd2lab.diffusion import NoiseSchedule
from dmd2lab.dmd import GANHead
from dmd2lab.objective import CriticWithHead, DMD2Objective, DMD2Settings, RegressionObjective
from dmd2lab.train import TrainConfig, Trainer

torch.set_num_threads(1)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_two_sample_mmd_is_near_zero_for_one_distribution_and_positive_for_two():
    data = toy2d.ring()
    a, b = data.sample(800, _g(0)), data.sample(800, _g(1))
    wide = data.inflated(0.1).sample(800, _g(2))
    same, different = toy_metrics.two_sample_mmd(a, b), toy_metrics.two_sample_mmd(a, wide)
    assert abs(same) < 3, same  # unbiased: sampling noise of either sign
    assert different > 5 * max(abs(same), 1), (same, different)
    assert toy_metrics.two_sample_mmd(a, wide) == pytest.approx(toy_metrics.two_sample_mmd(wide, a), rel=1e-9)


def test_two_sample_mmd_against_a_large_exact_sample_approaches_the_closed_form():
    data = toy2d.ring()
    x = data.inflated(0.1).sample(600, _g(3))
    exact = toy_metrics.mmd(x, data)
    estimate = toy_metrics.two_sample_mmd(x, data.sample(6000, _g(4)))
    assert estimate == pytest.approx(exact, rel=0.1), (estimate, exact)


def test_two_sample_mmd_needs_two_samples_a_side():
    with pytest.raises(ValueError, match="at least 2 samples"):
        toy_metrics.two_sample_mmd(torch.zeros(1, 2), torch.zeros(5, 2))


def test_spread_ratio_measures_the_width_of_the_modes():
    data = toy2d.ring()
    exact = data.sample(20000, _g(5))
    owner = data.responsibilities(exact.double()).argmax(1)
    centre = data.means[owner].float()
    half_width = centre + 0.5 * (exact - centre)
    assert toy_metrics.mode_statistics(exact, data)["spread_ratio"] == pytest.approx(0.97, abs=0.02)
    # Exact samples lose their tails to the 3-std window (0.97); halved offsets all stay inside it, so exactly 0.5.
    assert toy_metrics.mode_statistics(half_width, data)["spread_ratio"] == pytest.approx(0.5, abs=0.02)
    far = torch.full((10, 2), 50.0)
    assert math.isnan(toy_metrics.mode_statistics(far, data)["spread_ratio"])
    assert "spread_ratio" not in tx.evaluate_samples(far, data)  # evaluate_samples keeps only numbers


def test_settings_reject_combinations_that_would_silently_do_nothing_or_crash_late():
    with pytest.raises(ValueError, match="gan_timesteps"):
        DMD2Settings(gan_timesteps=(0, 10))
    with pytest.raises(ValueError, match="backward_simulation=False"):
        DMD2Settings(backward_simulation=False)
    with pytest.raises(ValueError, match="regression_weight"):
        DMD2Settings(regression_weight=1.0, student_sigmas=(1.0, 0.1))


def test_regression_warm_start_recovers_a_linear_map():
    z = torch.randn(2048, 2, generator=_g(6))
    y = z @ torch.tensor([[1.5, 0.3], [-0.2, 0.8]]) + torch.tensor([0.5, -1.0])
    generator = tx.regression_warm_start((z, y), steps=400, lr=3e-3, seed=0)
    with torch.no_grad():
        error = (generator(z) - y).pow(2).mean().item()
    assert error < 0.01 * y.var().item(), error


def test_regression_objective_rejects_mismatched_pairs():
    with pytest.raises(ValueError, match="one non-zero length"):
        RegressionObjective(toy2d.MLPGenerator(hidden=8), (torch.zeros(4, 2), torch.zeros(5, 2)))


def test_sample_multistep_with_the_exact_denoiser_lands_on_the_data():
    data = toy2d.ring()
    x = tx.sample_multistep(data.denoise, tx.student_sigmas(), 2000, seed=0)
    assert toy_metrics.mode_statistics(x, data)["modes_covered"] == 8
    one_step = tx.sample_multistep(data.denoise, tx.student_sigmas(), 2000, seed=0, steps=1)
    assert one_step.norm(dim=1).max() < 0.5  # from sigma 40 the posterior mean is the data mean, ~0


def test_student_sigmas_map_dmd2s_timesteps_onto_the_teacher_table():
    sigmas = tx.student_sigmas()
    assert sigmas[0] == pytest.approx(tx.TEACHER_SIGMAS[1])
    assert list(sigmas) == sorted(sigmas, reverse=True)
    assert sigmas[-1] == pytest.approx(0.047, abs=1e-3)


def test_loss_gradient_norms_are_positive_for_a_gan_run():
    data = toy2d.ring()
    teacher = toy2d.MLPDenoiser(hidden=16).requires_grad_(False)
    run = tx.distill(teacher, data, ratio=2, generator_steps=3, batch_size=32, gan_weights=(0.3, 1.0),
                     real_data=data.sample(100, _g(7)))
    norms = tx.loss_gradient_norms(run, n=64)
    assert set(norms) == {"dm", "gan"} and all(math.isfinite(v) and v > 0 for v in norms.values()), norms


def _gan_multistep_trainer(steps, out_dir, seed=0):
    data = toy2d.ring()
    torch.manual_seed(seed)
    generator = toy2d.MLPDenoiser(hidden=16, sigma_data=1.4)
    critic = toy2d.MLPDenoiser(hidden=16, sigma_data=1.4)
    real = data.sample(256, _g(8))
    settings = DMD2Settings(batch_size=32, gan_generator_weight=0.3, gan_discriminator_weight=1.0,
                            student_sigmas=(10.0, 1.0, 0.1))
    objective = DMD2Objective(generator, CriticWithHead(critic, GANHead((16,))), data.denoise,
                              NoiseSchedule.geometric(100, 0.05, 10), lambda n, rng: torch.randn(n, 2, generator=rng),
                              settings, sample_real=lambda n, rng: real[torch.randint(0, 256, (n,), generator=rng)])
    players = objective.players(1e-3, 1e-3, ratio=2)
    return Trainer(objective, players, TrainConfig(steps, seed=seed, log_every=1, checkpoint_every=6), out_dir)


def test_gan_multistep_distillation_resumes_bitwise(tmp_path):
    straight = _gan_multistep_trainer(14, tmp_path / "straight")
    straight.fit()
    _gan_multistep_trainer(8, tmp_path / "resumed").fit()
    resumed = _gan_multistep_trainer(14, tmp_path / "resumed", seed=99)
    resumed.fit()
    for key in ("critic_loss", "gan_discriminator_loss", "gan_generator_loss"):
        assert [r.get(key) for r in resumed.history] == [r.get(key) for r in straight.history], key
    for a, b in zip(straight.state_tensors().values(), resumed.state_tensors().values()):
        assert torch.equal(a, b)
