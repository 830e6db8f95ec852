"""Tests for DMD2's GAN loss (Sec. 4.3) and multi-step students with backward simulation (Sec. 4.5): the losses
and helpers of dmd2lab.dmd, DMD2Settings / CriticWithHead / DMD2Objective, and the toy `distill` entry point.

Oracles: hand-computed values in Python floats (softplus via math.log1p(math.exp(.))), the analytic derivative of
softplus, re-derived randomness (the same torch.Generator state replayed by hand gives the exact noise, timesteps
and step the code drew), recording fake students / classifiers that log every call, and loss recomputation from
the public pieces of dmd2lab.dmd on a cloned RNG.
"""
import math
import re

import pytest
import torch
from torch import nn

from dmd2lab import dmd, toy_experiments
from dmd2lab.diffusion import NoiseSchedule
from dmd2lab.dmd import (GANHead, backward_simulation, gan_discriminator_loss, gan_generator_loss, gan_logits,
                         multistep_generate)
from dmd2lab.objective import CriticWithHead, DMD2Objective, DMD2Settings
from dmd2lab.toy2d import MLPDenoiser, MLPGenerator, ring
from dmd2lab.train import TrainConfig, Trainer

torch.set_num_threads(1)

F64 = torch.float64
SCHEDULE = NoiseSchedule.geometric(1000, 0.05, 10.0)
SMALL_SCHEDULE = NoiseSchedule.geometric(100, 0.05, 10.0)
DATA = ring()
SIGMAS = (10.0, 3.0, 1.0, 0.2)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def clone_rng(rng):
    return torch.Generator().set_state(rng.get_state())


# --------------------------------------------------------------------------------------------------------------
# GAN losses
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_gan_losses_at_zero_logits_are_log_2_per_term(dtype):
    zeros = torch.zeros(6, dtype=dtype)
    assert gan_generator_loss(zeros).item() == pytest.approx(math.log(2), rel=1e-6)
    assert gan_discriminator_loss(zeros, zeros[:4]).item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_gan_losses_match_hand_computed_values():
    fake, real = [2.0, -1.0], [0.5, -3.0, 1.5]
    expected_g = (softplus(-2.0) + softplus(1.0)) / 2
    expected_d = sum(softplus(f) for f in fake) / 2 + sum(softplus(-r) for r in real) / 3
    for dtype in (torch.float32, F64):
        g = gan_generator_loss(torch.tensor(fake, dtype=dtype))
        d = gan_discriminator_loss(torch.tensor(real, dtype=dtype), torch.tensor(fake, dtype=dtype))
        assert g.ndim == 0 and d.ndim == 0
        assert g.item() == pytest.approx(expected_g, rel=1e-6), (dtype, g.item(), expected_g)
        assert d.item() == pytest.approx(expected_d, rel=1e-6), (dtype, d.item(), expected_d)


