"""Tests for the follow-ups to DMD2 (dmd2lab.followups) and their wiring: f-distill's density-ratio weights in
dmd / DMD2Objective, Decoupled DMD (GuidedDMDObjective), DP-DMD's first-step target, the labelled toy
(ClassConditionalMixture, labelled, conditional MLPGenerator, oracle ratio / fake), allocation_tv, and the toy
experiment entry points.

Oracles: closed forms (softmax / sigmoid weights, the guided mixture's weights, class posteriors), f-divergences
integrated by quadrature and differentiated by finite differences in 1-D, autograd of the DM loss, replayed
torch.Generator draws (a clone of the RNG state gives the exact timesteps, noise and student step the code drew),
and recomputation from the public pieces of dmd2lab.dmd.
"""
import math

import pytest
import torch
from torch import nn

from dmd2lab import dmd, followups, toy_experiments as tx, toy_metrics
from dmd2lab.diffusion import NoiseSchedule, edm_sampler
from dmd2lab.dmd import GANHead
from dmd2lab.followups import decoupled_dm_gradient, f_divergence_weights, first_step_target_loss, guided_x0
from dmd2lab.objective import CriticWithHead, DMD2Objective, DMD2Settings, GuidedDMDObjective
from dmd2lab.toy2d import (ClassConditionalMixture, ClassOracleFakeDenoiser, GaussianMixture, MLPDenoiser,
                           MLPGenerator, OracleLogDensityRatio, labelled, ring)

torch.set_num_threads(1)

F64 = torch.float64
DATA = ring()
SCHEDULE = NoiseSchedule.geometric(100, 0.05, 10.0)
BIG_SCHEDULE = NoiseSchedule.geometric(1000, 0.05, 10.0)
SIGMAS = (10.0, 3.0, 1.0, 0.2)
BATCH = 8
DIVERGENCES = ("reverse_kl", "forward_kl", "jensen_shannon")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def clone_rng(rng):
    return torch.Generator().set_state(rng.get_state())


def tiny_denoiser(seed):
    torch.manual_seed(seed)
    return MLPDenoiser(2, hidden=16, depth=2)


def tiny_generator(seed=0, **kw):
    torch.manual_seed(seed)
    return MLPGenerator(hidden=16, depth=2, **kw)


def latents(n, rng):
    return torch.randn(n, 2, generator=rng)


def sample_real(n, rng):
    return DATA.sample(n, rng)


# A labelled 6-mode ring: unequal weights, three classes owning two modes each.
WEIGHTS6 = torch.tensor([0.3, 0.05, 0.25, 0.1, 0.2, 0.1], dtype=F64)
OWNERS6 = torch.tensor([0, 0, 1, 1, 2, 2])
PURITY = 0.7
BASE6 = ring(modes=6, radius=3.0, std=0.1, weights=WEIGHTS6)
LAB = labelled(BASE6, OWNERS6, PURITY)


def share_table():
    """p(c | k) by hand: PURITY on a component's owner, the rest shared equally by the other classes."""
    table = torch.full((3, 6), (1 - PURITY) / 2, dtype=F64)
    table[OWNERS6, torch.arange(6)] = PURITY
    return table


# --------------------------------------------------------------------------------------------------------------
# 1. f_divergence_weights
# --------------------------------------------------------------------------------------------------------------

LOG_R = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.5, 6.0], dtype=F64)


@pytest.mark.parametrize("normalize", [True, False])
def test_reverse_kl_weights_are_ones(normalize):
    w = f_divergence_weights(LOG_R, "reverse_kl", normalize)
    assert torch.equal(w, torch.ones(6, dtype=F64))


def test_forward_kl_weights_are_r_or_n_softmax():
    torch.testing.assert_close(f_divergence_weights(LOG_R, "forward_kl", normalize=False), LOG_R.exp(),
                               rtol=1e-14, atol=0)
    expected = [6 * math.exp(v) / sum(math.exp(u) for u in LOG_R.tolist()) for v in LOG_R.tolist()]
    torch.testing.assert_close(f_divergence_weights(LOG_R, "forward_kl"), torch.tensor(expected, dtype=F64),
                               rtol=1e-13, atol=0)


def test_jensen_shannon_weights_are_sigmoid_and_normalised_by_their_mean():
    raw = [1 / (1 + math.exp(-v)) for v in LOG_R.tolist()]  # r / (1 + r)
    torch.testing.assert_close(f_divergence_weights(LOG_R, "jensen_shannon", normalize=False),
                               torch.tensor(raw, dtype=F64), rtol=1e-14, atol=0)
    mean = sum(raw) / len(raw)
    normed = f_divergence_weights(LOG_R, "jensen_shannon")
    torch.testing.assert_close(normed, torch.tensor([v / mean for v in raw], dtype=F64), rtol=1e-13, atol=0)
    assert normed.mean().item() == pytest.approx(1.0, rel=1e-14)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_weights_are_detached_float64_and_normalised_to_mean_one(divergence):
    log_r = LOG_R.float().requires_grad_(True)
    w = f_divergence_weights(log_r, divergence)
    assert w.dtype == F64 and not w.requires_grad and w.shape == (6,)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-12)
    assert (w >= 0).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_normalised_weights_are_finite_at_huge_log_ratios(divergence):
    log_r = torch.tensor([900.0, -900.0, 0.0, 900.0], dtype=F64)
    w = f_divergence_weights(log_r, divergence)
    assert torch.isfinite(w).all(), w
    assert w.sum().item() == pytest.approx(4.0, rel=1e-12)
    if divergence == "forward_kl":  # all the mass on the two samples with r = e^900, shared equally
        torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 0.0, 2.0], dtype=F64))
    if divergence == "jensen_shannon":  # sigmoid = (1, 0, 1/2, 1), mean 5/8
        torch.testing.assert_close(w, torch.tensor([1.6, 0.0, 0.8, 1.6], dtype=F64))
    # Shifting every log ratio by +-900 leaves forward KL's normalised weights unchanged (softmax).
    if divergence == "forward_kl":
        torch.testing.assert_close(f_divergence_weights(LOG_R + 900, divergence),
                                   f_divergence_weights(LOG_R - 900, divergence), rtol=1e-12, atol=0)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jensen_shannon"])
def test_unnormalised_bounded_weights_are_finite_at_huge_log_ratios(divergence):
    w = f_divergence_weights(torch.tensor([900.0, -900.0], dtype=F64), divergence, normalize=False)
    assert torch.isfinite(w).all()
    if divergence == "jensen_shannon":
        assert w.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("divergence", followups.F_DIVERGENCES)
