"""grpo_fast.reference against TRL 1.16's own loss code (tests/trl_oracle.py), in float64.

Every loss type and option, alone and in the combinations published recipes use, on inputs where every
branch fires: ratios clip low, high and not at all (per token and per row), the off-policy mask drops some
negative-advantage rows and keeps others, the entropy mask keeps a fraction of the tokens, the vLLM
importance ratios are truncated or masked, one row is empty and one advantage is 0. Loss, the gradients with
respect to the log-probs and the entropies, and every metric TRL logs must agree to float64 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
import trl_oracle

from grpo_fast import reference

B, T, V = 8, 6, 13
LENGTHS = (6, 4, 6, 1, 5, 0, 6, 3)  # row 5 is empty
ADVANTAGES = (1.0, -1.0, 0.7, -0.7, 0.3, 0.0, -0.5, 0.9)
SHIFTS = (0.35, -0.4, 0.02, 0.3, -0.3, 0.1, -0.05, 0.25)  # mean log-ratio per row: rows clip at sequence level


def make_inputs(seed: int = 0) -> dict:
    """float64 log-probs and entropies of random logits, and companions around them (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    logps = reference.selective_log_softmax(logits, ids)
    entropy = reference.entropy_from_logits(logits)
    mask = (torch.arange(T) < torch.tensor(LENGTHS).unsqueeze(1)).long()  # (B, T)
    noise = lambda scale: scale * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    old = logps - torch.tensor(SHIFTS, dtype=torch.float64).unsqueeze(1) + noise(0.15)
    sampling = old + noise(0.3)
    sampling[2, 3] = math.nan  # a token the sampler could not score (TRL: counts 0 in the off-policy KL)
    return dict(
        logps=logps, entropy=entropy, mask=mask, advantages=torch.tensor(ADVANTAGES, dtype=torch.float64),
        old_logps=old, ref_logps=logps + noise(0.2), sampling_logps=sampling,
    )  # fmt: skip


def run_both(inp: dict, is_mode: str | None = None, clip=(None, 3.0), num_items=None, accumulation=1, **options):
    """(ours, TRL's): each (loss, {metric}, dlogps, dentropy) from fresh leaves."""
    out = []
    for fn in (_ours, _theirs):
        logps = inp["logps"].clone().requires_grad_()
        entropy = inp["entropy"].clone().requires_grad_()
        is_ratio = None
        if is_mode is not None:
            is_ratio, _ = reference.importance_sampling_ratio(
                inp["old_logps"], inp["sampling_logps"], inp["mask"], is_mode, *clip
            )
        kw = dict(old_logps=inp["old_logps"], ref_logps=inp["ref_logps"], sampling_logps=inp["sampling_logps"])
        kw.update(importance_sampling_ratio=is_ratio, num_items_in_batch=num_items)
        loss, metrics = fn(logps, entropy, inp, accumulation, **kw, **options)
        dlogps, dent = torch.autograd.grad(loss, [logps, entropy], allow_unused=True)
        out.append((loss.detach(), metrics, dlogps, dent))
    return out


def _ours(logps, entropy, inp, accumulation, **kw):
    """TRL scales for gradient accumulation: the whole loss, or (token-normalized types, whose normalizer
    already spans the accumulated batch) only the entropy bonus; FastGRPOTrainer does the same."""
    by_items = kw.get("loss_type", "dapo") in ("dapo", "cispo", "vespo")
    if by_items:
        kw["entropy_coef"] = kw.get("entropy_coef", 0.0) / accumulation
    loss, metrics = reference.grpo_loss_from_logps(logps, inp["mask"], inp["advantages"], entropy=entropy, **kw)
    return (loss if by_items else loss / accumulation), metrics


def _theirs(logps, entropy, inp, accumulation, **kw):
    return trl_oracle.compute_loss(logps, entropy, inp["mask"], inp["advantages"], accumulation=accumulation, **kw)


def assert_same(ours, theirs) -> dict:
    loss, metrics, dlogps, dent = ours
    loss_t, metrics_t, dlogps_t, dent_t = theirs
    torch.testing.assert_close(loss, loss_t, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dlogps, dlogps_t, rtol=1e-12, atol=1e-14)
    if dent_t is None:
        assert dent is None or dent.abs().max() == 0
    else:
        torch.testing.assert_close(dent, dent_t, rtol=1e-12, atol=1e-14)
    for ours_name, trl_name in trl_oracle.METRIC_NAMES.items():
        if trl_name in metrics_t:  # TRL averages float32 flags: 1e-7
            assert float(metrics[ours_name]) == pytest.approx(metrics_t[trl_name], rel=1e-6, abs=1e-12), ours_name
    per_row = ("clip_ratio/low_min", "clip_ratio/high_max", "entropy_coef")  # the TRL drop-in's, not the op's
    logged = {k for k in metrics_t if k not in per_row}
    assert logged <= set(trl_oracle.METRIC_NAMES.values()), logged
    return metrics_t


LEVELS = ("token", "sequence")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", reference.LOSS_TYPES)
@pytest.mark.parametrize("beta", (0.0, 0.04))
def test_each_loss_type(loss_type, level, beta):
    inp = make_inputs()
    eps_high = 1.3 if loss_type == "cispo" else 0.28  # cispo: the cap itself; 1.3 caps some tokens here
    got = run_both(inp, loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_high=eps_high)
    metrics = assert_same(*got)
    if loss_type in reference.CLIP_LOSS_TYPES:  # every clip branch fires
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
        assert metrics["clip_ratio/region_mean"] < 1
    if loss_type == "cispo":
        assert 0 < metrics["cispo_clip_ratio"] < 1
    if loss_type == "vespo":
        assert 0 < metrics["vespo/phi_seq_mean"]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ("dapo", "grpo", "cispo", "sapo", "vespo"))
