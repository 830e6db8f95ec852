"""Faults with real processes and real files (docs/reliability.md): `dmd2lab distill` killed with SIGKILL while
training and while writing a checkpoint, a run whose loss stops being finite, checkpoint files truncated or
changed. Nothing is lost beyond one checkpoint interval, the resumed run equals an uninterrupted one bitwise on the
CPU, and a broken checkpoint is an error, never a silent fresh start."""
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmd2lab.cli import main
from dmd2lab.train import latest_checkpoint

torch.set_num_threads(1)
ROOT = Path(__file__).parents[1]
MINI = str(ROOT / "data" / "fmnist-mini")
CONFIG = str(ROOT / "configs" / "fmnist.yaml")
EVERY = 4  # checkpoint interval, loop steps


def settings(teacher, steps: int, *extra) -> list[str]:
    return [f"steps={steps}", "batch_size=4", "log_every=1", f"checkpoint_every={EVERY}", "warmup_steps=2",
            "progress=False", "eval_every=0", f"data_root={MINI}", f"teacher={teacher}", "device=cpu", *extra]


def distill_command(out: Path, teacher, steps: int, *extra) -> list[str]:
    return ["distill", "--config", CONFIG, "--out", str(out), "--set", *settings(teacher, steps, *extra)]


def start(args: list[str], script: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *(script or ["-m", "dmd2lab"]), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


def curve(out: Path) -> list[dict[str, str]]:
    """The logged numbers of every step, as written (strings: equal means bitwise equal), without wall times."""
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in log_rows(out)]


@pytest.fixture(scope="module")
def uninterrupted(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(distill_command(out, teacher, 40)) == 0
    return out


def test_kill_9_while_training_loses_at_most_one_interval_and_resumes_bitwise(teacher, uninterrupted, tmp_path):
    run = start(distill_command(tmp_path, teacher, 40))
    deadline = time.monotonic() + 120
    while not ((tmp_path / "log.csv").exists() and len(log_rows(tmp_path)) >= 10):
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL
    done = int(log_rows(tmp_path)[-1]["step"])
    assert done < 40, "the run ended before it was killed; the test needs a longer run"
    kept = int(latest_checkpoint(tmp_path).name.split("-")[1])
    assert 0 <= done - kept <= EVERY  # at most one checkpoint interval of work lost
    assert main(distill_command(tmp_path, teacher, 40)) == 0  # the same command resumes
    assert curve(tmp_path) == curve(uninterrupted)
    resumed, whole = load_file(tmp_path / "student.safetensors"), load_file(uninterrupted / "student.safetensors")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_kill_9_during_a_checkpoint_write_resumes_the_previous_checkpoint(teacher, uninterrupted, tmp_path):
    run = start(distill_command(tmp_path, teacher, 12), ["tests/scripts/die_mid_checkpoint.py"])
    run.communicate(timeout=120)
    assert run.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path).name == f"step-{EVERY:08d}"  # the torn second one is not pointed at
    torn = list((tmp_path / "checkpoints").glob(f".step-{2 * EVERY:08d}.tmp-*"))
    assert len(torn) == 1 and (torn[0] / "models.safetensors").exists()
    assert main(distill_command(tmp_path, teacher, 12)) == 0
    assert not torn[0].exists()
    assert curve(tmp_path) == curve(uninterrupted)[:12]


def test_non_finite_loss_stops_naming_step_and_quantity_and_keeps_the_last_good_checkpoint(teacher, tmp_path):
    # A learning rate of 1e30 sends the weights to ~1e30 in one update; the next forward pass overflows.
    run = start(distill_command(tmp_path, teacher, 20, "lr=1e30", "checkpoint_every=1"))
    _, err = run.communicate(timeout=120)
    assert run.returncode == 2, err[-3000:]
    message = re.search(r"dmd2lab: error: step (\d+): (generator|critic) (loss|gradient norm) is (nan|inf|-inf) "
                        r"\(non-finite\); training stopped and the last good checkpoint (\S+) is kept", err)
    assert message, err[-3000:]
    step, kept = int(message.group(1)), Path(message.group(5))
    assert kept == latest_checkpoint(tmp_path) and kept.name == f"step-{step:08d}"  # the step before the bad one
    assert all(torch.isfinite(t).all() for t in load_file(kept / "models.safetensors").values())
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncate weights", "flip a byte of weights", "truncate state",
                                    "delete manifest"])
def test_a_broken_checkpoint_is_a_clear_error_never_a_fresh_start(teacher, tmp_path, capsys, damage):
    assert main(distill_command(tmp_path, teacher, 8)) == 0
    folder = latest_checkpoint(tmp_path)
    weights, state = folder / "models.safetensors", folder / "state.pt"
    if damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif damage == "flip a byte of weights":  # in a tensor's numbers: the file still parses
        data = bytearray(weights.read_bytes())
        data[len(data) * 3 // 4] ^= 0x40
        weights.write_bytes(bytes(data))
    elif damage == "truncate state":
        state.write_bytes(state.read_bytes()[:100])
    else:
        (folder / "manifest.json").unlink()
    log_before, student_before = (tmp_path / "log.csv").read_text(), (tmp_path / "student.safetensors").read_bytes()
    capsys.readouterr()
    assert main(distill_command(tmp_path, teacher, 12)) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {folder}" in err and "point" in err and "latest" in err and "fresh out_dir" in err
    assert ("is corrupt" in err) if damage != "delete manifest" else ("no readable manifest.json" in err)
    assert latest_checkpoint(tmp_path) == folder and (tmp_path / "log.csv").read_text() == log_before
    assert (tmp_path / "student.safetensors").read_bytes() == student_before
