"""Two real gloo ranks on the CPU, started by the launch lines of docs/scaling.md (torchrun, accelerate launch with
the shipped configs, a two-node launch on localhost): replicas stay identical, and the loss curve equals a single
process accumulating the same global batch (float tolerance); FSDP agrees with it, and its checkpoint resumes in one
process."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmd2lab.cli import main
from dmd2lab.train import latest_checkpoint

torch.set_num_threads(1)
ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
MINI = str(ROOT / "data" / "fmnist-mini")
CONFIG = str(ROOT / "configs" / "fmnist.yaml")
# Tiny units so the 0.6M-parameter Fashion-MNIST UNet really is cut into several FSDP shards.
RUN = ["steps=6", "batch_size=4", "log_every=1", "checkpoint_every=3", "warmup_steps=2", "progress=False",
       "eval_every=0", f"data_root={MINI}", "fsdp_min_params=20000", "ema_decay=0.9"]
# Measured: DDP vs one process accumulating, relative difference < 1e-6 (all-reduce order); FSDP < 3e-4 (its
# reduce-scatter sums in another order, and the difference grows over the steps).
DDP_RTOL, FSDP_RTOL, STUDENT_ATOL = 1e-5, 2e-3, 1e-4


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def start(command: list[str]) -> subprocess.Popen:
    # A session of its own, so a launcher that fails or hangs is stopped with all its ranks (killpg).
    return subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(runs: list[subprocess.Popen], timeout: int = 240):
    try:
        for run in runs:
            output, _ = run.communicate(timeout=timeout)
            assert run.returncode == 0, output[-5000:]
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)


def launch(command: list[str]):
    finish([start(command)])


def sharded_run(out: Path, world_size: int):
    """The run folder's last checkpoint was written by an FSDP run of ``world_size`` ranks."""
    state = torch.load(latest_checkpoint(out) / "state.pt", weights_only=False)
    assert (state["fsdp"], state["world_size"]) == (True, world_size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out: Path) -> list[dict[str, float]]:
    with open(out / "log.csv") as f:
        return [{k: float(v) for k, v in row.items() if v and k.endswith(("loss", "gap", "norm"))}
                for row in csv.DictReader(f)]


def assert_same_curve(a: list[dict], b: list[dict], rtol: float):
    assert len(a) == len(b) and [sorted(r) for r in a] == [sorted(r) for r in b]
    for step, (ra, rb) in enumerate(zip(a, b), 1):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=rtol, abs=1e-7), (step, k, ra[k], rb[k])


@pytest.fixture(scope="module")
def one_process(teacher, tmp_path_factory):
    """The reference: one process, two accumulated micro-batches per step (the global batch of two ranks)."""
    out = tmp_path_factory.mktemp("one")
    assert main(["distill", "--config", CONFIG, "--out", str(out), "--set", *RUN, f"teacher={teacher}",
                 "gradient_accumulation=2"]) == 0
    return out


def test_torchrun_two_ranks_equal_one_process_accumulating_the_same_global_batch(teacher, one_process, tmp_path):
    launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "dmd2lab", "distill",
            "--config", CONFIG, "--out", str(tmp_path), "--set", *RUN, f"teacher={teacher}"])
    assert_same_curve(losses(tmp_path), losses(one_process), DDP_RTOL)
    two, one = load_file(tmp_path / "student.safetensors"), load_file(one_process / "student.safetensors")
    assert max(float((two[k] - one[k]).abs().max()) for k in one) < 1e-5


def test_every_rank_holds_identical_parameters_after_training(teacher, tmp_path):
    result = tmp_path / "replicas.json"
    launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
            str(free_port()), str(ROOT / "tests" / "scripts" / "replicas.py"), str(tmp_path / "run"), str(result),
            *RUN, f"teacher={teacher}"])
    replicas = json.loads(result.read_text())
    assert replicas["world_size"] == 2 and replicas["parameters"] > 1_000_000
    assert replicas["identical"], replicas


def test_fsdp_on_two_nodes_matches_one_process_and_its_checkpoint_resumes_in_one(teacher, one_process, tmp_path):
    port = str(free_port())
    finish([start([str(BIN / "accelerate"), "launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / "2node_8gpu_fsdp.yaml"), "--num_processes", "2",
                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   "-m", "dmd2lab", "distill", "--config", CONFIG, "--out", str(tmp_path), "--set", *RUN,
                   f"teacher={teacher}"]) for rank in (0, 1)])
    sharded_run(tmp_path, 2)
    assert_same_curve(losses(tmp_path), losses(one_process), FSDP_RTOL)
    sharded, one = load_file(tmp_path / "student.safetensors"), load_file(one_process / "student.safetensors")
    assert max(float((sharded[k] - one[k]).abs().max()) for k in one) < STUDENT_ATOL  # the EMA weights
    # Sharded over two ranks, written whole: one process reads it and goes on where the two stopped.
    assert main(["distill", "--config", CONFIG, "--out", str(tmp_path), "--set", *RUN, f"teacher={teacher}",
                 "gradient_accumulation=2", "steps=8"]) == 0
    assert [int(r["step"]) for r in csv.DictReader(open(tmp_path / "log.csv"))] == list(range(1, 9))


def test_fsdp_one_node_config_shards_and_trains(teacher, one_process, tmp_path):
    launch([str(BIN / "accelerate"), "launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "1node_8gpu_fsdp.yaml"), "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "dmd2lab", "distill", "--config", CONFIG,
            "--out", str(tmp_path), "--set", *RUN, f"teacher={teacher}", "steps=3", "eval_every=3", "eval_images=16",
            f"classifier={ROOT / 'data' / 'fmnist_classifier.safetensors'}"])
    sharded_run(tmp_path, 2)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert float(rows[-1]["classifier_fid"]) > 0  # evaluation samples the sharded generator
    assert_same_curve(losses(tmp_path), losses(one_process)[:3], FSDP_RTOL)


def test_fsdp_on_one_rank_matches_one_process(teacher, one_process, tmp_path):
    launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "1", "-m", "dmd2lab", "distill",
            "--config", CONFIG, "--out", str(tmp_path), "--set", *RUN, f"teacher={teacher}", "steps=3", "fsdp=true",
            "gradient_accumulation=2"])
    sharded_run(tmp_path, 1)
    assert_same_curve(losses(tmp_path), losses(one_process)[:3], FSDP_RTOL)


def test_a_four_step_student_under_fsdp_draws_one_step_index_for_all_ranks(teacher, tmp_path):
    """Backward simulation runs the student k times without grad; under FSDP each run gathers its shards, so every
    rank must draw the same k (DMD2: one per global batch), or the ranks' collectives stop pairing up."""
    four = [*RUN, f"teacher={teacher}", "steps=3", "student_steps=4"]
    launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "dmd2lab", "distill", "--config",
            CONFIG, "--out", str(tmp_path / "two"), "--set", *four, "fsdp=true"])
    sharded_run(tmp_path / "two", 2)
    assert main(["distill", "--config", CONFIG, "--out", str(tmp_path / "one"), "--set", *four,
                 "gradient_accumulation=2"]) == 0
    assert_same_curve(losses(tmp_path / "two"), losses(tmp_path / "one"), FSDP_RTOL)
