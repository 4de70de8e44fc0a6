"""Data parallelism under torchrun: process group, collectives on Python floats and tensors, gradient
all-reduce (ddp) and FSDP2 sharding (fsdp2). With one process every helper is a no-op.

ddp: every rank holds the full policy; after the update's micro-batches have all been backpropagated, the
trainable gradients are summed over ranks in flat buckets (one all-reduce per `_BUCKET` elements). The
engine calls decoder submodules and reads the LM head weight directly (completion_hidden_states,
generate_groups), outside any `DistributedDataParallel.forward`, whose reducer would then not be armed;
an explicit all-reduce after backward is exact, syncs once per update like DDP's `no_sync`, and needs no
wrapper. The loss is normalized by global counts (active tokens or rows of all ranks), so the sum over
ranks is the gradient of the single-process loss over the global batch.

fsdp2: each decoder layer and a root `Runner` are `fully_shard`ed. Every use of the policy runs inside
`Runner.forward` (see `forward`), so the root's parameters (embeddings, final norm, LM head) are gathered
there and the LM head weight handed to the fused loss is the unsharded one; FSDP2 keeps the root unsharded
until backward ends. Gradients are reduce-scattered as sums (the divide factor set to 1).
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn

_BUCKET = 1 << 24  # elements per gradient all-reduce bucket: 64 MB of fp32


def world() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return world()[0] == 0


def backend(device_type: str) -> str:
    """nccl on CUDA, gloo on CPU; ValueError before any training when this torch build lacks it."""
    name = "nccl" if device_type == "cuda" else "gloo"
    available = dist.is_available() and (dist.is_nccl_available() if name == "nccl" else dist.is_gloo_available())
    if not available:
        raise ValueError(
            f"distributed backend {name!r} (for {device_type}) is not available in this torch build; "
            "install a torch build with it, or run a single process"
        )
    return name


def device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is present, else cpu."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init(dev: torch.device) -> None:
    """Joins the torchrun process group (env:// rendezvous) when WORLD_SIZE > 1."""
    if world()[1] == 1 or (dist.is_available() and dist.is_initialized()):
        return
    name = backend(dev.type)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(name)


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Elementwise sums over ranks of a list of floats, in float64 (one collective)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_max(values: list[float]) -> list[float]:
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every parameter (each rank's local shards under fsdp2) is finite on every rank: one host sync."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    ok = bool(torch.stack([torch.isfinite(p.detach()).all() for p in local]).all()) if local else True
    return all_max([float(not ok)])[0] == 0


def all_gather(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenation along `dim` of every rank's `x` (same shape on every rank), in rank order."""
    if not active():
        return x
    local = x.to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim).to(x.device)


def all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Concatenation, in rank order, of every rank's 1-D `x`; the lengths may differ between ranks."""
    if not active():
        return x
    n = x.shape[0]
    lengths = [int(k) for k in all_gather(torch.tensor([n], device=x.device)).tolist()]
    parts = all_gather(torch.nn.functional.pad(x, (0, max(lengths) - n))).view(len(lengths), max(lengths))
    return torch.cat([part[:k] for part, k in zip(parts, lengths)])


def broadcast_trainable(model: nn.Module) -> None:
    """Rank 0's trainable weights to every rank (ddp): replicas start equal even if an init drew differently."""
    if not active():
        return
    for p in model.parameters():
        if p.requires_grad:
            local = p.data.to(_comm_device())
            dist.broadcast(local, 0)
            p.data.copy_(local)


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """ddp: sums every gradient over ranks in flat buckets; a parameter without grad counts as zeros."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params:
        bucket.append(p)
        size += p.numel()
        if size >= _BUCKET or p is params[-1]:
            flat = torch.cat([q.grad.reshape(-1) for q in bucket]).to(_comm_device())
            dist.all_reduce(flat)
            for q, g in zip(bucket, flat.to(bucket[0].grad.device).split([q.numel() for q in bucket])):
                q.grad.copy_(g.view_as(q))
            bucket, size = [], 0


# -------------------------------------------------------------------------------------------------- fsdp2


class Runner(nn.Module):
    """FSDP2 root around the policy: `runner(fn, *args)` is `fn(policy, *args)` with the root's parameters
    gathered for the call."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, fn, *args, **kwargs):
        return fn(self.policy, *args, **kwargs)


def forward(model: nn.Module, fn, *args, **kwargs):
    """fn(policy, *args, **kwargs), through the FSDP2 root when `model` is a Runner."""
    return model(fn, *args, **kwargs) if isinstance(model, Runner) else fn(model, *args, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The policy (PeftModel or transformers model) inside a Runner."""
    return model.policy if isinstance(model, Runner) else model


def shard_fsdp2(model: nn.Module) -> Runner:
    """fully_shard every decoder layer, then the root Runner (embeddings, final norm, LM head)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from .packing import causal_lm

    layers = getattr(causal_lm(model).get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"parallel='fsdp2': {type(causal_lm(model)).__name__} has no decoder `layers` to shard")
    for layer in layers:
        fully_shard(layer)
    runner = fully_shard(Runner(model))
    for m in runner.modules():  # loss normalized by global counts: reduce-scatter sums, never averages
        if isinstance(m, FSDPModule):  # older torch names the setter set_reduce_scatter_divide_factor
            (getattr(m, "set_gradient_divide_factor", None) or m.set_reduce_scatter_divide_factor)(1.0)
            if dist.get_backend() == "gloo" and hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return runner


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, sharded: bool) -> float:
    """Global 2-norm of the gradients, which are scaled by max_norm / norm when it is larger. sharded (fsdp2):
    the squares of each rank's local shards (disjoint) are summed over ranks."""
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.to_local() for p in params if p.grad is not None]
    (square,) = all_sum([float(sum(g.detach().double().pow(2).sum() for g in grads))])
    norm = math.sqrt(square)
    if norm > max_norm:  # NaN compares False: the caller skips the update anyway
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def full_state_dict(model: nn.Module) -> dict | None:
    """fsdp2: the policy's full state dict (keys as `unwrap(model).state_dict()`) on rank 0, None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # collective: every rank calls it
    if not is_main():
        return None
    return {k.removeprefix("policy."): v for k, v in state.items()}


def parallelize(model: nn.Module, ref: nn.Module | None, mode: str) -> tuple[nn.Module, nn.Module | None]:
    """Under torchrun: ddp broadcasts rank 0's trainable weights; fsdp2 shards the policy (and the reference
    when it is the policy with adapters disabled; a separate frozen reference stays replicated)."""
    if not active():
        return model, ref
    if mode == "ddp":
        broadcast_trainable(model)
        return model, ref
    runner = shard_fsdp2(model)
    return runner, (runner if ref is model else ref)
