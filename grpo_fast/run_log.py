"""What a run writes beside its checkpoints: metrics.jsonl (one object per step), the reward-curve
PNG, samples.jsonl (a few completions per logged step) and config.json."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v  # JSON has no NaN


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drops rows after `last_step`: a resumed run rewrites the steps after its checkpoint."""
    rows = [r for r in read_jsonl(path) if r["step"] <= last_step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_rewards(metrics_path: Path, png_path: Path, title: str = "GRPO reward") -> None:
    """Mean reward per step (with a +-std band) and its moving average, written to `png_path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    mean = [r["reward"] for r in rows]
    std = [r.get("reward_std") or 0.0 for r in rows]
    k = max(1, len(rows) // 20)
    smooth = [sum(mean[max(0, i - k + 1) : i + 1]) / len(mean[max(0, i - k + 1) : i + 1]) for i in range(len(mean))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    ax.plot(steps, mean, lw=0.8, alpha=0.6, label="mean reward")
    ax.plot(steps, smooth, lw=2, label=f"moving average ({k} steps)")
    ax.set(xlabel="step", ylabel="reward", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)  # a viewer never sees a half-written PNG


def samples(step: int, prompts: list[str], completions: list[str], rewards: list[float], k: int = 4) -> dict:
    return {
        "step": step,
        "samples": [
            {"prompt": p, "completion": c, "reward": r} for p, c, r in list(zip(prompts, completions, rewards))[:k]
        ],
    }
