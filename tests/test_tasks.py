"""Built-in generated tasks (arithmetic, countdown): deterministic for a seed, held-out split disjoint from the
training split, reachable as --dataset with their rewards; the rewards on hand-written completions; the held-out
split of the embedded reverse task."""

import dataclasses

import pytest

from grpo_fast import config, data, rewards, tasks, tiny
from grpo_fast.config import Config


def key(row: dict):
    return (tuple(sorted(row["numbers"])), row["target"]) if "numbers" in row else row["prompt"]


@pytest.mark.parametrize(
    "generate, options",
    [(tasks.arithmetic, dict(operations=["+", "-", "*", "/"], digits=2)),
     (tasks.countdown, dict(numbers=4, max_number=25))],
)  # fmt: skip
def test_deterministic_for_a_seed_and_held_out_disjoint(generate, options):
    train = generate("train", size=300, heldout=60, seed=7, **options)
    test = generate("test", size=300, heldout=60, seed=7, **options)
    assert len(train) == 300 and len(test) == 60
    assert train == generate("train", size=300, heldout=60, seed=7, **options)  # same seed, same rows
    assert train != generate("train", size=300, heldout=60, seed=8, **options)  # another seed, other rows
    assert not {key(r) for r in train} & {key(r) for r in test}  # no held-out problem is trained on
    assert len({key(r) for r in train}) == 300  # distinct problems
    assert generate("test", size=50, heldout=60, seed=7, **options) == test  # held-out split independent of size


def test_arithmetic_answers_and_options():
    rows = tasks.arithmetic("train", size=400, heldout=10, operations=["+", "-", "*", "/"], digits=2)
    seen_ops = set()
    for r in rows:
        a, op, b = r["prompt"].removeprefix("What is ").split("?")[0].split()
        seen_ops.add(op)
        exact = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
        assert float(r["answer"]) == exact and int(r["answer"]) >= 0  # division exact, subtraction >= 0
        assert 10 <= int(b) <= 99 and (op == "/" or 10 <= int(a) <= 99)
    assert seen_ops == {"+", "-", "*", "/"}
    one_digit = tasks.arithmetic("train", size=1000, heldout=20, digits=1)  # 100 problems exist: 80 left to train
    assert len(one_digit) == 80
    with pytest.raises(ValueError, match="arithmetic_operations"):
        tasks.arithmetic(operations=["^"])
    with pytest.raises(ValueError, match="task_heldout"):
        tasks.arithmetic(size=10, heldout=100, digits=1)  # every problem held out, none left to train
    with pytest.raises(ValueError, match="dataset_split"):
        tasks.arithmetic("validation")


def test_countdown_puzzles_are_solvable():
    rows = tasks.countdown("train", size=200, heldout=20, numbers=3, max_number=10, max_target=50)
    for r in rows:
        assert len(r["numbers"]) == 3 and all(1 <= n <= 10 for n in r["numbers"])
        assert 1 <= r["target"] <= 50 and r["target"] not in r["numbers"]
        assert tasks.check_countdown(r["answer"], r["numbers"], r["target"])  # the stored solution verifies
    with pytest.raises(ValueError, match="no puzzle found"):
        tasks.countdown(max_number=1, max_target=1)  # 1 op 1 never gives a target in 1..1 that is not a number


def reward(name: str, completions: list[str], **columns) -> list[float]:
    return rewards.resolve(name, 16)([""] * len(completions), completions, [[]] * len(completions), **columns)


def test_arithmetic_reward():
    completions = ["42", "The answer is 42.", "40 + 2 = 42", "\\boxed{42} then 7", "41", "forty-two", ""]
    assert reward("arithmetic", completions, answer=["42"] * 7) == [1, 1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize(
    "completion, expected",
    [("(25 - 5) * 3", 1),  # uses 25, 5, 3
     ("<answer>3 * (25 - 5)</answer>", 1),
     ("Let me think.\n(25 - 5) * 3 = 60", 1),  # the expression before "= 60" on the last line
     ("25 × 3 − 5 × 3", 0),  # unicode operators read as * and -: 3 used twice
     ("25 * 2 + 10", 1),
     ("(25 - 5) * 3 = 60.", 1),
     ("60", 0),  # a bare number is not an expression
     ("(25 + 5) * 2", 1),  # another solution
     ("(25 + 5) * 3", 0),  # 90: the wrong value
     ("20 * 3", 0),  # 20 is not given
     ("(25 - 5) * 3 * 1", 0),  # 1 is not given
     ("25 + 25 + 10", 0),  # 25 used twice
     ("3 / (5 - 5)", 0),  # division by zero
     ("25 / 5 * 12", 0),  # 12 not given
     ("2 ** 99999999", 0),  # powers are not allowed (and never evaluated)
     ("__import__('os').system('true')", 0),  # not an expression of numbers
     ("-(5 - 25) * 3", 0),  # unary minus is not allowed
     ("(25 - 5) * 3.0", 0),  # floats are not allowed
     ("((((((((((((((((((((25))))))))))))))))))))", 0),
     ("I cannot solve this", 0), ("", 0)],
)  # fmt: skip
def test_countdown_reward(completion, expected):
    numbers, target = [25, 5, 3, 2, 10], 60
    assert reward("countdown", [completion], numbers=[numbers], target=[target]) == [expected]


def test_countdown_exact_rationals():
    assert tasks.check_countdown("(1 + 2 / 3) * 3", [1, 2, 3, 3], 5)  # exact fractions, not floats
    assert not tasks.check_countdown("7 / 2", [7, 2], 3)  # 3.5 is not 3 (no floor division)
    assert tasks.check_countdown("7 / 2 * 2", [7, 2, 2], 7)


def test_countdown_reward_needs_its_columns():
    with pytest.raises(ValueError, match="'numbers' and 'target'"):
        reward("countdown", ["1 + 2"], answer=["3"])


def test_builtin_dataset_names_and_config_options():
    flags = ["--arithmetic-operations", "*", "-", "--arithmetic-digits", "1", "--task-heldout", "20"]
    flags += ["--task-size", "99"]
    cfg = config.parse(["--model", "m", "--dataset", "arithmetic", *flags])
    rows = data.load(cfg.dataset, None, "train", "prompt", "answer", cfg)
    assert rows == tasks.arithmetic("train", size=99, heldout=20, operations=["-", "*"], digits=1)
    assert len(rows) == 99 and {r["prompt"].split()[3] for r in rows} == {"-", "*"}
    held = data.load("countdown", None, "test", "prompt", "answer", dataclasses.replace(Config(), task_heldout=7))
    assert len(held) == 7 and {"numbers", "target"} <= set(held[0])
    assert data.load("countdown", None, "test", "prompt", "answer") == tasks.countdown("test")  # defaults


def test_builtin_rewards_declare_their_maximum():
    assert all(rewards.maximum(rewards.resolve(n, 8)) == 1.0 for n in ("math", "format", "reverse", "arithmetic"))
    assert rewards.maximum(rewards.resolve("countdown", 8)) == 1.0
    assert rewards.maximum(rewards.resolve("length", 8)) is None  # a shaping term takes no part in pass rates


def test_reverse_task_held_out_words_never_train():
    train, test = tiny.reverse_task(), data.load("reverse", None, "test", "prompt", "answer")
    assert len(test) == tiny.HELDOUT and len({r["prompt"] for r in test}) == tiny.HELDOUT
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert train == tiny.reverse_task() and all(r["answer"] == r["prompt"][:-1][::-1] for r in train + test)
    with pytest.raises(ValueError, match="dataset_split"):
        tiny.reverse_task(split="validation")
