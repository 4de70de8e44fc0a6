"""Prompt datasets: a Hugging Face id (config, split), a local JSONL/Parquet file, or a built-in task;
and the deterministic order prompts are drawn in, so a resumed run sees the same prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import tasks
from .config import Config

# Built-in tasks: name -> (source, HF config, split, column renames to prompt/answer).
BUILTIN = {
    "reverse": ("tiny", None, None, {}),
    "gsm8k": ("openai/gsm8k", "main", "train", {"question": "prompt"}),
    "arithmetic": ("arithmetic", None, None, {}),  # generated (tasks.py); split "train" or held-out "test"
    "countdown": ("countdown", None, None, {}),
}


def _load_hf(source: str, config: str | None, split: str):
    import datasets

    if source.endswith((".jsonl", ".json")):
        return datasets.load_dataset("json", data_files=source, split="train")
    if source.endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=source, split="train")
    return datasets.load_dataset(source, config, split=split)


def load(source: str, config: str | None, split: str, prompt_column: str, answer_column: str | None, task=None):
    """Rows as a list-like of dicts (a `datasets.Dataset` or a list) with `prompt_column` present; `task` (a
    Config) carries the options of the generated tasks (tasks.py), their defaults when None.

    Raises ValueError naming the dataset or the missing column.
    """
    renames: dict[str, str] = {}
    if source in BUILTIN:
        source, builtin_config, builtin_split, renames = BUILTIN[source]
        config, split = config or builtin_config, builtin_split or split
    if source == "tiny":
        from .tiny import reverse_task

        rows = reverse_task(split=split)
        columns = list(rows[0])
    elif source in tasks.GENERATORS:
        rows = tasks.load(source, split, task or Config())
        columns = list(rows[0])
    else:
        is_file = source.endswith((".jsonl", ".json", ".parquet"))
        if is_file and not Path(source).is_file():
            raise ValueError(f"dataset: no such file {source!r}")
        try:
            rows = _load_hf(source, config, split)
        except Exception as e:
            raise ValueError(f"dataset: cannot load {source!r} (config {config!r}, split {split!r}): {e}") from e
        rows = rows.rename_columns({k: v for k, v in renames.items() if k in rows.column_names})
        columns = rows.column_names
    if prompt_column not in columns:
        raise ValueError(f"dataset {source!r} has no prompt column {prompt_column!r}; columns: {columns}")
    if len(rows) == 0:
        raise ValueError(f"dataset {source!r} is empty")
    return rows


def needs_answer(rewards: list[str]) -> bool:
    return any(name in ("math", "reverse", "arithmetic") for name in rewards)


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