def test_bias_corrected_kl(loss_type, level):
    inp = make_inputs(1)
    assert_same(
        *run_both(inp, loss_type=loss_type, importance_sampling_level=level, beta=0.1, use_bias_correction_kl=True)
    )


@pytest.mark.parametrize("quantile", (0.0, 0.2, 0.5))
@pytest.mark.parametrize("loss_type", ("dapo", "grpo", "luspo", "sapo"))
def test_top_entropy_quantile(loss_type, quantile):
    inp = make_inputs(2)
    ours, theirs = run_both(inp, loss_type=loss_type, top_entropy_quantile=quantile, beta=0.04)
    assert_same(ours, theirs)
    kept = float(ours[1]["entropy_mask_ratio"])
    active = int(inp["mask"].sum())
    assert 0 < kept < 1 and (quantile > 0 or kept * active == pytest.approx(1))  # 0.0 keeps the top token only
    threshold = torch.quantile(inp["entropy"][inp["mask"].bool()].float(), 1 - quantile)
    assert float(ours[1]["entropy_threshold"]) == float(threshold)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ("dapo", "grpo", "cispo", "vespo"))
@pytest.mark.parametrize("with_sampling", (True, False))
def test_off_policy_mask(loss_type, level, with_sampling):
    inp = make_inputs(3)
    if not with_sampling:  # TRL then uses old_logps as the sampler's log-probs
        inp["sampling_logps"] = None
    ours, theirs = run_both(inp, loss_type=loss_type, importance_sampling_level=level, off_policy_mask_threshold=0.1)
    assert_same(ours, theirs)
    sampling = inp["old_logps"] if inp["sampling_logps"] is None else inp["sampling_logps"]
    adv = inp["advantages"].unsqueeze(1)
    keep = reference.off_policy_mask(adv, inp["logps"], sampling, inp["mask"], 0.1)
    negative = adv.squeeze(1) < 0
    assert 0 < keep[negative].sum() < negative.sum()  # some negative rows dropped, some kept


@pytest.mark.parametrize("mode", reference.IS_MODES)
@pytest.mark.parametrize("loss_type", ("dapo", "grpo", "cispo", "vespo"))
def test_vllm_importance_sampling(loss_type, mode):
    if loss_type == "vespo" and mode.startswith("sequence"):
        pytest.skip("TRL refuses vespo with sequence-level IS modes")
    inp = make_inputs(4)
    clip = (0.8, 1.25) if "token" in mode else (0.3, 2.0)  # both bounds bind on these inputs
    ours, theirs = run_both(inp, is_mode=mode, clip=clip, loss_type=loss_type, beta=0.04)
    assert_same(ours, theirs)


@pytest.mark.parametrize("mode", reference.IS_MODES)
@pytest.mark.parametrize("bounds", ("both", "min", "max"))
def test_importance_sampling_ratio_and_stats(mode, bounds):
    """The ratio (every entry) and TRL's logged statistics, with bounds at the raw ratios' quartiles."""
    inp = make_inputs(5)
    args = (inp["old_logps"], inp["sampling_logps"], inp["mask"])
    raw, _ = reference.importance_sampling_ratio(*args, mode.replace("truncate", "mask"), None, None)  # unbounded
    values = raw[inp["mask"].bool()] if mode.startswith("token") else raw.flatten()
    lo, hi = (float(torch.quantile(values, q)) for q in (0.25, 0.75))
    clip = {"both": (lo, hi), "min": (lo, None), "max": (None, hi)}[bounds]
    ratio, stats = reference.importance_sampling_ratio(*args, mode, *clip)
    ratio_t, stats_t = trl_oracle.importance_sampling_ratio(*args, mode, *clip)
    torch.testing.assert_close(ratio, ratio_t, rtol=0, atol=0)
    for k, v in stats_t.items():
        assert float(stats[k]) == pytest.approx(float(v), rel=1e-12), k
    bound = clip[0] if bounds == "min" else clip[1]
    assert ((ratio == 0) if mode.endswith("mask") else (ratio == bound)).any()  # the bound binds


