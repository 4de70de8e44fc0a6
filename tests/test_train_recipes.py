"""Issue 11 in the lean trainer: TRL's recipe options. The soft overlong punishment against TRL's own reward,
mask_truncated_completions against TRL's own loss code (its truncation rule and token counts), dynamic sampling
(groups of equal rewards never reach the loss, the step fills or says why, the data position and resume stay
exact), and the recipe presets, composed over the embedded default."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch
import trl_oracle
from safetensors.torch import load_file
from test_train_hostile import cli, comparable, interrupted_run
from test_train_loss import fixed_rollout, grads, per_row_logits

from grpo_fast import checkpoint, config, data, reference, rewards, run_log, tiny, train
from grpo_fast.config import PRESETS, Config

pytestmark = pytest.mark.usefixtures("trainer_cpu_path")

G = 3
RECIPES = ("dapo", "gspo", "dr_grpo", "cispo")

# gated: prompts whose word starts with a-d score the first completion token (a group's samples almost never all
# start alike), e-h score 0.5 for every sample (never informative); flat: nothing is ever informative; rare: only
# prompts starting with "a" score with the reverse task's reward (often 0 for the whole group)
GATE = """
from grpo_fast.tiny import reverse_reward
def gated(prompts, completions, completion_ids, **kw):
    return [float(ids[0]) if p[0] in "abcd" and ids else 0.5 for p, ids in zip(prompts, completion_ids)]
def flat(prompts, completions, completion_ids, **kw):
    return [1.0] * len(completions)
def rare(prompts, completions, completion_ids, *, answer, **kw):
    base = reverse_reward(prompts, completions, completion_ids, answer=answer)
    return [r if p[0] == "a" else 0.0 for p, r in zip(prompts, base)]
