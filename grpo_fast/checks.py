"""Host-side input validation shared by every public entry point (DESIGN.md, "Bad input").

Each check raises ValueError/TypeError with the offending argument's name in the message.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .reference import AGGREGATIONS, IMPORTANCE_LEVELS, IS_MODES, LOSS_TYPES, SCALE_REWARDS, LossOptions

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(x, name: str, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def floating(x: torch.Tensor, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dtype == torch.float16 and x.device.type == "cpu":
        raise TypeError(f"{name}: float16 is not supported on CPU; use bfloat16 or float32")


def same_device(name: str, ref: torch.Tensor, *others: tuple[str, torch.Tensor | None]) -> None:
    for other_name, t in others:
        if t is not None and t.device != ref.device:
            raise ValueError(f"{other_name} is on {t.device} but {name} is on {ref.device}")


def shape(x: torch.Tensor | None, name: str, expected: tuple[int, ...]) -> None:
    if x is not None and tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def ids_in_range(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} has values outside [0, {vocab_size}): min {int(ids.min())}, max {int(ids.max())}")


def finite(x: torch.Tensor | None, name: str) -> None:
    if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def binary_mask(mask: torch.Tensor, name: str) -> None:
    """Every value 0 or 1 (bool, int or float): a fraction, a negative or NaN would weigh tokens silently."""
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"{name} must hold only 0 and 1, found {bad!r}")


def number_or_scalar_tensor(x, name: str) -> None:
    """A finite positive int/float, or a 0-d tensor holding one."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise ValueError(
                f"{name} must be a number or a 0-d int/float tensor, got a {x.dtype} tensor {tuple(x.shape)}"
            )
        value = float(x)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        value = float(x)
    else:
        raise TypeError(f"{name} must be a number or a 0-d tensor, got {type(x).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {x!r}")


def positive_number(x, name: str) -> None:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {x!r}")


def choice(x, name: str, options: tuple[str, ...]) -> None:
    if x not in options:
        raise ValueError(f"{name} must be one of {options}, got {x!r}")


def group_size(rewards: torch.Tensor, group_size, name: str = "group_size") -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{name} must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"{name}={group_size} does not divide the batch of {rewards.shape[0]} rows")


def rewards(r: torch.Tensor, gsize, scale_rewards: str, eps: float = 1e-4) -> None:
    tensor(r, "rewards", ndim=1)
    if not r.is_floating_point():
        raise TypeError(f"rewards must be a floating tensor, got {r.dtype}")
    finite(r, "rewards")
    group_size(r, gsize)
    choice(scale_rewards, "scale_rewards", SCALE_REWARDS)
    positive_number(eps, "eps")


def finite_number(x, name: str, low: float = -math.inf) -> None:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x < low:
        bound = "" if low == -math.inf else f" >= {low}"
        raise ValueError(f"{name} must be a finite number{bound}, got {x!r}")


