"""Prompt datasets: a Hugging Face id (config, split), a local JSONL/JSON/CSV/Parquet file, or a built-in task;
and the deterministic order prompts are drawn in, so a resumed run sees the same prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import tasks
from .config import Config

# Built-in tasks: name -> (source, HF config, column renames to prompt/answer); the split is --dataset-split
# (generated tasks and reverse: "train", or the held-out "test").
BUILTIN = {
    "reverse": ("tiny", None, {}),
    "gsm8k": ("openai/gsm8k", "main", {"question": "prompt"}),
    "arithmetic": ("arithmetic", None, {}),  # generated (tasks.py)
    "countdown": ("countdown", None, {}),
}


FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # suffix -> datasets builder


def _local_file(source: str, config: str | None, split: str) -> Path | None:
    """The local data file `source` names (checked), or None for a Hub id or a local dataset directory. A name
    that exists or has a file suffix is never sent to the Hub (which would retry for half a minute)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir() or not (path.exists() or suffix in FILE_TYPES or source.startswith((".", "/", "~"))):
        return None
    if not path.is_file():
        raise ValueError(f"dataset: no such file {source!r}")
    if suffix not in FILE_TYPES:
        raise ValueError(
            f"dataset: unsupported file type {suffix or '(none)'!r} of {source!r}; use .jsonl, .json, .csv or .parquet"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"dataset file {source!r} is empty")
    if config is not None or split != "train":
        raise ValueError(
            "dataset_config and dataset_split apply to Hugging Face datasets; a local file is loaded whole"
        )
    return path


def _load_hf(source: str, config: str | None, split: str):
    import datasets

    local = _local_file(source, config, split)
    if local is not None:
        return datasets.load_dataset(FILE_TYPES[local.suffix.lower()], data_files=str(local), split="train")
    return datasets.load_dataset(source, config, split=split)


def load(source: str, config: str | None, split: str, prompt_column: str, answer_column: str | None, task=None):
    """Rows as a list-like of dicts (a `datasets.Dataset` or a list) with `prompt_column` present; `task` (a
    Config) carries the options of the generated tasks (tasks.py), their defaults when None.

    Raises ValueError naming the dataset or the missing column.
    """
    renames: dict[str, str] = {}
    if source in BUILTIN:
        source, builtin_config, renames = BUILTIN[source]
        config = config or builtin_config  # the split stays the user's (default "train")
    if source == "tiny":
        from .tiny import reverse_task

        rows = reverse_task(split=split)
        columns = list(rows[0])
    elif source in tasks.GENERATORS:
        rows = tasks.load(source, split, task or Config())
        columns = list(rows[0])
    else:
        try:
            rows = _load_hf(source, config, split)
        except ValueError as e:
            if str(e).startswith("dataset"):  # ours, already one clear line
                raise
            raise ValueError(f"dataset: cannot load {source!r} (config {config!r}, split {split!r}): {e}") from e
        except Exception as e:
            raise ValueError(f"dataset: cannot load {source!r} (config {config!r}, split {split!r}): {e}") from e
        rows = rows.rename_columns({k: v for k, v in renames.items() if k in rows.column_names})
        columns = rows.column_names
    if prompt_column not in columns:
        raise ValueError(f"dataset {source!r} has no prompt column {prompt_column!r}; columns: {columns}")
    if len(rows) == 0:
        raise ValueError(f"dataset {source!r} is empty")
    return rows


@dataclass
class PromptOrder:
    """Prompt i of the run is row perm_e[i % n] of epoch e = i // n, perm_e seeded by (seed, e):
    the position in the stream is the whole data state."""

    n: int
    seed: int

    def indices(self, position: int, count: int) -> list[int]:
        out, perm, epoch = [], None, -1
        for i in range(position, position + count):
            if i // self.n != epoch:
                epoch = i // self.n
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            out.append(int(perm[i % self.n]))
        return out