"""


@pytest.fixture
def gate(tmp_path, monkeypatch):
    (tmp_path / "gate.py").write_text(GATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gate", raising=False)  # this test's module, not one an earlier test imported


def tiny_cfg(tmp_path, **kw) -> Config:
    small = dict(prompts_per_step=4, micro_batch_groups=2, group_size=4, max_steps=3, save_steps=0, cpu_threads=0)
    base = dataclasses.replace(Config(**PRESETS["tiny"]), output_dir=str(tmp_path / "run"), progress=False)
    return dataclasses.replace(base, **(small | kw))


# ----------------------------------------------------------------------------------- soft overlong punishment


def test_soft_overlong_punishment_equals_trl():
    trl_rewards = pytest.importorskip("trl.rewards")
    for max_len, cache in [(100, 20), (20, 5), (8, 1), (10, 10), (16, 3)]:
        ids = [[7] * n for n in range(max_len + 3)]  # every length up to past the limit
        ours = rewards.resolve("overlong", max_len, cache)
        assert ours(None, None, ids) == trl_rewards.get_soft_overlong_punishment(max_len, cache)(ids)
    dapo = rewards.resolve("overlong", 100, 20)(None, None, [[1] * 80, [1] * 81, [1] * 90, [1] * 100])
    assert dapo == [0.0, -0.05, -0.5, -1.0]  # TRL's docstring example (90 -> -0.5) and the ends of the ramp
    assert rewards.overlong_cache(20480, None) == 4096  # DAPO's 4096 of 20480 (§4.1)
    assert rewards.overlong_cache(4, None) == 1 and rewards.overlong_cache(64, 3) == 3


def test_soft_overlong_punishment_joins_the_rewards():
    cfg = Config(rewards=["math", "format"], reward_weights=[1.0, 0.2], soft_overlong_punishment=True)
    funcs, weights = rewards.configured(cfg)
    assert list(funcs) == ["math", "format", "overlong"] and weights == [1.0, 0.2, 1.0]
    ramp = funcs["overlong"](None, None, [[1] * 205, [1] * 222, [1] * 256])  # L_cache 256 // 5 = 51: from 205 on
    assert ramp == [0.0, pytest.approx(-1 / 3), -1.0]
    listed = dataclasses.replace(cfg, rewards=["math", "overlong"], reward_weights=[1.0, 0.5], soft_punish_cache=8)
    funcs, weights = rewards.configured(listed)  # named with a weight of its own: not added twice
    assert list(funcs) == ["math", "overlong"] and weights == [1.0, 0.5]
    assert funcs["overlong"](None, None, [[1] * 252]) == [-0.5]


# ------------------------------------------------------------------------------- mask_truncated_completions


def truncation_rollout(tok, gen):
    """fixed_rollout with rows ending in EOS (finished), one cut at Tc on a sampled pad id (finished for TRL), the
    others cut (their last token is neither)."""
    roll = fixed_rollout(len(tok), gen)
    ids, lengths = roll.completion_ids.clone(), roll.completion_lengths
    for i in (1, 4, 8):
        ids[i, lengths[i] - 1] = tok.eos_token_id
    ids[5, 4] = tok.pad_token_id
    return dataclasses.replace(roll, completion_ids=ids)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "luspo", "bnpo"])
def test_mask_truncated_completions_equals_trl(loss_type):
    """The trainer's mask_truncated + accumulate over micro-batches against TRL's own code on the whole batch: its
    rule (last token not EOS or pad), completion_mask * ~is_truncated, num_items_in_batch counted after that, then
    `_compute_loss` (rows still count for grpo, dr_grpo, luspo; tokens do not for dapo, bnpo)."""
    gen = torch.Generator().manual_seed(0)
    tok = tiny.build_tokenizer()
    roll = truncation_rollout(tok, gen)
    lists = [roll.completion_ids[i, :n].tolist() for i, n in enumerate(roll.completion_lengths.tolist())]
    eos_and_pad = [tok.eos_token_id, tok.pad_token_id]
    is_truncated = torch.tensor([bool(x) and x[-1] not in eos_and_pad for x in lists])  # TRL's (an empty row: no)
    masked = train.mask_truncated(roll, tok)
    assert ((masked.completion_mask.sum(1) == 0) & (roll.completion_lengths > 0)).tolist() == is_truncated.tolist()
    assert is_truncated.any() and (~is_truncated & (roll.completion_lengths > 0)).sum() >= 4
    assert torch.equal(masked.completion_mask[~is_truncated], roll.completion_mask[~is_truncated])

    model = tiny.build_model(tok, seed=1).double()
    cfg = dataclasses.replace(Config(**PRESETS["tiny"]), group_size=G, micro_batch_groups=2, loss_type=loss_type,
                              epsilon=0.1, epsilon_high=0.15, temperature=0.9, max_new_tokens=5)  # fmt: skip
    adv = torch.randn(roll.completion_ids.shape[0], generator=gen, dtype=torch.float64)
    with torch.no_grad():
        logps = reference.selective_log_softmax(per_row_logits(model, roll).double(), roll.completion_ids, 0.9)
    old = logps + 0.3 * torch.randn(logps.shape, generator=gen, dtype=torch.float64)
    mbs, row = train.micro_batches(masked, adv, cfg), 0
    for mb in mbs:
        n, T = mb["ids"].shape
        mb["old"], mb["ref"], row = old[row : row + n, :T], None, row + n
    model.zero_grad()
    loss, metrics = train.accumulate(model, mbs, cfg)
    got = grads(model)

    ref_model = tiny.build_model(tok, seed=1).double()
    logits = per_row_logits(ref_model, roll)
    trl_mask = roll.completion_mask * (~is_truncated).unsqueeze(1).int()  # TRL's masking
    want, want_metrics = trl_oracle.compute_loss(
        reference.selective_log_softmax(logits, roll.completion_ids, 0.9),
        reference.entropy_from_logits(logits.detach(), 0.9), trl_mask, adv, old_logps=old,
        num_items_in_batch=trl_mask.sum(), **config.loss_options(cfg),
    )  # fmt: skip
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-6, atol=1e-6)
    for name, g in grads(ref_model).items():
        scale = g.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got[name] / scale, g / scale, rtol=1e-6, atol=1e-6, msg=name)
    for ours, theirs in trl_oracle.METRIC_NAMES.items():
        if theirs in want_metrics:
            assert metrics[ours] == pytest.approx(want_metrics[theirs], rel=1e-6, abs=1e-6), ours


def test_mask_truncated_completions_reaches_the_trainer(tmp_path, monkeypatch):
    """With the flag, the rollout the updates train on holds no token of a row TRL calls truncated; without, it does."""
    seen, real = [], train.micro_batches

    def spy(roll, advantages, cfg):
        seen.append(roll)
        return real(roll, advantages, cfg)

    monkeypatch.setattr(train, "micro_batches", spy)
    tok = tiny.build_tokenizer()
    for flag in (True, False):
        seen.clear()
        train.run(tiny_cfg(tmp_path / str(flag), max_steps=2, mask_truncated_completions=flag))
        for roll in seen:
            last = [ids[n - 1] for ids, n in zip(roll.completion_ids.tolist(), roll.completion_lengths.tolist())]
            cut = torch.tensor([t not in (tok.eos_token_id, tok.pad_token_id) for t in last])
            assert cut.any() and (~cut).any()  # 4 tokens: some rows finish, some are cut
            assert torch.equal(roll.completion_mask.sum(1)[cut] == 0, torch.full((int(cut.sum()),), flag))
            assert torch.equal(roll.completion_mask.sum(1)[~cut], roll.completion_lengths[~cut])


# ------------------------------------------------------------------------------------------ dynamic sampling


def drawn_prompts(cfg, start: int, count: int) -> list[str]:
    rows = tiny.reverse_task()
    return [rows[i]["prompt"] for i in data.PromptOrder(len(rows), cfg.seed).indices(start, count)]


def test_dynamic_sampling_trains_only_informative_groups(tmp_path, monkeypatch, gate):
    trained, real = [], train.accumulate

    def spy(model, mbs, cfg):
        trained.append([(mb["prompts"], mb["advantages"].clone()) for mb in mbs])
        return real(model, mbs, cfg)

    monkeypatch.setattr(train, "accumulate", spy)
    cfg = tiny_cfg(tmp_path, rewards=["gate:gated"], dynamic_sampling=True, max_steps=4, save_steps=4)
    rows = train.run(cfg)[1:]  # after step 0's held-out evaluation
    tok, position = tiny.build_tokenizer(), 0
    for row, step in zip(rows, trained):
        groups = [(p, a) for prompts, adv in step for p, a in zip(prompts, adv.view(-1, cfg.group_size))]
        assert row["groups_trained"] == len(groups) == cfg.prompts_per_step  # the step filled
        for prompt, adv in groups:  # never a group of equal rewards: e-h prompts or a-d ones scored alike
            assert tok.decode(prompt)[0] in "abcd" and adv.abs().max() > 0
        drawn = drawn_prompts(cfg, position, row["sampling_batches"] * cfg.prompts_per_step)
        assert row["extra_prompts"] == len(drawn) - cfg.prompts_per_step
        constant = sum(p[0] not in "abcd" for p in drawn)
        assert row["groups_dropped"] >= constant  # every e-h group, and a-d groups whose samples scored alike
        assert row["groups_dropped"] + row["groups_trained"] + row["groups_unused"] == len(drawn)
        position += len(drawn)
    assert sum(r["extra_prompts"] for r in rows) > 0  # the filter did resample
    state = json.loads((checkpoint.latest(tmp_path / "run" / "checkpoints") / "trainer_state.json").read_text())
    assert state["data_position"] == position  # every prompt drawn moved the data on


@pytest.mark.parametrize("reward", ["flat", "rare"])
def test_dynamic_sampling_cap_trains_on_what_was_found(tmp_path, capsys, gate, reward):
    """flat: no group is ever informative, no update at all (weights untouched); rare: fewer than prompts_per_step
    informative groups in dynamic_sampling_max_batches batches, the step trains on those and says so."""
    cfg = tiny_cfg(tmp_path, rewards=[f"gate:{reward}"], dynamic_sampling=True, dynamic_sampling_max_batches=2)
    rows = train.run(cfg)[1:]  # after step 0's held-out evaluation
    err = capsys.readouterr().err
    assert all(r["sampling_batches"] == 2 and r["groups_trained"] < cfg.prompts_per_step for r in rows)
    for r in rows:
        found = r["groups_trained"] + r["groups_unused"]
        tail = "no update" if found == 0 else f"training on {r['groups_trained']}"
        assert f"dynamic sampling: {found} of 4 groups with unequal rewards after 2 batches" in err and tail in err
        assert r["skipped"] == int(r["groups_trained"] == 0) and math.isnan(r["loss"]) == (r["groups_trained"] == 0)
    if reward == "flat":
        weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
        initial = tiny.build_model(tiny.build_tokenizer(), cfg.seed).state_dict()
        assert all(torch.equal(weights[k], initial[k]) for k in weights)
    else:
        assert any(r["groups_trained"] > 0 for r in rows)


def test_dynamic_sampling_keeps_each_trained_rows_rollout_logps(tmp_path, gate):
    """The rollout's log-probs follow the groups dynamic sampling keeps (batches concatenated, groups picked): under
    old_logps_from=rollout each trained token's IS ratio is its own rollout log-prob against the training forward's,
    so a row paired with another row's log-probs would show as a mismatch far above fp32 rounding."""
    cfg = tiny_cfg(tmp_path, rewards=["gate:gated"], dynamic_sampling=True, old_logps_from="rollout", num_iterations=2)
    rows = [r for r in train.run(cfg) if r["step"] > 0]
    assert sum(r["extra_prompts"] for r in rows) > 0  # some steps drew more than one batch
    for r in rows:
        assert r["rollout_logp_diff_max"] < 1e-4 and r["rollout_ratio_outside"] == 0
        assert abs(r["importance_sampling_ratio_min"] - 1) < 1e-4 and abs(r["importance_sampling_ratio_max"] - 1) < 1e-4


