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
    import yaml
    # The text-to-image recipes (a t2i section; tests/test_t2i_cli.py reads them) hold no image sections.
    image_configs = [p for p in sorted(CONFIGS.glob("*.yaml")) if "t2i" not in yaml.safe_load(p.read_text())]
    assert [p.stem for p in image_configs] == ["cifar10", "fmnist", "imagenet64"]
    for path in image_configs:
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
    # Settings fail before any file is read.
    with pytest.raises(ValueError, match="mixed_precision"):
        recipe.load_config("distill", None, {"mixed_precision": "bf17"})
    with pytest.raises(ValueError, match="ema_decay"):
        recipe.load_config("distill", None, {"ema_decay": 1.5})


def test_yaml_files_are_read_strictly_and_as_yaml_spells_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("distill:\n  lr: 2e-6\n  backward_simulation: true\n")
    assert recipe.load_config("distill", path).lr == 2e-6  # YAML 1.1 reads 2e-6 as a string
    with pytest.raises(ValueError, match="'teacher:' section"):
        recipe.load_config("teacher", path)
    path.write_text("techer:\n  steps: 3\ndistill:\n  steps: 3\n")
    with pytest.raises(ValueError, match="unknown section.*techer"):
        recipe.load_config("distill", path)
    from dmd2lab.cli import _settings
    settings = _settings(["backward_simulation=false", "lr=3e-5", "ema_decay=null", "seed=3", "student_steps=4"])
    config = recipe.load_config("distill", None, settings)
    assert (config.backward_simulation, config.lr, config.ema_decay, config.seed) == (False, 3e-5, None, 3)


def test_cli_reports_bad_settings_without_a_traceback(capsys):
    assert main(["distill", "--out", "x", "--set", "nonsense"]) == 2
    assert "name=value" in capsys.readouterr().err
    assert main(["distill", "--out", "x", "--set", "bogus=1"]) == 2
    assert "unknown distill setting" in capsys.readouterr().err


def test_teacher_file_records_how_it_was_made(teacher):
    config, meta = read_metadata(teacher)
    assert meta["role"] == "teacher" and meta["steps"] == 4 and meta["config"]["batch_size"] == 4
    assert meta["complete"] is True
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