def test_normalised_weights_are_finite_when_every_ratio_is_tiny(divergence):
    """A batch of generator samples all far from the data at small noise has every log r hugely negative (with the
    exact oracle at sigma 0.05 a sample 2 units off has log r ~ -800). The normalised weights only share the
    batch's step between samples, so they must stay finite (here: equal, as every r is alike)."""
    w = f_divergence_weights(torch.full((4,), -900.0, dtype=F64), divergence)
    torch.testing.assert_close(w, torch.ones(4, dtype=F64))


def test_weights_reject_unknown_divergence_and_non_vector_input():
    with pytest.raises(ValueError, match="unknown f-divergence"):
        f_divergence_weights(LOG_R, "hellinger")
    for bad in (LOG_R[:, None], LOG_R.reshape(2, 3), torch.tensor(0.5)):
        with pytest.raises(ValueError, match="shape"):
            f_divergence_weights(bad, "forward_kl")


# --------------------------------------------------------------------------------------------------------------
# 2. The f-distill gradient, checked against numerical integration in 1-D
# --------------------------------------------------------------------------------------------------------------

GRID = torch.linspace(-16.0, 16.0, 64001, dtype=F64)


def _log_normal(x, mean, std):
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


def _f(r, divergence):
    if divergence == "reverse_kl":
        return -torch.log(r)
    if divergence == "forward_kl":
        return r * torch.log(r)
    return r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2)


def _f_divergence(mu, s, divergence):
    """D_f(p || q_mu) = int q f(p / q) dx with p = N(0, 1), q = N(mu, s^2), by the trapezoid rule."""
    log_p, log_q = _log_normal(GRID, 0.0, 1.0), _log_normal(GRID, mu, s)
    return torch.trapezoid(log_q.exp() * _f((log_p - log_q).exp(), divergence), GRID).item()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mu,s", [(0.7, 1.3), (-0.4, 0.8)])
def test_f_distill_gradient_matches_finite_differences_of_the_divergence(divergence, mu, s):
    eps = 1e-4
    numeric = (_f_divergence(mu + eps, s, divergence) - _f_divergence(mu - eps, s, divergence)) / (2 * eps)
    log_p, log_q = _log_normal(GRID, 0.0, 1.0), _log_normal(GRID, mu, s)
    h = f_divergence_weights(log_p - log_q, divergence, normalize=False)
    score_q, score_p = -(GRID - mu) / s ** 2, -GRID
    # The generator x = mu + s z moves by dx/dmu = 1: d D_f / d mu = E_q[h(r) (s_q - s_p)].
    formula = torch.trapezoid(log_q.exp() * h * (score_q - score_p), GRID).item()
    assert abs(numeric) > 0.05  # a real gradient, not 0 = 0
    assert formula == pytest.approx(numeric, rel=1e-5), (divergence, formula, numeric)
    if divergence == "reverse_kl":  # closed forms: d KL(q || p) / d mu = mu
        assert formula == pytest.approx(mu, rel=1e-8)
    if divergence == "forward_kl":  # d KL(p || q) / d mu = mu / s^2
        assert formula == pytest.approx(mu / s ** 2, rel=1e-8)


# --------------------------------------------------------------------------------------------------------------
# 3-4. Weighted DM loss and DM step
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 2, 2)])
def test_weighted_dm_loss_gradient_is_weights_times_dm_gradient_over_numel(shape):
    x = randn(*shape, seed=1).requires_grad_(True)
    real, fake = randn(*shape, seed=2), randn(*shape, seed=3)
    weights = torch.rand(shape[0], generator=gen(4), dtype=F64) * 3
    (grad,) = torch.autograd.grad(dmd.distribution_matching_loss(x, real, fake, weights), x)
    dm = dmd.distribution_matching_gradient(x, real, fake)
    expected = weights.reshape((-1,) + (1,) * (len(shape) - 1)) * dm / x.numel()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_weighted_dm_loss_with_ones_or_none_is_dmd_and_rejects_bad_shapes():
    x = randn(5, 3, seed=1).requires_grad_(True)
    real, fake = randn(5, 3, seed=2), randn(5, 3, seed=3)
    plain = dmd.distribution_matching_loss(x, real, fake)
    ones = dmd.distribution_matching_loss(x, real, fake, torch.ones(5, dtype=F64))
    assert torch.equal(plain, ones)
    g1, = torch.autograd.grad(plain, x)
    g2, = torch.autograd.grad(ones, x)
    assert torch.equal(g1, g2)
    # Weights are detached: no gradient flows into them.
    w = torch.ones(5, dtype=F64, requires_grad=True)
    _, w_grad = torch.autograd.grad(dmd.distribution_matching_loss(x, real, fake, w), [x, w], allow_unused=True)
    assert w_grad is None
    for bad in (torch.ones(4), torch.ones(5, 1), torch.ones(()), torch.ones(5, 3)):
        with pytest.raises(ValueError, match="weights must have shape"):
            dmd.distribution_matching_loss(x, real, fake, bad)


def test_gradient_loss_gradient_is_grad_over_numel():
    x = randn(4, 3, seed=5, dtype=torch.float32).requires_grad_(True)
    g = randn(4, 3, seed=6) * 1e-6  # tiny against x: float64 inside keeps its low bits
    (out,) = torch.autograd.grad(dmd.gradient_loss(x, g), x)
    torch.testing.assert_close(out.double(), g / 12, rtol=1e-5, atol=0)


def test_dm_step_weighting_sees_the_drawn_inputs_and_ones_reproduce_dmd():
    x = randn(64, 2, seed=7).requires_grad_(True)
    real, fake = DATA.denoise, DATA.inflated(0.3).denoise
    seen = []

    def weighting(x_t, sigma):
        seen.append((x_t.clone(), sigma.clone(), torch.is_grad_enabled()))
        return 1.0 + sigma  # varies per sample

    loss, logs = dmd.distribution_matching_step(x, real, fake, SCHEDULE, (10, 90), gen(3), weighting)
    # Replay the step's draws: timesteps, then the noise.
    replay = gen(3)
    t = SCHEDULE.sample_timesteps(64, 10, 90, generator=replay)
    sigma = SCHEDULE.sigma(t)
    x_t = x.detach() + sigma[:, None] * torch.randn(x.shape, generator=replay, dtype=F64)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0], x_t, rtol=0, atol=0)
    torch.testing.assert_close(seen[0][1], sigma, rtol=0, atol=0)
    assert not seen[0][2], "the weighting runs without grad"
    assert logs["dm_largest_sample_weight"].item() == pytest.approx(1 + sigma.max().item(), rel=1e-12)
    expected = dmd.distribution_matching_loss(x, real(x_t, sigma), fake(x_t, sigma), 1.0 + sigma)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)

    ones, ones_logs = dmd.distribution_matching_step(x, real, fake, SCHEDULE, (10, 90), gen(3),
                                                     lambda x_t, s: torch.ones(x_t.shape[0], dtype=F64))
    plain, plain_logs = dmd.distribution_matching_step(x, real, fake, SCHEDULE, (10, 90), gen(3))
    assert torch.equal(ones, plain)
    assert "dm_largest_sample_weight" not in plain_logs and ones_logs["dm_largest_sample_weight"].item() == 1.0
    g1, = torch.autograd.grad(ones, x)
    g2, = torch.autograd.grad(plain, x)
    assert torch.equal(g1, g2)


