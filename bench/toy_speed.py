"""Toy training speed (steps/s) and each lab's wall time, printed as tables.

    python bench/toy_speed.py [--steps 500] [--threads 1] [--no-labs]

Speed targets live here, never in timed tests. On 2 CPU cores one thread is the fast setting for these tiny
models (two threads contend); --threads lets you see that.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dmd2lab import toy2d, toy_experiments as tx
from dmd2lab.labs import find_labs

ROOT = Path(__file__).resolve().parent.parent


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def training_speed(steps: int) -> list[tuple[str, float]]:
    data = toy2d.ring()
    teacher = tx.train_teacher(data, steps=50)
    real = data.sample(10000)
    rows = [
        ("teacher DSM step (MLP denoiser, batch 256)",
         steps / timed(lambda: tx.train_teacher(data, steps=steps))),
        ("DMD2 loop step, learned critic, ratio 5 (batch 256)",
         steps / timed(lambda: tx.distill(teacher, data, ratio=5, generator_steps=steps // 5))),
        ("DMD2 loop step + GAN head on the critic, ratio 5",
         steps / timed(lambda: tx.distill(teacher, data, ratio=5, generator_steps=steps // 5, gan_weights=(0.3, 1.0),
                                          real_data=real))),
        ("4-step student loop step, backward simulation, ratio 5",
         steps / timed(lambda: tx.distill(teacher, data, ratio=5, generator_steps=steps // 5, real_data=real,
                                          student_sigmas=tx.student_sigmas()))),
        ("DMD2 generator step, exact oracle critic (1024 samples)",
         steps / 5 / timed(lambda: tx.distill(data.denoise, data, critic="oracle", generator_steps=steps // 5))),
    ]
    return rows


def lab_times() -> list[tuple[str, float]]:
    rows = []
    for lab in find_labs(ROOT / "labs"):
        out = ROOT / "runs" / "bench"
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "dmd2lab.cli", "labs", "run", "--labs", str(lab.parent), "--out", str(out),
                   "--only", lab.stem]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        status = "" if result.returncode == 0 else " (FAILED: see runs/bench/summary.md)"
        rows.append((lab.stem + status, time.perf_counter() - started))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-labs", action="store_true", help="skip the lab wall times")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs\n")
    print("| toy training | steps/s |\n|---|---|")
    for name, rate in training_speed(args.steps):
        print(f"| {name} | {rate:.0f} |")
    if not args.no_labs:
        print("\n| lab (quick, papermill, incl. kernel start) | wall (s) |\n|---|---|")
        for name, wall in lab_times():
            print(f"| {name} | {wall:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
