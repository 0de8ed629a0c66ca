"""Several processes under torchrun: what train.py needs beyond one process, in one place.

    torchrun --nproc_per_node 8 train.py --loss dft --model Qwen/Qwen2.5-Math-1.5B --data train.parquet
    torchrun --nproc_per_node 8 train.py --loss sft --model Qwen/Qwen2.5-7B --data ... --fsdp

torchrun starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; a script
started any other way is one process and none of this does anything. There is no launcher and no wrapper class: the
training loop stays the plain loop of train.py, and calls these functions at the few places where ranks must agree.

How the ranks share an optimizer step (train.py, "the step"): every rank builds the same global list of the step's
micro-batches (the sampler is a pure function of the seed), and rank r trains micro-batches r*M .. r*M + M - 1 of the
N*M (M = --grad-accum). The step's normaliser (trained tokens, sequences or pairs: the losses' `count`) and every
metric sum are all-reduced, and the summed gradients once per step, so N ranks x M micro-batches make the same update
as one rank with --grad-accum N*M, up to the order of floating-point sums.

Data parallel (default): every rank holds the whole model and optimizer; gradients are all-reduced by hand after the
last micro-batch (no DistributedDataParallel wrapper: nothing to sync inside accumulation, and the model keeps its own
attribute names). --fsdp: FSDP2 (`fully_shard`) shards parameters, gradients and AdamW's state; see `shard_model`.
Generation under --fsdp (GRPO rollouts, evals) runs on the whole model, gathered once: see `gathered_for_generation`.

A rank that dies: torchrun notices the exit and terminates the other ranks (its "worker group failed" report names
the rank and its error). A rank that hangs instead (stuck I/O, a deadlocked collective) is caught by the timeout every
collective carries (--dist-timeout): the waiting ranks raise, exit, and torchrun ends the job.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Who this process is. The default is the single process: rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def main(self) -> bool:
        """Rank 0 logs, shows the progress bar and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets these for every worker it starts."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init(device: str, timeout_s: float, fsdp: bool = False) -> tuple[Ranks, str]:
    """Join the process group when torchrun started us: nccl on CUDA (one device per local rank), gloo on CPU.
    Returns (ranks, this rank's device). A plain process gets (SINGLE, device) and no process group."""
    if not launched_by_torchrun():
        return SINGLE, device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=torch.device(device) if cuda else None)
    if rank != 0:  # every line once: rank 0 prints; the others' stdout goes nowhere (their stderr stays)
        sys.stdout = open(os.devnull, "w")
    return Ranks(rank, world, local, fsdp), device


def close() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def my_share(items: Sequence, ranks: Ranks, per_rank: int) -> list:
    """Rank r's items: positions r*per_rank .. r*per_rank + per_rank - 1 of the global list (empty when the list is
    short, as the last step of an epoch may be)."""
    return list(items[ranks.rank * per_rank:(ranks.rank + 1) * per_rank])


def all_sum(values: Sequence[float], ranks: Ranks, device: str) -> list[float]:
    """Element-wise sum over ranks of a few floats, in float64 (so counts stay exact), in one collective."""
    if not ranks.active:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; [obj] in a single process."""
    if not ranks.active:
        return [obj]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def sum_gradients(model: torch.nn.Module, ranks: Ranks) -> float:
    """Make every rank's gradients the sum over ranks; returns the factor that still turns them into that sum.

    Data parallel: all-reduce (sum) each gradient, once per step; factor 1. A parameter without a gradient on this
    rank (none here, but a rank could skip a module) gets zeros first, so every rank issues the same collectives.
    FSDP: the reduce-scatter already ran in the step's last backward (train.py turns it off for the others) and
    averaged over ranks; factor N turns the mean into the sum."""
    if not ranks.active:
        return 1.0
    if ranks.fsdp:
        return float(ranks.world)
    pending = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        pending.append(dist.all_reduce(p.grad, async_op=True))
    for work in pending:
        work.wait()
    return 1.0


def shard_model(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """FSDP2: each decoder block is one unit (all-gathered just before its forward, freed after), then the root (the
    embedding, the final norm and the LM head, which the tied embedding shares). Mixed precision: on CUDA the
    all-gathered parameters are bf16 for compute while the sharded fp32 parameters stay the master weights that AdamW
    updates, and gradients are reduced in fp32; on CPU everything stays fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kind = torch.device(device).type
    # The model arrives in CPU memory; fully_shard moves each unit to the mesh's device (this rank's GPU, set by
    # init) as it shards it, so a GPU holds one unit's whole weights at most, for a moment.
    mesh = init_device_mesh(kind, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if kind == "cuda" else None, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root stays gathered between forward and backward: the log-prob kernel reads lm_head.weight after
    # model(...) returns (losses/logprobs.py), and backward needs it again at once anyway.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


@contextmanager
def gathered_for_generation(model: torch.nn.Module, ranks: Ranks) -> Iterator[None]:
    """Under FSDP: the whole model's parameters on every rank while the block runs, sharded again after it.

    Decoding (model.generate.generate) runs one forward per new token, and ranks whose completions end at different lengths
    run different numbers of them (a rank with no prompt runs none). A sharded forward all-gathers each block's
    parameters in its pre-forward hook, a collective, so those ranks would wait on each other forever. Here every
    rank all-gathers every unit once, in the same order (module order), and turns off resharding after forward, so
    the forwards inside issue no collective and each rank may decode as many steps as it needs. Costs the whole
    model (in the compute dtype) on each device meanwhile. Every rank must enter it, with or without prompts; a
    no-op without FSDP."""
    if not ranks.fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root first, then the blocks
    model._get_fsdp_state()._lazy_init()  # a no-op after the first forward; before it, unshard needs the root set up
    model.set_reshard_after_forward(False)  # recursive: no unit frees its parameters after a decode forward
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        # Back to shard_model's settings: blocks reshard after forward, the root does not.
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def full_state_dict(model: torch.nn.Module, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, on rank 0 (empty elsewhere): a collective under FSDP, every rank calls it."""
    if not ranks.fsdp:
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """FSDP: AdamW's state as torch.distributed.checkpoint files, each rank writing its own shard (a collective; on
    several nodes `path` must be on storage every node sees). Keyed by parameter name, so it loads under any number
    of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path)


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Inverse of save_sharded_optimizer, resharded to however many ranks (or a single process) load it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())  # one process: read every shard
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's clip_grad_norm_ returns one) as a plain tensor holding the global value."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _comm_device(device: str) -> str:
    # nccl moves only CUDA tensors; gloo only CPU ones.
    return device if torch.device(device).type == "cuda" else "cpu"
