"""What a run writes beside its checkpoints: metrics.jsonl (one object per step), the reward-curve
PNG, samples.jsonl (a few completions per logged step) and config.json; and how it talks to the user.

A write that fails (permissions, a full disk, a path that is a file) is a WriteError: one line naming the
path and the reason. A torn last line in a log (power loss, a full disk) is dropped with a warning when
the log is read back, so a resume never depends on hand-editing it.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from . import distributed

LOGS = ("metrics.jsonl", "samples.jsonl")  # the per-step logs a resumed run truncates


class WriteError(ValueError):
    """Something the run owns could not be written."""


def say(message: str) -> None:
    """One line on stderr from rank 0, above the progress bar."""
    if distributed.is_main():
        tqdm.write(message, file=sys.stderr)


def free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f} MB free there"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def writing(path: Path):
    """Turns an OSError raised while writing `path` into a WriteError naming the path and the reason."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"cannot write {e.filename or path}: {e.strerror or e}") from e


def prepare(out: Path) -> None:
    """Creates the output directory and proves it writable, before anything slow (model, data) is loaded."""
    probe = out / ".write-probe"
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()


def write_text(path: Path, text: str) -> None:
    with writing(path):
        Path(path).write_text(text)


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v  # JSON has no NaN


def append_jsonl(path: Path, row: dict) -> None:
    with writing(path), open(path, "a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL log; a torn LAST line is dropped with a warning, any other bad line is an error."""
    if not Path(path).is_file():
        return []
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n + 1 < len(lines):
                raise ValueError(f"{path}: line {i} is not JSON ({e}); fix or remove it") from e
            say(f"warning: {path}: dropping a torn last line {i} ({line[:40]!r}...)")
    return rows


def truncate(path: Path, last_step: int) -> None:
    """Drops rows after `last_step`: a resumed run rewrites the steps after its checkpoint."""
    if Path(path).is_file():
        rows = [r for r in read_jsonl(path) if r["step"] <= last_step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_rewards(metrics_path: Path, png_path: Path, title: str = "GRPO reward") -> None:
    """Mean reward per step (with a +-std band) and its moving average, beside the held-out evaluations' mean
    reward and pass rate (eval_* fields, heldout.py), written to `png_path`. Steps whose reward is not finite (null
    in metrics.jsonl) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = read_jsonl(metrics_path)
    rows = [r for r in logged if _number(r.get("reward"))]
    evals = [r for r in logged if _number(r.get("eval_reward"))]
    if not rows and not evals:
        return
    steps = [r["step"] for r in rows]
    mean = [r["reward"] for r in rows]
    std = [r.get("reward_std") or 0.0 for r in rows]
    k = max(1, len(rows) // 20)
    smooth = [sum(mean[max(0, i - k + 1) : i + 1]) / len(mean[max(0, i - k + 1) : i + 1]) for i in range(len(mean))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    ax.plot(steps, mean, lw=0.8 if k > 1 else 1.5, alpha=0.6 if k > 1 else 1.0, label="mean reward (sampled)")
    if k > 1:  # a 1-step average is the mean line again
        ax.plot(steps, smooth, lw=2, label=f"moving average ({k} steps)")
    _plot_evals(ax, evals)
    ax.set(xlabel="step", ylabel="reward" + (" / pass rate" if evals else ""), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    try:
        with writing(tmp):
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    with writing(png_path):
        tmp.replace(png_path)  # a viewer never sees a half-written PNG


def _plot_evals(ax, evals: list[dict]) -> None:
    """The held-out evaluations on the training reward's axes (greedy completions of the same prompts each time)."""
    if not evals:
        return
    held = f"held-out ({evals[-1].get('eval_prompts')} prompts, greedy)"
    steps, reward = [r["step"] for r in evals], [r["eval_reward"] for r in evals]
    passed = [(r["step"], r["eval_pass_rate"]) for r in evals if _number(r.get("eval_pass_rate"))]
    if passed == list(zip(steps, reward)):  # a 0/1 reward: one line says both
        ax.plot(steps, reward, "o-", ms=4, lw=1.2, label=f"{held} pass rate = mean reward")
        return
    ax.plot(steps, reward, "o-", ms=4, lw=1.2, label=f"{held} mean reward")
    if passed:
        ax.plot(*zip(*passed), "s--", ms=4, lw=1.2, label=f"{held} pass rate")


def try_plot(metrics_path: Path, png_path: Path) -> None:
    """The plot is a convenience: a failure is a warning, never the end of a run."""
    try:
        plot_rewards(metrics_path, png_path)
    except Exception as e:  # matplotlib can raise anything; training must go on
        say(f"warning: reward plot not updated: {type(e).__name__}: {e}")


def samples(step: int, prompts: list[str], completions: list[str], rewards: list[float], k: int = 4) -> dict:
    return {
        "step": step,
        "samples": [
            {"prompt": p, "completion": c, "reward": r} for p, c, r in list(zip(prompts, completions, rewards))[:k]
        ],
    }
