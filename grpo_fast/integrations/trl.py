"""grpo-fast's fused linear GRPO loss inside TRL: `FastGRPOTrainer`, a drop-in for `trl.GRPOTrainer`.

    from grpo_fast.integrations.trl import FastGRPOTrainer  # instead of: from trl import GRPOTrainer

Everything but the loss is TRL's: generation (vLLM or transformers), rewards, advantages, old and
reference log-probs, accelerate / DeepSpeed / FSDP wrapping, logging. The policy forward runs the
model only up to its final hidden states (B, P+C, H); the positions that score the C completion tokens
go with the LM head weight into `grpo_fast.fused_linear_grpo_loss`, so neither the (B, C, V) logits nor
their gradient are ever in memory. The model is still called through its wrappers (DDP, DeepSpeed,
PEFT, autocast) with an extra keyword read by a patched `forward`, as TRL itself does for its fused head.

Supported: all of TRL 1.16's loss options: loss types grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo,
vespo (with their knobs); importance sampling at token or sequence level; beta, epsilon, epsilon_high,
delta, temperature; use_bias_correction_kl; top_entropy_quantile (ranked over every process' tokens, as
TRL); off_policy_mask_threshold; the vLLM importance-sampling correction (every vllm_importance_sampling_mode:
the ratios TRL computes at generation are applied in the fused loss); entropy_coef and adaptive entropy
control (TRL's host-side controller, reproduced here); tool masks; LoRA (not on the LM head); scaled and
soft-capped heads (Granite, Cohere, Gemma 2/3: `grpo_fast.logit_head` reads them, the fused ops apply them).
Rejected with a ValueError naming the option: MoE router aux loss, vision-language models, a logit transform
`logit_head` cannot express.

Logged metrics are TRL's (entropy, kl, clip_ratio/*, cispo_clip_ratio, vespo/phi_seq_mean, policy_loss,
entropy_coef). `clip_ratio/low_min` and `clip_ratio/high_max` need per-token ratios: when old log-probs
are given (off-policy steps), they cost one extra no-grad `fused_linear_logps` pass (2*N*H*V FLOPs, O(N)
memory).
"""

from __future__ import annotations

import functools
import types

import torch
from packaging.version import Version

from grpo_fast.fused_linear import fused_linear_grpo_loss, fused_linear_logps
from grpo_fast.logit_head import LogitTransform, logit_transform
from grpo_fast.reference import CLIP_LOSS_TYPES, LOSS_TYPES

TRL_MIN, TRL_MAX = "1.10.0", "1.17.0"  # tested: 1.10.0, 1.13.0, 1.16.0 (_compute_loss is version-specific)
SUPPORTED_TRL = f"trl>={TRL_MIN},<{TRL_MAX}"
BY_ITEMS = ("dapo", "cispo", "vespo")  # normalized by the accumulated batch's tokens: no accumulation division
ENTROPY_PAD = -1e9  # TRL's sentinel when entropies are padded across processes (an entropy is never negative)
_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids")


def check_trl_version(version: str) -> None:
    """Raise ImportError unless `version` (trl.__version__) lies in the supported range."""
    if not Version(TRL_MIN) <= Version(version) < Version(TRL_MAX):
        raise ImportError(
            f"grpo_fast.integrations.trl supports {SUPPORTED_TRL}, but trl {version} is installed; "
            f"install a supported version: pip install 'grpo-fast[trl]'"
        )


try:
    import trl as _trl
except ImportError:  # the module imports without trl; FastGRPOTrainer() then raises
    _trl = None

if _trl is not None:
    check_trl_version(_trl.__version__)
    from accelerate.utils import is_peft_model
    from trl import GRPOTrainer as _GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
else:
    _GRPOTrainer = object


def _unsupported_options(trainer) -> list[str]:
    """TRL options whose math fused_linear_grpo_loss does not implement, as 'name=value' strings."""
    checks = {
        "loss_type": trainer.loss_type not in LOSS_TYPES,  # a TRL newer than this module
        "router_aux_loss_coef": trainer.aux_loss_enabled,
    }
    args = trainer.args
    return [f"{name}={getattr(trainer, name, getattr(args, name, None))!r}" for name, bad in checks.items() if bad]


def _check_model(model) -> LogitTransform:
    """Text-only causal LMs whose logits are f(hidden @ W^T (+ b)) with a plain linear LM head (not
    LoRA-wrapped); returns f, the logit scale and softcap `grpo_fast.logit_head` reads from the config."""
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        raise ValueError("FastGRPOTrainer supports text-only models; use trl.GRPOTrainer for vision-language models")
    if not isinstance(getattr(model.get_output_embeddings(), "weight", None), torch.Tensor):
        raise ValueError("FastGRPOTrainer needs a linear LM head (output embeddings with a weight)")
    return logit_transform(model)  # refuses a LoRA-wrapped head and transforms it cannot express


def _head_tensors(model, hidden: torch.Tensor, cast_fp32: bool):
    """LM head weight (V, H), bias (V,) or None, and hidden cast to the dtype the head runs in."""
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 shards parameters as DTensors: gather the head (V*H elements)
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    if cast_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)  # what nn.Linear would run in under autocast
    else:
        dtype = weight.dtype
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(hidden), cast(weight), cast(bias)