# --------------------------------------------------------------------------------------------------------------
# 5-6. guided_x0, decoupled_dm_gradient, first_step_target_loss
# --------------------------------------------------------------------------------------------------------------

def _four(shape=(6, 4)):
    return tuple(randn(*shape, seed=s) for s in (11, 12, 13, 14))


def test_guided_x0_is_linear_classifier_free_guidance():
    cond, uncond = randn(5, 2, seed=1), randn(5, 2, seed=2)
    torch.testing.assert_close(guided_x0(cond, uncond, 1.0), cond, rtol=1e-14, atol=1e-15)
    assert torch.equal(guided_x0(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guided_x0(cond, uncond, 3.0), 3 * cond - 2 * uncond, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("guidance", [1.0, 2.5, 7.0])
def test_decoupled_gradient_both_terms_is_dmd_with_the_guided_teacher(guidance):
    x, fake, cond, uncond = _four()
    both = decoupled_dm_gradient(x, fake, cond, uncond, guidance)
    reference = dmd.distribution_matching_gradient(x, guided_x0(cond, uncond, guidance), fake)
    torch.testing.assert_close(both, reference, rtol=1e-12, atol=1e-13)
    dm_only = decoupled_dm_gradient(x, fake, cond, uncond, guidance, cfg_augmentation=False)
    ca_only = decoupled_dm_gradient(x, fake, cond, uncond, guidance, distribution_matching=False)
    torch.testing.assert_close(dm_only + ca_only, both, rtol=1e-12, atol=1e-13)
    # Each term by hand, with DMD's normaliser against the guided teacher.
    norm = (x - guided_x0(cond, uncond, guidance)).abs().mean(1, keepdim=True)
    torch.testing.assert_close(dm_only, (fake - cond) / norm, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ca_only, -(guidance - 1) * (cond - uncond) / norm, rtol=1e-12, atol=1e-13)
    if guidance == 1.0:
        assert torch.equal(ca_only, torch.zeros_like(ca_only))


def test_decoupled_gradient_zero_normaliser_gives_zero_and_errors():
    x, fake, cond, uncond = _four()
    x = x.clone()
    x[2] = guided_x0(cond[2], uncond[2], 3.0)  # normaliser 0 for that sample only
    g = decoupled_dm_gradient(x, fake, cond, uncond, 3.0)
    assert torch.isfinite(g).all() and torch.equal(g[2], torch.zeros(4, dtype=F64)) and g[0].abs().sum() > 0
    with pytest.raises(ValueError, match="both terms off"):
        decoupled_dm_gradient(x, fake, cond, uncond, 3.0, distribution_matching=False, cfg_augmentation=False)
    with pytest.raises(ValueError, match="one shape"):
        decoupled_dm_gradient(x, fake[:, :3], cond, uncond, 3.0)
    with pytest.raises(ValueError, match="one shape"):
        decoupled_dm_gradient(x, fake, cond, uncond[:5], 3.0)


def test_first_step_target_loss_is_mse_to_the_teacher_and_trains_only_the_student():
    teacher = tiny_denoiser(3)  # trainable parameters: the loss must still not reach them
    x, sigma = randn(6, 2, seed=1, dtype=torch.float32) * 10, torch.full((6,), 10.0)
    student = nn.Parameter(randn(6, 2, seed=2, dtype=torch.float32))
    loss = first_step_target_loss(student * 1.0, teacher, x, sigma)
    with torch.no_grad():
        target = teacher(x, sigma)
    torch.testing.assert_close(loss, ((student - target) ** 2).mean(), rtol=1e-6, atol=0)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    torch.testing.assert_close(student.grad, 2 * (student - target).detach() / 12, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# 7. DMD2Settings / DMD2Objective validation
# --------------------------------------------------------------------------------------------------------------

def test_settings_validate_the_follow_up_fields():
    with pytest.raises(ValueError, match="unknown divergence"):
        DMD2Settings(divergence="kl")
    with pytest.raises(ValueError, match="dm_weight"):
        DMD2Settings(divergence="forward_kl", dm_weight=0.0, gan_generator_weight=0.1, gan_discriminator_weight=0.1)
    # A discriminator trained with no generator GAN loss: only for an f-divergence that reads its ratio.
    with pytest.raises(ValueError, match="GAN needs"):
        DMD2Settings(gan_generator_weight=0.0, gan_discriminator_weight=1.0)
    for divergence in ("forward_kl", "jensen_shannon"):
        s = DMD2Settings(divergence=divergence, gan_generator_weight=0.0, gan_discriminator_weight=1.0)
        assert s.gan
    with pytest.raises(ValueError, match="GAN needs"):
        DMD2Settings(divergence="forward_kl", gan_generator_weight=0.3, gan_discriminator_weight=0.0)
    for sigmas in (None, (5.0,)):
        with pytest.raises(ValueError, match="first_step_target_prediction"):
            DMD2Settings(first_step_target_prediction=True, student_sigmas=sigmas)
    assert DMD2Settings(first_step_target_prediction=True, student_sigmas=(5.0, 1.0)).student_sigmas == (5.0, 1.0)
    # The discriminator's ratio is read wherever the DM loss samples t: the head must be trained there.
    ratio_head = dict(divergence="jensen_shannon", gan_generator_weight=0.0, gan_discriminator_weight=1.0)
    for dm, gan in (((10, 90), (20, 99)), (None, (0, 99))):
        with pytest.raises(ValueError, match="must contain"):
            DMD2Settings(dm_timesteps=dm, gan_timesteps=gan, **ratio_head)
    DMD2Settings(dm_timesteps=(20, 90), gan_timesteps=(10, 99), **ratio_head)


def _objective(divergence="reverse_kl", gan=(0.0, 0.0), head=False, log_density_ratio=None, **kw):
    critic = tiny_denoiser(1)
    fake = CriticWithHead(critic, (torch.manual_seed(2), GANHead((16,)))[1]) if head else critic
    settings = DMD2Settings(batch_size=BATCH, divergence=divergence, gan_generator_weight=gan[0],
                            gan_discriminator_weight=gan[1], **kw)
    generator = tiny_denoiser(0) if settings.student_sigmas is not None else tiny_generator(0)
    return DMD2Objective(generator, fake, DATA.denoise, SCHEDULE, latents, settings, sample_real=sample_real,
                         log_density_ratio=log_density_ratio)


def _zero_ratio(x_t, sigma):
    return torch.zeros(x_t.shape[0])


def test_objective_validates_the_density_ratio_source():
    with pytest.raises(ValueError, match="density ratio"):
        _objective("forward_kl")
    with pytest.raises(ValueError, match="only read by an f-divergence"):
        _objective("reverse_kl", log_density_ratio=_zero_ratio)
    with pytest.raises(ValueError, match="nothing reads it"):
        _objective("forward_kl", gan=(0.0, 1.0), head=True, log_density_ratio=_zero_ratio)
    # Accepted: the exact ratio; the head's ratio; a full GAN beside the exact ratio.
    assert _objective("forward_kl", log_density_ratio=_zero_ratio).log_density_ratio is _zero_ratio
    by_head = _objective("jensen_shannon", gan=(0.0, 1.0), head=True)
    assert by_head.log_density_ratio.__self__ is by_head.fake
    assert by_head.log_density_ratio.__func__ is CriticWithHead.logits
    _objective("forward_kl", gan=(0.3, 1.0), head=True, log_density_ratio=_zero_ratio)


# --------------------------------------------------------------------------------------------------------------
# 8. DMD2Objective f-divergence wiring
# --------------------------------------------------------------------------------------------------------------

def test_forward_kl_with_one_huge_ratio_puts_the_whole_step_on_that_sample():
    def log_ratio(x_t, sigma):
        out = torch.zeros(x_t.shape[0])
        out[3] = 60.0
        return out

    objective = _objective("forward_kl", log_density_ratio=log_ratio)
    rng = gen(4)
    context = objective.prepare(0, ["generator", "critic"], rng)
    replay = clone_rng(rng)
    loss, logs = objective.loss("generator", context, rng)
    (grad,) = torch.autograd.grad(loss, context["x"], retain_graph=True)
    rows = grad.double().norm(dim=1)
    assert rows[3] > 0 and (rows[torch.arange(BATCH) != 3] < 1e-12 * rows[3]).all(), rows
    assert logs["dm_largest_sample_weight"].item() == pytest.approx(BATCH, rel=1e-12)
    # The same loss and gradient, recomputed from dmd's pieces on the replayed draws.
    expected, _ = dmd.distribution_matching_step(
        context["x"], DATA.denoise, objective.fake, SCHEDULE, None, replay,
        lambda x_t, s: f_divergence_weights(log_ratio(x_t, s), "forward_kl"))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    # Sample 3's gradient is BATCH times its unweighted DMD gradient.
    replay = clone_rng(gen(4))
    objective.prepare(0, ["generator", "critic"], replay)
    plain, _ = dmd.distribution_matching_step(context["x"], DATA.denoise, objective.fake, SCHEDULE, None, replay)
    (plain_grad,) = torch.autograd.grad(plain, context["x"])
    torch.testing.assert_close(grad[3], BATCH * plain_grad[3], rtol=1e-5, atol=1e-12)


def test_discriminator_ratio_path_weighs_by_the_heads_logits():
    objective = _objective("jensen_shannon", gan=(0.0, 1.0), head=True)
    fake, calls = objective.fake, []

    # Replace the head's reading by a recording, strongly varying one, and rebuild the objective on it.
    def logits(x_t, sigma):
        calls.append(x_t.clone())
        return 3.0 * x_t[:, 0]

    fake.logits = logits
    objective = DMD2Objective(objective.generator, fake, DATA.denoise, SCHEDULE, latents, objective.settings,
                              sample_real=sample_real)
    rng = gen(6)
    context = objective.prepare(0, ["generator", "critic"], rng)
    assert "real" in context
    replay = clone_rng(rng)
    loss, logs = objective.loss("generator", context, rng)
    assert len(calls) == 1 and "gan_generator_loss" not in logs and "dm_largest_sample_weight" in logs
    expected, _ = dmd.distribution_matching_step(
        context["x"], DATA.denoise, fake, SCHEDULE, None, replay,
        lambda x_t, s: f_divergence_weights(3.0 * x_t[:, 0], "jensen_shannon"))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    unweighted, _ = dmd.distribution_matching_step(context["x"], DATA.denoise, fake, SCHEDULE, None,
                                                   clone_rng(replay))
    assert abs(unweighted.item() - loss.item()) > 1e-3 * abs(loss.item())
    # The discriminator still trains: the critic loss has the GAN term.
    c_loss, c_logs = objective.loss("critic", context, rng)
    assert "gan_discriminator_loss" in c_logs and torch.isfinite(c_loss)


# --------------------------------------------------------------------------------------------------------------
# 9. DP-DMD wiring
# --------------------------------------------------------------------------------------------------------------

def _dpdmd(keep=2):
    settings = DMD2Settings(batch_size=BATCH, student_sigmas=SIGMAS, first_step_target_prediction=True)
    return DMD2Objective(tiny_denoiser(0), tiny_denoiser(1), DATA.denoise, SCHEDULE, latents, settings,
                         keep_inputs=keep)


def test_dpdmd_never_draws_step_zero_and_adds_a_first_step_context_for_generator_updates():
    objective = _dpdmd()
    student, rng, drawn = objective.generator, gen(3), set()
    for step in range(30):
        updating = ["generator", "critic"] if step % 2 == 0 else ["critic"]
        replay = clone_rng(rng)
        context = objective.prepare(step, updating, rng)
        z = torch.randn(BATCH, 2, generator=replay)
        k = int(torch.randint(1, len(SIGMAS), (), generator=replay))
        drawn.add(k)
        student_input = dmd.backward_simulation(student, z, SIGMAS, k, replay)
        torch.testing.assert_close(objective.recent_inputs[k][-1], student_input, rtol=0, atol=0)
        if "generator" in updating:
            noise = torch.randn(z.shape, generator=replay)
            first_input, first_sigma, first_x0 = context["first_step"]
            torch.testing.assert_close(first_input, SIGMAS[0] * noise, rtol=0, atol=0)
            assert torch.equal(first_sigma, torch.full((BATCH,), SIGMAS[0]))
            assert first_x0.requires_grad
            torch.testing.assert_close(first_x0, student(first_input, first_sigma), rtol=0, atol=0)
        else:
            assert "first_step" not in context
        assert torch.equal(replay.get_state(), rng.get_state()), "prepare drew something unexpected"
    assert 0 not in objective.recent_inputs and 0 not in drawn
    assert drawn == {1, 2, 3}


def test_dpdmd_generator_loss_adds_the_first_step_target_loss():
    objective = _dpdmd()
    rng = gen(5)
    context = objective.prepare(0, ["generator", "critic"], rng)
    replay = clone_rng(rng)
    loss, logs = objective.loss("generator", context, rng)
    first_input, first_sigma, first_x0 = context["first_step"]
    target = DATA.denoise(first_input, first_sigma)
    first = ((first_x0 - target) ** 2).mean()
    assert logs["first_step_loss"].item() == pytest.approx(first.item(), rel=1e-6)
    dm, _ = dmd.distribution_matching_step(context["x"], DATA.denoise, objective.fake, SCHEDULE, None, replay)
    torch.testing.assert_close(loss, dm + first, rtol=1e-6, atol=1e-8)
    g_first, = torch.autograd.grad(loss, first_x0, retain_graph=True)
    torch.testing.assert_close(g_first, 2 * (first_x0 - target).detach() / first_x0.numel(), rtol=1e-5,
                               atol=1e-9)
    # It reaches the student's parameters through the first-step call alone.
    params = list(objective.generator.parameters())
    grads = torch.autograd.grad(((first_x0 - target) ** 2).mean(), params, allow_unused=True)
    assert sum(1 for g in grads if g is not None and g.abs().max() > 0) >= len(params) // 2
    # The critic loss ignores the first step and runs.
    c_loss, _ = objective.loss("critic", context, rng)
    assert torch.isfinite(c_loss)


# --------------------------------------------------------------------------------------------------------------
# 10. GuidedDMDObjective
# --------------------------------------------------------------------------------------------------------------

GUIDE = 3.0
FAKE_LAB = labelled(ring(modes=6, radius=3.0, std=0.4, weights=WEIGHTS6), OWNERS6, 0.5)


def _guided_latents(n, rng):
    return torch.randn(n, 2, generator=rng, dtype=F64), torch.randint(0, 3, (n,), generator=rng)


def _guided(fake=FAKE_LAB.denoise, real=LAB.denoise, **kw):
    generator = tiny_generator(0, num_classes=3).double()
    kw.setdefault("batch_size", 16)
    return GuidedDMDObjective(generator, fake, real, BIG_SCHEDULE, _guided_latents, GUIDE, **kw)


def test_guided_objective_both_terms_equal_dmd_with_the_guided_teacher():
    objective = _guided()
    rng = gen(2)
    context = objective.prepare(0, ["generator"], rng)
    x, labels = context["x"], context["labels"]
    assert x.requires_grad and labels.shape == (16,)
    replay = clone_rng(rng)
    loss, logs = objective.loss("generator", context, rng)
    assert set(logs) == {"guided_dm_loss"}
    real = lambda x_t, s: guided_x0(LAB.denoise(x_t, s, labels), LAB.denoise(x_t, s, None), GUIDE)  # noqa: E731
    fake = lambda x_t, s: FAKE_LAB.denoise(x_t, s, labels)  # noqa: E731
    expected, _ = dmd.distribution_matching_step(x, real, fake, BIG_SCHEDULE, None, replay)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-14)
    assert torch.equal(replay.get_state(), rng.get_state())
    g, = torch.autograd.grad(loss, x, retain_graph=True)
    g_ref, = torch.autograd.grad(expected, x)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)
    assert g.abs().max() > 0


def test_guided_objective_ca_only_never_calls_the_fake():
    def fake(*args):
        raise AssertionError("the CA term must not read the fake score")

    objective = _guided(fake=fake, distribution_matching=False)
    rng = gen(1)
    context = objective.prepare(0, ["generator"], rng)
    replay = clone_rng(rng)
    loss, _ = objective.loss("generator", context, rng)
    x, labels = context["x"], context["labels"]
    t = BIG_SCHEDULE.sample_timesteps(16, *dmd.dm_timesteps(BIG_SCHEDULE), generator=replay)
    sigma = BIG_SCHEDULE.sigma(t)
    x_t = x.detach() + sigma[:, None] * torch.randn(x.shape, generator=replay, dtype=F64)
    cond, uncond = LAB.denoise(x_t, sigma, labels), LAB.denoise(x_t, sigma, None)
    expected = decoupled_dm_gradient(x, cond, cond, uncond, GUIDE, distribution_matching=False)
    g, = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g, expected / x.numel(), rtol=1e-10, atol=1e-15)