def test_a_time_limited_run_says_it_is_unfinished_and_resumes(tmp_path, capsys):
    out = tmp_path / "teacher"
    assert main(["train-teacher", "--out", str(out), "--set", *TINY_TEACHER, "steps=1000", "time_limit_s=0.5"]) == 0
    _, meta = read_metadata(out / "teacher.safetensors")
    assert meta["complete"] is False and 0 < meta["steps"] < 1000
    assert "stopped by time_limit_s" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="unfinished"):
        recipe.build_distillation(recipe.load_config("distill", None, dict(
            teacher=str(out / "teacher.safetensors"), data_root=MINI, batch_size=4, progress=False)))
    assert main(["train-teacher", "--out", str(out), "--set", *TINY_TEACHER, "steps=" + str(meta["steps"] + 2)]) == 0
    assert read_metadata(out / "teacher.safetensors")[1]["steps"] == meta["steps"] + 2


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
                 "--data-root", MINI, "--batch-size", "4", "--reference", "16", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["reference_images"] == 16 and metrics["nfe"] == 3 and metrics["classifier_fid"] >= 0 and metrics["images_per_s"] > 0
    assert main(["eval", "--model", str(teacher), "--num", "0"]) == 2
    with pytest.raises(ValueError, match="nothing to measure"):
        recipe.evaluate_file(teacher, None, 4, 1, data_root=MINI)
    from dmd2lab import image_metrics
    image_metrics.save_classifier(image_metrics.FeatureClassifier(channels=3, width=4), tmp_path / "rgb.safetensors")
    with pytest.raises(ValueError, match="reads 3-channel images but fmnist has 1"):
        recipe.evaluate_file(teacher, tmp_path / "rgb.safetensors", 4, 1, data_root=MINI)
    with pytest.raises(ValueError, match="reads 3-channel images"):  # before any training step, not at the first eval
        recipe.build_distillation(recipe.load_config("distill", None, dict(
            teacher=str(teacher), data_root=MINI, eval_every=1, classifier=str(tmp_path / "rgb.safetensors"))))
    assert main(["sample", "--model", str(tmp_path / "absent.safetensors"), "--out", "x.png"]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_one_step_student_samples_in_one_step_only(teacher, tmp_path):
    assert main(["distill", "--out", str(tmp_path), "--set", *tiny_distill(teacher, "steps=1")]) == 0
    with pytest.raises(ValueError, match="1-step student"):
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
        teacher=str(teacher), data_root=MINI, steps=1, batch_size=4, progress=False, checkpoint_every=0)))
    calls = {"generator": [], "teacher": [], "features": [], "real": []}

    def spy(module, name, method="forward"):
        original = getattr(module, method)

        def wrapped(*args, **kwargs):
            calls[name].append(kwargs.get("class_labels"))
            return original(*args, **kwargs)
        setattr(module, method, wrapped)
    spy(run.generator, "generator")
    spy(run.teacher, "teacher")
    spy(run.critic.critic, "features", "features")
    draw_real = run.trainer.objective.sample_real

    def real(n, rng):
        images, conditions = draw_real(n, rng)
        calls["real"].append(conditions["class_labels"])
        return images, conditions
    run.trainer.objective.sample_real = real
    run.trainer.fit()  # step 0 updates the generator and the critic
    generated = calls["generator"][0]
    assert generated is not None and generated.shape == (4,)
    # The teacher scores each generator sample under the sample's own label (DM loss) ...
    assert all(torch.equal(labels, generated) for labels in calls["teacher"])
    # ... the head sees fake samples with theirs (generator's GAN loss), then real + fake with real labels first.
    assert torch.equal(calls["features"][0], generated)
    assert torch.equal(calls["features"][1], torch.cat([calls["real"][0], generated]))
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
    reloaded, sigmas, _ = recipe.load_student(path)
    assert sigmas == (run.generator.sigma,)
    torch.testing.assert_close(reloaded(2, 5), run.sample(2, 5))


def test_four_step_student_with_backward_simulation(teacher, tmp_path):
    """DMD2's multi-step student on images: timesteps 999/749/499/249 of the table, trained on backward-simulated
    inputs; the file samples in its 4 steps and says so."""
    from dmd2lab.diffusion import NoiseSchedule
    sigmas = recipe.student_sigmas(NoiseSchedule.karras(), 4)
    table = NoiseSchedule.karras().sigmas
    assert sigmas == tuple(float(table[t]) for t in (999, 749, 499, 249))
    assert recipe.student_sigmas(NoiseSchedule.karras(), 1) == (80.0,)
    assert main(["distill", "--out", str(tmp_path), "--set", *tiny_distill(teacher, "steps=3", "student_steps=4")]) == 0
    sample, nfe, meta = recipe.file_sampler(tmp_path / "student.safetensors", None, "cpu")
    assert nfe == 4 and meta["sigmas"] == list(sigmas) and sample(2, 0).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="4-step student"):
        recipe.file_sampler(tmp_path / "student.safetensors", 1, "cpu")
    with pytest.raises(ValueError, match="multi-step"):
        recipe.load_config("distill", None, {"backward_simulation": False})
    run = recipe.build_distillation(recipe.load_config("distill", None, dict(
        teacher=str(teacher), data_root=MINI, steps=2, batch_size=4, progress=False, checkpoint_every=0,
        student_steps=4, backward_simulation=False, gan_generator_weight=0.0, gan_discriminator_weight=0.0)))
    run.trainer.fit()  # trained on noised real data instead: it needs the real sampler even without the GAN


def test_eval_finds_the_shipped_classifier_from_any_folder(teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", str(teacher), "--steps", "1", "--num", "4", "--batch-size", "4",
                 "--data-root", MINI, "--reference", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["classifier_fid"] >= 0