def _fused_grpo_head(model, spec: dict, temperature: float, transform: dict, cast_fp32: bool, args, kwargs):
    """Backbone to hidden states, then the fused loss; returns (loss, metrics, no-grad logps or None)."""
    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state  # (B, P+C, H)
    ids, mask = spec.pop("completion_ids"), spec.pop("completion_mask")
    hidden = hidden[:, -ids.shape[1] - 1 : -1]  # (B, C, H): position t-1 scores completion token t
    hidden, weight, bias = _head_tensors(model, hidden, cast_fp32)
    ids, mask = ids.to(weight.device), mask.to(weight.device)
    want_logps = spec.pop("return_logps")
    with torch.autocast(hidden.device.type, enabled=False):
        head = dict(bias=bias, temperature=temperature, **transform)
        loss, metrics = fused_linear_grpo_loss(hidden, weight, ids, mask, **head, **spec)
        logps = None
        if want_logps:
            with torch.no_grad():
                logps = fused_linear_logps(hidden, weight, ids, **head)  # (B, C)
    return loss, metrics, logps


def add_fused_grpo_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False) -> None:
    """Patch `model.forward`: called with `grpo_fast_loss=spec` it returns (loss, metrics, logps) from
    the fused linear GRPO loss; otherwise it is the previous forward (generation is unchanged)."""
    transform = _check_model(model).kwargs()
    previous_forward = model.forward

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, grpo_fast_loss=None, **kwargs):
        if grpo_fast_loss is None:
            return previous_forward(*args, **kwargs)
        return _fused_grpo_head(self, dict(grpo_fast_loss), temperature, transform, cast_lm_head_to_fp32, args, kwargs)

    model.forward = types.MethodType(forward, model)


