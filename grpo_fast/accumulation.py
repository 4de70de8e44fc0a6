"""The step's loss as a sum over micro-batches and ranks (gradient accumulation) that equals TRL 1.16's loss over the
whole step's batch, one `_compute_loss` over every rank's rows, for every loss type and option.

Each micro-batch (whole groups) runs `fused_linear_grpo_loss` on its packed hidden states, weighed so that the
micro-batches of all ranks sum to the batch's loss:
- per-row reductions, grpo and sapo (row token means), luspo (row token sums) and dr_grpo (token sums over a
  constant per row): the micro-batch's loss times its share of the step's rows;
- per-token reductions, dapo, bnpo, cispo and vespo: num_items_in_batch = the step's active tokens;
- the entropy bonus, -entropy_coef times the mean entropy over the step's trained tokens: the op's coefficient in a
  micro-batch is entropy_coef * (its trained tokens / the step's) / (its loss weight);
- top_entropy_quantile < 1 ranks every active token of the step, which the loss of the first micro-batch already
  needs: a no-grad entropy pass over the micro-batches comes first (one more forward of the policy and the head
  per update, no backward: about a third of an update's compute, a quarter with gradient checkpointing; the first
  update reuses the old-log-prob pass when num_iterations > 1). Each loss call ranks against that whole set
  through the op's `entropy_gather` hook, so every micro-batch trains against the same threshold.
Metrics are the step's: means over its active tokens (rows for sequence-level clip fractions and vespo's weights,
kept tokens for entropy_kept_mean), and policy_loss summed as the loss is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import config, distributed, reference
from .fused_linear import fused_linear_grpo_loss, fused_linear_logps
from .logit_head import logit_transform
from .packing import completion_hidden_states, lm_head
from .rollout_agreement import rollout_old_logps, training_logps_buffer
from .run_log import say

ROW_REDUCED = ("grpo", "sapo", "luspo", "dr_grpo")  # TRL reduces these per row: a micro-batch weighs by its rows
PER_ROW_METRICS = ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "cispo_clip_ratio")  # at sequence level


def hidden(model, mb: dict, cfg) -> torch.Tensor:
    """Packed shared-prefix forward: (b*G, T, H) hidden states that predict mb["ids"]."""
    return completion_hidden_states(model, mb["prompts"], mb["ids"], mb["mask"], group_size=cfg.group_size)


def loss_inputs(model, mb: dict, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """hidden(...), the LM head's weight and bias, and the fused ops' logit transform keywords (logit_head.py);
    under fsdp2 run inside the root's forward, which gathers the head (distributed.forward)."""
    return hidden(model, mb, cfg), *lm_head(model), logit_transform(model).kwargs()


@torch.no_grad()
def logps(model, mb: dict, cfg, with_entropy: bool = False):
    """No-grad fused log-probs (b*G, T) of mb["ids"] under `model` (old or reference policy); with_entropy: also
    the entropy (b*G, T) of every position, from the same sweep."""
    h, weight, bias, head = distributed.forward(model, loss_inputs, mb, cfg)
    return fused_linear_logps(
        h, weight, mb["ids"], bias=bias, temperature=cfg.temperature, return_entropy=with_entropy, **head
    )


@dataclass
class StepEntropy:
    """Every active token's entropy in the step, for top_entropy_quantile (reference.high_entropy_mask's ranking)."""

    values: torch.Tensor  # (n,) fp32: every micro-batch's active-token entropies, every rank's
    kept: list[int]  # per micro-batch of this rank: active tokens at or above the threshold
    kept_total: float  # the step's kept tokens, all ranks

    @classmethod
    def measure(cls, model, mbs: list[dict], cfg) -> StepEntropy:
        """From the entropies an old-log-prob pass left in mb["entropy"] (used once: the policy moves after each
        update), else from a no-grad pass."""
        local = []
        for mb in mbs:
            entropy = mb.pop("entropy", None)
            entropy = logps(model, mb, cfg, with_entropy=True)[1] if entropy is None else entropy
            local.append(entropy[mb["mask"].bool()])  # (n_i,) in the loss' dtype
        values = distributed.all_gather_varlen(torch.cat(local).float())
        if values.numel() == 0:  # no active token anywhere: the op keeps none either
            return cls(values, [0] * len(mbs), 0.0)
        threshold = reference.quantile(values, 1.0 - cfg.top_entropy_quantile)  # fp32 0-d, as the op's
        kept = [int((e >= threshold).sum()) for e in local]
        return cls(values, kept, distributed.all_sum([float(sum(kept))])[0])

    def gather(self, _local: torch.Tensor) -> torch.Tensor:
        """The op's entropy_gather: the step's entropies (this micro-batch's among them) in place of its own."""
        return self.values


