"""Fixtures shared by test files."""
from pathlib import Path

import pytest

from dmd2lab.cli import main
from dmd2lab.image_metrics import InceptionFeatures, inception_path

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def inception():
    try:
        inception_path()
    except FileNotFoundError as error:
        pytest.skip(f"FID Inception file absent: {error}")
    return InceptionFeatures()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A Fashion-MNIST EDM teacher trained for 4 steps by `dmd2lab train-teacher` on the shipped subset: a real
    teacher file for runs of the command line (a test module may define its own)."""
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--config", str(ROOT / "configs" / "fmnist.yaml"), "--out", str(out), "--set",
                 "steps=4", "batch_size=4", "log_every=2", "checkpoint_every=4", "warmup_steps=1", "progress=False",
                 f"data_root={ROOT / 'data' / 'fmnist-mini'}"]) == 0
    return out / "teacher.safetensors"
