"""Data parallelism for the one training loop: the launch's ranks, per-micro-batch random streams, gradient
averaging, FSDP sharding and world-size-free checkpoint state.

A step's global batch is ``world_size x gradient_accumulation`` micro-batches. Micro-batch ``i`` of loop step ``s``
draws from a random generator seeded by (seed, s, i) whichever rank draws it, so the samples of a step depend on
neither the world size nor the rank: two ranks x one micro-batch, and one rank x two accumulated micro-batches,
see the same data and noise, and a checkpoint resumes at any world size with the same global batch.

Replicated players (data parallel, "DDP") average their gradients with one all-reduce per bucket after the step's
backward passes; the objective keeps calling its own modules, which is why this is not torch's
DistributedDataParallel wrapper (it would have to be the module the objective calls). FSDP uses torch's FSDP2
``fully_shard``, which shards a module in place, so the objective's references stay valid. Processes come from
``torchrun`` or ``accelerate launch`` (docs/scaling.md); :func:`process_device` joins their process group through
accelerate, with gloo on CPUs and NCCL on GPUs.
"""
from __future__ import annotations

import inspect
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

# Elements per all-reduce: DDP's own default bucket is 25 MB; larger buckets mean fewer calls for a bit more memory.
_BUCKET_ELEMENTS = 2 ** 24


def launched() -> bool:
    """True in a process that torchrun / accelerate launch started (one rank or several)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def process_device(preference: str = "auto") -> torch.device:
    """This rank's device in a multi-rank launch, after joining the launch's process group through accelerate:
    each rank takes its own GPU (cuda:LOCAL_RANK) with NCCL, or the CPU with gloo when ``preference`` is 'cpu' or no
    GPU is visible. accelerate is told about CPUs explicitly: without that it quietly gives every CPU rank a world
    of its own, and each trains alone."""
    from accelerate import PartialState
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"under torchrun / accelerate launch, device must be 'auto', 'cpu' or 'cuda' (each rank "
                         f"takes cuda:LOCAL_RANK itself); got {preference!r}")
    cpu = preference == "cpu" or not torch.cuda.is_available()
    if preference == "cuda" and cpu:
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible; use device=cpu or auto")
    state = PartialState(cpu=cpu)
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"the launch asked for {os.environ['WORLD_SIZE']} processes but accelerate joined a world "
                           f"of {state.num_processes}; launch with torchrun or `accelerate launch --multi_gpu`")
    if not dist.is_initialized():  # a one-rank launch (FSDP on one GPU): accelerate leaves the group to us
        dist.init_process_group("gloo" if cpu else "nccl", device_id=None if cpu else state.device)
    return state.device


def leave_process_group():
    """Close the launch's process group before the process exits (a rank that exits with gloo's threads still up
    can abort, SIGABRT, after its work is done); nothing in a single process."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """The rank that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def micro_batch_generator(seed: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The random stream of micro-batch ``index`` of loop step ``step``, the same on whichever rank draws it."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A random stream of loop step ``step`` that every micro-batch and rank shares (for draws the whole global batch
    must agree on, such as a K-step student's step index)."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def micro_batch_indices(accumulation: int) -> list[int]:
    """The micro-batches this rank draws in a step: rank r takes r*A .. r*A + A - 1, so every index in
    0 .. world*A - 1 is drawn exactly once."""
    return [rank() * accumulation + a for a in range(accumulation)]


def broadcast_parameters(module: nn.Module):
    """Make every rank start from rank 0's parameters and buffers (a model built from a per-rank random state would
    otherwise train a different replica on each rank)."""
    if world_size() > 1:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, 0)