def test_dynamic_sampling_resume_is_exact(tmp_path, capsys, monkeypatch, gate):
    """Killed when step 3 starts (checkpoint at 2), resumed: the same prompts, samples, metrics and weights."""
    args = ("--rewards", "gate:gated", "--dynamic-sampling", "--max-steps", 4, "--save-steps", 2)
    assert cli(tmp_path / "want", capsys, *args)[0] == 0
    want = run_log.read_jsonl(tmp_path / "want" / "metrics.jsonl")
    assert any(r["extra_prompts"] for r in want[3:])  # the resumed steps resample too (want[0]: step 0's evaluation)
    out = tmp_path / "run"
    interrupted_run(out, capsys, monkeypatch, 3, *args)
    rc, err = cli(out, capsys, *args, "--resume")
    assert rc == 0, err
    assert comparable(run_log.read_jsonl(out / "metrics.jsonl")) == comparable(want)
    a, b = (load_file(p / "final" / "model.safetensors") for p in (out, tmp_path / "want"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------- presets


def test_recipe_presets_compose():
    assert config.parse(["--preset", "dapo"]) == config.validate(Config(**(PRESETS["tiny"] | PRESETS["dapo"])))
    on_model = config.parse(["--preset", "dapo", "--model", "some/model"])  # no tiny base under a named model
    assert (on_model.model, on_model.dataset, on_model.max_new_tokens) == ("some/model", "gsm8k", 256)
    assert (on_model.loss_type, on_model.epsilon_high, on_model.dynamic_sampling) == ("dapo", 0.28, True)
    assert on_model.mask_truncated_completions and on_model.soft_overlong_punishment and on_model.beta == 0
    flags_win = config.parse(["--preset", "gspo", "--epsilon", "0.1"])
    assert (flags_win.importance_sampling_level, flags_win.epsilon, flags_win.epsilon_high) == ("sequence", 0.1, 4e-4)
    stacked = config.parse(["--preset", "qwen-0.5b-gsm8k", "cispo"])
    assert (stacked.model, stacked.max_new_tokens, stacked.loss_type, stacked.epsilon_high) == (
        "Qwen/Qwen2.5-0.5B-Instruct", 512, "cispo", 5.0)  # fmt: skip
    last = config.parse(["--preset", "gspo", "dr_grpo"])  # a recipe sets every algorithm field: the last one wins
    assert (last.loss_type, last.importance_sampling_level, last.epsilon, last.scale_rewards) == (
        "dr_grpo", "token", 0.2, "none")  # fmt: skip


@pytest.mark.parametrize("preset", RECIPES)
def test_recipe_presets_train_the_embedded_default(tmp_path, preset):
    out = tmp_path / "run"
    cfg = config.parse(["--preset", preset, "--max-steps", "2", "--no-progress", "--output-dir", str(out)])
    assert (
        cfg.dataset == "reverse" and cfg.model == "" and all(getattr(cfg, k) == v for k, v in PRESETS[preset].items())
    )
    rows = train.run(cfg)
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the held-out evaluation before training
    for r in rows[1:]:
        assert r["skipped"] == 0 and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
