"""Distillation speed and memory on this device, and the scaling efficiency of several ranks.

    python bench/scaling.py [--steps 20] [--batch 16] [--ranks 2] [--fsdp] [--device auto]

Table 1: DMD2 loop steps/s and peak memory of the toy backend (MLPs on the 8-mode ring) and of the image backend
(the Fashion-MNIST UNet preset, random weights and data) in one process. Table 2: the image backend launched with
torchrun as 1 rank and as --ranks ranks, each rank with the same batch (weak scaling: the global batch grows with the
ranks); efficiency = throughput(N ranks) / (N x throughput(1 rank)), so what communication costs is visible. On a
CPU the ranks share the machine's cores, so each rank is given one thread. Speed targets live here, never in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak resident memory on a CPU (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def timed_steps(trainer, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per loop step over ``steps`` steps, after ``warmup`` untimed ones (lazy init, allocator)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        trainer._train_step()
        trainer.step += 1
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        trainer._train_step()
        trainer.step += 1
    sync()
    return (time.perf_counter() - started) / steps


def toy_row(args, device: torch.device) -> dict:
    from dmd2lab import toy2d, toy_experiments as tx
    data = toy2d.ring()
    teacher = tx.train_teacher(data, steps=20)
    run = tx.distill(teacher, data, generator_steps=1, gan_weights=(3e-3, 1e-2), real_data=data.sample(4096))
    step_s = timed_steps(run.trainer, args.steps * 10, 10, device)
    return {"backend": "toy 2-D (MLPs, batch 256, GAN)", "steps_per_s": 1 / step_s, "samples_per_s": 256 / step_s,
            "peak_mem_GB": peak_memory_gb(torch.device("cpu"))}


def image_run(args, folder: Path, fsdp: bool):
    from dmd2lab import image_data, image_recipe as recipe
    from dmd2lab.image_models import UNET_PRESETS, EDMDenoiser, save_denoiser
    torch.manual_seed(0)
    path = save_denoiser(EDMDenoiser.from_config(UNET_PRESETS["fmnist"]), folder / f"teacher-{os.getpid()}.safetensors",
                         {"role": "teacher", "dataset": "fmnist"})
    info = image_data.DATASETS["fmnist"]
    g = torch.Generator().manual_seed(0)
    data = image_data.ImageData("fmnist", torch.randint(0, 256, (512, 1, info.size, info.size), generator=g,
                                                        dtype=torch.uint8), torch.zeros(512, dtype=torch.long), info)
    config = recipe.load_config("distill", None, dict(
        teacher=str(path), batch_size=args.batch, steps=10 ** 6, warmup_steps=0, progress=False, device=args.device,
        checkpoint_every=0, log_every=10 ** 6, fsdp=fsdp, fsdp_min_params=100_000))
    return recipe.build_distillation(config, None, data=data), recipe.resolve_device(args.device)


def image_row(args, folder: Path) -> dict:
    run, device = image_run(args, folder, fsdp=False)
    step_s = timed_steps(run.trainer, args.steps, 5, device)
    return {"backend": f"image, fmnist UNet 0.62M (batch {args.batch}, GAN)", "steps_per_s": 1 / step_s,
            "samples_per_s": args.batch / step_s, "peak_mem_GB": peak_memory_gb(device)}


def worker(args):
    """One rank of the scaling run: time the image distillation, rank 0 writes the result."""
    from dmd2lab import distributed
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        run, device = image_run(args, Path(folder), args.fsdp)
        step_s = timed_steps(run.trainer, args.steps, 5, device)
    if distributed.is_main():
        world = distributed.world_size()
        Path(args.result).write_text(json.dumps({"ranks": world, "step_s": step_s,
                                                 "images_per_s": args.batch * world / step_s,
                                                 "peak_mem_GB": peak_memory_gb(device)}))


def scaling_rows(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for ranks in (1, args.ranks):
            result = Path(folder) / f"{ranks}.json"
            command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(ranks),
                       __file__, "--worker", "--result", str(result), "--steps", str(args.steps), "--batch",
                       str(args.batch), "--device", args.device] + (["--fsdp"] if args.fsdp else [])
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
            rows.append(json.loads(result.read_text()))
    base = rows[0]["images_per_s"]
    for row in rows:
        row["efficiency"] = row["images_per_s"] / (row["ranks"] * base)
    return rows


def table(rows: list[dict]):
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed loop steps (the toy: 10x as many)")
    parser.add_argument("--batch", type=int, default=16, help="image batch per rank")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the scaling run, compared with 1")
    parser.add_argument("--fsdp", action="store_true", help="shard the image players with FSDP in the scaling run")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (ranks take cuda:LOCAL_RANK)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the one-process table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} thread(s))"
    print(f"one process on {name}")
    with tempfile.TemporaryDirectory() as folder:
        table([toy_row(args, device), image_row(args, Path(folder))])
    print(f"\nimage backend, 1 vs {args.ranks} ranks ({'FSDP' if args.fsdp else 'data parallel'}), batch {args.batch} "
          "per rank, one thread per rank")
    table(scaling_rows(args))


if __name__ == "__main__":
    main()
