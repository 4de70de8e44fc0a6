"""Where a run starts: a fresh output directory, or (--resume) its latest usable checkpoint.

- Each checkpoint stores the run's config (trainer_state.json). On --resume every field that changes what the run
  computes must equal the stored value, else the run stops listing the differences, before the model loads; the
  fields in MAY_CHANGE (length, logging, evaluation, checkpoint cadence, memory and threading knobs) may differ, and
  config.json is then rewritten with the values in effect.
- max_steps may grow: the LR schedule is laid over the new total (as if the run had been started with it) and the
  restored optimizer takes the new schedule's LR at the restored update (schedule.sync_lr), so no update runs at the old
  schedule's final LR of 0. max_steps at or below the checkpoint's step is an error: nothing would train.
- --resume without a checkpoint prints one line and starts at step 0, as Lightning's ckpt_path="last" does (HF's
  resume_from_checkpoint=True raises instead): a preemptible job can then launch the same command every time.
- A checkpoint whose files cannot be read (torn by a crash or a full disk) is skipped for the next older one,
  saying so; one that reads but does not fit the model (LoRA on/off, rank, another model) is an error naming the
  probable cause, since every checkpoint of the run would fail the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint, config, distributed, run_log, schedule
from .run_log import say

MAY_CHANGE = {
    "max_steps", "output_dir", "resume", "progress", "save_steps", "keep_checkpoints", "log_samples_steps",
    "plot_steps", "cpu_threads", "micro_batch_groups", "gradient_checkpointing", "compile_decode", "eval_dataset",
    "eval_prompts", "eval_steps",
}  # fmt: skip  # micro-batching only changes the order of a float sum; the others, no trained number (evaluation
# draws no random number and changes no weight: heldout.py)


# Fields added later whose default is not what the code did before them: a checkpoint without the field ran so.
BEFORE = {"use_bias_correction_kl": False}  # issue 11 took TRL's default (True); no run before it corrected the KL


def _changes(stored: dict, cfg) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between a checkpoint's config and this run's, as 'field: old -> new'."""
    now, stored = json.loads(json.dumps(config.to_dict(cfg))), BEFORE | stored
    diff = [k for k in now if k in stored and stored[k] != now[k]]
    if stored.get("beta") == now["beta"] == 0:  # no KL term: its correction computes nothing
        diff = [k for k in diff if k != "use_bias_correction_kl"]
    line = lambda k: f"{k}: {stored[k]!r} -> {now[k]!r}"  # noqa: E731
    return [line(k) for k in diff if k not in MAY_CHANGE], [line(k) for k in diff if k in MAY_CHANGE and k != "resume"]


def check_config(state: dict, cfg, path: Path) -> None:
    stored = state.get("config")
    if stored is None:
        say(f"warning: checkpoint {path} stores no config (an older version wrote it): settings not checked")
        return
    refused, allowed = _changes(stored, cfg)
    if refused:
        raise ValueError(
            f"resume: settings differ from the run in {path}: {'; '.join(refused)}. Resume with the same values, "
            "or start a new --output-dir"
        )
    for line in allowed:
        say(f"resume: {line}")


def plan(cfg, out: Path) -> list[Path]:
    """Checkpoints to resume from, newest first (empty: start at step 0). Checked before the model loads: the
    stored config against this one, and max_steps against the checkpoint's step."""
    found = checkpoint.all_checkpoints(out / "checkpoints")[::-1]
    if not cfg.resume:
        if found:
            raise ValueError(f"output_dir {out} already has checkpoints: pass --resume, or choose another --output-dir")
        return []
    if not found:
        say(f"resume: no checkpoint under {out / 'checkpoints'}: starting at step 0")
        return []
    for i, path in enumerate(found):
        try:
            state = checkpoint.read_state(path)
        except checkpoint.Unreadable as e:
            say(f"warning: {e}; trying the previous checkpoint")
            continue
        check_config(state, cfg, path)
        if cfg.max_steps <= state["step"]:
            raise ValueError(
                f"max_steps={cfg.max_steps} but checkpoint {path} is at step {state['step']}: nothing to train; "
                "raise --max-steps to continue"
            )
        return found[i:]
    raise ValueError(f"resume: no checkpoint under {out / 'checkpoints'} can be read")


def restore(candidates: list[Path], model, optimizer, scheduler, generator, sharded: bool) -> tuple[Path, dict]:
    """Loads the newest readable checkpoint of `candidates` in place (falling back past torn ones, saying so) and
    puts the optimizer on this run's LR schedule. Returns its path and trainer_state.json."""
    for i, path in enumerate(candidates):
        try:
            loaded = checkpoint.read(path, sharded)
        except checkpoint.Unreadable as e:
            if i + 1 == len(candidates):
                raise
            say(f"warning: {e}; falling back to {candidates[i + 1]}")
            continue
        state = checkpoint.apply(loaded, model, optimizer, scheduler, generator, sharded)
        schedule.sync_lr(optimizer, scheduler)  # max_steps may have grown: this run's schedule
        return path, state
    raise AssertionError("unreachable: plan() returns at least one checkpoint")


def start(cfg, out: Path, candidates: list[Path], model, optimizer, scheduler, generator) -> tuple[int, int]:
    """(step, data position) to start from: a restored checkpoint's (its logs truncated to its step), or 0 with the
    logs of an earlier run that saved no checkpoint removed."""
    main = distributed.is_main()
    if not candidates:
        for stale in run_log.LOGS if main else ():
            (out / stale).unlink(missing_ok=True)
        return 0, 0
    sharded = isinstance(model, distributed.Runner)
    path, state = restore(candidates, model, optimizer, scheduler, generator, sharded)
    for log in run_log.LOGS if main else ():  # rank 0 alone touches the logs
        run_log.truncate(out / log, state["step"])
    say(f"resumed from {path} (step {state['step']})")
    return state["step"], state["data_position"]