def test_guided_objective_separate_ca_schedule_draws_its_own_timesteps():
    calls = []

    def real(x_t, sigma, labels):
        calls.append(sigma.clone())
        return LAB.denoise(x_t, sigma, labels)

    objective = _guided(real=real, dm_timesteps=(0, 9), ca_timesteps=(990, 999))
    rng = gen(8)
    context = objective.prepare(0, ["generator"], rng)
    replay = clone_rng(rng)
    loss, _ = objective.loss("generator", context, rng)
    assert len(calls) == 4  # (cond, uncond) for DM, then (cond, uncond) for CA
    assert all((s <= BIG_SCHEDULE.sigmas[9]).all() for s in calls[:2])
    assert all((s >= BIG_SCHEDULE.sigmas[990]).all() for s in calls[2:])
    # Exact replay of both draws.
    x, labels = context["x"], context["labels"]
    grads = []
    for (lo, hi), terms in (((0, 9), dict(cfg_augmentation=False)), ((990, 999), dict(distribution_matching=False))):
        sigma = BIG_SCHEDULE.sigma(BIG_SCHEDULE.sample_timesteps(16, lo, hi, generator=replay))
        x_t = x.detach() + sigma[:, None] * torch.randn(x.shape, generator=replay, dtype=F64)
        cond, uncond = LAB.denoise(x_t, sigma, labels), LAB.denoise(x_t, sigma, None)
        fake = FAKE_LAB.denoise(x_t, sigma, labels) if "cfg_augmentation" in terms else cond
        grads.append(decoupled_dm_gradient(x, fake, cond, uncond, GUIDE, **terms))
    g, = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g, (grads[0] + grads[1]) / x.numel(), rtol=1e-10, atol=1e-15)


