"""One training loop for every backend: players, TTUR, optimizers, EMA, checkpoints, guards, logs.

A training problem is an *objective* with named *players* (DMD2: the generator and the critic; a teacher: one
denoiser). Each player has its own optimizer and updates every ``every`` steps, which is DMD2's two time-scale
update rule (TTUR): the critic updates every step, the generator every ``ratio`` steps (DMD2 Sec. 4.1). The loop
knows nothing of backends; an objective provides

    prepare(step, updating: list[str], rng, shared) -> context  # e.g. the generator batch, with grad iff needed
    loss(name, context, rng) -> (loss tensor, {name: tensor} diagnostics)

``rng`` is the micro-batch's own random stream; ``shared`` one that the whole global batch of the step draws alike.

Players update in the order they are given (DMD2: generator first, then the critic on the same batch,
detached). Gradients of every player are cleared before each backward, so a loss that flows through another
player's parameters (a GAN head) never leaks into that player's update.

Checkpoints: ``<out_dir>/checkpoints/step-XXXXXXXX/`` holds ``models.safetensors`` (players and EMA weights) and
``state.pt`` (optimizers, step, log, RNG states); each is written to a temporary folder first and
renamed into place, then ``latest`` is replaced atomically, so a crash mid-write leaves the previous checkpoint
as the one resumed. They hold whole (unsharded) tensors keyed by name, so any world size resumes them.

Several processes (torchrun / accelerate launch, :mod:`dmd2lab.distributed`): each rank runs
``gradient_accumulation`` micro-batches of the objective's batch per step, each with its own random stream, and the
players' gradients are averaged over ranks (or sharded with FSDP) before the optimizer step; rank 0 writes the log
and the checkpoints. One process with one micro-batch draws from a single generator carried across steps.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import distributed


class NonFiniteError(RuntimeError):
    """A loss or gradient stopped being finite; the message names the step, the player and the quantity."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, torn or does not fit the models."""


@dataclass
class Player:
    """One optimised module. AdamW with DMD2's defaults: betas (0.9, 0.999), weight decay 0.01, grad clip 10,
    a linear warm-up over ``warmup_steps`` LOOP steps (as DMD2's code steps every scheduler every iteration, so at
    TTUR ratio 5 the generator is warm after warmup_steps / 5 of its own updates); ``every`` is its update period
    in loop steps (TTUR); ``ema_decay`` keeps an EMA copy."""

    module: nn.Module
    lr: float
    every: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float | None = 10.0
    ema_decay: float | None = None

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"update period 'every' must be an integer >= 1 (the TTUR ratio); got {self.every!r}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0; got {self.lr!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in (0, 1) or be None; got {self.ema_decay!r}")
        if not any(p.requires_grad for p in self.module.parameters()):
            raise ValueError(f"{type(self.module).__name__} has no trainable parameters to optimise")


class Objective(Protocol):
    def prepare(self, step: int, updating: list[str], rng: torch.Generator,
                shared: torch.Generator | None = None) -> dict: ...
    def loss(self, name: str, context: dict, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]: ...