def loss_options(options: dict) -> LossOptions:
    """The `LossOptions` of a loss op's keyword options (no tensors: also the trainer's config.validate);
    TypeError for a name that is not an option."""
    names = [f.name for f in dataclasses.fields(LossOptions)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the loss options are {names}")
    opts = LossOptions(**options)
    choice(opts.loss_type, "loss_type", LOSS_TYPES)
    choice(opts.importance_sampling_level, "importance_sampling_level", IMPORTANCE_LEVELS)
    for name in ("epsilon", "sapo_temperature_pos", "sapo_temperature_neg"):
        positive_number(getattr(opts, name), name)
    for name in ("epsilon_high", "delta"):
        if getattr(opts, name) is not None:
            positive_number(getattr(opts, name), name)
    for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef"):
        finite_number(getattr(opts, name), name)
    finite_number(opts.beta, "beta", low=0.0)
    if opts.off_policy_mask_threshold is not None:
        finite_number(opts.off_policy_mask_threshold, "off_policy_mask_threshold")
    finite_number(opts.top_entropy_quantile, "top_entropy_quantile", low=0.0)
    if opts.top_entropy_quantile > 1:
        raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {opts.top_entropy_quantile!r}")
    if not isinstance(opts.use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl must be a bool, got {opts.use_bias_correction_kl!r}")
    mcl = opts.max_completion_length
    if mcl is not None and (not isinstance(mcl, int) or isinstance(mcl, bool) or mcl < 1):
        raise ValueError(f"max_completion_length must be a positive int, got {mcl!r}")
    return opts


def importance_ratio(ratio: torch.Tensor | None, mask: torch.Tensor, opts: LossOptions) -> None:
    """The vLLM importance-sampling ratio: (B, T) or (B, 1), finite and >= 0 where it counts (active tokens)."""
    if ratio is None:
        return
    B, T = mask.shape
    tensor(ratio, "importance_sampling_ratio", ndim=2)
    if tuple(ratio.shape) not in ((B, T), (B, 1)):
        raise ValueError(f"importance_sampling_ratio must have shape {(B, T)} or {(B, 1)}, got {tuple(ratio.shape)}")
    floating(ratio, "importance_sampling_ratio")
    if opts.loss_type == "vespo" and T > 1 and ratio.shape[1] == 1:
        raise ValueError("vespo needs a per-token importance_sampling_ratio (B, T) (TRL: a token_* IS mode)")
    counted = ratio[mask.bool().expand_as(ratio) if ratio.shape[1] == T else mask.bool().any(1, keepdim=True)]
    if counted.numel() and not bool((torch.isfinite(counted) & (counted >= 0)).all()):
        raise ValueError("importance_sampling_ratio must be finite and >= 0 at active tokens")


def token_inputs(
    B: int,
    T: int,
    device: torch.device,
    *,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor | None,
    rewards_: torch.Tensor | None,
    group_size_: int | None,
    scale_rewards: str,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    num_items_in_batch,
    sampling_logps: torch.Tensor | None = None,
) -> None:
    """Checks the per-row and per-token companions of a (B, T) batch of completions."""
    tensor(completion_mask, "completion_mask", ndim=2)
    shape(completion_mask, "completion_mask", (B, T))
    if (advantages is None) == (rewards_ is None):
        raise ValueError("pass exactly one of advantages or rewards (with group_size)")
    if advantages is not None:
        tensor(advantages, "advantages", ndim=1)
        shape(advantages, "advantages", (B,))
        floating(advantages, "advantages")
        finite(advantages, "advantages")
    else:
        if group_size_ is None:
            raise ValueError("group_size is required with rewards")
        shape(tensor(rewards_, "rewards", ndim=1), "rewards", (B,))
        rewards(rewards_, group_size_, scale_rewards)
    logps = (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps))
    for name, t in logps:
        if t is not None:
            tensor(t, name, ndim=2)
            shape(t, name, (B, T))
            floating(t, name)
    names = ("completion_mask", "advantages", "rewards", "old_logps", "ref_logps", "sampling_logps")
    tensors = (completion_mask, advantages, rewards_, old_logps, ref_logps, sampling_logps)
    for name, t in zip(names, tensors):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the model inputs are on {device}")
    binary_mask(completion_mask, "completion_mask")  # reads values: after the device check
    if num_items_in_batch is not None:
        number_or_scalar_tensor(num_items_in_batch, "num_items_in_batch")


def grpo_batch(
    B: int, T: int, V: int, device: torch.device, completion_ids, completion_mask, options: dict, **kw
) -> LossOptions:
    """Every check of a GRPO loss call over a (B, T) batch scored against a vocabulary of V; returns its
    `LossOptions` (from `options`, the op's loss keywords).

    `kw` holds the op's other keywords: advantages, rewards, group_size, scale_rewards, old_logps, ref_logps,
    sampling_logps, importance_sampling_ratio, num_items_in_batch, temperature.
    """
    tensor(completion_ids, "completion_ids", ndim=2)
    shape(completion_ids, "completion_ids", (B, T))
    if completion_ids.device != device:
        raise ValueError(f"completion_ids is on {completion_ids.device} but the model inputs are on {device}")
    ids_in_range(completion_ids, V, "completion_ids")
    token_names = ("advantages", "rewards", "group_size", "scale_rewards", "old_logps", "ref_logps")
    token = {k: kw[k] for k in token_names + ("num_items_in_batch", "sampling_logps")}
    token["rewards_"], token["group_size_"] = token.pop("rewards"), token.pop("group_size")
    token_inputs(B, T, device, completion_mask=completion_mask, **token)
    positive_number(kw["temperature"], "temperature")
    opts = loss_options(options)
    if opts.beta != 0 and kw["ref_logps"] is None:
        raise ValueError("ref_logps is required when beta != 0")
    ratio = kw["importance_sampling_ratio"]
    same_device("completion_mask", completion_mask, ("importance_sampling_ratio", ratio))
    importance_ratio(ratio, completion_mask, opts)
    return opts


def importance_sampling(old_logps, sampling_logps, completion_mask, mode: str, clip_min, clip_max) -> None:
    """Inputs of the vLLM importance-sampling ratio (TRL's vllm_importance_sampling_* semantics)."""
    tensor(completion_mask, "completion_mask", ndim=2)
    for name, t in (("old_logps", old_logps), ("sampling_logps", sampling_logps)):
        tensor(t, name, ndim=2)
        shape(t, name, tuple(completion_mask.shape))
        floating(t, name)
    same_device("old_logps", old_logps, ("sampling_logps", sampling_logps), ("completion_mask", completion_mask))
    importance_sampling_mode(mode, clip_min, clip_max)


def importance_sampling_mode(mode: str, clip_min, clip_max, names=("mode", "clip_min", "clip_max")) -> None:
    """A vLLM importance-sampling mode and its bounds; `names` are the arguments' names in messages."""
    choice(mode, names[0], IS_MODES)
    for name, bound in ((names[1], clip_min), (names[2], clip_max)):
        if bound is not None:
            finite_number(bound, name, low=0.0)
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(f"{names[1]} ({clip_min}) must be less than {names[2]} ({clip_max})")
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"{names[0]}={mode!r} needs {names[1]} or {names[2]}")


