"""Rollout log-probs in the trainer (rollout_agreement.py): the mismatch with the training forward is logged every step
and is at fp32 rounding on CPU; --old-logps-from rollout skips the no-grad old forward, its IS weights are 1 where the
two agree (and the run then equals the training-forward run), and they correct a mismatch as TRL's vLLM path does."""

import dataclasses

import pytest
import torch
from test_train_run import tiny_cfg

from grpo_fast import fused_linear_grpo_loss, fused_linear_logps, importance_sampling_ratio, rollout_agreement, train
from grpo_fast.config import Config, validate

pytestmark = pytest.mark.usefixtures("trainer_cpu_path")
AGREEMENT = {"rollout_logp_diff_mean", "rollout_logp_diff_max", "rollout_ratio_outside"}
IS_STATS = {"importance_sampling_ratio_min", "importance_sampling_ratio_mean", "importance_sampling_ratio_max"}


def test_mismatch_logged_every_step_at_fp32_rounding(tmp_path):
    rows = train.run(tiny_cfg(tmp_path, max_steps=2))
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the held-out evaluation alone, no rollout
    for r in rows[1:]:
        assert AGREEMENT <= set(r) and not IS_STATS & set(r)
        assert 0 < r["rollout_logp_diff_max"] < 1e-4 and r["rollout_logp_diff_mean"] <= r["rollout_logp_diff_max"]
        assert r["rollout_ratio_outside"] == 0


def test_old_logps_from_rollout_skips_the_old_forward_and_equals_training(tmp_path, monkeypatch):
    """num_iterations=2: the training mode computes old log-probs with one no-grad forward per micro-batch, the
    rollout mode with none; its IS weights are 1 to fp32 rounding and every logged number matches."""
    calls = []
    real = train.logps
    monkeypatch.setattr(train, "logps", lambda *a: calls.append(1) or real(*a))
    cfg = dict(max_steps=2, num_iterations=2)
    by_training = train.run(tiny_cfg(tmp_path / "t", **cfg))
    old_forwards = len(calls)
    by_rollout = train.run(tiny_cfg(tmp_path / "r", old_logps_from="rollout", **cfg))
    assert old_forwards == 2 * 2 and len(calls) == old_forwards  # 2 steps x 2 micro-batches, then none
    for t, r in zip(by_training[1:], by_rollout[1:], strict=True):  # [0]: step 0's held-out evaluation
        assert IS_STATS <= set(r)
        for k in IS_STATS:
            assert r[k] == pytest.approx(1.0, abs=1e-4), k
        for k in ("reward", "loss", "grad_norm", "clip_ratio_region", "rollout_logp_diff_max"):
            assert r[k] == pytest.approx(t[k], rel=1e-3, abs=1e-5), k


def _mb(gen, rows=4, T=6, H=16, V=23):
    hidden = torch.randn(rows, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / 4
    ids = torch.randint(0, V, (rows, T), generator=gen)
    mask = (torch.arange(T) < torch.tensor([6, 3, 1, 5])[:, None]).long()
    train_logps = torch.where(mask.bool(), fused_linear_logps(hidden, weight, ids), 0.0)
    sampling = train_logps + 0.3 * torch.randn(rows, T, generator=gen)  # a sampler that drifts: IS weights clip
    return hidden, weight, dict(ids=ids, mask=mask, sampling=sampling, old=None), train_logps


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_rollout_old_logps_and_metrics_against_direct_computation(mode):
    gen = torch.Generator().manual_seed(0)
    hidden, weight, mb, train_logps = _mb(gen)
    cfg = dataclasses.replace(Config(), temperature=1.0, rollout_is_mode=mode, rollout_is_min=0.8, rollout_is_max=1.2)
    rollout_agreement.rollout_old_logps(hidden, weight, None, {}, mb, cfg)
    torch.testing.assert_close(mb["old"], train_logps)
    expected, _ = importance_sampling_ratio(train_logps, mb["sampling"], mb["mask"], mode, 0.8, 1.2)
    torch.testing.assert_close(mb["is_ratio"], expected)
    got = rollout_agreement.agreement_metrics([mb])
    active = mb["mask"].bool()
    diff = (train_logps - mb["sampling"])[active]
    assert got["rollout_logp_diff_mean"] == pytest.approx(float(diff.abs().mean()), rel=1e-6)
    assert got["rollout_logp_diff_max"] == pytest.approx(float(diff.abs().max()), rel=1e-6)
    outside = ((diff.exp() < 0.9) | (diff.exp() > 1.1)).float().mean()
    assert got["rollout_ratio_outside"] == pytest.approx(float(outside)) and 0 < float(outside) < 1
    flat = expected.flatten() if mode.startswith("sequence") else expected[active]
    assert got["importance_sampling_ratio_min"] == pytest.approx(float(flat.min()))
    assert got["importance_sampling_ratio_max"] == pytest.approx(float(flat.max()))
    assert got["importance_sampling_ratio_mean"] == pytest.approx(float(flat.mean()))


def test_logps_out_holds_the_forward_log_probs():
    gen = torch.Generator().manual_seed(1)
    hidden, weight, mb, train_logps = _mb(gen)
    out = torch.full(mb["ids"].shape, float("nan"))
    fused_linear_grpo_loss(hidden, weight, mb["ids"], mb["mask"], advantages=torch.randn(4, generator=gen),
                           logps_out=out)  # fmt: skip
    torch.testing.assert_close(out, train_logps)
    with pytest.raises(ValueError, match="logps_out must have shape"):
        fused_linear_grpo_loss(hidden, weight, mb["ids"], mb["mask"], advantages=torch.zeros(4), logps_out=out[:2])


def test_config_checks():
    for bad, match in (
        (dict(old_logps_from="vllm"), "old_logps_from must be one of"),
        (dict(compile_decode="yes"), "compile_decode must be one of"),
        (dict(rollout_is_mode="token"), "rollout_is_mode must be one of"),
        (dict(rollout_is_min=2.0, rollout_is_max=1.0), r"rollout_is_min \(2.0\) must be less than rollout_is_max"),
        (dict(rollout_is_min=None, rollout_is_max=None), "rollout_is_mode='token_truncate' needs rollout_is_min"),
    ):
        with pytest.raises(ValueError, match=match):
            validate(dataclasses.replace(Config(), **bad))
