"""Image denoisers: EDM preconditioning, the VP wrapper against Tweedie's formula for Gaussian data, bottleneck
features, the one-step generator, files, EDM pickles, FLOP counts."""
import pickle
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dmd2lab import image_models as im

torch.set_num_threads(1)

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
            add_attention=False)


def tiny_denoiser(**overrides) -> im.EDMDenoiser:
    torch.manual_seed(0)
    return im.EDMDenoiser.from_config(dict(TINY, **overrides))


def test_edm_preconditioning_is_c_skip_x_when_the_network_outputs_zero():
    d = tiny_denoiser()
    nn.init.zeros_(d.unet.conv_out.weight), nn.init.zeros_(d.unet.conv_out.bias)
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.01, 0.5, 80.0])
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(d(x, sigma), c_skip[:, None, None, None] * x)


def test_edm_denoiser_recovers_clean_input_at_tiny_sigma_and_is_bounded_at_huge_sigma():
    d = tiny_denoiser()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        # c_out -> sigma, so the network's output barely matters at sigma -> 0 (D is the identity there)...
        torch.testing.assert_close(d(x, 1e-6), x, atol=1e-5, rtol=0)
        # ...and c_skip -> 0, c_out -> sigma_data at sigma -> inf: D stays O(sigma_data * |F|), not O(sigma).
        assert d(x * 1e4, 1e4).abs().max() < 50


def test_labels_are_checked_against_the_network():
    plain, cond = tiny_denoiser(), tiny_denoiser(num_class_embeds=3)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, 1.0, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional"):
        cond(x, 1.0)
    with pytest.raises(ValueError, match="shape"):
        cond(x, 1.0, class_labels=torch.tensor([0]))
    a, b = cond(x, 1.0, torch.tensor([0, 0])), cond(x, 1.0, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)


def test_features_are_the_mid_block_output_and_carry_gradients():
    d = tiny_denoiser()
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    seen = []
    handle = d.unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o))
    d(x, 2.0)
    handle.remove()
    features = d.features(x, 2.0)
    torch.testing.assert_close(features, seen[0])
    assert features.shape == (2, 16, 4, 4)
    features.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # The cut forward pass leaves no hook behind.
    assert not d.unet.mid_block._forward_hooks


def test_bottleneck_says_when_the_module_never_runs():
    with pytest.raises(RuntimeError, match="never ran"):
        im.bottleneck(lambda: None, nn.Linear(1, 1))


def test_one_step_generator_is_the_denoiser_at_its_sigma():
    d = tiny_denoiser()
    g = im.OneStepGenerator(d, 80.0)
    z = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(g(z), d(80.0 * z, torch.full((2,), 80.0)))
    with pytest.raises(ValueError, match="> 0"):
        im.OneStepGenerator(d, 0.0)


def test_trainable_copy_is_independent_and_trainable():
    d = tiny_denoiser().requires_grad_(False)
    c = im.trainable_copy(d)
    assert all(p.requires_grad for p in c.parameters())
    assert not any(p.requires_grad for p in d.parameters())
    next(c.parameters()).data.add_(1.0)
    assert not torch.equal(next(c.parameters()), next(d.parameters()))


def test_edm_sigmas_are_log_normal():
    s = im.edm_sigmas(200_000, torch.Generator().manual_seed(0))
    assert abs(s.log().mean().item() + 1.2) < 0.01 and abs(s.log().std().item() - 1.2) < 0.01


# ------------------------------------------------------------------------------------ VP wrapper, exactly
class GaussianVPModel(nn.Module):
    """The exact VP model for data x0 ~ N(0, s^2 I): its output at (x_vp, t) is E[eps | x_vp] (or v, or x0),
    with the noise level of fractional t read off the scheduler's table the way VPDenoiser interpolates it."""

    def __init__(self, scheduler, s: float, kind: str):
        super().__init__()
        a = scheduler.alphas_cumprod.double()
        self.log_sigmas, self.s, self.kind = ((1 - a) / a).sqrt().log(), s, kind
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_vp, t, class_labels=None):
        lo = t.double().floor().long().clamp(0, len(self.log_sigmas) - 2)
        log_sigma = self.log_sigmas[lo] + (t.double() - lo) * (self.log_sigmas[lo + 1] - self.log_sigmas[lo])
        a = (1 / (1 + log_sigma.exp() ** 2))[:, None, None, None]
        x = x_vp.double()
        eps = (1 - a).sqrt() * x / (a * self.s ** 2 + 1 - a)
        x0 = a.sqrt() * self.s ** 2 * x / (a * self.s ** 2 + 1 - a)
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.kind]
        return SimpleNamespace(sample=out.to(x_vp.dtype))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_vp_denoiser_is_tweedie_for_gaussian_data(kind):
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    s = 0.7
    d = im.VPDenoiser(GaussianVPModel(scheduler, s, kind), scheduler)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64) * 3
    sigma = torch.tensor([0.05, 0.9, 7.0, 100.0], dtype=torch.float64)
    expected = s ** 2 / (s ** 2 + sigma ** 2)[:, None, None, None] * x  # E[x0 | x0 + sigma eps]
    torch.testing.assert_close(d(x, sigma), expected, rtol=1e-9, atol=1e-12)


def test_vp_timestep_inverts_the_table_and_clamps():
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    d = im.VPDenoiser(GaussianVPModel(scheduler, 1.0, "epsilon"), scheduler)
    table = d.log_sigmas.exp()
    torch.testing.assert_close(d.timestep(table[[0, 10, 999]]), torch.tensor([0.0, 10.0, 999.0], dtype=torch.float64))
    assert d.timestep(torch.tensor([1e-9, 1e9])).tolist() == [0.0, 999.0]


