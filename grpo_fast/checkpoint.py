"""Atomic checkpoints: everything is written into a temporary directory that is renamed into place
with os.replace, so a crash mid-write leaves the previous checkpoint intact.

A checkpoint `checkpoint-<step>` holds the model (a peft adapter, or full weights) via
save_pretrained, `trainer.pt` (optimizer, scheduler, torch/python/numpy/sampling RNG states) and
`trainer_state.json` (step, data position, world size, the run's config), written last. Loading is
`read` (every file into memory: a torn file is `Unreadable` and nothing is touched) then `apply`
(in place; a checkpoint that does not fit the model is a ValueError naming the probable cause).
Under torchrun every rank calls `save`, `read` and `apply`; rank 0 alone writes, except for fsdp2, where
each rank writes its shards of the weights and optimizer through torch.distributed.checkpoint (`dcp/`)
and the adapter/weights files are left out.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from . import distributed, run_log

_NAME = re.compile(r"checkpoint-(\d+)$")


def rng_state(generator: torch.Generator) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    root: str | Path, step: int, model, optimizer, scheduler, generator, state: dict, keep: int = 2, sharded=False
) -> Path:
    """Writes checkpoint-<step> under `root` atomically and prunes all but the `keep` newest. Every rank calls
    it; `sharded` (fsdp2): weights and optimizer through torch.distributed.checkpoint."""
    root = Path(root)
    final, tmp = root / f"checkpoint-{step:07d}", root / f".tmp-checkpoint-{step:07d}"
    main = distributed.is_main()
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        if sharded:
            _save_sharded(tmp, model, optimizer)
        elif main:
            model.save_pretrained(tmp)
        if main:
            optim = None if sharded else optimizer.state_dict()
            blob = {"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng_state(generator)}
            torch.save(blob, tmp / "trainer.pt")
            world_size = distributed.world()[1]
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "world_size": world_size}))
            _publish(root, tmp, final, step, keep)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
        raise run_log.WriteError(
            f"cannot write checkpoint {tmp}: {reason} ({run_log.free_space(root)}); the previous checkpoints are intact"
        ) from e
    distributed.barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path, step: int, keep: int) -> None:
    """Renames the finished `tmp` to `final` and prunes old checkpoints."""
    if final.exists():  # re-saving the same step: move the old one aside first (os.replace needs an empty target)
        old = root / f".old-checkpoint-{step:07d}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in all_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)


def _save_sharded(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path / "dcp")


def _load_sharded(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path / "dcp")  # in place, each rank reading its shards
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def all_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories never match)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest(root: str | Path) -> Path | None:
    found = all_checkpoints(root)
    return found[-1] if found else None


class Unreadable(ValueError):
    """A checkpoint's file is missing, truncated or corrupt (a crash or a full disk while it was written)."""


@dataclass
class Loaded:
    """Everything in a checkpoint, read into memory: reading can fail without touching the model."""

    path: Path
    state: dict  # trainer_state.json
    trainer: dict  # trainer.pt: optimizer, scheduler, RNG states
    weights: dict | None  # the adapter's or the model's tensors; None when sharded (fsdp2 reads in place)
    adapter: bool  # weights are a peft adapter


def _unreadable(path: Path, name: str, e: Exception) -> Unreadable:
    reason = " ".join(str(e).split())[:160]
    return Unreadable(f"checkpoint {path}: {name} cannot be read ({type(e).__name__}: {reason}): truncated or corrupt")


def read_state(path: str | Path) -> dict:
    """trainer_state.json of a checkpoint; Unreadable when it is missing or torn."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise _unreadable(path, "trainer_state.json", e) from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _unreadable(path, "trainer_state.json", ValueError("no step"))
    return state


def _read_weights(path: Path) -> tuple[dict, bool]:
    from safetensors.torch import load_file

    adapter = path / "adapter_model.safetensors"
    files = [adapter] if adapter.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise Unreadable(f"checkpoint {path} has no weights (*.safetensors)")
    weights = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except Exception as e:  # SafetensorError, OSError: a torn file
            raise _unreadable(path, f.name, e) from e
    return weights, adapter.is_file()


def read(path: str | Path, sharded: bool = False) -> Loaded:
    """Reads a checkpoint whole. Unreadable for a torn file; ValueError when it was written by another world size
    or parallel mode."""
    path = Path(path)
    state = read_state(path)
    saved, world_size = state.get("world_size", 1), distributed.world()[1]
    if saved != world_size:
        raise ValueError(
            f"resume: checkpoint {path} was written by {saved} processes, this run has world size {world_size}; "
            f"resume with --nproc_per_node {saved} (or the same total over nodes), or start a new --output-dir"
        )
    if (path / "dcp").is_dir() != sharded:
        written = "parallel='fsdp2'" if (path / "dcp").is_dir() else "parallel='ddp' or one process"
        raise ValueError(f"resume: checkpoint {path} was written with {written}; resume with the same --parallel")
    try:
        blob = torch.load(path / "trainer.pt", weights_only=False)  # our own file: python/numpy RNG tuples
    except Exception as e:  # zip, pickle, EOF and OS errors all mean a torn file
        raise _unreadable(path, "trainer.pt", e) from e
    weights, adapter = (None, False) if sharded else _read_weights(path)
    return Loaded(path, state, blob, weights, adapter)


def _misfit(loaded: Loaded, model) -> str:
    """The probable reason why a readable checkpoint does not load into `model`."""
    lora = hasattr(model, "peft_config")
    if loaded.adapter and not lora:
        return "it holds a LoRA adapter and this run has --no-lora"
    if loaded.weights is not None and not loaded.adapter and lora:
        return "it holds full weights (a --no-lora run) and this run has --lora"
    if lora and (loaded.path / "adapter_config.json").is_file():
        r = json.loads((loaded.path / "adapter_config.json").read_text()).get("r")
        if r != model.peft_config["default"].r:
            return f"its adapter has LoRA rank {r}, this run {model.peft_config['default'].r}"
    return "another model, LoRA target modules or parallel mode than this run"


def _apply_weights(loaded: Loaded, model) -> None:
    if loaded.adapter:
        from peft import set_peft_model_state_dict

        if not hasattr(model, "peft_config"):
            raise ValueError("adapter weights for a model without LoRA")
        set_peft_model_state_dict(model, loaded.weights)
        return
    missing, unexpected = model.load_state_dict(loaded.weights, strict=False)
    if unexpected:
        raise ValueError(f"unexpected weights {unexpected[:5]}")


def apply(loaded: Loaded, model, optimizer, scheduler, generator, sharded: bool = False) -> dict:
    """Restores weights, optimizer, scheduler and RNG states in place; returns trainer_state.json. ValueError naming
    the checkpoint and the probable cause when it does not fit this run."""
    try:
        if sharded:
            _load_sharded(loaded.path, model, optimizer)
        else:
            _apply_weights(loaded, model)
            optimizer.load_state_dict(loaded.trainer["optimizer"])
        scheduler.load_state_dict(loaded.trainer["scheduler"])
        set_rng_state(loaded.trainer["rng"], generator)
    except (RuntimeError, ValueError, KeyError, AttributeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(
            f"resume: checkpoint {loaded.path} does not fit this run ({_misfit(loaded, model)}): {first}"
        ) from e
    return loaded.state
