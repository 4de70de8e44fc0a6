"""Atomic checkpoints: everything is written into a temporary directory that is renamed into place
with os.replace, so a crash mid-write leaves the previous checkpoint intact.

A checkpoint `checkpoint-<step>` holds the model (a peft adapter, or full weights) via
save_pretrained, `trainer.pt` (optimizer, scheduler, torch/python/numpy/sampling RNG states) and
`trainer_state.json` (step, data position), written last.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

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


def save(root: str | Path, step: int, model, optimizer, scheduler, generator, state: dict, keep: int = 2) -> Path:
    """Writes checkpoint-<step> under `root` atomically and prunes all but the `keep` newest."""
    root = Path(root)
    final, tmp = root / f"checkpoint-{step:07d}", root / f".tmp-checkpoint-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(generator)},
        tmp / "trainer.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}))
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
    return final


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


def _load_weights(path: Path, model) -> None:
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint {path} has no weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {path}: unexpected weights {unexpected[:5]}")


def load(path: str | Path, model, optimizer, scheduler, generator) -> dict:
    """Restores weights, optimizer, scheduler and RNG states in place; returns trainer_state.json."""
    path = Path(path)
    _load_weights(path, model)
    blob = torch.load(path / "trainer.pt", weights_only=False)  # our own file: python/numpy RNG tuples
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"], generator)
    return json.loads((path / "trainer_state.json").read_text())
