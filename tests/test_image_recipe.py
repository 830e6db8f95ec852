"""The image recipe end to end on CPU with tiny settings: configs, train-teacher, distill (and its resume),
train-classifier, sample, eval — through the command line a user types."""
import csv
import json
from pathlib import Path

import pytest
import torch

from dmd2lab import image_recipe as recipe
from dmd2lab.cli import main
from dmd2lab.image_models import read_metadata

torch.set_num_threads(1)
MINI = str(Path(__file__).parents[1] / "data" / "fmnist-mini")
CONFIGS = Path(__file__).parents[1] / "configs"
TINY_TEACHER = ["steps=4", "batch_size=4", "log_every=2", "checkpoint_every=2", "warmup_steps=1", "progress=False",
                f"data_root={MINI}"]


def tiny_distill(teacher, *extra):
    return ["steps=6", "batch_size=4", "log_every=1", "checkpoint_every=3", "warmup_steps=2", "progress=False",
            "eval_every=0", f"teacher={teacher}", f"data_root={MINI}", *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--config", str(CONFIGS / "fmnist.yaml"), "--out", str(out), "--set",
                 *TINY_TEACHER]) == 0
    return out / "teacher.safetensors"


def test_shipped_configs_parse_and_name_real_presets():
    for path in sorted(CONFIGS.glob("*.yaml")):
        for kind in ("teacher", "distill"):
            config = recipe.load_config(kind, path)
            assert config.dataset == path.stem


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown distill setting.*'stepz'.*valid: dataset"):
        recipe.load_config("distill", None, {"stepz": 3})
    with pytest.raises(ValueError, match="DistillConfig.steps must be int"):
        recipe.load_config("distill", None, {"steps": "many"})
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        recipe.load_config("teacher", None, {"dataset": "mnist"})
    with pytest.raises(ValueError, match="ratio"):
        recipe.load_config("distill", None, {"ratio": 0})
    with pytest.raises(FileNotFoundError, match="configs/fmnist.yaml"):
        recipe.load_config("distill", "absent.yaml")
    assert recipe.load_config("distill", None, {"lr": 1}).lr == 1.0 and recipe.load_config(
        "distill", None, {"ema_decay": None}).ema_decay is None


def test_cli_reports_bad_settings_without_a_traceback(capsys):
    assert main(["distill", "--out", "x", "--set", "nonsense"]) == 2
    assert "name=value" in capsys.readouterr().err
    assert main(["distill", "--out", "x", "--set", "bogus=1"]) == 2
    assert "unknown distill setting" in capsys.readouterr().err


def test_teacher_file_records_how_it_was_made(teacher):
    config, meta = read_metadata(teacher)
    assert meta["role"] == "teacher" and meta["steps"] == 4 and meta["config"]["batch_size"] == 4
    assert config["unet"]["block_out_channels"] == [16, 32, 64]