def reward_table(rewards: torch.Tensor, gsize, weights, aggregation: str, scale_rewards: str) -> None:
    """A (B, F) table of F reward functions' scores: NaN means not scored, infinities are refused."""
    tensor(rewards, "rewards", ndim=2)
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating tensor, got {rewards.dtype}")
    if bool(torch.isinf(rewards).any()):
        raise ValueError("rewards contains infinite values (NaN marks a score a reward function did not give)")
    group_size(rewards, gsize)
    if weights is not None:
        tensor(weights, "reward_weights", ndim=1)
        shape(weights, "reward_weights", (rewards.shape[1],))
        finite(weights, "reward_weights")
    choice(aggregation, "multi_objective_aggregation", AGGREGATIONS)
    choice(scale_rewards, "scale_rewards", SCALE_REWARDS)


def linear_head(hidden, weight, bias, ids, ids_name: str = "ids") -> None:
    """hidden (..., H) and ids (...) against an LM head weight (V, H) and bias (V,) or None."""
    tensor(hidden, "hidden")
    tensor(weight, "weight", ndim=2)
    tensor(ids, ids_name)
    floating(hidden, "hidden")
    floating(weight, "weight")
    if weight.shape[1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, H) with V, H >= 1, got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dimension must equal weight's H={weight.shape[1]}, got {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    shape(ids, ids_name, tuple(hidden.shape[:-1]))
    same_device("hidden", hidden, ("weight", weight), (ids_name, ids), ("bias", bias))
    if bias is not None:
        tensor(bias, "bias", ndim=1)
        shape(bias, "bias", (weight.shape[0],))
        floating(bias, "bias")
    ids_in_range(ids, weight.shape[0], ids_name)
