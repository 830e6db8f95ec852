"""Image-backend speed on the current device: a DMD2 distillation step (images/s, peak memory, MFU) and sampling
(teacher's Heun sampler vs the one-step student), for each UNet preset, with random weights and random images
(speed does not depend on what the weights are).

    python bench/image_speed.py [--presets fmnist cifar10] [--batch 64] [--steps 20] [--bf16] [--channels-last]

MFU = (FLOPs of one loop step, counted by torch's FLOP counter over the whole step: generator, teacher, critic,
GAN head, forward and backward) / step time / the device's peak dense bf16 (or TF32) tensor throughput. Speed
targets live here, never in timed tests.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmd2lab import image_data, image_recipe as recipe
from dmd2lab.image_metrics import sampling_speed
from dmd2lab.image_models import UNET_PRESETS, EDMDenoiser, count_parameters, flops_per_image, save_denoiser

# Dense tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts), for MFU.
PEAK_FLOPS = {"H100": {"bf16": 989e12, "tf32": 494e12}, "H200": {"bf16": 989e12, "tf32": 494e12},
              "A100": {"bf16": 312e12, "tf32": 156e12}}


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks["bf16" if bf16 else "tf32"]
    return None


def random_data(preset: str, n: int = 512) -> image_data.ImageData:
    info = image_data.DATASETS[preset]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, info.channels, info.size, info.size), generator=g, dtype=torch.uint8)
    return image_data.ImageData(preset, images, torch.randint(0, info.num_classes, (n,), generator=g), info)


def bench_preset(preset: str, args, device: torch.device, folder: Path) -> dict:
    torch.manual_seed(0)
    teacher = EDMDenoiser.from_config(UNET_PRESETS[preset])
    path = save_denoiser(teacher, folder / f"{preset}.safetensors", {"role": "teacher", "dataset": preset})
    config = recipe.load_config("distill", None, dict(
        dataset=preset, teacher=str(path), batch_size=args.batch, steps=10 ** 6, warmup_steps=0, progress=False,
        device=str(device), mixed_precision="bf16" if args.bf16 else "no", channels_last=args.channels_last,
        compile=args.compile, checkpoint_every=0, log_every=10 ** 6))
    run = recipe.build_distillation(config, None, data=random_data(preset))
    trainer, sync = run.trainer, (torch.cuda.synchronize if device.type == "cuda" else (lambda: None))
    for _ in range(args.warmup):
        trainer._train_step(); trainer.step += 1
    counter = FlopCounterMode(display=False)
    with counter:  # one full TTUR period: ratio steps, one of which updates the generator
        for _ in range(config.ratio):
            trainer._train_step(); trainer.step += 1
    flops_per_step = counter.get_total_flops() / config.ratio
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        trainer._train_step(); trainer.step += 1
    sync()
    step_s = (time.perf_counter() - started) / args.steps
    peak = peak_flops(device, args.bf16)
    row = {"preset": preset, "params_M": count_parameters(teacher) / 1e6, "batch": args.batch,
           "step_ms": 1000 * step_s, "distill_images_per_s": args.batch / step_s,
           "step_GFLOP": flops_per_step / 1e9, "achieved_TFLOPs": flops_per_step / step_s / 1e12,
           "mfu": flops_per_step / step_s / peak if peak else float("nan"),
           "peak_mem_GB": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")}
    teacher = run.teacher
    shape = (teacher.unet.config.in_channels, teacher.unet.config.sample_size, teacher.unet.config.sample_size)
    row["forward_MFLOP_per_image"] = flops_per_image(lambda x: teacher(x, torch.ones(x.shape[0], device=device)),
                                                     torch.zeros((2,) + shape, device=device)) / 1e6
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.bf16)
    with autocast:
        student = sampling_speed(lambda n: run.sample(n, 0, args.sample_batch),
                                 args.sample_images, args.sample_batch, device)
        heun = sampling_speed(lambda n: recipe.teacher_samples(teacher, n, args.teacher_steps, 0, args.sample_batch),
                              max(args.sample_images // 8, args.sample_batch), args.sample_batch, device)
    row.update(student_images_per_s=student["images_per_s"], teacher_images_per_s=heun["images_per_s"],
               speedup=student["images_per_s"] / heun["images_per_s"])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["fmnist"], choices=sorted(UNET_PRESETS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed loop steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--teacher-steps", type=int, default=18, help="Heun steps of the teacher's sampler")
    parser.add_argument("--sample-images", type=int, default=512)
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = recipe.resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {'bf16' if args.bf16 else 'fp32'}; batch {args.batch}; channels_last {args.channels_last}; "
          f"compile {args.compile}; teacher sampler {args.teacher_steps} Heun steps ({2 * args.teacher_steps - 1} NFE)")
    with tempfile.TemporaryDirectory() as folder:
        rows = [bench_preset(p, args, device, Path(folder)) for p in args.presets]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