@pytest.mark.parametrize("loss_type", ("dapo", "grpo", "dr_grpo", "luspo", "cispo"))
@pytest.mark.parametrize("quantile", (1.0, 0.3))
def test_entropy_bonus(loss_type, quantile):
    """The bonus' gradient reaches the entropies, over the trained tokens; scaled for accumulation as TRL."""
    inp = make_inputs(6)
    ours, theirs = run_both(inp, accumulation=2, loss_type=loss_type, entropy_coef=0.05, top_entropy_quantile=quantile)
    assert_same(ours, theirs)
    assert ours[3].abs().max() > 0
    if quantile < 1:  # only the kept tokens get the bonus' gradient
        keep, _ = reference.high_entropy_mask(inp["entropy"], inp["mask"], quantile)
        assert (ours[3][~keep] == 0).all() and (ours[3][keep] != 0).all()


RECIPES = {
    "dapo": dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28),  # DAPO (arXiv 2503.14476), clip-higher
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),  # GSPO
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),  # MiniMax-M1 / ScaleRL's epsilon_max
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=8),  # Dr. GRPO: constant normalizer
    "sapo": dict(loss_type="sapo"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "80/20": dict(loss_type="dapo", epsilon_high=0.28, top_entropy_quantile=0.2),  # Beyond the 80/20 rule
    "deepseek-v3.2": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, off_policy_mask_threshold=0.1),
}
RECIPES["everything"] = dict(beta=0.04, use_bias_correction_kl=True, off_policy_mask_threshold=0.1, delta=1.5)
RECIPES["everything"] |= dict(loss_type="dapo", epsilon_high=0.28, top_entropy_quantile=0.4, entropy_coef=0.01)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("is_mode", (None, "token_truncate"))
def test_recipes(recipe, is_mode):
    assert_same(
        *run_both(make_inputs(7), is_mode=is_mode, clip=(None, 1.2), num_items=41.0, accumulation=2, **RECIPES[recipe])
    )


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", reference.LOSS_TYPES)
def test_masked_positions_never_count(loss_type, level):
    """NaN anywhere a token is masked (log-probs of old / ref / sampler, entropies, IS ratios): same result."""
    inp = make_inputs(8)
    opts = RECIPES["everything"] | dict(loss_type=loss_type, importance_sampling_level=level)
    is_ratio, _ = reference.importance_sampling_ratio(
        inp["old_logps"], inp["sampling_logps"], inp["mask"], "token_mask", 0.8, 1.25
    )
    clean = _loss_grads(inp, is_ratio, opts)
    masked = ~inp["mask"].bool()
    dirty = dict(inp)
    for k in ("old_logps", "ref_logps", "sampling_logps", "entropy"):
        dirty[k] = inp[k].masked_fill(masked, math.nan)
    got = _loss_grads(dirty, is_ratio.masked_fill(masked, math.nan), opts)
    for a, b in zip(got, clean):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _loss_grads(inp, is_ratio, opts):
    logps = inp["logps"].clone().requires_grad_()
    entropy = inp["entropy"].clone().requires_grad_()
    loss, metrics = reference.grpo_loss_from_logps(
        logps, inp["mask"], inp["advantages"], entropy=entropy, old_logps=inp["old_logps"],
        ref_logps=inp["ref_logps"], sampling_logps=inp["sampling_logps"], importance_sampling_ratio=is_ratio, **opts,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, [logps, entropy])
    return (loss, *grads, *(metrics[k] for k in sorted(metrics)))


def test_quantile_equals_torch():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000):
        x = torch.rand(n, generator=g)
        for q in (0.0, 0.2, 0.5, 0.8, 0.999, 1.0):
            assert reference.quantile(x, q) == torch.quantile(x, q), (n, q)


@pytest.mark.parametrize("aggregation", reference.AGGREGATIONS)
@pytest.mark.parametrize("scale_rewards", reference.SCALE_REWARDS)
@pytest.mark.parametrize("group_size", (1, 3))
def test_multi_objective_advantages(aggregation, scale_rewards, group_size):
    """GDPO and the weighted sum, NaN-aware: a row no function scored, a function missing for some rows, a
    group where a function has one score only, a group of equal totals."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (12, 3), generator=g).double()
    rewards += 0.1 * torch.rand(12, 3, generator=g, dtype=torch.float64)
    rewards[4] = math.nan  # unscorable
    rewards[0:2, 2] = math.nan  # function 2 scored one row of the first group only
    rewards[6:9] = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)  # a group of equal rows
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    got = reference.multi_objective_advantages(rewards, group_size, weights, aggregation, scale_rewards)
    want = trl_oracle.multi_objective_advantages(rewards, group_size, weights, aggregation, scale_rewards)
    # TRL's nanstd computes Bessel's count / (count - 1) in float32: 1e-8 relative in float64
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)
    assert got[4] == 0 and torch.isfinite(got).all()
    assert (got != 0).sum() > 6 or group_size == 1  # a group of one has nothing to compare with: A = 0


def test_single_reward_sum_equals_group_advantages():
    rewards = torch.rand(8, 1, dtype=torch.float64)
    for scale in reference.SCALE_REWARDS:
        want = reference.group_advantages(rewards[:, 0], 4, scale)
        got = reference.multi_objective_advantages(rewards, 4, None, "sum_then_normalize", scale)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
