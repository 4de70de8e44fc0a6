"""Built-in offline tasks for instruct models, generated from a seed: `arithmetic` and `countdown`.

Each task draws one seeded stream of distinct problems: the first `heldout` form the held-out split ("test"),
the next `size` the training split ("train"). The splits are disjoint by construction (a problem is its
operands, not its wording), and the held-out split does not depend on `size`.

- arithmetic: "What is 47 + 18? Answer with just the final number." The answer column holds the result; the
  `arithmetic` reward (rewards.py) compares it with the last number of the completion. Subtraction keeps the
  larger operand first (results >= 0); division is exact (dividend = divisor * quotient).
- countdown: reach a target from given numbers with + - * / and parentheses, each number used at most once.
  Every puzzle is solvable: the target is the value of a random expression over some of the numbers, with
  integer intermediate results. `countdown_reward` verifies the completion's expression with an `ast`
  whitelist (never `eval`): only integer literals, binary + - * /, parentheses; exact rational arithmetic.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction

OPERATIONS = ("+", "-", "*", "/")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}  # exact where used
_SPLITS = ("train", "test")
_DRAWS_PER_PROBLEM = 50  # draw budget: a problem space smaller than asked gives fewer training prompts
_PUZZLE_ATTEMPTS = 10_000  # countdown draws in a row that may miss (out of range, trivial) before options are refused


def _distinct(draw: Callable, key: Callable, split: str, size: int, heldout: int, seed: int, name: str) -> list[dict]:
    """Rows of `split` from one seeded stream of distinct problems (heldout first, then training)."""
    if split not in _SPLITS:
        raise ValueError(f"dataset_split for the built-in task {name!r} must be one of {_SPLITS}, got {split!r}")
    if size < 1 or heldout < 1:
        raise ValueError(f"task_size and task_heldout must be >= 1, got {size} and {heldout}")
    rng, seen, test, train = random.Random(seed), set(), [], []
    for _ in range(_DRAWS_PER_PROBLEM * (size + heldout)):
        if len(train) == size:
            break
        row = draw(rng)
        if key(row) not in seen:
            seen.add(key(row))
            (test if len(test) < heldout else train).append(row)
    if not train:
        raise ValueError(
            f"{name}: found only {len(seen)} distinct problems for these options, all taken by the held-out split "
            f"(task_heldout={heldout}); lower task_heldout or widen the task"
        )
    return test if split == "test" else train


# ------------------------------------------------------------------------------------------------ arithmetic


def _operand(rng: random.Random, digits: int, low: int = 0) -> int:
    return rng.randint(max(low, 10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1)


def _arithmetic_problem(rng: random.Random, operations: list[str], digits: int) -> dict:
    op = rng.choice(operations)
    if op == "/":
        b, q = _operand(rng, digits, low=1), _operand(rng, digits)
        a, result = b * q, q
    else:
        a, b = _operand(rng, digits), _operand(rng, digits)
        if op == "-" and a < b:
            a, b = b, a
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"prompt": f"What is {a} {op} {b}? Answer with just the final number.", "answer": str(result)}


def arithmetic(
    split: str = "train",
    *,
    size: int = 2000,
    heldout: int = 200,
    seed: int = 1234,
    operations: list[str] | tuple[str, ...] = ("+",),
    digits: int = 2,
) -> list[dict]:
    """Rows {"prompt", "answer"} of one binary operation each, operands of `digits` digits (1: 0-9)."""
    bad = [op for op in operations if op not in OPERATIONS]
    if not operations or bad:
        raise ValueError(f"arithmetic_operations must be a non-empty list from {OPERATIONS}, got {list(operations)}")
    if not 1 <= digits <= 9:
        raise ValueError(f"arithmetic_digits must be in 1..9, got {digits}")
    ops = sorted(set(operations), key=OPERATIONS.index)  # the same stream however the options were ordered
    draw = lambda rng: _arithmetic_problem(rng, ops, digits)
    return _distinct(draw, lambda row: row["prompt"], split, size, heldout, seed, "arithmetic")


# ------------------------------------------------------------------------------------------------- countdown


def _combine(rng: random.Random, items: list[tuple[int, str]]) -> tuple[int, str] | None:
    """A random expression over all `items` (value, text) with integer, non-negative intermediates; None
    when the drawn operation is not allowed there (a negative difference, an inexact or zero division)."""
    items = list(items)
    while len(items) > 1:
        (a, x), (b, y) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
        op = rng.choice(OPERATIONS)
        if (op == "-" and a < b) or (op == "/" and (b == 0 or a % b)):
            return None
        value = _APPLY[op](a, b)
        items.append((value, f"({x} {op} {y})"))
    return items[0]


def _countdown_problem(rng: random.Random, count: int, max_number: int, max_target: int) -> dict | None:
    numbers = [rng.randint(1, max_number) for _ in range(count)]
    used = rng.sample(numbers, rng.randint(2, count))
    found = _combine(rng, [(n, str(n)) for n in used])
    if found is None or not 1 <= found[0] <= max_target or found[0] in numbers:
        return None  # not allowed, out of range, or trivial (the target is one of the numbers)
    target, solution = found[0], found[1][1:-1]  # outer parentheses dropped
    prompt = (
        f"Using the numbers {numbers}, write an expression that equals {target}. Use + - * / and parentheses; "
        "each number at most once (not all are needed). Give only the expression, for example: (2 + 3) * 4"
    )
    return {"prompt": prompt, "answer": solution, "numbers": numbers, "target": target}


def countdown(
    split: str = "train",
    *,
    size: int = 2000,
    heldout: int = 200,
    seed: int = 1234,
    numbers: int = 4,
    max_number: int = 25,
    max_target: int = 100,
) -> list[dict]:
    """Rows {"prompt", "answer" (one solution), "numbers", "target"}: `numbers` numbers in 1..max_number,
    a target in 1..max_target that some of them reach."""
    if not 2 <= numbers <= 6:
        raise ValueError(f"countdown_numbers must be in 2..6, got {numbers}")
    if max_number < 1 or max_target < 1:
        raise ValueError(f"countdown_max_number and countdown_max_target must be >= 1, got {max_number}, {max_target}")

    def draw(rng: random.Random) -> dict:
        for _ in range(_PUZZLE_ATTEMPTS):
            if (row := _countdown_problem(rng, numbers, max_number, max_target)) is not None:
                return row
        raise ValueError(f"countdown: no puzzle found for these options (countdown_max_target={max_target} too small?)")

    key = lambda row: (tuple(sorted(row["numbers"])), row["target"])
    return _distinct(draw, key, split, size, heldout, seed, "countdown")


GENERATORS = {"arithmetic": arithmetic, "countdown": countdown}


def load(name: str, split: str, cfg) -> list[dict]:
    """The rows of built-in task `name` for `split` ("train" or "test"), with the options of `cfg` (Config)."""
    common = dict(size=cfg.task_size, heldout=cfg.task_heldout, seed=cfg.task_seed)
    if name == "arithmetic":
        return arithmetic(split, operations=cfg.arithmetic_operations, digits=cfg.arithmetic_digits, **common)
    options = dict(numbers=cfg.countdown_numbers, max_number=cfg.countdown_max_number)
    return countdown(split, max_target=cfg.countdown_max_target, **options, **common)


# ---------------------------------------------------------------------------------------- countdown reward

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_EXPRESSION_RUN = re.compile(r"[\d\s+\-*/().]+")  # digits, spaces, operators and parentheses only
_MAX_EXPRESSION = 200  # characters: longer text is not a countdown answer (and keeps ast.parse shallow)


def extract_expression(completion: str) -> str | None:
    """The expression a completion answers with: inside its last <answer></answer> if any, else on its last
    non-empty line; there, the last run of digits, operators and parentheses that holds an operator (so
    "(2 + 3) * 4 = 20" gives "(2 + 3) * 4")."""
    tagged = _ANSWER_TAG.findall(completion)
    text = tagged[-1] if tagged else next((s for s in reversed(completion.splitlines()) if s.strip()), "")
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-")
    runs = [r.rstrip(" \t.").lstrip() for r in _EXPRESSION_RUN.findall(text)]  # a full stop ends a sentence
    runs = [r for r in runs if re.search(r"\d", r) and re.search(r"[-+*/]", r)]
    return runs[-1] if runs else None


def _value(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of a whitelisted expression tree; collects its integer literals into `used`.
    ValueError for anything else (names, calls, powers, unary signs, floats); ZeroDivisionError."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, used), _value(node.right, used)
        return _BINARY[type(node.op)](left, right)
    raise ValueError(f"not allowed in a countdown expression: {type(node).__name__}")


def check_countdown(expression: str | None, numbers: list[int], target: int) -> bool:
    """True when `expression` uses only `numbers` (each at most once) with + - * / and equals `target`."""
    if expression is None or len(expression) > _MAX_EXPRESSION:
        return False
    used: list[int] = []
    try:
        value = _value(ast.parse(expression, mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return False
    return not Counter(used) - Counter(int(n) for n in numbers) and value == target


def countdown_reward(prompts, completions, completion_ids=None, *, numbers=None, target=None, **kwargs) -> list:
    """1 when the completion's expression (extract_expression) reaches `target` from `numbers`, else 0."""
    if numbers is None or target is None:
        raise ValueError("countdown reward needs the dataset columns 'numbers' and 'target' (--dataset countdown)")
    return [float(check_countdown(extract_expression(c), n, int(t))) for c, n, t in zip(completions, numbers, target)]


countdown_reward.max_reward = 1.0  # rewards.maximum: a sample at its maximum passes