@dataclass
class TrainConfig:
    """Loop settings. ``steps`` counts loop iterations (DMD2 reports critic steps, which are these).
    ``time_limit_s`` (0 = none) ends a run cleanly once this much wall time has passed in this process: the step in
    hand finishes, is logged and checkpointed, and ``fit`` returns (a batch job's time limit without losing work;
    the next ``fit`` resumes there). ``gradient_accumulation``: micro-batches per rank per step (the global batch is
    the objective's batch x ranks x this). ``fsdp``: shard the players with FSDP2; submodules of at least
    ``fsdp_min_params`` parameters become their own units (None: as the launch's accelerate config says, see
    :func:`dmd2lab.distributed.fsdp_settings`)."""

    steps: int
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = False
    tensorboard: bool = False
    mixed_precision: str = "no"
    time_limit_s: float = 0.0
    gradient_accumulation: int = 1
    fsdp: bool | None = None
    fsdp_min_params: int | None = None

    def __post_init__(self):
        if not self.time_limit_s >= 0:
            raise ValueError(f"TrainConfig.time_limit_s must be >= 0 seconds (0 = no limit); got {self.time_limit_s!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"TrainConfig.mixed_precision must be 'no' or 'bf16'; got {self.mixed_precision!r}")
        for name in ("steps", "log_every", "gradient_accumulation"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1; got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0 (0 = never); "
                                 f"got {getattr(self, name)!r}")
        if self.fsdp_min_params is not None and not (isinstance(self.fsdp_min_params, int)
                                                     and self.fsdp_min_params >= 1):
            raise ValueError(f"TrainConfig.fsdp_min_params must be an integer >= 1 or None; "
                             f"got {self.fsdp_min_params!r}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"TrainConfig.keep_checkpoints must be >= 1; got {self.keep_checkpoints}")


@dataclass
class Trainer:
    """Runs an objective's players for ``config.steps`` steps; ``fit()`` resumes from ``out_dir`` if it holds a
    checkpoint. ``evaluate(trainer)`` (optional) returns metrics every ``config.eval_every`` steps; they are
    logged with the losses. ``history`` holds the logged rows."""

    objective: Objective
    players: dict[str, Player]
    config: TrainConfig
    out_dir: str | Path | None = None
    evaluate: Callable[["Trainer"], dict[str, float]] | None = None
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self):
        if not self.players:
            raise ValueError("Trainer needs at least one player")
        self.out_dir = Path(self.out_dir) if self.out_dir is not None else None
        if self.out_dir is not None and self.out_dir.exists() and not self.out_dir.is_dir():
            raise NotADirectoryError(f"out_dir {self.out_dir} is a file; pass a folder for checkpoints and logs "
                                     "(created if missing)")
        device = next(next(iter(self.players.values())).module.parameters()).device
        # bf16 autocast around the objective (DMD2 trains in bf16); optimizer states and weights stay float32.
        self._autocast = lambda: torch.autocast(device.type, torch.bfloat16,
                                                enabled=self.config.mixed_precision == "bf16")
        self.rng = torch.Generator(device=device).manual_seed(self.config.seed)
        self.fsdp, fsdp_min_params, reshard = distributed.fsdp_settings(self.config.fsdp, self.config.fsdp_min_params)
        self.micro_batches = distributed.world_size() * self.config.gradient_accumulation
        self.optimizers, self.ema = {}, {}
        for name, p in self.players.items():
            distributed.broadcast_parameters(p.module)
            if p.ema_decay is not None:
                # Copied before sharding (a sharded module cannot be copied), then sharded like its player.
                self.ema[name] = AveragedModel(p.module, multi_avg_fn=get_ema_multi_avg_fn(p.ema_decay))
            if self.fsdp:
                distributed.shard(p.module, fsdp_min_params, reshard)
                if name in self.ema:
                    distributed.shard(self.ema[name].module, fsdp_min_params, reshard)
            self.optimizers[name] = torch.optim.AdamW([q for q in p.module.parameters() if q.requires_grad],
                                                      lr=p.lr, betas=p.betas, weight_decay=p.weight_decay,
                                                      foreach=True)
        self._running: dict[str, list[float]] = {}
        self._writer = None
        self._rewrite_log = False
        self._saved_step: int | None = None

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> list[dict[str, float]]:
        if self.out_dir is not None and latest_checkpoint(self.out_dir) is not None:
            self.load(latest_checkpoint(self.out_dir))
        from tqdm.auto import tqdm
        bar = tqdm(total=self.config.steps, initial=self.step, desc="train",
                   disable=not (self.config.progress and distributed.is_main()))
        started = time.perf_counter() - (self.history[-1]["elapsed_s"] if self.history else 0.0)
        deadline = time.perf_counter() + self.config.time_limit_s if self.config.time_limit_s else math.inf
        while self.step < self.config.steps:
            self._train_step()
            self.step += 1
            bar.update(1)
            if self.config.eval_every and self.step % self.config.eval_every == 0 and self.evaluate:
                self._record(self.evaluate(self))
            out_of_time = self.config.time_limit_s and distributed.any_rank(time.perf_counter() >= deadline,
                                                                            self.rng.device)
            if self.step % self.config.log_every == 0 or self.step == self.config.steps or out_of_time:
                row = self._flush_log(time.perf_counter() - started)
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k.endswith("loss")}, refresh=False)
            if self.out_dir is not None and (self.step == self.config.steps or out_of_time or (
                    self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0)):
                self.save()
            if out_of_time:
                break
        bar.close()
        if self._writer is not None:
            self._writer.close()
        return self.history

    def _train_step(self):
        """One loop step: every micro-batch's losses backward (each player's gradient into that player only), then
        for each updating player the gradient averaged over ranks, checked, clipped and stepped."""
        updating = [n for n, p in self.players.items() if self.step % p.every == 0]
        for name in updating:
            self.optimizers[name].zero_grad(set_to_none=True)
        # Per player, in update order, so log.csv keeps each player's columns together: its logs, then its grad norm.
        totals: dict[str, dict[str, float]] = {name: {} for name in updating}
        for rng, shared in self._micro_batch_streams():
            with self._autocast():
                context = self.objective.prepare(self.step, updating, rng, shared)
            for name in updating:
                with self._autocast():
                    loss, logs = self.objective.loss(name, context, rng)
                self._backward_into(name, loss / self.config.gradient_accumulation)
                for k, v in {"loss": loss, **logs}.items():
                    totals[name][k] = totals[name].get(k, 0.0) + float(v.detach()) / self.config.gradient_accumulation
            del context
        averaged = distributed.mean_over_ranks({(n, k): v for n in updating for k, v in totals[n].items()},
                                               self.rng.device)
        for name in updating:
            player = self.players[name]
            logs = {k: averaged[(name, k)] for k in totals[name]}
            if not math.isfinite(logs.pop("loss")):
                raise NonFiniteError(self._stop_message(f"{name} loss is {averaged[(name, 'loss')]}"))
            params = [q for q in player.module.parameters() if q.requires_grad]
            if not self.fsdp:  # FSDP reduces its shards' gradients in the backward pass itself
                distributed.average_gradients(params)
            norm = torch.nn.utils.clip_grad_norm_([q for q in params if q.grad is not None],
                                                  player.grad_clip if player.grad_clip else math.inf)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if not torch.isfinite(norm):
                raise NonFiniteError(self._stop_message(f"{name} gradient norm is {norm.item()}"))
            for group in self.optimizers[name].param_groups:
                group["lr"] = self.learning_rate(name)
            self.optimizers[name].step()
            if name in self.ema:
                self.ema[name].update_parameters(player.module)
            self._record({**logs, f"{name}_grad_norm": float(norm)})
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def _micro_batch_streams(self) -> list[tuple[torch.Generator, torch.Generator]]:
        """(its own stream, the step's shared stream) for each of this rank's micro-batches of this step (see
        :mod:`dmd2lab.distributed`). The shared stream starts afresh for every micro-batch, so draws from it agree
        across the global batch; with one micro-batch both are the trainer's one generator."""
        if self.micro_batches == 1:
            return [(self.rng, self.rng)]
        device = self.rng.device
        return [(distributed.micro_batch_generator(self.config.seed, self.step, i, device),
                 distributed.step_generator(self.config.seed, self.step, device))
                for i in distributed.micro_batch_indices(self.config.gradient_accumulation)]

    def _backward_into(self, name: str, loss: Tensor):
        """Backward ``loss`` into player ``name``'s gradients only: a loss that flows through another player (the
        generator's GAN loss through the critic and its head) leaves that player's accumulated gradient as it was."""
        kept = {q: q.grad for other, p in self.players.items() if other != name for q in p.module.parameters()}
        for q in kept:
            q.grad = None
        loss.backward()
        for q, grad in kept.items():
            q.grad = grad

    def learning_rate(self, name: str, step: int | None = None) -> float:
        """The player's lr at a loop step: linear warm-up over its warmup_steps loop steps, then constant."""
        p = self.players[name]
        step = self.step if step is None else step
        return p.lr * min(1.0, (step + 1) / max(p.warmup_steps, 1))

    def _stop_message(self, what: str) -> str:
        kept = latest_checkpoint(self.out_dir) if self.out_dir is not None else None
        where = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint was written"
        return (f"step {self.step}: {what} (non-finite); training stopped and {where}. Lower the learning rate, "
                f"check the inputs for NaN/Inf, or resume from the checkpoint.")

    # ------------------------------------------------------------------------------------------ logging
    def _record(self, values: dict):
        for k, v in values.items():
            self._running.setdefault(k, []).append(float(v))

    def _flush_log(self, elapsed: float) -> dict[str, float]:
        row = {"step": self.step, "elapsed_s": round(elapsed, 3)}
        row.update({k: float(np.mean(v)) for k, v in self._running.items()})
        row.update({f"lr_{n}": self.learning_rate(n, self.step - 1) for n in self.players})
        self._running.clear()
        self.history.append(row)
        if self.out_dir is not None and distributed.is_main():
            self._write_csv()
            if self.config.tensorboard:
                self._tensorboard(row)
        return row

    def _write_csv(self):
        path = self.out_dir / "log.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        # Rewrite the whole file after a resume (it may hold rows past the checkpoint) or when a new column
        # appears; otherwise append the new row.
        rewrite = self._rewrite_log or not path.exists() or path.read_text().split("\n", 1)[0].split(",") != keys
        self._rewrite_log = False
        with open(path, "w" if rewrite else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            if rewrite:
                writer.writeheader()
                writer.writerows(self.history)
            else:
                writer.writerow(self.history[-1])

    def _tensorboard(self, row: dict):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        for k, v in row.items():
            if k != "step":
                self._writer.add_scalar(k, v, row["step"])

    # -------------------------------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, Tensor]:
        """Every player's and EMA copy's whole weights, keyed ``<player>.<name>`` / ``ema.<player>.<name>`` (gathered
        from the shards under FSDP: a collective call; the main rank gets them, the others an empty dict)."""
        tensors = {}
        for name, p in self.players.items():
            tensors.update(_with_prefix(distributed.full_model_state(p.module), f"{name}."))
        for name, ema in self.ema.items():
            tensors.update(_with_prefix(distributed.full_model_state(ema), f"ema.{name}."))
        return tensors

    def save(self) -> Path:
        """Write a checkpoint atomically and prune old ones; returns its folder. Every rank calls it (gathering a
        sharded state takes them all); the main rank writes."""
        final = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        # Decided from memory, the same on every rank (a rank that read rank 0's fresh 'latest' would skip the
        # collective below and hang the others).
        if self._saved_step == self.step:
            return final  # this very step is already the saved state
        tensors = self.state_tensors()
        optimizers = {n: distributed.full_optimizer_state(self.players[n].module, o)
                      for n, o in self.optimizers.items()}
        failure = None
        if distributed.is_main():
            try:
                self._write_checkpoint(final, tensors, optimizers)
            except OSError as e:  # a full disk, a lost mount: every rank must stop, not wait for rank 0
                failure = e
        if distributed.any_rank(failure is not None, self.rng.device):
            raise CheckpointError(f"writing checkpoint {final} failed on rank 0 ({failure}); the previous checkpoint "
                                  "is intact. Free space or fix the folder, then run the same command to resume.")
        self._saved_step = self.step
        return final

    def _write_checkpoint(self, final: Path, tensors: dict[str, Tensor], optimizers: dict):
        root = final.parent
        root.mkdir(parents=True, exist_ok=True)
        for torn in root.glob(".step-*"):  # left by a process killed mid-write; never pointed at by 'latest'
            shutil.rmtree(torn, ignore_errors=True)
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        save_file(tensors, str(tmp / "models.safetensors"))
        torch.save({
            "step": self.step, "history": self.history, "config": asdict(self.config), "optimizers": optimizers,
            "world_size": distributed.world_size(), "fsdp": self.fsdp,
            "rng": self.rng.get_state(), "rng_device": self.rng.device.type, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
        }, tmp / "state.pt")
        _write_manifest(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)  # the files' names, before the folder is renamed into place
        if final.exists():
            shutil.rmtree(final)  # a folder of an abandoned run (latest names an earlier step): not ours to keep
        os.replace(tmp, final)
        _fsync(root)
        _atomic_write_text(self.out_dir / "latest", final.name)
        older = sorted(p for p in root.glob("step-*") if p != final)
        for old in older[:max(len(older) - (self.config.keep_checkpoints - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, folder: str | Path):
        """Restore players, EMA, optimizers, step, log and RNG states from a checkpoint folder (written at any
        world size; every rank reads it)."""
        folder = Path(folder)
        tensors, state, failure = _read_checkpoint(folder)
        # Every rank stops if any cannot read it (a stale network filesystem on one node), rather than the others
        # waiting in the collectives of loading.
        if distributed.any_rank(failure is not None, self.rng.device):
            raise failure or CheckpointError(f"checkpoint {folder} could not be read on another rank; check that "
                                             "every node sees the same out_dir")
        try:
            for name, p in self.players.items():
                distributed.load_full_state(p.module, _prefixed(tensors, f"{name}."), self.optimizers[name],
                                            state["optimizers"][name])
            for name, ema in self.ema.items():
                distributed.load_full_state(ema, _prefixed(tensors, f"ema.{name}."))
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {folder} does not fit these players/models ({type(e).__name__}: {e}); "
                                  "was it written by another configuration?") from e
        self.step, self.history = state["step"], state["history"]
        self._saved_step = self.step
        self._rewrite_log = True
        if state.get("rng_device", self.rng.device.type) == self.rng.device.type:
            self.rng.set_state(state["rng"])
        else:
            # CPU and CUDA generators have different states: the run continues, but not bitwise as it would have.
            warnings.warn(f"checkpoint {folder} was written with a {state['rng_device']} random generator and resumes "
                          f"on {self.rng.device.type}; its random stream restarts from seed {self.config.seed} + step "
                          f"{self.step}, so the rest of the run differs from an uninterrupted one")
            self.rng.manual_seed(self.config.seed + self.step)
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])

    def full_state(self, name: str, ema: bool = True) -> dict[str, Tensor]:
        """A player's whole weights (its EMA copy's when it has one and ``ema`` is set) on the main rank, an empty
        dict on the others; gathered from the shards under FSDP, so every rank must call it."""
        return distributed.full_model_state(self.module(name, ema))

    def module(self, name: str, ema: bool = True) -> nn.Module:
        """A player's module, or its EMA copy when it has one and ``ema`` is set."""
        return self.ema[name].module if ema and name in self.ema else self.players[name].module


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder ``<out_dir>/latest`` names, None when no checkpoint was ever completed there."""
    pointer = Path(out_dir) / "latest"
    if not pointer.exists():
        return None
    folder = Path(out_dir) / "checkpoints" / pointer.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {folder}, which does not exist; restore it or delete {pointer} "
                              "to start fresh")
    return folder


def _with_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not picked:
        raise KeyError(f"no tensors under '{prefix}'")
    return picked


def _read_checkpoint(folder: Path) -> tuple[dict | None, dict | None, CheckpointError | None]:
    """(tensors, state, None), or (None, None, the error) when the folder's files are missing, torn or changed."""
    try:
        _check_manifest(folder)
        tensors = load_file(str(folder / "models.safetensors"))
        # map_location: a checkpoint written on a GPU resumes on a CPU machine (optimizer states follow the params).
        return tensors, torch.load(folder / "state.pt", weights_only=False, map_location="cpu"), None
    except CheckpointError as e:
        return None, None, e
    except Exception as e:  # safetensors and pickle raise many types for torn files
        return None, None, CheckpointError(
            f"checkpoint {folder} is unreadable ({type(e).__name__}: {e}); it may be truncated or corrupt. Delete it "
            f"and point '{folder.parent.parent}/latest' at an earlier step-* folder, or start in a fresh out_dir.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path):
    """Record each checkpoint file's size and SHA-256, so a file changed after it was written (a flipped bit, a
    partial copy between machines) is caught at resume, not trained on: safetensors checks a file's layout, not the
    numbers in it."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(folder.iterdir())
             if f.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(files, indent=1))


def _check_manifest(folder: Path):
    fix = (f"Delete {folder} and point '{folder.parent.parent}/latest' at an earlier step-* folder, or start in a "
           "fresh out_dir.")
    try:
        files = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {folder} has no readable manifest.json ({type(e).__name__}: {e}), so its "
                              "files cannot be checked: it is incomplete, or was written by a dmd2lab from before "
                              "checkpoints carried one (resume it with that version, which reads it). " + fix) from e
    if not isinstance(files, dict) or not {"models.safetensors", "state.pt"} <= set(files):
        raise CheckpointError(f"checkpoint {folder}'s manifest.json does not list models.safetensors and state.pt; "
                              f"it was changed after it was written. {fix}")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing. {fix}")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} differs from the file that was written "
                                  f"(size or SHA-256; truncated or changed since). {fix}")


def _fsync(path: Path):
    """Flush a file, or a folder's entries (after a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)
