"""Bad input fails before any training step with a message naming the culprit; the CLI, config files and
the built-in reward functions."""

import dataclasses
import json
import math
import re

import pytest

from grpo_fast import config, data, rewards, train
from grpo_fast.config import PRESETS, Config

pytestmark = pytest.mark.usefixtures("trainer_cpu_path")


def tiny_cfg(tmp_path, **kw) -> Config:
    small = dict(prompts_per_step=2, group_size=2, max_steps=1, output_dir=str(tmp_path / "run"), progress=False)
    return dataclasses.replace(Config(**PRESETS["tiny"]), cpu_threads=0, **(small | kw))


# user reward functions, loaded as `test_train_inputs:<name>` (pytest puts tests/ on sys.path)
def raises(prompts, completions, completion_ids, **kw):
    raise RuntimeError("boom")


def wrong_length(prompts, completions, completion_ids, **kw):
    return [0.0]


def returns_nan(prompts, completions, completion_ids, **kw):
    return [math.nan] * len(completions)


def half_none(prompts, completions, completion_ids, *, answer, **kw):
    return [None if i % 2 else 1.0 for i in range(len(completions))]


def assert_no_step(tmp_path):
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "fn, message",
    [("raises", "'test_train_inputs:raises' raised RuntimeError: boom"),
     ("wrong_length", "'test_train_inputs:wrong_length' returned 1 values for 2"),
     ("returns_nan", "'test_train_inputs:returns_nan' returned a non-finite"),
     ("no_such_function", "cannot load reward function 'test_train_inputs:no_such_function'")],
)  # fmt: skip
def test_reward_errors_stop_before_training(tmp_path, fn, message):
    with pytest.raises(ValueError, match=message):
        train.run(tiny_cfg(tmp_path, rewards=[f"test_train_inputs:{fn}"]))
    assert_no_step(tmp_path)


def test_reward_error_during_a_step_names_the_function():
    calls = []

    def flaky(prompts, completions, completion_ids, **kw):
        calls.append(1)
        return [1.0] * (len(completions) - (len(calls) > 1))

    rewards.score({"flaky": flaky}, [1.0], ["p"], ["c"], [[1]], {})
    with pytest.raises(rewards.RewardError, match="'flaky' returned 0 values for 1"):
        rewards.score({"flaky": flaky}, [1.0], ["p"], ["c"], [[1]], {})


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(model="/no/such/model_dir"), "model: no such local directory"),
     (dict(group_size=1), "group_size must be >= 2"),
     (dict(max_new_tokens=100), "exceeds the model's 64 positions"),
     (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
     (dict(dataset="/no/such/file.jsonl"), "dataset: no such file"),
     (dict(rewards=["nope"]), "unknown reward 'nope'"),
     (dict(loss_type="ppo"), "loss_type must be one of")],
)  # fmt: skip
def test_bad_config_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.run(config.validate(tiny_cfg(tmp_path, **overrides)))
    assert_no_step(tmp_path)


def test_dataset_without_prompt_or_answer_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1+1", "solution": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"no prompt column 'prompt'; columns: \['question', 'solution'\]"):
        train.run(tiny_cfg(tmp_path, dataset=str(path)))
    with pytest.raises(ValueError, match="no answer column 'answer'"):
        train.run(tiny_cfg(tmp_path, dataset=str(path), prompt_column="question"))
    assert_no_step(tmp_path)


def test_cli_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit):
        config.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert re.search(r"--output-dir OUTPUT_DIR [^-]*\(default: runs/tiny\)", text)  # no --model: tiny preset
    for flag in ("--max-steps", "--save-steps", "--seed", "--resume", "--model", "--dataset", "--group-size"):
        assert flag in text


def test_cli_precedence_and_config_file(tmp_path):
    assert config.parse([]) == config.validate(Config(**PRESETS["tiny"]))
    real = config.parse(["--model", "some/model", "--group-size", "4", "--no-lora", "--epsilon-high", "0.28"])
    assert (real.model, real.group_size, real.lora, real.epsilon_high, real.learning_rate) == (
        "some/model", 4, False, 0.28, Config().learning_rate)  # fmt: skip
    file = tmp_path / "c.yaml"
    file.write_text("model: m\nrewards: [math, format]\nreward_weights: [1.0, 0.5]\nmax_steps: 7\n")
    cfg = config.parse(["--config", str(file), "--max-steps", "9"])
    assert (cfg.model, cfg.rewards, cfg.reward_weights, cfg.max_steps) == ("m", ["math", "format"], [1.0, 0.5], 9)
    (tmp_path / "bad.json").write_text(json.dumps({"group_sise": 4}))
    with pytest.raises(ValueError, match=r"unknown config fields \['group_sise'\]"):
        config.parse(["--config", str(tmp_path / "bad.json")])
    assert train.main(["--group-size", "1"]) == 2


def test_builtin_rewards():
    completions = ["so \\boxed{1,234}", "x = 3.5 then 7", "<think>a</think> <answer>7</answer>", "none"]
    answers = ["#### 1234", "7", "work #### 7", "12"]
    assert rewards.math_reward(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0]
    assert rewards.math_reward(None, ["1"], answer=["no number"]) == [None]
    assert rewards.format_reward(None, completions) == [0.0, 0.0, 1.0, 0.0]
    length = rewards.resolve("length", max_new_tokens=4)
    assert length(None, ["", "", ""], [[], [1, 2], [1] * 9]) == [1.0, 0.5, 0.0]
    total, stats = rewards.score({"h": half_none, "f": rewards.format_reward}, [2.0, 1.0], [""] * 4, completions,
                                 [[]] * 4, {"answer": answers})  # fmt: skip
    assert total.tolist() == [2.0, 0.0, 3.0, 0.0]  # None counts 0 in the weighted sum
    assert (stats["reward_h_mean"], stats["reward_h_std"]) == (1.0, 0.0)  # ... and is left out of h's stats
    assert stats["reward_f_mean"] == 0.25


def test_prompt_order_is_a_pure_function_of_the_position():
    order = data.PromptOrder(n=5, seed=3)
    first = order.indices(0, 12)
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))  # epochs cover all rows
    assert order.indices(7, 5) == first[7:12]  # resuming at position 7 sees the same prompts