@pytest.mark.parametrize("shape", [(5,), (3, 1), (2, 2, 2)])
def test_gan_losses_average_over_every_element(shape):
    logits = randn(*shape, seed=1, dtype=F64)
    expected = sum(softplus(-v) for v in logits.flatten().tolist()) / logits.numel()
    assert gan_generator_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_gan_loss_gradients_match_analytic_derivative():
    fake = torch.tensor([2.0, -1.0, 0.0, 4.0], dtype=F64, requires_grad=True)
    gan_generator_loss(fake).backward()
    expected = [-sigmoid(-v) / 4 for v in fake.tolist()]  # d/dl softplus(-l) = -sigmoid(-l)
    torch.testing.assert_close(fake.grad, torch.tensor(expected, dtype=F64), rtol=1e-6, atol=1e-8)

    real = torch.tensor([0.5, -3.0, 1.5], dtype=F64, requires_grad=True)
    fake = torch.tensor([2.0, -1.0], dtype=F64, requires_grad=True)
    gan_discriminator_loss(real, fake).backward()
    torch.testing.assert_close(real.grad, torch.tensor([-sigmoid(-v) / 3 for v in real.tolist()], dtype=F64),
                               rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(fake.grad, torch.tensor([sigmoid(v) / 2 for v in fake.tolist()], dtype=F64),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gan_losses_are_stable_at_huge_logits(dtype):
    big = torch.tensor([1000.0, -1000.0], dtype=dtype, requires_grad=True)
    g = gan_generator_loss(big)
    assert torch.isfinite(g) and g.item() == pytest.approx(big[1].abs().item() / 2, rel=1e-3)
    g.backward()
    assert torch.isfinite(big.grad).all()
    torch.testing.assert_close(big.grad.float(), torch.tensor([0.0, -0.5]), atol=1e-3, rtol=0)

    real = big.detach().clone().requires_grad_(True)
    fake = big.detach().clone().requires_grad_(True)
    d = gan_discriminator_loss(real, fake)
    # softplus(D(fake)) = (1000 + 0) / 2, softplus(-D(real)) = (0 + 1000) / 2
    assert torch.isfinite(d) and d.item() == pytest.approx(big[0].abs().item(), rel=1e-3)
    d.backward()
    assert torch.isfinite(real.grad).all() and torch.isfinite(fake.grad).all()
    torch.testing.assert_close(real.grad.float(), torch.tensor([0.0, -0.5]), atol=1e-3, rtol=0)
    torch.testing.assert_close(fake.grad.float(), torch.tensor([0.5, 0.0]), atol=1e-3, rtol=0)


def test_gan_discriminator_loss_accepts_different_batch_sizes():
    # DMD2 may see more real than fake samples; each term is its own mean.
    d = gan_discriminator_loss(torch.zeros(5), torch.full((2,), 3.0))
    assert d.item() == pytest.approx(softplus(3.0) + math.log(2), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# gan_logits: re-noised inputs for the head
# --------------------------------------------------------------------------------------------------------------

class RecordingClassifier:
    """classify(x_t, sigma) = sum(w * x_t) per sample; records its inputs."""

    def __init__(self, weight):
        self.weight, self.calls = weight, []

    def __call__(self, x_t, sigma):
        self.calls.append((x_t, sigma))
        return (self.weight * x_t).reshape(x_t.shape[0], -1).sum(1, keepdim=True)  # (B, 1): gan_logits reshapes


@pytest.mark.parametrize("shape", [(16, 2), (4, 3, 5, 5)])
@pytest.mark.parametrize("schedule", [SCHEDULE, NoiseSchedule.karras()], ids=["geometric", "karras"])
@pytest.mark.parametrize("timesteps", [None, (100, 200), (0, 0), (999, 999)])
def test_gan_logits_renoise_with_replayable_sigma_and_noise(shape, schedule, timesteps):
    x = randn(*shape, seed=1).requires_grad_(True)
    classify = RecordingClassifier(randn(*shape[1:], seed=2))
    logits = gan_logits(classify, x, schedule, timesteps, gen(5))
    assert logits.shape == (shape[0],)
    assert len(classify.calls) == 1
    x_t, sigma = classify.calls[0]
    assert sigma.shape == (shape[0],) and x_t.shape == shape

    # Replay: timesteps uniform in the range, then standard normal noise of x's shape and dtype.
    low, high = timesteps if timesteps is not None else (0, len(schedule) - 1)
    replay = gen(5)
    t = torch.randint(low, high + 1, (shape[0],), generator=replay)
    eps = torch.randn(shape, generator=replay)
    torch.testing.assert_close(sigma, schedule.sigmas[t], rtol=0, atol=0)
    assert torch.isin(sigma, schedule.sigmas[low:high + 1]).all(), "sigma must come from the table's range"
    scale = sigma.reshape(-1, *[1] * (len(shape) - 1)).float()
    torch.testing.assert_close(x_t.detach() - x.detach(), scale * eps, rtol=1e-5, atol=1e-5)
    if timesteps == (0, 0):
        assert (sigma == schedule.sigmas.min()).all()

    # Gradients flow into x: d logit_i / d x_i = w.
    logits.sum().backward()
    torch.testing.assert_close(x.grad, classify.weight.expand(shape))


def test_gan_logits_default_range_covers_whole_table():
    x = torch.zeros(4000, 1)
    sigma = []
    gan_logits(lambda x_t, s: sigma.append(s) or x_t.sum(1), x, SMALL_SCHEDULE, None, gen(0))
    t = torch.searchsorted(SMALL_SCHEDULE.sigmas, sigma[0])
    assert t.min() == 0 and t.max() == len(SMALL_SCHEDULE) - 1


def test_gan_logits_reject_timesteps_outside_the_table():
    with pytest.raises(ValueError, match="timestep range"):
        gan_logits(lambda x_t, s: x_t.sum(1), torch.zeros(3, 2), SMALL_SCHEDULE, (0, 100), gen(0))


# --------------------------------------------------------------------------------------------------------------
# GANHead
# --------------------------------------------------------------------------------------------------------------

FEATURE_SHAPES = [(64,), (16, 8, 8), (8, 4, 4), (8, 2, 2), (32, 32, 32)]
HEAD_CASES = [(s, None) for s in FEATURE_SHAPES] + [((16, 8, 8), 48), ((8, 4, 4), 40)]
HEAD_IDS = [f"{'x'.join(map(str, s))}-hidden{h}" for s, h in HEAD_CASES]


def _head(shape, hidden=None, seed=0):
    torch.manual_seed(seed)
    return GANHead(shape, hidden)


@pytest.mark.parametrize("shape", FEATURE_SHAPES)
def test_gan_head_gives_one_logit_per_sample(shape):
    head = _head(shape)
    out = head(randn(3, *shape, seed=1))
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_gan_head_downsamples_by_two_until_4x4():
    def strided(shape):  # the 4x4 / stride-2 downsampling convs (the last conv spans the whole remaining map)
        return [m for m in _head(shape).modules()
                if isinstance(m, nn.Conv2d) and m.kernel_size == (4, 4) and m.stride == (2, 2)]
    assert len(strided((32, 32, 32))) == 3  # 32 -> 16 -> 8 -> 4
    assert len(strided((16, 8, 8))) == 1
    assert len(strided((8, 4, 4))) == 0 and len(strided((8, 2, 2))) == 0
    # ... and one conv over the whole remaining map, then a 1x1 conv to one logit.
    last_two = [m for m in _head((32, 32, 32)).modules() if isinstance(m, nn.Conv2d)][-2:]
    assert last_two[0].kernel_size == (4, 4) and last_two[0].stride == (4, 4) and last_two[1].out_channels == 1
    assert [m for m in _head((8, 2, 2)).modules() if isinstance(m, nn.Conv2d)][0].kernel_size == (2, 2)
    assert not any(isinstance(m, nn.Conv2d) for m in _head((64,)).modules())
    # hidden sets the width of the conv stack / MLP
    assert _head((16, 8, 8), hidden=24).net[0].out_channels == 24
    assert _head((64,), hidden=7).net[0].out_features == 7


@pytest.mark.parametrize("shape", [(16, 8, 8), (8, 3, 3), (8, 5, 5), (4, 7, 7), (4, 9, 9)])
def test_gan_head_handles_odd_map_sizes(shape):
    assert _head(shape)(randn(2, *shape, seed=1)).shape == (2,)


@pytest.mark.parametrize("shape, hidden", HEAD_CASES, ids=HEAD_IDS)
def test_gan_head_gradients_reach_every_parameter(shape, hidden):
    head = _head(shape, hidden)
    head(randn(4, *shape, seed=1)).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 1e-4, f"{name}: gradient {p.grad.abs().max().item():.3g} is (numerically) zero"


@pytest.mark.parametrize("shape, hidden", HEAD_CASES, ids=HEAD_IDS)
def test_gan_head_logits_depend_on_the_features(shape, hidden):
    """A discriminator whose output does not depend on its input can never tell real from fake."""
    head = _head(shape, hidden)
    out = head(randn(8, *shape, seed=1)).detach()
    assert out.std() > 1e-3, f"logits {out.tolist()} are constant over 8 different feature maps"


@pytest.mark.parametrize("shape, match", [((16, 8, 4), "square"), ((8, 4), r"\(C,\) or \(C, H, W\)"),
                                          ((2, 3, 4, 4), r"\(C,\) or \(C, H, W\)"), ((), r"\(C,\) or \(C, H, W\)")])
def test_gan_head_rejects_bad_feature_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        GANHead(shape)


@pytest.mark.parametrize("shape, bad", [((64,), (2, 32)), ((16, 8, 8), (2, 16, 4, 4)), ((16, 8, 8), (2, 8, 8, 8)),
                                        ((64,), (2, 64, 1))])
def test_gan_head_forward_names_the_expected_shape(shape, bad):
    with pytest.raises(ValueError, match=rf"built for features of shape {re.escape(str(shape))}"):
        _head(shape)(torch.zeros(bad))


# --------------------------------------------------------------------------------------------------------------
# multistep_generate and backward_simulation
# --------------------------------------------------------------------------------------------------------------

class FakeStudent:
    """x0 = 0.5 * x; records (sigma, input, grad enabled) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma):
        self.calls.append((sigma.clone(), x.clone(), torch.is_grad_enabled()))
        return 0.5 * x


@pytest.mark.parametrize("shape", [(6, 2), (2, 3, 4, 4)])
@pytest.mark.parametrize("sigmas", [SIGMAS, (5.0,), [8.0, 0.5]])
def test_multistep_generate_visits_sigmas_in_order_with_fresh_noise(shape, sigmas):
    student, noise = FakeStudent(), randn(*shape, seed=1)
    predictions, inputs = multistep_generate(student, noise, sigmas, gen(7))
    assert len(predictions) == len(inputs) == len(student.calls) == len(sigmas)
    for (sigma, _, _), s in zip(student.calls, sigmas):
        assert sigma.shape == (shape[0],) and (sigma == s).all(), (sigma, s)
    torch.testing.assert_close(inputs[0], sigmas[0] * noise, rtol=0, atol=0)
    replay = gen(7)
    for k in range(1, len(sigmas)):
        fresh = torch.randn(shape, generator=replay)
        torch.testing.assert_close(inputs[k], predictions[k - 1] + sigmas[k] * fresh, rtol=1e-6, atol=1e-6)
    for k, (_, x_in, _) in enumerate(student.calls):
        torch.testing.assert_close(x_in, inputs[k], rtol=0, atol=0)
        torch.testing.assert_close(predictions[k], 0.5 * inputs[k], rtol=0, atol=0)


def test_multistep_generate_fresh_noise_differs_from_the_initial_noise():
    # The re-noising must not reuse `noise`: its residual is independent of it.
    noise = randn(2000, 1, seed=1)
    _, inputs = multistep_generate(lambda x, s: 0 * x, noise, (4.0, 2.0), gen(3))
    residual = inputs[1] / 2.0
    assert abs(torch.corrcoef(torch.stack([residual[:, 0], noise[:, 0]]))[0, 1]) < 0.1
    assert residual.std().item() == pytest.approx(1.0, abs=0.1)


def test_multistep_generate_rejects_empty_sigmas():
    with pytest.raises(ValueError, match="at least one noise level"):
        multistep_generate(FakeStudent(), torch.zeros(2, 2), ())


def test_backward_simulation_k0_is_scaled_noise_without_calling_the_student():
    student, noise = FakeStudent(), randn(5, 2, seed=1)
    out = backward_simulation(student, noise, SIGMAS, 0, gen(0))
    torch.testing.assert_close(out, SIGMAS[0] * noise, rtol=0, atol=0)
    assert student.calls == []


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("shape", [(5, 2), (2, 3, 4, 4)])
def test_backward_simulation_runs_k_steps_without_grad(k, shape):
    student, noise = FakeStudent(), randn(*shape, seed=1)
    out = backward_simulation(student, noise, SIGMAS, k, gen(9))
    assert [c[0][0].item() for c in student.calls] == pytest.approx(list(SIGMAS[:k]))
    assert not any(c[2] for c in student.calls), "backward simulation must run under no_grad"
    # Replay: fresh start noise, then k - 1 fresh re-noisings, then `noise` itself at sigma_k.
    replay = gen(9)
    x = SIGMAS[0] * torch.randn(shape, generator=replay)
    for j in range(1, k):
        x = 0.5 * x + SIGMAS[j] * torch.randn(shape, generator=replay)
    expected = 0.5 * x + SIGMAS[k] * noise
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    last_prediction = 0.5 * student.calls[-1][1]
    torch.testing.assert_close(out - last_prediction, SIGMAS[k] * noise, rtol=1e-5, atol=1e-5)


def test_backward_simulation_output_has_no_graph_with_a_trainable_student():
    torch.manual_seed(0)
    student = MLPDenoiser(2, hidden=16, depth=2)
    assert any(p.requires_grad for p in student.parameters())
    for k in range(len(SIGMAS)):
        out = backward_simulation(student, randn(4, 2, seed=k), SIGMAS, k, gen(k))
        assert not out.requires_grad and out.grad_fn is None and out.shape == (4, 2)


@pytest.mark.parametrize("k", [-1, 4, 10])
def test_backward_simulation_rejects_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"0\.\.3"):
        backward_simulation(FakeStudent(), torch.zeros(2, 2), SIGMAS, k)


# --------------------------------------------------------------------------------------------------------------
# DMD2Settings and CriticWithHead
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dm_weight", "regression_weight", "gan_generator_weight",
                                  "gan_discriminator_weight"])
@pytest.mark.parametrize("value", [-0.1, float("nan")])
def test_settings_reject_negative_or_nan_weights(name, value):
    with pytest.raises(ValueError, match=name):
        DMD2Settings(**{name: value})


@pytest.mark.parametrize("weights", [(0.1, 0.0), (0.0, 0.1)])
def test_settings_reject_half_a_gan(weights):
    with pytest.raises(ValueError, match="both"):
        DMD2Settings(gan_generator_weight=weights[0], gan_discriminator_weight=weights[1])


@pytest.mark.parametrize("sigmas", [(), (1.0, 2.0), (2.0, 2.0), (3.0, 1.0, 1.5), (1.0, 0.0), (2.0, -1.0),
                                    (5.0, float("nan"), 1.0), (float("nan"),)],
                         ids=["empty", "increasing", "equal", "not-monotone", "zero", "negative", "nan-inside",
                              "nan-alone"])
def test_settings_reject_bad_student_sigmas(sigmas):
    with pytest.raises(ValueError, match="strictly decreasing"):
        DMD2Settings(student_sigmas=sigmas)


def test_settings_gan_flag_and_sigma_normalisation():
    assert not DMD2Settings().gan
    assert DMD2Settings(gan_generator_weight=3e-3, gan_discriminator_weight=1e-2).gan
    s = DMD2Settings(student_sigmas=[4, 1.5, 0.25])
    assert s.student_sigmas == (4.0, 1.5, 0.25) and isinstance(s.student_sigmas, tuple)
    assert all(isinstance(v, float) for v in s.student_sigmas)
    assert DMD2Settings(student_sigmas=(2.0,)).student_sigmas == (2.0,)


class PlainDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, sigma):
        return self.lin(x)


def _tiny_denoiser(seed):
    torch.manual_seed(seed)
    return MLPDenoiser(2, hidden=16, depth=2)


def test_critic_with_head_forward_is_the_critics_and_logits_read_its_features():
    critic, head = _tiny_denoiser(0), _head((16,), seed=1)
    both = CriticWithHead(critic, head)
    x, sigma = randn(6, 2, seed=2), torch.linspace(0.1, 5.0, 6)
    torch.testing.assert_close(both(x, sigma), critic(x, sigma), rtol=0, atol=0)
    logits = both.logits(x, sigma)
    assert logits.shape == (6,)
    torch.testing.assert_close(logits, head(critic.features(x, sigma)), rtol=0, atol=0)
    assert {id(p) for p in both.parameters()} == {id(p) for p in [*critic.parameters(), *head.parameters()]}


def test_critic_with_head_uses_passed_features():
    critic, teacher, head = _tiny_denoiser(0), _tiny_denoiser(3).requires_grad_(False), _head((16,), seed=1)
    both = CriticWithHead(critic, head, teacher.features)
    x, sigma = randn(6, 2, seed=2), torch.full((6,), 0.7)
    torch.testing.assert_close(both.logits(x, sigma), head(teacher.features(x, sigma)), rtol=0, atol=0)
    assert not torch.allclose(both.logits(x, sigma), head(critic.features(x, sigma)))
    # The teacher is read, not owned: its parameters are not the critic player's to train.
    assert {id(p) for p in both.parameters()} == {id(p) for p in [*critic.parameters(), *head.parameters()]}
    # A plain denoiser works when features are passed...
    plain = CriticWithHead(PlainDenoiser(), head, teacher.features)
    assert plain.logits(x, sigma).shape == (6,)


def test_critic_with_head_without_features_raises():
    with pytest.raises(ValueError, match="PlainDenoiser has no .features"):
        CriticWithHead(PlainDenoiser(), _head((16,)))


# --------------------------------------------------------------------------------------------------------------
# DMD2Objective with the GAN and multi-step students
# --------------------------------------------------------------------------------------------------------------

GAN = dict(gan_generator_weight=0.3, gan_discriminator_weight=0.7)
BATCH = 8


class RecordingStudent(nn.Module):
    """A trainable multi-step student that records (input, sigma, grad enabled) of every call."""

    def __init__(self, seed=0):
        super().__init__()
        self.inner, self.calls = _tiny_denoiser(seed), []

    def forward(self, x, sigma):
        self.calls.append((x.detach().clone(), torch.as_tensor(sigma).detach().clone(), torch.is_grad_enabled()))
        return self.inner(x, sigma)


def sample_real(n, rng):
    return DATA.sample(n, rng)


def latents(n, rng):
    return torch.randn(n, 2, generator=rng)


def make_objective(head=True, multistep=False, real=sample_real, keep_inputs=4, **settings):
    generator = RecordingStudent(0) if multistep else (torch.manual_seed(0), MLPGenerator(hidden=16, depth=2))[1]
    critic = _tiny_denoiser(1)
    fake = CriticWithHead(critic, _head((16,), seed=2)) if head else critic
    if multistep:
        settings.setdefault("student_sigmas", SIGMAS)
    return DMD2Objective(generator, fake, DATA.denoise, SMALL_SCHEDULE, latents,
                         DMD2Settings(batch_size=BATCH, **settings), sample_real=real, keep_inputs=keep_inputs)


def test_objective_gan_needs_a_head_and_real_data():
    with pytest.raises(ValueError, match="CriticWithHead"):
        make_objective(head=False, **GAN)
    with pytest.raises(ValueError, match="sample_real"):
        make_objective(real=None, **GAN)
    with pytest.raises(ValueError, match="sample_real"):
        make_objective(multistep=True, real=None, backward_simulation=False)
    make_objective(multistep=True, real=None, backward_simulation=True)  # backward simulation needs no data
    make_objective(head=False, real=None)  # plain DMD2 needs neither


def _one_round(objective, seed=0):
    rng = gen(seed)
    context = objective.prepare(0, ["generator", "critic"], rng)
    g_loss, g_logs = objective.loss("generator", context, rng)
    c_loss, c_logs = objective.loss("critic", context, rng)
    return context, (g_loss, g_logs), (c_loss, c_logs)


@pytest.mark.parametrize("multistep", [False, True])
def test_objective_with_gan_logs_every_gan_quantity(multistep):
    objective = make_objective(multistep=multistep, **GAN)
    context, (g_loss, g_logs), (c_loss, c_logs) = _one_round(objective)
    assert context["real"].shape == (BATCH, 2) and context["x"].shape == (BATCH, 2)
    assert torch.isfinite(g_loss) and torch.isfinite(c_loss)
    assert {"dm_loss", "gan_generator_loss"} <= g_logs.keys()
    assert {"critic_loss", "gan_discriminator_loss", "discriminator_accuracy"} <= c_logs.keys()
    assert 0 <= c_logs["discriminator_accuracy"].item() <= 1
    # Unweighted logs; the returned losses are the weighted sums.
    assert g_loss.item() == pytest.approx(g_logs["dm_loss"].item() + 0.3 * g_logs["gan_generator_loss"].item(),
                                          rel=1e-5)
    assert c_loss.item() == pytest.approx(c_logs["critic_loss"].item()
                                          + 0.7 * c_logs["gan_discriminator_loss"].item(), rel=1e-5)


def test_objective_without_any_generator_loss_is_rejected_up_front():
    # dm_weight = 0 with no GAN and no regression leaves the generator a constant loss with no graph; it should be
    # refused when built (ValueError), not fail later inside loss.backward().
    with pytest.raises(ValueError):
        make_objective(head=False, dm_weight=0.0)


def test_objective_without_gan_logs_no_gan_quantity():
    _, (_, g_logs), (_, c_logs) = _one_round(make_objective(head=False))
    assert not any("gan" in k or "discriminator" in k for k in {**g_logs, **c_logs})


def _prepared(objective, seed):
    """One prepared batch, the loop's RNG after it, and a clone of that RNG to replay the loss's draws."""
    rng = gen(seed)
    context = objective.prepare(0, ["generator", "critic"], rng)
    return context, rng, clone_rng(rng)


def test_objective_losses_equal_recomputation_from_dmd_pieces():
    objective = make_objective(**GAN)
    context, rng, replay = _prepared(objective, 4)
    g_loss, _ = objective.loss("generator", context, rng)
    dm, _ = dmd.distribution_matching_step(context["x"], DATA.denoise, objective.fake, SMALL_SCHEDULE, None, replay)
    gan = gan_generator_loss(gan_logits(objective.fake.logits, context["x"], SMALL_SCHEDULE, None, replay))
    torch.testing.assert_close(g_loss, dm + 0.3 * gan)

    replay = clone_rng(rng)
    c_loss, c_logs = objective.loss("critic", context, rng)
    dsm, _ = dmd.fake_score_loss(objective.fake, context["x"], SMALL_SCHEDULE, "edm", 0.5, None, replay)
    real_logits, fake_logits = gan_logits(objective.fake.logits, torch.cat([context["real"], context["x"].detach()]),
                                          SMALL_SCHEDULE, None, replay).chunk(2)
    torch.testing.assert_close(c_loss, dsm + 0.7 * gan_discriminator_loss(real_logits, fake_logits))
    accuracy = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
    torch.testing.assert_close(c_logs["discriminator_accuracy"], accuracy)


def test_gan_only_generator_loss_is_the_weighted_gan_loss():
    objective = make_objective(dm_weight=0.0, **GAN)
    context, rng, replay = _prepared(objective, 1)
    loss, logs = objective.loss("generator", context, rng)
    assert "dm_loss" not in logs and "real_fake_gap" not in logs
    gan = gan_generator_loss(gan_logits(objective.fake.logits, context["x"], SMALL_SCHEDULE, None, replay))
    torch.testing.assert_close(loss, 0.3 * gan)
    torch.testing.assert_close(logs["gan_generator_loss"], gan.detach())
    # Its gradient reaches every generator parameter.
    loss.backward()
    for name, p in objective.generator.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_critic_gan_term_trains_the_head_and_the_critic_body_but_not_the_generator():
    objective = make_objective(**GAN)
    context, rng, replay = _prepared(objective, 2)
    loss, _ = objective.loss("critic", context, rng)
    dsm, _ = dmd.fake_score_loss(objective.fake, context["x"], SMALL_SCHEDULE, "edm", 0.5, None, replay)
    (loss - dsm).backward()  # the GAN term alone (same draws as inside the objective)
    head, critic = objective.fake.head, objective.fake.critic
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"head.{name}"
    for name, p in critic.named_parameters():
        if name.startswith("out."):  # the denoiser's output layer is not part of the features
            assert p.grad is None or p.grad.abs().max() < 1e-6, f"critic.{name}"
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, f"critic.{name}"
    assert all(p.grad is None for p in objective.generator.parameters()), "the critic loss must detach x"


def test_generator_batch_has_grad_only_when_the_generator_updates():
    for multistep in (False, True):
        objective = make_objective(multistep=multistep, **GAN)
        assert objective.prepare(0, ["generator", "critic"], gen(0))["x"].requires_grad
        context = objective.prepare(1, ["critic"], gen(0))
        assert not context["x"].requires_grad and not context["real"].requires_grad


def _draw_k(rng, num_steps):
    """Replay prepare's draws without GAN: latents, then the step k."""
    z = torch.randn(BATCH, 2, generator=rng)
    return z, int(torch.randint(0, num_steps, (), generator=rng))


@pytest.mark.parametrize("keep", [1, 2])
def test_backward_simulation_training_inputs_match_inference(keep):
    objective = make_objective(multistep=True, keep_inputs=keep)
    student, rng, counts = objective.generator, gen(3), {}
    for step in range(14):
        student.calls.clear()
        z, k = _draw_k(clone_rng(rng), len(SIGMAS))
        context = objective.prepare(step, ["generator", "critic"], rng)
        counts[k] = counts.get(k, 0) + 1
        # k no-grad steps of backward simulation at sigmas[0..k-1], then the trained call at sigma_k with grad.
        assert len(student.calls) == k + 1
        for j, (_, sigma, grad) in enumerate(student.calls):
            assert (sigma == SIGMAS[j]).all() and grad == (j == k), (k, j, sigma, grad)
        x_in = student.calls[-1][0]
        torch.testing.assert_close(objective.recent_inputs[k][-1], x_in, rtol=0, atol=0)
        if k == 0:
            torch.testing.assert_close(x_in, SIGMAS[0] * z, rtol=0, atol=0)
        else:
            with torch.no_grad():
                last = student.inner(student.calls[k - 1][0], student.calls[k - 1][1])
            torch.testing.assert_close(x_in, last + SIGMAS[k] * z, rtol=1e-5, atol=1e-5)
        assert context["x"].requires_grad
    assert len(counts) > 1, counts
    assert set(objective.recent_inputs) == set(counts)
    for k, n in counts.items():
        assert len(objective.recent_inputs[k]) == min(n, keep), (k, n, keep)
        assert all(not t.requires_grad and t.shape == (BATCH, 2) for t in objective.recent_inputs[k])


def test_keep_inputs_zero_keeps_nothing():
    objective = make_objective(multistep=True, keep_inputs=0)
    rng = gen(0)
    for step in range(6):
        objective.prepare(step, ["critic"], rng)
    assert all(len(v) == 0 for v in objective.recent_inputs.values()), \
        {k: len(v) for k, v in objective.recent_inputs.items()}


def test_without_backward_simulation_inputs_are_noised_real_data():
    const = torch.tensor([0.25, -1.5])
    objective = make_objective(multistep=True, backward_simulation=False, real=lambda n, rng: const.expand(n, 2))
    student, rng, seen = objective.generator, gen(5), set()
    for step in range(8):
        student.calls.clear()
        z, k = _draw_k(clone_rng(rng), len(SIGMAS))
        objective.prepare(step, ["generator"], rng)
        assert len(student.calls) == 1 and (student.calls[0][1] == SIGMAS[k]).all()
        x_in = objective.recent_inputs[k][-1]
        torch.testing.assert_close(x_in, student.calls[0][0], rtol=0, atol=0)
        torch.testing.assert_close((x_in - const) / SIGMAS[k], z, rtol=1e-5, atol=1e-5)
        seen.add(k)
    assert len(seen) > 1
    # The recovered noise is standard normal-ish.
    noise = torch.cat([(x - const) / SIGMAS[k] for k, xs in objective.recent_inputs.items() for x in xs])
    assert abs(noise.mean().item()) < 0.5 and 0.6 < noise.std().item() < 1.4


@pytest.mark.parametrize("multistep", [False, True])
def test_trainer_runs_gan_objective_end_to_end(multistep):
    objective = make_objective(multistep=multistep, **GAN)
    head_before = [p.detach().clone() for p in objective.fake.head.parameters()]
    trainer = Trainer(objective, objective.players(1e-3, 1e-3, ratio=2, weight_decay=0.0),
                      TrainConfig(10, log_every=5))
    history = trainer.fit()
    assert trainer.step == 10 and len(history) == 2
    for row in history:
        assert {"gan_generator_loss", "gan_discriminator_loss", "discriminator_accuracy"} <= row.keys(), row.keys()
        assert all(math.isfinite(v) for v in row.values()), row
    assert any(not torch.equal(a, b) for a, b in zip(head_before, objective.fake.head.parameters()))
    if multistep:
        assert objective.recent_inputs and all(len(v) <= 4 for v in objective.recent_inputs.values())


# --------------------------------------------------------------------------------------------------------------
# toy_experiments.distill with the GAN and multi-step students
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_teacher():
    return _tiny_denoiser(11).requires_grad_(False).eval()


@pytest.fixture(scope="module")
def real_data():
    return DATA.sample(256, gen(12))


def _distill(teacher, **kw):
    return toy_experiments.distill(teacher, DATA, generator_steps=3, ratio=2, batch_size=32, **kw)


@pytest.mark.parametrize("head_features", ["critic", "teacher"])
def test_distill_with_gan_runs(tiny_teacher, real_data, head_features):
    run = _distill(tiny_teacher, gan_weights=(0.3, 1.0), real_data=real_data, head_features=head_features)
    samples = run.sample(50)
    assert samples.shape == (50, 2) and torch.isfinite(samples).all()
    assert isinstance(run.critic, CriticWithHead)
    logged = {k for row in run.trainer.history for k in row}  # the last row may hold critic-only steps
    assert {"gan_generator_loss", "gan_discriminator_loss", "discriminator_accuracy"} <= logged
    assert all(math.isfinite(v) for row in run.trainer.history for v in row.values())
    assert not any(p.requires_grad for p in tiny_teacher.parameters()), "distill must leave the teacher frozen"


@pytest.mark.parametrize("backward", [True, False])
def test_distill_multistep_student_runs(tiny_teacher, real_data, backward):
    sigmas = toy_experiments.student_sigmas()
    assert len(sigmas) == 4 and all(a > b > 0 for a, b in zip(sigmas, sigmas[1:]))
    run = _distill(tiny_teacher, student_sigmas=sigmas, backward_simulation=backward,
                   real_data=None if backward else real_data)
    for k in range(1, 5):
        samples = run.sample(50, steps=k)
        assert samples.shape == (50, 2) and torch.isfinite(samples).all(), k
    torch.testing.assert_close(run.sample(50), run.sample(50, steps=4), rtol=0, atol=0)
    inputs = run.step_inputs(50)
    assert len(inputs) == 4 and all(t.shape == (50, 2) and torch.isfinite(t).all() for t in inputs)
    assert run.objective.recent_inputs


def test_distill_rejects_bad_gan_options(tiny_teacher, real_data):
    with pytest.raises(ValueError, match="head_features"):
        _distill(tiny_teacher, gan_weights=(0.3, 1.0), real_data=real_data, head_features="nope")
    with pytest.raises(ValueError, match="learned critic"):
        _distill(tiny_teacher, critic="oracle", gan_weights=(0.3, 1.0), real_data=real_data)
    with pytest.raises(ValueError, match="real_data"):
        _distill(tiny_teacher, gan_weights=(0.3, 1.0))
    with pytest.raises(ValueError, match="gan_weights"):
        _distill(tiny_teacher, gan_weights=(0.3, 0.0), real_data=real_data)


@pytest.mark.parametrize("case", ["oracle-multistep", "teacher-features-of-a-function"])
def test_distill_rejects_unsupported_combinations_with_value_error(tiny_teacher, real_data, case):
    """Unsupported combinations get a ValueError that says why, like distill's other checks, not an
    AttributeError from deep inside (an oracle fake score samples generator(randn(n, noise_dim)), which a
    multi-step student does not have; a function teacher has no .features for the head)."""
    if case == "oracle-multistep":
        call = lambda: _distill(tiny_teacher, critic="oracle",  # noqa: E731
                                student_sigmas=toy_experiments.student_sigmas())
    else:
        call = lambda: _distill(DATA.denoise, gan_weights=(0.3, 1.0), real_data=real_data,  # noqa: E731
                                head_features="teacher")
    with pytest.raises(ValueError):
        call()