def average_gradients(params: list[Tensor]):
    """All-reduce the mean gradient of replicated parameters over the ranks (data parallelism). A parameter that got
    a gradient on some ranks only takes zeros on the others (the buffers must line up); one that got none anywhere
    keeps none, so AdamW leaves it alone exactly as one process would."""
    world = world_size()
    if world == 1 or not params:
        return
    present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    params = [p for p, used in zip(params, present.tolist()) if used]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(params):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def _buckets(params: list[Tensor]) -> list[list[Tensor]]:
    buckets, size = [[]], 0
    for p in params:
        if buckets[-1] and (size + p.numel() > _BUCKET_ELEMENTS or p.grad.dtype != buckets[-1][0].grad.dtype):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    return [b for b in buckets if b]


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each logged value over the ranks (one all-reduce), so the log shows the global batch's loss.
    ``device``: the training device (NCCL reduces only GPU tensors)."""
    if world_size() == 1 or not values:
        return values
    flat = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    return dict(zip(values, (flat / world_size()).tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any (a stop or an error that one rank meets must be taken by all)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def fsdp_settings(fsdp: bool | None, min_params: int | None) -> tuple[bool, int, bool]:
    """(shard with FSDP?, smallest unit in parameters, reshard after forward?): a setting given wins, else what the
    launch says (an accelerate config with ``distributed_type: FSDP`` makes ``accelerate launch`` export
    ACCELERATE_USE_FSDP, FSDP_MIN_NUM_PARAMS and FSDP_RESHARD_AFTER_FORWARD), else no FSDP, 1e6, True."""
    env = os.environ
    if fsdp is None:
        fsdp = env.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    if min_params is None:
        min_params = int(env.get("FSDP_MIN_NUM_PARAMS", 1_000_000))
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("1", "true", "yes")
    return fsdp, min_params, reshard


def shard(module: nn.Module, min_params: int, reshard_after_forward: bool = True,
          entry_points: tuple[str, ...] = ("features", "logits")) -> nn.Module:
    """Shard ``module`` in place with FSDP2: every submodule holding at least ``min_params`` parameters not already
    in a sharded descendant becomes its own unit (gathered just for its forward and backward), the rest goes with the
    root (accelerate's size-based auto-wrap policy, on torch's ``fully_shard``). Every denoiser (a module with
    ``features``) is a unit whatever its size, because samplers and evaluation call it directly, past its parents'
    hooks (a one-step generator's ``.denoiser``). ``entry_points``: methods besides ``forward`` through which a unit
    is called (the GAN head's bottleneck ``features`` and ``logits``); FSDP gathers its parameters around them too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    if not dist.is_initialized():
        raise RuntimeError("FSDP shards over ranks: launch with torchrun or accelerate launch (docs/scaling.md)")
    sharded: set[int] = set()

    def unsharded_count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if id(p) not in sharded)

    def make_unit(m: nn.Module):
        fully_shard(m, reshard_after_forward=reshard_after_forward)
        for name in entry_points:
            if inspect.ismethod(getattr(m, name, None)):
                register_fsdp_forward_method(m, name)
        sharded.update(id(p) for p in m.parameters())

    def visit(m: nn.Module):
        for child in m.children():
            visit(child)
            # Containers (ModuleList, ModuleDict) have no forward of their own for FSDP to hook.
            runs = not isinstance(child, (nn.ModuleList, nn.ModuleDict))
            denoiser = inspect.ismethod(getattr(child, "features", None))
            if runs and (unsharded_count(child) >= min_params or denoiser):
                make_unit(child)

    visit(module)
    make_unit(module)
    return module


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(module: nn.Module) -> dict[str, Tensor]:
    """The whole module's state (a sharded one gathered; a collective call under FSDP): on the main rank, an empty
    dict on the others. Keys are the module's own, so any world size reads it."""
    state = get_model_state_dict(module, options=_FULL)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()} if is_main() else {}


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer's state keyed by parameter names (not positions) and gathered whole, on the main rank."""
    state = get_optimizer_state_dict(module, optimizer, options=_FULL)
    return state if is_main() else {}


def load_full_state(module: nn.Module, state: dict[str, Tensor], optimizer: torch.optim.Optimizer | None = None,
                    optimizer_state: dict | None = None):
    """Load a whole-module state (and its optimizer's) written by :func:`full_model_state` at any world size; a
    sharded module keeps its own shard of it."""
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(module, state, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)