def test_distill_resumes_to_the_same_result_as_an_uninterrupted_run(teacher, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["distill", "--config", str(CONFIGS / "fmnist.yaml"), "--out", str(whole), "--set",
                 *tiny_distill(teacher)]) == 0
    # Interrupted after its step-3 checkpoint, then run again with the same command: it resumes there.
    assert main(["distill", "--config", str(CONFIGS / "fmnist.yaml"), "--out", str(split), "--set",
                 *tiny_distill(teacher, "steps=3")]) == 0
    assert (split / "latest").read_text().strip() == "step-00000003"
    assert main(["distill", "--config", str(CONFIGS / "fmnist.yaml"), "--out", str(split), "--set",
                 *tiny_distill(teacher)]) == 0
    rows = [list(csv.DictReader(open(p / "log.csv"))) for p in (whole, split)]
    assert [r["step"] for r in rows[1]] == [str(s) for s in range(1, 7)]
    for a, b in zip(*rows):
        assert {k: v for k, v in a.items() if k != "elapsed_s"} == {k: v for k, v in b.items() if k != "elapsed_s"}
    from safetensors.torch import load_file
    wa, wb = load_file(str(whole / "student.safetensors")), load_file(str(split / "student.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_metadata(whole / "student.safetensors")[1]["role"] == "student"


def test_distill_logs_every_loss_of_dmd2(teacher, tmp_path):
    assert main(["distill", "--config", str(CONFIGS / "fmnist.yaml"), "--out", str(tmp_path), "--set",
                 *tiny_distill(teacher, "steps=5")]) == 0
    keys = set(next(csv.DictReader(open(tmp_path / "log.csv"))))
    assert {"dm_loss", "gan_generator_loss", "critic_loss", "gan_discriminator_loss", "discriminator_accuracy",
            "real_fake_gap"} <= keys


def test_sample_and_eval_commands(teacher, tmp_path, capsys):
    classifier = tmp_path / "classifier.safetensors"
    assert main(["train-classifier", "--out", str(classifier), "--data-root", MINI, "--steps", "3"]) == 0
    assert main(["sample", "--model", str(teacher), "--out", str(tmp_path / "grid.png"), "--num", "4",
                 "--steps", "2"]) == 0
    images = torch.load(tmp_path / "grid.pt")
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8
    assert (tmp_path / "grid.png").stat().st_size > 100
    capsys.readouterr()
    assert main(["eval", "--model", str(teacher), "--steps", "2", "--num", "8", "--classifier", str(classifier),
                 "--data-root", MINI, "--batch-size", "4", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["nfe"] == 3 and metrics["classifier_fid"] >= 0 and metrics["images_per_s"] > 0
    assert main(["eval", "--model", str(teacher), "--num", "0"]) == 2
    assert main(["sample", "--model", str(tmp_path / "absent.safetensors"), "--out", "x.png"]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_student_samples_in_one_step_only(teacher, tmp_path):
    assert main(["distill", "--out", str(tmp_path), "--set", *tiny_distill(teacher, "steps=1")]) == 0
    with pytest.raises(ValueError, match="one-step student"):
        recipe.file_sampler(tmp_path / "student.safetensors", 4, "cpu")
    sample, nfe, meta = recipe.file_sampler(tmp_path / "student.safetensors", None, "cpu")
    assert nfe == 1 and sample(3, 0).shape == (3, 1, 32, 32)


def test_class_conditional_teacher_and_distillation(tmp_path):
    """DMD2's ImageNet-64 setting: a class-conditional teacher, so generator, critic and GAN head are conditioned,
    each generator sample on a drawn label and each real image on its own."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    assert main(["train-teacher", "--out", str(teacher_dir), "--set", *TINY_TEACHER, "class_conditional=True"]) == 0
    teacher = teacher_dir / "teacher.safetensors"
    assert read_metadata(teacher)[0]["unet"]["num_class_embeds"] == 10
    run = recipe.build_distillation(recipe.load_config("distill", None, dict(
        teacher=str(teacher), data_root=MINI, steps=2, batch_size=4, progress=False, checkpoint_every=0)))
    seen = []
    critic = run.critic.critic
    original = critic.forward
    critic.forward = lambda x, sigma, class_labels=None: seen.append(class_labels) or original(x, sigma, class_labels)
    run.trainer.fit()
    assert seen and all(labels is not None and labels.shape == (4,) for labels in seen)
    assert main(["distill", "--out", str(student_dir), "--set", *tiny_distill(teacher, "steps=2")]) == 0
    sample, nfe, _ = recipe.file_sampler(student_dir / "student.safetensors", None, "cpu")
    assert sample(5, 0).shape == (5, 1, 32, 32)
    a, b = recipe.fixed_noise(6, (1, 2, 2), 3, "cpu", 10), recipe.fixed_noise(6, (1, 2, 2), 3, "cpu", 10)
    assert torch.equal(a[1]["class_labels"], b[1]["class_labels"]) and a[1]["class_labels"].max() < 10


def test_distil_a_pretrained_diffusers_vp_model(tmp_path, monkeypatch):
    """A DDPM-style diffusers folder as the teacher: DMD2 runs on its own scheduler's table (generator at its
    largest sigma, epsilon-weighted critic), and the student file reloads from that folder plus its own weights."""
    from diffusers import DDPMScheduler, UNet2DModel
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    folder = tmp_path / "ddpm"
    UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                add_attention=False).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    config = recipe.load_config("distill", None, dict(teacher=str(folder), data_root=MINI, steps=2, batch_size=4,
                                                      progress=False, checkpoint_every=0, log_every=1))
    run, path = recipe.distill(config, tmp_path / "run")
    schedule, weighting = recipe.teacher_schedule(run.teacher, config)
    assert weighting == "eps" and run.generator.sigma == pytest.approx(float(schedule.sigmas[-1]))
    assert run.generator.sigma > 100  # DDPM's linear betas end near sigma 157, not EDM's 80
    reloaded, _ = recipe.load_sampler(path)
    z = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(reloaded(z), run.generator(z))