class FastGRPOTrainer(_GRPOTrainer):
    """`trl.GRPOTrainer` whose loss is grpo-fast's fused linear GRPO loss (no logits in memory).

    Same constructor, config (`trl.GRPOConfig`), loss values, gradients and logged metrics as
    `trl.GRPOTrainer` for the supported options (module docstring). Requires trl>=1.10,<1.17.
    """

    def __init__(self, *args, **kwargs):
        if _trl is None:
            raise ImportError(f"FastGRPOTrainer needs {SUPPORTED_TRL}: pip install 'grpo-fast[trl]'")
        super().__init__(*args, **kwargs)
        self._check_supported()
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_fused_grpo_head(base, self.temperature, self.args.cast_lm_head_to_fp32)

    def _check_supported(self) -> None:
        bad = _unsupported_options(self)
        if bad:
            raise ValueError(
                f"FastGRPOTrainer does not support {', '.join(bad)}; "
                f"supported loss_type: {LOSS_TYPES}. Use trl.GRPOTrainer for these options."
            )

    def _loss_spec(self, inputs: dict, mask: torch.Tensor, mode: str) -> dict:
        """Keywords of fused_linear_grpo_loss reproducing TRL's _compute_loss, normalizers included."""
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise ValueError(f"advantages must have shape (B,), got {tuple(advantages.shape)}")
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items = None
        if self.loss_type in BY_ITEMS:  # TRL: the generation batch's token count, per process and accumulation step
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            num_items = num_items * accumulation / self.args.steps_per_generation if mode == "train" else num_items
        old_logps = inputs.get("old_per_token_logps")
        vllm_is = self.use_vllm and self.vllm_importance_sampling_correction
        args = self.args
        return dict(
            completion_ids=inputs["completion_ids"],
            completion_mask=mask,
            advantages=advantages,
            old_logps=old_logps,
            ref_logps=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
            sampling_logps=inputs.get("sampling_per_token_logps"),
            importance_sampling_ratio=inputs.get("importance_sampling_ratio") if vllm_is else None,
            num_items_in_batch=num_items,
            entropy_gather=self._gather_entropies,
            loss_type=self.loss_type,
            beta=self.beta,
            epsilon=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=args.delta,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos,
            vespo_lambda_pos=args.vespo_lambda_pos,
            vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg,
            top_entropy_quantile=self.top_entropy_quantile,
            use_bias_correction_kl=bool(args.use_bias_correction_kl),
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            entropy_coef=self._entropy_coef_now(accumulation),
            return_logps=old_logps is not None and self.loss_type in CLIP_LOSS_TYPES,
        )

    def _entropy_coef_now(self, accumulation: int) -> float:
        """The entropy bonus' coefficient in the fused loss. TRL subtracts coef * mean entropy / accumulation
        after its accumulation scaling; that scaling divides the whole loss of the other loss types afterwards
        (here too), so only the token-normalized types take the 1 / accumulation here. Adaptive control: the
        coefficient gated by the entropy of the last optimizer step (TRL's rule)."""
        if not self._entropy_bonus_enabled:
            return 0.0
        coef = self.entropy_coef
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            coef = 0.0
        return coef / accumulation if self.loss_type in BY_ITEMS else coef

    def _gather_entropies(self, local: torch.Tensor) -> torch.Tensor:
        """Every process' active-token entropies for top_entropy_quantile, gathered as TRL does."""
        padded = self.accelerator.pad_across_processes(local, dim=0, pad_index=ENTROPY_PAD)
        gathered = self.accelerator.gather(padded)
        return gathered[gathered != ENTROPY_PAD]

    def _compute_loss(self, model, inputs):
        self._check_supported()
        if any(inputs.get(k) is not None for k in _VISION_KEYS):
            raise ValueError("FastGRPOTrainer supports text-only inputs; use trl.GRPOTrainer for images")
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]  # (B, C)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # (B, P+C)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mode = "train" if self.model.training else "eval"
        spec = self._loss_spec(inputs, mask, mode)
        with self.accelerator.autocast():
            loss, metrics, logps = model(input_ids=input_ids, attention_mask=attention_mask, grpo_fast_loss=spec)
        if self._entropy_bonus_enabled:  # a coefficient gated to 0: the loss is the policy loss
            metrics.setdefault("policy_loss", loss.detach())
            self._entropy_bonus_bookkeeping(mode, metrics, mask.float())
        if self.loss_type not in BY_ITEMS and mode == "train":  # TRL scales these for gradient accumulation
            loss = loss / self.current_gradient_accumulation_steps
        self._log_fused_metrics(mode, metrics, mask.float(), inputs, logps)
        return loss

    def _entropy_bonus_bookkeeping(self, mode: str, metrics: dict, mask: torch.Tensor) -> None:
        """TRL's logging (policy_loss, entropy_coef) and adaptive entropy controller around the bonus: the
        window's entropy sum and token count over the trained tokens, reduced over processes at each
        optimizer step, move entropy_coef by entropy_coef_delta toward entropy_target."""
        log = self._metrics[mode]
        log["policy_loss"].append(self.accelerator.gather(metrics["policy_loss"]).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            tokens = mask.sum()
            mean = metrics["entropy"]
            if self.top_entropy_quantile < 1.0:  # the bonus acts on the kept tokens only
                tokens = torch.round(metrics["entropy_mask_ratio"] * tokens)
                mean = metrics["entropy_kept_mean"]
            stats = torch.stack([mean * tokens, tokens]).detach()
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                args = self.args
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            log["entropy_coef"].append(self.entropy_coef)

    def _global_mean(self, local_mean: torch.Tensor, count: torch.Tensor) -> float:
        """TRL's global_masked_mean from a local mean over `count` items: sums and counts reduced over ranks."""
        local = torch.stack([local_mean.float() * count, count.float()])
        totals = self.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_fused_metrics(self, mode: str, metrics: dict, mask: torch.Tensor, inputs: dict, logps) -> None:
        """TRL's metrics of _compute_loss: global means over tokens, or over rows for per-row quantities."""
        tokens = mask.sum()
        rows = tokens.new_tensor(float(mask.shape[0]))
        clip_count = tokens if self.importance_sampling_level == "token" else rows
        log = self._metrics[mode]
        if self.beta != 0.0:
            log["kl"].append(self._global_mean(metrics["kl"], tokens))
        log["entropy"].append(self._global_mean(metrics["entropy"], tokens))
        if self.loss_type == "cispo":
            log["cispo_clip_ratio"].append(self._global_mean(metrics["cispo_clip_ratio"], clip_count))
        elif self.loss_type == "vespo":
            log["vespo/phi_seq_mean"].append(self._global_mean(metrics["vespo_phi_seq_mean"], rows))
        elif self.loss_type in CLIP_LOSS_TYPES:
            for name in ("low", "high", "region"):
                log[f"clip_ratio/{name}_mean"].append(self._global_mean(metrics[f"clip_ratio_{name}"], clip_count))
            low_rows, high_rows = self._row_clip_fractions(mask, inputs, logps)
            log["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(low_rows)).item())
            log["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(high_rows)).item())

    def _row_clip_fractions(self, mask: torch.Tensor, inputs: dict, logps):
        """Per-row fractions of low- and high-clipped tokens (B,), as TRL's masked_seq_mean computes them."""
        old = inputs.get("old_per_token_logps")
        if old is None:  # on-policy: the ratio is exactly 1, nothing clips; empty rows give NaN as in TRL
            zero = torch.zeros(mask.shape[0], device=mask.device)
            return (zero, zero) if self.importance_sampling_level == "sequence" else (zero / mask.sum(-1),) * 2
        log_ratio = torch.where(mask.bool(), logps - old, 0.0)  # (B, C); a masked position never counts
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
        ratio, adv = torch.exp(log_ratio), inputs["advantages"].unsqueeze(1)
        if self.args.delta is not None:  # TRL flags clipping on the delta-capped ratio
            ratio = ratio.clamp(max=self.args.delta)
        low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).float()
        if self.importance_sampling_level == "sequence":
            return low.squeeze(1), high.squeeze(1)
        return (low * mask).sum(-1) / mask.sum(-1), (high * mask).sum(-1) / mask.sum(-1)


__all__ = ["FastGRPOTrainer", "add_fused_grpo_head", "check_trl_version", "SUPPORTED_TRL"]