def test_guided_objective_validation():
    with pytest.raises(ValueError, match="no loss"):
        _guided(distribution_matching=False, cfg_augmentation=False)
    with pytest.raises(ValueError, match="guidance"):
        GuidedDMDObjective(tiny_generator(0, num_classes=3), FAKE_LAB.denoise, LAB.denoise, BIG_SCHEDULE,
                           _guided_latents, 0.5)
    for terms in (dict(distribution_matching=False), dict(cfg_augmentation=False)):
        with pytest.raises(ValueError, match="ca_timesteps"):
            _guided(ca_timesteps=(0, 10), **terms)
    with pytest.raises(ValueError, match="batch_size"):
        _guided(batch_size=0)


class LabelledCritic(nn.Module):
    """A trainable fake score D(x, sigma, label): a tiny denoiser plus a learned shift per class."""

    def __init__(self):
        super().__init__()
        self.inner, self.shift = tiny_denoiser(4), nn.Parameter(torch.zeros(3, 2, dtype=F64))

    def forward(self, x, sigma, labels):
        return self.inner(x, sigma).double() + self.shift[labels]


def test_guided_objective_with_a_module_fake_trains_a_critic():
    critic = LabelledCritic()
    objective = _guided(fake=critic)
    players = objective.players(1e-3, 1e-3, ratio=2)
    assert set(players) == {"generator", "critic"} and players["critic"].module is critic
    assert players["critic"].every == 1 and players["generator"].every == 2
    rng = gen(9)
    context = objective.prepare(0, ["generator", "critic"], rng)
    replay = clone_rng(rng)
    loss, logs = objective.loss("critic", context, rng)
    labels = context["labels"]
    expected, _ = dmd.fake_score_loss(lambda x_t, s: critic(x_t, s, labels), context["x"], BIG_SCHEDULE, "edm",
                                      0.5, None, replay)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert set(logs) == {"critic_loss"}
    loss.backward()
    assert critic.shift.grad is not None and critic.shift.grad.abs().max() > 0
    assert all(p.grad is None for p in objective.generator.parameters())


