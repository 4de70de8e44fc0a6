"""The optimizer and its learning-rate schedule: AdamW on the trainable parameters, linear warmup, then cosine to 0
over every update of the run (max_steps * num_iterations).

On --resume with a larger max_steps the schedule is laid over the new total, as if the run had been started with it:
`sync_lr` gives the restored optimizer the new schedule's LR at the restored update. Without it the first resumed
update would run at the value the checkpoint holds (the old schedule's end: 0) before the scheduler's next step.
"""

from __future__ import annotations

import math

import torch


def make_optimizer(cfg, model):
    """AdamW on the trainable parameters; linear warmup then cosine to 0 over every update."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    total = cfg.max_steps * cfg.num_iterations
    warmup = max(1, int(cfg.warmup_ratio * total))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, total - warmup))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def sync_lr(optimizer, scheduler) -> None:
    """Each parameter group's LR from this run's schedule at the scheduler's (restored) update count."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports for the next update
