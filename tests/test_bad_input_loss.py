"""Bad input to grpo_loss, selective_log_softmax and group_advantages (DESIGN.md, "Bad input"): each case
expects the error type AND the offending argument's name in the message. Validation runs on the host
before any kernel, so these are fast on every backend."""

from __future__ import annotations

import pytest
import torch

import grpo_fast

B, T, V = 4, 3, 11
# A second device for the mismatch cases: CUDA where there is one, else "meta" (validation only looks
# at .device before it reads any value).
OTHER = "cuda" if torch.cuda.is_available() else "meta"


def valid_loss_inputs() -> dict:
    return dict(
        logits=torch.randn(B, T, V),
        completion_ids=torch.randint(0, V, (B, T)),
        completion_mask=torch.ones(B, T),
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.5]),
        group_size=2,
        old_logps=torch.randn(B, T),
        ref_logps=torch.randn(B, T),
    )


LOSS_CASES = [
    ("logits-2d", dict(logits=torch.randn(B, V)), ValueError, "logits"),
    ("logits-int", dict(logits=torch.zeros(B, T, V, dtype=torch.int64)), TypeError, "logits"),
    ("logits-fp16-cpu", dict(logits=torch.randn(B, T, V).half()), TypeError, "logits"),
    ("logits-not-tensor", dict(logits=[[[0.0]]]), TypeError, "logits"),
    ("ids-shape", dict(completion_ids=torch.zeros(B, T + 1, dtype=torch.int64)), ValueError, "completion_ids"),
    ("ids-float", dict(completion_ids=torch.zeros(B, T)), TypeError, "completion_ids"),
    ("ids-too-big", dict(completion_ids=torch.full((B, T), V)), ValueError, "completion_ids"),
    ("ids-negative", dict(completion_ids=torch.full((B, T), -1)), ValueError, "completion_ids"),
    ("mask-shape", dict(completion_mask=torch.ones(B, T - 1)), ValueError, "completion_mask"),
    ("advantages-shape", dict(rewards=None, advantages=torch.zeros(B + 1)), ValueError, "advantages"),
    ("advantages-nan", dict(rewards=None, advantages=torch.tensor([0, float("nan"), 0, 0])), ValueError, "advantages"),
    ("rewards-nan", dict(rewards=torch.tensor([1.0, float("nan"), 0, 0])), ValueError, "rewards"),
    ("rewards-inf", dict(rewards=torch.tensor([1.0, float("inf"), 0, 0])), ValueError, "rewards"),
    ("rewards-shape", dict(rewards=torch.zeros(B - 1)), ValueError, "rewards"),
    ("group-size-not-dividing", dict(group_size=3), ValueError, "group_size"),
    ("group-size-zero", dict(group_size=0), ValueError, "group_size"),
    ("group-size-missing", dict(group_size=None), ValueError, "group_size"),
    ("both-advantages-and-rewards", dict(advantages=torch.zeros(B)), ValueError, "advantages"),
    ("neither-advantages-nor-rewards", dict(rewards=None), ValueError, "advantages"),
    ("scale-rewards-unknown", dict(scale_rewards="std"), ValueError, "scale_rewards"),
    ("loss-type-unknown", dict(loss_type="ppo"), ValueError, "loss_type"),
    ("importance-level-unknown", dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
    ("beta-without-ref", dict(beta=0.04, ref_logps=None), ValueError, "ref_logps"),
    ("beta-negative", dict(beta=-0.1), ValueError, "beta"),
    ("epsilon-zero", dict(epsilon=0.0), ValueError, "epsilon"),
    ("epsilon-high-negative", dict(epsilon_high=-0.2), ValueError, "epsilon_high"),
    ("delta-zero", dict(delta=0.0), ValueError, "delta"),
    ("temperature-zero", dict(temperature=0.0), ValueError, "temperature"),
    ("old-logps-shape", dict(old_logps=torch.zeros(B, T + 1)), ValueError, "old_logps"),
    ("ref-logps-int", dict(ref_logps=torch.zeros(B, T, dtype=torch.int64)), TypeError, "ref_logps"),
    ("max-completion-length-zero", dict(max_completion_length=0), ValueError, "max_completion_length"),
    ("num-items-zero", dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ("ids-other-device", dict(completion_ids=torch.zeros(B, T, dtype=torch.int64, device=OTHER)), ValueError,
     "completion_ids"),
    ("mask-other-device", dict(completion_mask=torch.ones(B, T, device=OTHER)), ValueError, "completion_mask"),
    ("old-logps-other-device", dict(old_logps=torch.zeros(B, T, device=OTHER)), ValueError, "old_logps"),
    # TRL's other loss options
    ("option-unknown", dict(epsilon_low=0.2), TypeError, "epsilon_low"),
    ("sapo-temperature-zero", dict(loss_type="sapo", sapo_temperature_neg=0.0), ValueError, "sapo_temperature_neg"),
    ("vespo-k-nan", dict(vespo_k_pos=float("nan")), ValueError, "vespo_k_pos"),
    ("entropy-quantile-above-1", dict(top_entropy_quantile=1.5), ValueError, "top_entropy_quantile"),
    ("entropy-quantile-negative", dict(top_entropy_quantile=-0.1), ValueError, "top_entropy_quantile"),
    ("entropy-coef-inf", dict(entropy_coef=float("inf")), ValueError, "entropy_coef"),
    ("off-policy-threshold-str", dict(off_policy_mask_threshold="0.5"), ValueError, "off_policy_mask_threshold"),
    ("bias-correction-not-bool", dict(use_bias_correction_kl=1), TypeError, "use_bias_correction_kl"),
    ("sampling-logps-shape", dict(sampling_logps=torch.zeros(B, T + 1)), ValueError, "sampling_logps"),
    ("is-ratio-shape", dict(importance_sampling_ratio=torch.ones(B)), ValueError, "importance_sampling_ratio"),
    ("is-ratio-cols", dict(importance_sampling_ratio=torch.ones(B, 2)), ValueError, "importance_sampling_ratio"),
    ("is-ratio-negative", dict(importance_sampling_ratio=-torch.ones(B, T)), ValueError, "importance_sampling_ratio"),
    ("is-ratio-nan-active", dict(importance_sampling_ratio=torch.full((B, 1), float("nan"))), ValueError,
     "importance_sampling_ratio"),
    ("is-ratio-int", dict(importance_sampling_ratio=torch.ones(B, T, dtype=torch.int64)), TypeError,
     "importance_sampling_ratio"),
    ("vespo-row-is-ratio", dict(loss_type="vespo", importance_sampling_ratio=torch.ones(B, 1)), ValueError,
     "importance_sampling_ratio"),
    ("is-ratio-other-device", dict(importance_sampling_ratio=torch.ones(B, T, device=OTHER)), ValueError,
     "importance_sampling_ratio"),
]  # fmt: skip


@pytest.mark.parametrize("changes,error,name", [c[1:] for c in LOSS_CASES], ids=[c[0] for c in LOSS_CASES])
def test_grpo_loss_rejects(changes, error, name):
    kw = valid_loss_inputs()
    kw.update(changes)
    logits, ids, mask = kw.pop("logits"), kw.pop("completion_ids"), kw.pop("completion_mask")
    with pytest.raises(error, match=name):
        grpo_fast.grpo_loss(logits, ids, mask, **kw)


def test_valid_inputs_pass():
    """The base of every case above is itself valid: the errors come from the one change. So is NaN where
    a token is masked in the per-token companions (it never counts)."""
    kw = valid_loss_inputs()
    loss, _ = grpo_fast.grpo_loss(kw.pop("logits"), kw.pop("completion_ids"), kw.pop("completion_mask"), **kw)
    assert torch.isfinite(loss)
    kw = valid_loss_inputs()
    kw["completion_mask"][1, 2] = 0
    ratio = torch.ones(B, T).index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan")))
    kw.update(importance_sampling_ratio=ratio, sampling_logps=torch.full((B, T), float("nan")))
    loss, _ = grpo_fast.grpo_loss(kw.pop("logits"), kw.pop("completion_ids"), kw.pop("completion_mask"), **kw)
    assert torch.isfinite(loss)


SLS_CASES = [
    ("ids-shape", dict(ids=torch.zeros(B, T + 1, dtype=torch.int64)), ValueError, "ids"),
    ("ids-too-big", dict(ids=torch.full((B, T), V)), ValueError, "ids"),
    ("ids-float", dict(ids=torch.zeros(B, T)), TypeError, "ids"),
    ("logits-int", dict(logits=torch.zeros(B, T, V, dtype=torch.int32)), TypeError, "logits"),
    ("logits-fp16-cpu", dict(logits=torch.randn(B, T, V).half()), TypeError, "logits"),
    ("temperature-negative", dict(temperature=-1.0), ValueError, "temperature"),
    ("ids-other-device", dict(ids=torch.zeros(B, T, dtype=torch.int64, device=OTHER)), ValueError, "ids"),
]


@pytest.mark.parametrize("changes,error,name", [c[1:] for c in SLS_CASES], ids=[c[0] for c in SLS_CASES])
def test_selective_log_softmax_rejects(changes, error, name):
    kw = dict(logits=torch.randn(B, T, V), ids=torch.randint(0, V, (B, T)), temperature=1.0)
    kw.update(changes)
    with pytest.raises(error, match=name):
        grpo_fast.selective_log_softmax(**kw)


ADV_CASES = [
    ("rewards-2d", dict(rewards=torch.zeros(B, 1)), ValueError, "rewards"),
    ("rewards-int", dict(rewards=torch.zeros(B, dtype=torch.int64)), TypeError, "rewards"),
    ("rewards-nan", dict(rewards=torch.tensor([0.0, float("nan"), 0, 0])), ValueError, "rewards"),
    ("group-size-not-dividing", dict(group_size=3), ValueError, "group_size"),
    ("scale-rewards-unknown", dict(scale_rewards="batchwise"), ValueError, "scale_rewards"),
    ("eps-zero", dict(eps=0.0), ValueError, "eps"),
]


@pytest.mark.parametrize("changes,error,name", [c[1:] for c in ADV_CASES], ids=[c[0] for c in ADV_CASES])
def test_group_advantages_rejects(changes, error, name):
    kw = dict(rewards=torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2, scale_rewards="group")
    kw.update(changes)
    with pytest.raises(error, match=name):
        grpo_fast.group_advantages(**kw)


IS_CASES = [
    ("mode-unknown", dict(mode="token"), ValueError, "mode"),
    ("truncate-without-bounds", dict(mode="token_truncate", clip_max=None), ValueError, "clip_min or clip_max"),
    ("bounds-crossed", dict(clip_min=3.0, clip_max=2.0), ValueError, "clip_min"),
    ("bound-negative", dict(clip_min=-1.0), ValueError, "clip_min"),
    ("sampling-shape", dict(sampling_logps=torch.zeros(B, T + 1)), ValueError, "sampling_logps"),
    ("old-int", dict(old_logps=torch.zeros(B, T, dtype=torch.int64)), TypeError, "old_logps"),
]


@pytest.mark.parametrize("changes,error,name", [c[1:] for c in IS_CASES], ids=[c[0] for c in IS_CASES])
def test_importance_sampling_ratio_rejects(changes, error, name):
    kw = dict(old_logps=torch.randn(B, T), sampling_logps=torch.randn(B, T), completion_mask=torch.ones(B, T))
    kw.update(changes)
    with pytest.raises(error, match=name):
        grpo_fast.importance_sampling_ratio(**kw)


TABLE_CASES = [
    ("rewards-1d", dict(rewards=torch.zeros(B)), ValueError, "rewards"),
    ("rewards-inf", dict(rewards=torch.tensor([[1.0, float("inf")]] * B)), ValueError, "rewards"),
    ("weights-shape", dict(reward_weights=torch.ones(3)), ValueError, "reward_weights"),
    ("aggregation-unknown", dict(multi_objective_aggregation="mean"), ValueError, "multi_objective_aggregation"),
    ("group-size-not-dividing", dict(group_size=3), ValueError, "group_size"),
]


@pytest.mark.parametrize("changes,error,name", [c[1:] for c in TABLE_CASES], ids=[c[0] for c in TABLE_CASES])
def test_multi_objective_advantages_rejects(changes, error, name):
    kw = dict(rewards=torch.tensor([[1.0, float("nan")], [0.0, 1.0], [0.5, 0.2], [0.5, 0.3]]), group_size=2)
    kw.update(changes)
    with pytest.raises(error, match=name):
        grpo_fast.multi_objective_advantages(**kw)