# --------------------------------------------------------------------------------------------------------------
# 11. ClassConditionalMixture / labelled
# --------------------------------------------------------------------------------------------------------------

def test_labelled_joint_is_the_share_table_times_the_weights():
    torch.testing.assert_close(LAB.joint, share_table() * WEIGHTS6[None], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(LAB.marginal.weights, WEIGHTS6, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(LAB.prior, (share_table() * WEIGHTS6[None]).sum(1), rtol=1e-12, atol=1e-15)
    assert LAB.num_classes == 3
    for c in range(3):
        own = share_table()[c] * WEIGHTS6
        torch.testing.assert_close(LAB.classes[c].weights, own / own.sum(), rtol=1e-12, atol=1e-15)


def test_conditional_and_unconditional_denoisers():
    x, sigma = randn(30, 2, seed=4) * 3, torch.linspace(0.05, 3.0, 30, dtype=F64)
    torch.testing.assert_close(LAB.denoise(x, sigma, None), BASE6.denoise(x, sigma), rtol=1e-12, atol=1e-12)
    labels = torch.randint(0, 3, (30,), generator=gen(5))
    out = LAB.denoise(x, sigma, labels)
    for c in range(3):
        rows = labels == c
        assert rows.any()
        torch.testing.assert_close(out[rows], LAB.classes[c].denoise(x[rows], sigma[rows]), rtol=0, atol=0)
    # Scalar sigma too; the conditional denoiser differs from the unconditional one between modes.
    torch.testing.assert_close(LAB.denoise(x, 0.7, labels)[labels == 1],
                               LAB.classes[1].denoise(x[labels == 1], 0.7), rtol=0, atol=0)
    assert not torch.allclose(out, LAB.denoise(x, sigma, None))


def test_guided_mixture_weights():
    for c in range(3):
        own = LAB.joint[c] / LAB.joint[c].sum()
        torch.testing.assert_close(LAB.guided(c, 1.0).weights, own, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(LAB.guided(c, 0.0).weights, WEIGHTS6, rtol=1e-12, atol=1e-15)
        for w in (2.0, 4.5):
            target = own ** w * WEIGHTS6 ** (1 - w)
            torch.testing.assert_close(LAB.guided(c, w).weights, target / target.sum(), rtol=1e-12, atol=1e-15)
            assert torch.equal(LAB.guided(c, w).means, BASE6.means)
            assert torch.equal(LAB.guided(c, w).stds, BASE6.stds)
        # Guidance moves mass onto the class's own components.
        owned = OWNERS6 == c
        assert LAB.guided(c, 4.5).weights[owned].sum() > own[owned].sum()


def test_guided_mixture_keeps_absent_components_absent():
    mix = ClassConditionalMixture(BASE6.means, 0.1, torch.tensor([[1.0, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1.0]]))
    w = mix.guided(0, 3.0).weights
    assert w[[1, 3, 4, 5]].abs().max() == 0
    own = torch.tensor([0.5, 0.5], dtype=F64) ** 3 * (mix.joint.sum(0)[[0, 2]]) ** -2
    torch.testing.assert_close(w[[0, 2]], own / own.sum(), rtol=1e-12, atol=0)


def test_labelled_sample_draws_labels_from_the_prior_and_x_from_their_class():
    x, labels = LAB.sample(20000, gen(6))
    assert x.shape == (20000, 2) and x.dtype == torch.float32 and labels.shape == (20000,)
    freq = torch.bincount(labels, minlength=3).double() / 20000
    se = (LAB.prior * (1 - LAB.prior) / 20000).sqrt()
    assert ((freq - LAB.prior).abs() < 4 * se).all(), (freq, LAB.prior)
    # Each class's samples sit on the modes with that class's weights.
    for c in range(3):
        modes = BASE6.responsibilities(x[labels == c].double()).argmax(1)
        share = torch.bincount(modes, minlength=6).double() / modes.numel()
        assert (share - LAB.classes[c].weights).abs().max() < 0.03, (c, share)
    x2, labels2 = LAB.sample(20000, gen(6))
    assert torch.equal(x, x2) and torch.equal(labels, labels2)


def test_labelled_and_class_conditional_mixture_validation():
    for purity in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="purity"):
            labelled(BASE6, OWNERS6, purity)
    for owners in (torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 2, -1]), OWNERS6[None]):
        with pytest.raises(ValueError, match="owners"):
            labelled(BASE6, owners, 0.5)
    with pytest.raises(ValueError, match="joint"):
        ClassConditionalMixture(BASE6.means, 0.1, torch.ones(2, 5))
    with pytest.raises(ValueError, match="joint"):
        ClassConditionalMixture(BASE6.means, 0.1, -torch.ones(2, 6))
    with pytest.raises(ValueError, match="row of zeros"):
        ClassConditionalMixture(BASE6.means, 0.1, torch.cat([torch.ones(1, 6), torch.zeros(1, 6)]))