def micro_batch_loss(model, mb: dict, cfg, options: dict, num_items, entropy_gather):
    """fused_linear_grpo_loss of one micro-batch: (loss, metrics)."""
    h, weight, bias, head = distributed.forward(model, loss_inputs, mb, cfg)
    if cfg.old_logps_from == "rollout" and mb["old"] is None:  # first update: old log-probs and IS weights
        rollout_old_logps(h, weight, bias, head, mb, cfg)
    return fused_linear_grpo_loss(
        h, weight, mb["ids"], mb["mask"], bias=bias, advantages=mb["advantages"], old_logps=mb["old"],
        ref_logps=mb["ref"], temperature=cfg.temperature, num_items_in_batch=num_items,
        importance_sampling_ratio=mb.get("is_ratio"), logps_out=training_logps_buffer(mb),
        entropy_gather=entropy_gather, **head, **options,
    )  # fmt: skip


def metric_count(key: str, rows: int, tokens: float, kept: float, cfg) -> float:
    """What a micro-batch's value of metric `key` averages over (its weight in the step's mean)."""
    if key == "vespo_phi_seq_mean" or (key in PER_ROW_METRICS and cfg.importance_sampling_level == "sequence"):
        return rows
    if key == "entropy_kept_mean":
        return kept
    return 1.0 if key == "entropy_threshold" else tokens  # the threshold is the step's, the same in every call


def accumulate(model, mbs: list[dict], cfg) -> tuple[torch.Tensor, dict]:
    """Backward over every micro-batch; the summed loss equals the loss of the whole batch of every rank (module
    docstring). Loss and metrics come back as the step's, reduced over ranks."""
    rows, tokens = distributed.all_sum(
        [sum(mb["ids"].shape[0] for mb in mbs), sum(float(mb["mask"].sum()) for mb in mbs)]
    )
    by_rows = cfg.loss_type in ROW_REDUCED
    options = config.loss_options(cfg) | {"loss_type": "dapo" if cfg.loss_type == "bnpo" else cfg.loss_type}
    step = StepEntropy.measure(model, mbs, cfg) if cfg.top_entropy_quantile < 1.0 else None
    trained = step.kept_total if step else tokens  # what the entropy bonus averages over
    total, sums, counts, moved = torch.zeros(()), {}, {}, 0
    for i, mb in enumerate(mbs):
        n, active = mb["ids"].shape[0], float(mb["mask"].sum())
        weight = n / rows if by_rows else 1.0
        kept = step.kept[i] if step else active
        options["entropy_coef"] = cfg.entropy_coef * kept / max(trained, 1.0) / weight
        loss, m = micro_batch_loss(
            model, mb, cfg, options, None if by_rows else max(tokens, 1.0), step.gather if step else None
        )
        (loss * weight).backward()
        total += (loss * weight).detach().float().cpu()
        if cfg.entropy_coef != 0.0:  # TRL logs the loss before the bonus (a 0 coefficient: no bonus in this one)
            sums["policy_loss"] = sums.get("policy_loss", 0.0) + weight * float(m.pop("policy_loss", loss.detach()))
        live = round(float(m["entropy_mask_ratio"]) * active) if step else active
        moved += abs(live - kept)
        for k, v in m.items():
            c = metric_count(k, n, active, live, cfg)
            sums[k], counts[k] = sums.get(k, 0.0) + c * float(v), counts.get(k, 0.0) + c
    return _reduce(total, sums, counts, moved, cfg)


def _reduce(total: torch.Tensor, sums: dict, counts: dict, moved: int, cfg) -> tuple[torch.Tensor, dict]:
    """The step's loss and metrics from this rank's sums and counts, summed over ranks (one collective)."""
    keys = sorted(sums)
    summed = distributed.all_sum(
        [float(total), float(moved), *(sums[k] for k in keys), *(counts.get(k, 1.0) for k in keys)]
    )
    loss, moved, values, weights = summed[0], summed[1], summed[2 : 2 + len(keys)], summed[2 + len(keys) :]
    if moved and cfg.entropy_coef != 0.0:
        say(
            f"warning: {moved:.0f} tokens changed side of the entropy threshold between the entropy pass and the "
            "training forward (non-deterministic kernels or dropout): the entropy bonus' normalizer is off by that"
        )
    metrics = {k: v if k == "policy_loss" else (v / w if w else 0.0) for k, v, w in zip(keys, values, weights)}
    return torch.tensor(loss), metrics
