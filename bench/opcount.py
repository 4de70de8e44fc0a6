"""Host work per decode step, counted: deterministic, unlike a timing on a shared machine.

- CUDA (torch.profiler): `kernels` are the GPU kernels (and memcpy/memset) a step executes, `launches` the host
  launch calls it makes (cudaLaunchKernel, cuLaunchKernel(Ex), cudaGraphLaunch, cudaMemcpyAsync, ...): a captured
  step is one cudaGraphLaunch that runs all its kernels.
- CPU, eager: `aten_ops`, the aten ops a step dispatches (a TorchDispatchMode counter), each a trip through Python
  and the dispatcher; `kernels` equals it.
- CPU, compiled: a dispatch mode would disable the compiled code, so the profiler counts: `kernels` are the calls the
  compiled graph makes (inductor's fused C++ kernels, visible with `enable_cpu_kernel_profile()` set before the first
  compile, and the aten ops it calls for GEMMs and fallbacks), `aten_ops` the latter alone.

generate_groups' steps are counted one by one (decode._Stepper calls wrapped in a profiler range or the counter),
averaged over all steps but the first (the warm-up, and on CUDA the capture, which runs before the profiler starts).
transformers' generate is counted as the difference of two budgets, divided by the difference of steps: prefill and
setup cancel out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_fast import decode

LAUNCH_APIS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch",
               "cudaMemcpyAsync", "cudaMemsetAsync")  # fmt: skip
COMPILED_GRAPH = "## Call CompiledFxGraph"
STEP = "grpo_fast.decode_step"


def enable_cpu_kernel_profile() -> None:
    """Inductor's C++ kernels announce themselves to the profiler (compiles after this call)."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True


class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _counts(root, cuda: bool) -> dict[str, int]:
    """Counts under one profiler event (a step range, or a whole call)."""
    events = [root, *_descendants(root)]
    if cuda:
        launches = sum(1 for e in events if e.name in LAUNCH_APIS)
        return {"kernels": sum(len(e.kernels) for e in events), "launches": launches}
    calls = [c for e in events if e.name.startswith(COMPILED_GRAPH) for c in e.cpu_children]
    return {"kernels": len(calls), "aten_ops": sum(1 for c in calls if c.name.startswith("aten::"))}


def _mean(rows: list[dict]) -> dict[str, float]:
    return {f"{k}_per_step": sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


@contextlib.contextmanager
def _wrapped_steps(around: Callable):
    """decode._Stepper.__call__ runs inside `around()` (a context manager factory) for the duration."""
    real = decode._Stepper.__call__

    def call(self):
        with around():
            real(self)

    decode._Stepper.__call__ = call
    try:
        yield
    finally:
        decode._Stepper.__call__ = real


def generate_groups_per_step(rollout: Callable[[], object], device: torch.device, compiled: bool) -> dict:
    """Counts per decode step of one generate_groups call (`rollout()`, already warm), all steps but the first."""
    if device.type != "cuda" and not compiled:
        counters: list[_AtenCounter] = []
        with _wrapped_steps(lambda: counters.append(_AtenCounter()) or counters[-1]):
            rollout()
        return _mean([{"aten_ops": c.count, "kernels": c.count} for c in counters[1:]])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof, calls = profile(activities=activities), []

    def around():  # the profiler starts at the second step: the first one's CUDA graph capture runs unprofiled
        calls.append(1)
        if len(calls) == 2:
            prof.start()
        return record_function(STEP) if len(calls) > 1 else contextlib.nullcontext()

    with _wrapped_steps(around):
        rollout()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if len(calls) < 2:
        return {}
    prof.stop()
    return _mean([_counts(e, device.type == "cuda") for e in prof.events() if e.name == STEP])


def call_counts(fn: Callable[[], object], device: torch.device) -> dict[str, int]:
    """Counts of one eager call: profiler kernels and launches on CUDA, dispatched aten ops on CPU."""
    if device.type != "cuda":
        with _AtenCounter() as counter:
            fn()
        return {"aten_ops": counter.count, "kernels": counter.count}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"kernels": kernels, "launches": sum(1 for e in events if e.name in LAUNCH_APIS)}


def difference_per_step(run: Callable[[int], object], budgets: tuple[int, int], device: torch.device) -> dict:
    """Counts per step of an eager generator: run(n) decodes exactly n tokens; (count(b1) - count(b0)) / (b1 - b0)."""
    low, high = (call_counts(lambda n=n: run(n), device) for n in budgets)
    return {f"{k}_per_step": (high[k] - low[k]) / (budgets[1] - budgets[0]) for k in high}