def test_labelled_with_one_class_is_the_data_itself():
    one = labelled(BASE6, torch.zeros(6, dtype=torch.long), 0.6)
    assert one.num_classes == 1
    torch.testing.assert_close(one.classes[0].weights, WEIGHTS6, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------------------------
# 12. Conditional MLPGenerator
# --------------------------------------------------------------------------------------------------------------

def test_conditional_generator_needs_labels_iff_it_has_classes():
    g = tiny_generator(0, num_classes=3)
    z = randn(5, 2, seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="labels"):
        g(z)
    with pytest.raises(ValueError, match="no labels"):
        tiny_generator(0)(z, torch.zeros(5, dtype=torch.long))
    a, b = g(z, torch.zeros(5, dtype=torch.long)), g(z, torch.full((5,), 2))
    assert a.shape == (5, 2) and not torch.allclose(a, b)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 0]), 3).float()
    torch.testing.assert_close(g(z, torch.tensor([0, 1, 2, 1, 0])), g.net(torch.cat([z, onehot], 1)),
                               rtol=0, atol=0)
    assert tiny_generator(0)(z).shape == (5, 2)


# --------------------------------------------------------------------------------------------------------------
# 13. Oracle log density ratio and class oracle fake
# --------------------------------------------------------------------------------------------------------------

def test_oracle_log_ratio_of_the_data_against_itself_is_near_zero():
    torch.manual_seed(0)
    ratio = OracleLogDensityRatio(DATA, lambda n: DATA.sample(n), num_samples=4096)
    x = DATA.sample(256, gen(1)).double() + randn(256, 2, seed=2)
    log_r = ratio(x, torch.ones(256, dtype=F64))
    assert log_r.shape == (256,) and torch.isfinite(log_r).all()
    assert log_r.abs().mean() < 0.05 and log_r.abs().max() < 0.2, (log_r.abs().mean(), log_r.abs().max())
    # A generator stuck on one mode: the ratio is large away from it and negative on it.
    stuck = OracleLogDensityRatio(DATA, lambda n: DATA.means[:1].expand(n, 2) + 0.1 * torch.randn(n, 2), 512)
    at_mode, opposite = DATA.means[[0]].double(), DATA.means[[4]].double()
    assert stuck(at_mode, 0.3) < -1 and stuck(opposite, 0.3) > 10


def test_class_oracle_fake_denoises_each_row_under_its_own_labels_reference():
    centres = {0: torch.tensor([-10.0, 0.0], dtype=F64), 1: torch.tensor([10.0, 0.0], dtype=F64)}
    offsets = randn(64, 2, seed=3) * 0.5
    asked = []

    def sample(n, c):
        asked.append((n, c))
        return centres[c] + offsets[:n]

    fake = ClassOracleFakeDenoiser(sample, num_samples=64)
    x = randn(10, 2, seed=4) * 3
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    sigma = torch.linspace(0.2, 2.0, 10, dtype=F64)
    out = fake(x, sigma, labels)
    assert sorted(asked) == [(64, 0), (64, 1)]
    for c in (0, 1):
        rows = labels == c
        reference = GaussianMixture(centres[c] + offsets, 0.0)
        torch.testing.assert_close(out[rows], reference.denoise(x[rows], sigma[rows]), rtol=0, atol=0)
        assert ((out[rows][:, 0] - centres[c][0]).abs() < 3).all()  # pulled to its own class's cloud


# --------------------------------------------------------------------------------------------------------------
# 14. allocation_tv
# --------------------------------------------------------------------------------------------------------------

def test_allocation_tv():
    data = ring(modes=4, weights=[0.4, 0.3, 0.2, 0.1])
    exact = toy_metrics.mode_statistics(data.sample(20000, gen(0)), data)
    assert exact["allocation_tv"] < 0.02
    for j in range(4):
        single = data.means[j].float() + 0.01 * randn(100, 2, seed=j, dtype=torch.float32)
        stats = toy_metrics.mode_statistics(single, data)
        assert stats["allocation_tv"] == pytest.approx(1 - data.weights[j].item(), rel=1e-12)
    # Outliers do not count against allocation_tv but do against mass_tv.
    half = torch.cat([data.means[0].float().expand(50, 2), torch.full((50, 2), 40.0)])
    stats = toy_metrics.mode_statistics(half, data)
    assert stats["allocation_tv"] == pytest.approx(0.6, rel=1e-12)
    assert stats["mass_tv"] == pytest.approx(0.5 * (0.1 + 0.3 + 0.2 + 0.1 + 0.5), rel=1e-12)
    far = torch.full((10, 2), 50.0)
    assert math.isnan(toy_metrics.mode_statistics(far, data)["allocation_tv"])
    assert "allocation_tv" not in tx.evaluate_samples(far, data)
    assert tx.evaluate_samples(half, data)["allocation_tv"] == pytest.approx(0.6, rel=1e-12)


# --------------------------------------------------------------------------------------------------------------
# 15. toy_experiments entry points
# --------------------------------------------------------------------------------------------------------------

def test_class_teacher_pairs_shapes_and_determinism():
    (z, y), labels = tx.class_teacher_pairs(LAB, 60, steps=8, seed=1)
    assert z.shape == y.shape == (60, 2) and labels.shape == (60,)
    assert z.dtype == y.dtype == torch.float32 and torch.isfinite(y).all()
    assert labels.min() >= 0 and labels.max() < 3 and len(labels.unique()) == 3
    (z2, y2), labels2 = tx.class_teacher_pairs(LAB, 60, steps=8, seed=1)
    assert torch.equal(z, z2) and torch.equal(y, y2) and torch.equal(labels, labels2)
    (z3, _), _ = tx.class_teacher_pairs(LAB, 60, steps=8, seed=2)
    assert not torch.equal(z, z3)
    # Replay: labels from the prior, then the noise; y is the exact conditional teacher's EDM Heun ODE sample.
    rng = gen(1)
    assert torch.equal(labels, torch.multinomial(LAB.prior, 60, replacement=True, generator=rng))
    assert torch.equal(z, torch.randn(60, 2, generator=rng))
    for c in range(3):
        rows = labels == c
        ode = edm_sampler(LAB.classes[c].denoise, z[rows].double(), 8, *tx.TEACHER_SIGMAS).float()
        torch.testing.assert_close(y[rows], ode, rtol=1e-6, atol=1e-6)


def test_regression_warm_start_with_labels_is_conditional():
    pairs, labels = tx.class_teacher_pairs(LAB, 64, steps=4, seed=0)
    g = tx.regression_warm_start(pairs, steps=3, batch_size=16, labels=labels)
    assert isinstance(g, MLPGenerator) and g.num_classes == 3
    z = randn(4, 2, dtype=torch.float32)
    assert g(z, torch.tensor([0, 1, 2, 0])).shape == (4, 2)
    with pytest.raises(ValueError, match="labels"):
        g(z)
    assert tx.regression_warm_start(pairs, steps=2, batch_size=16).num_classes == 0