def test_load_vp_teacher_from_a_local_folder_and_missing_folder(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler, UNet2DModel
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    UNet2DModel(**TINY).save_pretrained(tmp_path / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")
    d, scheduler = im.load_vp_teacher(str(tmp_path))
    assert d(torch.randn(2, 1, 8, 8), 1.0).shape == (2, 1, 8, 8)
    assert d.features(torch.randn(2, 1, 8, 8), 1.0).shape == (2, 16, 4, 4)
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        im.load_vp_teacher(str(tmp_path / "absent"))


# ------------------------------------------------------------------------------------------------- files
def test_save_load_round_trip_keeps_outputs_and_metadata(tmp_path):
    d = tiny_denoiser()
    path = im.save_denoiser(d, tmp_path / "m.safetensors", {"role": "teacher", "fid": 3.5})
    loaded = im.load_denoiser(path)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x, 0.3), d(x, 0.3))
    config, meta = im.read_metadata(path)
    assert meta == {"role": "teacher", "fid": 3.5} and config["sigma_data"] == 0.5
    assert not list(tmp_path.glob(".*tmp"))


def test_missing_and_foreign_model_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data/README.md"):
        im.load_denoiser(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="save_denoiser"):
        im.load_denoiser(tmp_path / "foreign.safetensors")
    (tmp_path / "edm.pkl.safetensors").write_bytes(b"\x80\x04 a pickle, not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        im.load_denoiser(tmp_path / "edm.pkl.safetensors")


# ----------------------------------------------------------------------------------------- EDM pickles
EDM_NETWORKS = '''
import torch
from torch import nn

class FakeEDMPrecond(nn.Module):
    """Stands in for EDM's EDMPrecond: x0 = D(x, sigma, class_labels one-hot), encoder blocks in model.enc, dropout
    applied in train mode as EDM's blocks do (functional, rate an attribute)."""
    def __init__(self, label_dim):
        super().__init__()
        self.label_dim = label_dim
        self.dropout = 0.1
        self.model = nn.Module()
        self.model.enc = nn.ModuleDict({"a": nn.Conv2d(3, 4, 3, padding=1), "b": nn.Conv2d(4, 6, 3, stride=2, padding=1)})
        self.label = nn.Linear(max(label_dim, 1), 6)
    def forward(self, x, sigma, class_labels=None):
        h = self.model.enc["b"](self.model.enc["a"](x))
        if class_labels is not None:
            h = h + self.label(class_labels)[:, :, None, None]
        x = torch.nn.functional.dropout(x, p=self.dropout, training=self.training)
        return x / (1 + sigma[:, None, None, None]) + h.mean() * 0
'''


def test_edm_pickle_loads_with_its_code_and_reads_the_encoder(tmp_path):
    code = tmp_path / "edm"
    (code / "torch_utils").mkdir(parents=True)
    (code / "torch_utils" / "__init__.py").write_text("")
    (code / "training").mkdir()
    (code / "training" / "__init__.py").write_text("")
    (code / "training" / "networks.py").write_text(textwrap.dedent(EDM_NETWORKS))
    sys.path.insert(0, str(code))
    try:
        from training.networks import FakeEDMPrecond
        with open(tmp_path / "net.pkl", "wb") as f:
            pickle.dump({"ema": FakeEDMPrecond(5)}, f)
    finally:
        sys.path.remove(str(code))
        for name in [m for m in sys.modules if m == "training" or m.startswith("training.")]:
            del sys.modules[name]
    d = im.load_edm_pickle(tmp_path / "net.pkl", code)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(d(x, 1.0, torch.tensor([0, 4])), x / 2)
    assert d.features(x, 1.0, torch.tensor([0, 4])).shape == (2, 6, 4, 4)
    with pytest.raises(ValueError, match="class_labels"):
        d(x, 1.0)
    # DMD2 fine-tunes EDM's network without its dropout: a trainable copy is deterministic.
    trainable = im.trainable_copy(d)
    torch.testing.assert_close(trainable(x, 1.0, torch.tensor([0, 4])), x / 2)
    with pytest.raises(FileNotFoundError, match="NVlabs/edm"):
        im.load_edm_pickle(tmp_path / "net.pkl", tmp_path)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="did not unpickle"):
        im.load_edm_pickle(tmp_path / "junk.pkl", code)
    with pytest.raises(FileNotFoundError, match="pretrained"):
        im.load_edm_pickle(tmp_path / "absent.pkl", code)


def test_flops_are_counted_not_guessed():
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    assert im.flops_per_image(conv, torch.zeros(4, 1, 8, 8)) == 2 * 9 * 64


def test_presets_build_and_fit_their_datasets():
    from dmd2lab.image_data import DATASETS
    for name, config in im.UNET_PRESETS.items():
        info = DATASETS[name]
        assert (config["in_channels"], config["sample_size"]) == (info.channels, info.resolution)
    assert 0.5e6 < im.count_parameters(im.EDMDenoiser.from_config(im.UNET_PRESETS["fmnist"])) < 1e6


def test_bf16_autocast_keeps_the_preconditioning_in_float32():
    """At sigma -> 0, D(x) = c_skip x + c_out F ~ x: under bf16 autocast the skip path must stay float32, or x would
    come back rounded to bf16 (relative error 2^-8, about 0.01 on values of size 2)."""
    d = tiny_denoiser()
    x = torch.randn(2, 1, 8, 8) * 2
    with torch.autocast("cpu", torch.bfloat16):
        out = d(x, 1e-4)
    assert out.dtype == torch.float32
    assert (out - x).abs().max() < 1e-3
    assert (x.bfloat16().float() - x).abs().max() > 1e-3  # what rounding to bf16 would have cost