@pytest.fixture(scope="module")
def tiny_teacher():
    return tiny_denoiser(11).requires_grad_(False).eval()


@pytest.fixture(scope="module")
def real_data():
    return DATA.sample(256, gen(12))


def _distill(teacher, **kw):
    return tx.distill(teacher, DATA, generator_steps=2, ratio=2, batch_size=32, **kw)


def test_distill_validates_the_follow_up_options(tiny_teacher, real_data):
    with pytest.raises(ValueError, match="density_ratio"):
        _distill(tiny_teacher, divergence="forward_kl", density_ratio="learned")
    with pytest.raises(ValueError, match="GAN head"):
        _distill(tiny_teacher, divergence="forward_kl", density_ratio="discriminator")
    with pytest.raises(ValueError, match="one-step"):
        _distill(tiny_teacher, divergence="jensen_shannon", student_sigmas=tx.student_sigmas())
    with pytest.raises(ValueError, match="gan_weights"):  # (0, d) only when the head's ratio is read
        _distill(tiny_teacher, divergence="forward_kl", gan_weights=(0.0, 1.0), real_data=real_data)
    with pytest.raises(ValueError, match="reads no ratio"):
        _distill(tiny_teacher, density_ratio="discriminator", gan_weights=(0.3, 1.0), real_data=real_data)


def test_distill_with_the_exact_ratio_logs_sample_weights(tiny_teacher):
    run = _distill(tiny_teacher, critic="oracle", divergence="forward_kl", oracle_samples=128)
    assert isinstance(run.objective.log_density_ratio, OracleLogDensityRatio)
    assert any("dm_largest_sample_weight" in row for row in run.trainer.history)
    assert torch.isfinite(run.sample(20)).all()


def test_distill_dpdmd_runs(tiny_teacher):
    run = _distill(tiny_teacher, student_sigmas=tx.student_sigmas(), first_step_target_prediction=True)
    assert 0 not in run.objective.recent_inputs
    assert any("first_step_loss" in row for row in run.trainer.history)
    assert torch.isfinite(run.sample(20)).all()


def test_distill_guided_rejects_a_warm_start_with_other_classes():
    (z, y), labels = tx.class_teacher_pairs(LAB, 64, steps=4, seed=0)
    missing_top_class = labels.clamp(max=LAB.num_classes - 2)
    warm = tx.regression_warm_start((z, y), steps=2, batch_size=16, labels=missing_top_class)
    assert warm.num_classes == LAB.num_classes - 1
    with pytest.raises(ValueError, match="num_classes"):
        tx.distill_guided(LAB, 2.0, generator_steps=1, initial_generator=warm)
    warm = tx.regression_warm_start((z, y), steps=2, batch_size=16, labels=missing_top_class,
                                    num_classes=LAB.num_classes)
    assert warm.num_classes == LAB.num_classes
    with pytest.raises(ValueError, match="labels must lie"):
        tx.regression_warm_start((z, y), steps=1, labels=labels, num_classes=1)


def test_distill_guided_is_deterministic_per_seed():
    kw = dict(generator_steps=5, batch_size=32, oracle_samples=32)
    a, b = tx.distill_guided(LAB, 2.0, seed=3, **kw), tx.distill_guided(LAB, 2.0, seed=3, **kw)
    c = tx.distill_guided(LAB, 2.0, seed=4, **kw)
    assert isinstance(a, tx.GuidedDistillation) and isinstance(a.objective, GuidedDMDObjective)
    sa, sb, sc = a.sample(40, label=1), b.sample(40, label=1), c.sample(40, label=1)
    assert sa.shape == (40, 2) and torch.isfinite(sa).all()
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)
    assert torch.equal(sa, tx.sample_labelled(a.generator, 40, 1))
    assert not torch.equal(sa, a.sample(40, label=0))
    assert any("guided_dm_loss" in row for row in a.trainer.history)


@pytest.mark.parametrize("label,guidance", [(0, 1.0), (1, 3.0), (2, 5.0)])
def test_evaluate_guided_on_exact_guided_samples(label, guidance):
    target = LAB.guided(label, guidance)
    samples = target.sample(20000, gen(label))
    scores = tx.evaluate_guided(samples, label, LAB, guidance)
    own = OWNERS6 == label  # with purity 0.7, each component's likeliest class is its owner
    assert torch.equal(LAB.joint.argmax(0) == label, own)
    assert scores["own_share"] == pytest.approx(target.weights[own].sum().item(), abs=0.015)
    assert scores["mass_tv"] < 0.03 and scores["outlier_fraction"] < 0.03
    assert math.isfinite(scores["nll"])
    # Samples of the unguided class scored against a strong guidance: visibly off.
    if guidance > 1:
        wrong = tx.evaluate_guided(LAB.classes[label].sample(20000, gen(9)), label, LAB, guidance)
        assert wrong["mass_tv"] > scores["mass_tv"] + 0.05
        assert wrong["own_share"] < scores["own_share"]


def test_density_ratio_agreement_on_a_discriminator_run(tiny_teacher, real_data):
    run = _distill(tiny_teacher, divergence="jensen_shannon", density_ratio="discriminator", gan_weights=(0.0, 1.0),
                   real_data=real_data)
    logged = {k for row in run.trainer.history for k in row}
    assert {"dm_largest_sample_weight", "gan_discriminator_loss"} <= logged and "gan_generator_loss" not in logged
    out = tx.density_ratio_agreement(run, DATA, sigmas=(0.3, 1.0), n=65, reference=256, seed=1)
    assert set(out) == {0.3, 1.0}
    for s, v in out.items():
        assert v["exact"].shape == v["estimate"].shape == (65,)
        assert math.isfinite(v["correlation"]) and -1 <= v["correlation"] <= 1
        assert math.isfinite(v["rmse"]) and v["rmse"] >= 0
        torch.testing.assert_close(torch.tensor(v["rmse"]), (v["estimate"] - v["exact"]).pow(2).mean().sqrt())
    again = tx.density_ratio_agreement(run, DATA, sigmas=(0.3, 1.0), n=65, reference=256, seed=1)
    assert torch.equal(again[0.3]["exact"], out[0.3]["exact"])
    with pytest.raises(ValueError, match="GAN head"):
        tx.density_ratio_agreement(_distill(tiny_teacher, critic="oracle", oracle_samples=64), DATA)
