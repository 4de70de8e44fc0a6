"""The trainer's configuration: one dataclass, named presets, a CLI generated from the dataclass.

Precedence, lowest first: dataclass defaults, `--preset` (one or more names, applied in order), a JSON/YAML
`--config` file, then explicit flags. A base preset names a model (and its task and sizes: `tiny`, ...); a recipe
preset (`dapo`, `gspo`, `dr_grpo`, `cispo`) sets only the algorithm, so it layers over any base: when no preset,
file or flag names a model, the `tiny` base comes first (`--preset dapo` trains the embedded default with DAPO).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import checks
from .reference import LOSS_TYPES, SCALE_REWARDS, LossOptions

GENERATED_TASKS = ("reverse", "arithmetic", "countdown")  # built-in tasks made offline (tiny.py, tasks.py)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Config:
    # what to train
    model: str = ""  # Hugging Face id or local path; empty: the embedded tiny model (tiny preset)
    dataset: str = "gsm8k"  # HF dataset id, local .jsonl/.parquet, or built-in: reverse, gsm8k, arithmetic, countdown
    dataset_config: str | None = None  # HF dataset configuration name (e.g. "main")
    dataset_split: str = "train"  # HF dataset split; arithmetic/countdown: train, or test (the held-out problems)
    prompt_column: str = "prompt"  # dataset column holding the prompt (text or chat messages)
    answer_column: str = "answer"  # dataset column the rewards receive as `answer` (math and reverse compare with it)
    system_prompt: str | None = None  # system message, when the tokenizer has a chat template
    rewards: list[str] = field(default_factory=lambda: ["math"])  # built-in names or module:function
    reward_weights: list[float] | None = None  # one weight per reward function; none: all 1
    # built-in generated tasks (tasks.py): --dataset arithmetic | countdown
    task_size: int = 2000  # training problems generated (fewer when the options allow fewer distinct ones)
    task_heldout: int = 200  # held-out problems (split "test"), drawn first and never among the training ones
    task_seed: int = 1234  # seed of the generated problems (independent of --seed, so runs share a task)
    arithmetic_operations: list[str] = field(default_factory=lambda: ["+"])  # arithmetic: drawn from + - * /
    arithmetic_digits: int = 2  # arithmetic: digits per operand (1: 0-9); / divides exactly
    countdown_numbers: int = 4  # countdown: numbers given per puzzle (2-6)
    countdown_max_number: int = 25  # countdown: the numbers are drawn from 1..this
    countdown_max_target: int = 100  # countdown: targets lie in 1..this
    # model and memory
    lora: bool = True  # LoRA adapters through peft; --no-lora: full fine-tuning
    lora_rank: int = 16  # LoRA rank r
    lora_alpha: int = 32  # LoRA alpha (scale alpha / r), >= 1
    lora_dropout: float = 0.0  # LoRA dropout (0 keeps old and new log-probs on the same network)
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module names, or all-linear
    load_in_4bit: bool = False  # 4-bit NF4 base via bitsandbytes (needs a CUDA GPU and a --model)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    bf16: bool = True  # bf16 weights on GPU; CPU always runs fp32
    # rollout
    group_size: int = 8  # G completions per prompt
    prompts_per_step: int = 4  # prompts (groups) per optimizer step, all ranks together
    micro_batch_groups: int = 1  # groups per micro-batch; gradients accumulate over the step
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    max_new_tokens: int = 256  # completion budget per sample
    temperature: float = 1.0  # sampling temperature (the loss uses the same)
    top_p: float = 1.0  # nucleus sampling; 1 disables
    top_k: int = 0  # top-k sampling; 0 disables
    rollout_groups: int = 0  # prompts per sampling call (generator seeded by seed + data position); 0: this rank's all
    compile_decode: str = "auto"  # decode step compiled whole, a CUDA graph on CUDA: auto (CUDA on, CPU off) | on | off
    # rollout log-probs: their mismatch with the training forward's is logged every step (rollout_logp_diff_*)
    old_logps_from: str = "training"  # training (no-grad pass if num_iterations > 1) | rollout (no pass; IS weights)
    rollout_is_mode: str = "token_truncate"  # old_logps_from=rollout: TRL's vllm_importance_sampling_mode
    rollout_is_min: float | None = None  # old_logps_from=rollout: TRL's vllm_importance_sampling_clip_min
    rollout_is_max: float | None = 3.0  # old_logps_from=rollout: TRL's vllm_importance_sampling_clip_max
    # loss (DESIGN.md, TRL 1.16's GRPOConfig names and defaults; every reduction is over the whole step's batch)
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo
    beta: float = 0.0  # KL coefficient; 0 skips the reference pass
    epsilon: float = 0.2  # lower clip range
    epsilon_high: float | None = None  # upper clip range; none: epsilon; cispo: the cap on the ratio itself
    delta: float | None = None  # upper bound on the ratio (two-sided GRPO); none: off
    scale_rewards: str = "group"  # group | batch | none
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    num_iterations: int = 1  # optimizer updates per rollout; > 1 computes old log-probs
    sapo_temperature_pos: float = 1.0  # sapo's gate temperature where A > 0
    sapo_temperature_neg: float = 1.05  # sapo's gate temperature where A <= 0
    vespo_k_pos: float = 2.0  # vespo's gamma-weight power where A >= 0
    vespo_lambda_pos: float = 3.0  # vespo's gamma-weight decay where A >= 0
    vespo_k_neg: float = 3.0  # vespo's gamma-weight power where A < 0
    vespo_lambda_neg: float = 2.0  # vespo's gamma-weight decay where A < 0
    top_entropy_quantile: float = 1.0  # policy loss only on the step's top fraction of tokens by entropy; 1: all
    use_bias_correction_kl: bool = True  # KL term times the importance ratio (DeepSeek-V3.2); applies when beta != 0
    off_policy_mask_threshold: float | None = None  # drop A < 0 rows whose mean KL(old || current) exceeds it
    entropy_coef: float = 0.0  # loss -= entropy_coef * mean entropy over the step's trained tokens
    mask_truncated_completions: bool = False  # rows cut at max_new_tokens get no loss (their rewards still count)
    soft_overlong_punishment: bool = False  # add DAPO's overlong penalty (the built-in reward "overlong", weight 1)
    soft_punish_cache: int | None = None  # its L_cache (the penalty's last tokens); none: max_new_tokens // 5, >= 1
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, sample more to fill the step
    dynamic_sampling_max_batches: int = 4  # its cap: batches of prompts_per_step prompts per step, the first included
    # held-out evaluation (heldout.py): greedy completions scored by the run's rewards, in metrics.jsonl as eval_*
    eval_dataset: str | None = None  # a local data file, or a built-in task (its held-out split); none: the task's own
    eval_prompts: int = 64  # held-out prompts per evaluation (the eval set's first N, the same every time); 0: none
    eval_steps: int = 50  # evaluate at step 0, every K steps and after the last; 0: at step 0 and after the last only
    # optimization
    learning_rate: float = 1e-5  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.05  # fraction of updates (in [0, 1]) with linear warmup, then cosine to 0
    max_grad_norm: float = 1.0  # gradient clipping: the update's global gradient norm is at most this (> 0)
    max_steps: int = 200  # rollout steps
    # run
    output_dir: str = "runs/grpo"  # metrics.jsonl, reward_curve.png, samples.jsonl, config, checkpoints
    save_steps: int = 50  # checkpoint every K steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2  # most recent checkpoints kept; 0 keeps every one
    log_samples_steps: int = 10  # write sample completions every K steps (and at step 1); 0: never
    plot_steps: int = 10  # refresh the reward-curve PNG every K steps (and at the end); 0: only at the end
    seed: int = 0  # seeds torch, python, numpy and the sampling generator; 0 .. 2**32 - 1
    resume: bool = False  # continue from the latest checkpoint in output_dir (none yet: start at step 0)
    progress: bool = True  # tqdm progress bar
    cpu_threads: int = 0  # torch CPU threads; 0: torch's default (1 suits tiny models on a shared CPU)
    parallel: str = "ddp"  # under torchrun: ddp (replicated weights, gradients all-reduced) | fsdp2 (fully_shard)


COMPILE_DECODE = {"auto": None, "on": True, "off": False}  # --compile-decode -> generate_groups(compile_decode=)

PRESETS: dict[str, dict] = {
    # The embedded default: tiny Llama (tiny.py), reverse 3-letter words, full fine-tuning. Chosen over seeds 0-3
    # by the mean reward of the last 20% of steps (issue 10). The former lr 2e-3, 600 steps collapsed early (85% of
    # groups all alike, entropy 0.05) at 0.61; a lower learning rate keeps the samples diverse until the
    # copy rule is learned: lr 1e-3 (1200 steps) 0.60-1.0 by seed, 5e-4 (2000) 0.69-1.0, 3e-4 (2000) 0.995-0.996
    # in every seed with held-out greedy pass rate 1.0 (1500 steps: 0.95-0.99). max_new_tokens is the word length:
    # with room for a 4th token the model must also learn to emit EOS there, and 4 of 7 runs never did (0.75:
    # letters right, no stop). Temperature 1.5 (sampling and loss): seed 2, 1500 steps, 0.953 vs 0.939 at 1.0.
    # epsilon_high alone changes nothing here: one update per rollout keeps the ratio at 1, so no clip binds.
    # The reward-curve PNG is redrawn every 100 steps (each redraw costs about as much as a few steps).
    "tiny": dict(
        model="",
        dataset="reverse",
        rewards=["reverse"],
        lora=False,
        group_size=8,
        prompts_per_step=16,
        micro_batch_groups=16,
        max_prompt_length=16,
        max_new_tokens=3,
        temperature=1.5,
        learning_rate=3e-4,
        max_steps=2000,
        output_dir="runs/tiny",
        save_steps=500,
        plot_steps=100,
        cpu_threads=1,
    ),
    # SmolLM2-135M-Instruct on one-digit addition with LoRA (defaults: r 16, alpha 32, every projection), on a 2-core
    # CPU in under 10 minutes with its evaluations (issue 10; measured: README). --model names the model
    # (NEEDS_MODEL). Greedy, the model answers 60% of the 40 held-out sums: it knows them, but often starts
    # "To solve this problem, we need to..." and never reaches the number. max_new_tokens 10 holds "7 + 4 = 11" and
    # EOS, so a rambling sample is cut off with reward 0 while a direct one scores 1: groups of 8 disagree, the
    # advantage says "answer directly", and held-out greedy pass rate reaches 0.95-1.0 by step 20-30 (seeds 0, 1:
    # 0.60 -> 0.80 / 1.00 at step 10). lr 5e-4 (LoRA): the training reward passes 0.9 by step 5-7. No system
    # prompt: the chat template's own. 4 prompts x 8 samples in one micro-batch (memory is no concern at 135M).
    # The 100 one-digit sums: the first 40 drawn are held out, the other 60 train. Two digits (not tried in
    # training): greedy 0.15 with 16 tokens, wrong sums among the failures ("22 + 55 = 108").
    "smollm2-arithmetic": dict(
        dataset="arithmetic",
        rewards=["arithmetic"],
        arithmetic_digits=1,
        task_heldout=40,
        eval_prompts=40,
        eval_steps=5,
        group_size=8,
        prompts_per_step=4,
        micro_batch_groups=4,
        max_prompt_length=96,
        max_new_tokens=10,
        learning_rate=5e-4,
        max_steps=30,
        save_steps=10,
        plot_steps=5,
        output_dir="runs/smollm2-arithmetic",
    ),
    # A real small model on GSM8K with LoRA: the usual first GPU run.
    "qwen-0.5b-gsm8k": dict(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        dataset="gsm8k",
        rewards=["math", "format"],
        reward_weights=[1.0, 0.2],
        system_prompt="Think in <think></think>, then give the final number in <answer></answer>.",
        learning_rate=2e-5,
        max_new_tokens=512,
        gradient_checkpointing=True,
        output_dir="runs/qwen-0.5b-gsm8k",
    ),
}

# The algorithm fields a recipe preset defines: each recipe sets all of them (the dataclass defaults, TRL's, then the
# paper's settings), so recipes compose with any base and the last recipe named wins whole. Sizes (group size,
# prompts per step, lengths, learning rate) stay the base's: they depend on the model and the hardware.
ALGORITHM = (
    "loss_type", "beta", "epsilon", "epsilon_high", "delta", "scale_rewards", "importance_sampling_level",
    "top_entropy_quantile", "entropy_coef", "off_policy_mask_threshold", "mask_truncated_completions",
    "soft_overlong_punishment", "soft_punish_cache", "dynamic_sampling",
)  # fmt: skip


def _recipe(**settings) -> dict:
    defaults = Config()
    return {name: getattr(defaults, name) for name in ALGORITHM} | settings


PRESETS |= {
    # DAPO, arXiv 2503.14476 (Algorithm 1; Table 1 adds its parts in this order).
    "dapo": _recipe(
        mask_truncated_completions=True,  # overlong filtering: truncated samples get no loss (§3.4, Table 1)
        epsilon=0.2,  # Clip-Higher: epsilon_low 0.2 (§3.1; values in §4.1)
        epsilon_high=0.28,  # Clip-Higher: epsilon_high 0.28 (§3.1, §4.1)
        soft_overlong_punishment=True,  # soft overlong punishment, Eq. 13 (§3.4)
        soft_punish_cache=None,  # L_cache = max_new_tokens // 5: 4096 of the 20480 generation budget (§4.1)
        loss_type="dapo",  # token-level policy gradient loss (§3.3)
        dynamic_sampling=True,  # keep only groups whose accuracy is neither 0 nor 1, resample to fill (§3.2)
        beta=0.0,  # no KL penalty (§2.3)
    ),
    # GSPO, arXiv 2507.18071.
    "gspo": _recipe(
        importance_sampling_level="sequence",  # s_i: the length-normalized sequence likelihood ratio (§4.1)
        loss_type="grpo",  # the objective averages the G sequences' clipped terms, one per sequence (Eq. 5)
        scale_rewards="group",  # group-normalized advantages (§4.1)
        epsilon=3e-4,  # left clipping range 3e-4 (§5.1)
        epsilon_high=4e-4,  # right clipping range 4e-4 (§5.1)
        beta=0.0,  # no KL term in Eq. 5 (and none in the authors' runs: TRL's paper index, verl PR 2775)
    ),  # §5.1 also splits each rollout batch into 4 mini-batch updates; here num_iterations repeats the whole batch
    # Dr. GRPO, arXiv 2503.20783 ("Understanding R1-Zero-Like Training").
    "dr_grpo": _recipe(
        loss_type="dr_grpo",  # no 1/|o_i| length normalization: token sums over a constant, max_new_tokens (§3.2)
        scale_rewards="none",  # no std normalization of the advantages: question-level difficulty bias (§3.2)
        beta=0.0,  # no KL term (the authors' training setup, as TRL's paper index records it)
    ),
    # CISPO, MiniMax-M1, arXiv 2506.13585.
    "cispo": _recipe(
        loss_type="cispo",  # sg(clip(r)) * A * log pi, normalized by the batch's tokens (§3.1)
        epsilon_high=5.0,  # the cap epsilon_max on the IS weight, no lower bound (§3.1); 5.0: TRL 1.16's recommended
        # value (GRPOConfig.epsilon_high, from ScaleRL, arXiv 2510.13786)
        scale_rewards="group",  # group-normalized advantages (§3.1)
        beta=0.0,  # no KL term in its objective (§3.1)
    ),
}


def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(Config)


def _comments() -> dict[str, str]:
    """Each field's trailing comment in the Config source: the --help text."""
    found = re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(Config), flags=re.MULTILINE)
    return {name: text.replace("%", "%%") for name, text in found}


def _scalar(tp):
    """Parser for one value of a (possibly optional) scalar type; "none" gives None for optionals."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    base = args[0] if args else tp
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0]

    def parse(s: str):
        if optional and s.lower() == "none":
            return None
        return base(s)

    parse.__name__ = base.__name__
    return parse


def _is_list(tp) -> bool:
    return any(typing.get_origin(a) is list for a in (tp, *typing.get_args(tp)))


def build_parser(defaults: Config) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m grpo_fast.train",
        description="GRPO training. No arguments: the embedded tiny model on a built-in task (tiny preset).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=None, help="named presets applied first")
    p.add_argument("--config", default=None, help="JSON or YAML file setting the same fields")
    comments = _comments()
    for name, tp in _field_types().items():
        flag, default, text = "--" + name.replace("_", "-"), getattr(defaults, name), comments.get(name, name)
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif _is_list(tp):
            p.add_argument(flag, nargs="+", type=_scalar(tp), default=default, help=text)
        else:
            p.add_argument(flag, type=_scalar(tp), default=default, help=text)
    return p


def read_file(path: str) -> dict:
    """The mapping in a JSON or YAML config file; ValueError naming the file when it cannot be read or parsed."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"config file {path}: unsupported type {suffix or '(none)'!r}; use .json, .yaml or .yml")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from e
    import yaml

    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config file {path}: cannot parse it: {' '.join(str(e).split())}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field names to values")
    return data


def _describe(tp) -> str:
    base, is_list, optional = _shape(tp)
    one, many = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
                 str: ("a string", "strings")}[base]  # fmt: skip
    return (f"a list of {many}" if is_list else one) + (" or null" if optional else "")


def _shape(tp) -> tuple[type, bool, bool]:
    """(scalar type, is a list, accepts None) of a Config field's type hint."""
    args = typing.get_args(tp)
    optional = type(None) in args
    inner = next((a for a in args if a is not type(None)), tp) if optional else tp
    if typing.get_origin(inner) is list:
        return typing.get_args(inner)[0], True, optional
    return inner, False, optional


def _scalar_value(value, base: type):
    """`value` as `base`, or raises TypeError. An int is a valid float; a string a YAML 1.1 reader left
    unparsed ("1e-5") is a float too. A bool is never a number, and only a bool is a bool."""
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if base is str and isinstance(value, str):
        return value
    raise TypeError


def coerce(name: str, value, source: str):
    """`value` checked against Config's type hint for field `name`; ValueError naming `source` and the field."""
    tp = _field_types()[name]
    base, is_list, optional = _shape(tp)
    try:
        if value is None and optional:
            return None
        if is_list != isinstance(value, list):
            raise TypeError
        return [_scalar_value(v, base) for v in value] if is_list else _scalar_value(value, base)
    except TypeError:
        hint = f" (write [{value}])" if is_list and isinstance(value, (str, int, float)) else ""
        raise ValueError(f"{source}: {name} must be {_describe(tp)}, got {value!r}{hint}") from None


def merge(cfg: Config, values: dict, source: str) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(map(str, set(values) - names))  # str: YAML keys may be numbers
    if unknown:
        raise ValueError(f"{source}: unknown config fields {unknown}; see --help")
    return dataclasses.replace(cfg, **{k: coerce(k, v, source) for k, v in values.items()})


NEEDS_MODEL = {  # presets for a model the user supplies: what to pass
    "smollm2-arithmetic": "the SmolLM2-135M-Instruct GGUF file (README) or HuggingFaceTB/SmolLM2-135M-Instruct",
}


def presets(names: list[str], named_model: bool) -> list[str]:
    """The presets to apply in order: `names`, after the `tiny` base when none of them (nor a flag or the config
    file) names a model."""
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"--preset must name presets of {sorted(PRESETS)}, got {unknown}")
    base = named_model or any("model" in PRESETS[n] for n in names)
    for name in (n for n in names if n in NEEDS_MODEL and not named_model):
        raise ValueError(f"--preset {name} needs --model: {NEEDS_MODEL[name]}")
    return names if base else ["tiny", *names]


def parse(argv: list[str] | None = None) -> Config:
    """Config from the command line (argv without the program name)."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", nargs="+", default=[])
    pre.add_argument("--config", default=None)
    pre.add_argument("--model", default=None)
    known, _ = pre.parse_known_args(argv)
    file_values = read_file(known.config) if known.config else {}
    from_file = merge(Config(), file_values, f"config file {known.config}")  # types checked before anything
    cfg = Config()
    for preset in presets(known.preset, named_model=bool(known.model or from_file.model)):
        cfg = merge(cfg, PRESETS[preset], f"preset {preset}")
    cfg = merge(cfg, file_values, f"config file {known.config}")
    args = vars(build_parser(cfg).parse_args(argv))
    args.pop("preset"), args.pop("config")
    return validate(Config(**args))


# Lower bounds of the integer fields, checked by validate.
AT_LEAST = dict(
    group_size=2, prompts_per_step=1, micro_batch_groups=1, max_prompt_length=1, max_new_tokens=1, max_steps=1,
    num_iterations=1, lora_rank=1, lora_alpha=1, top_k=0, rollout_groups=0, save_steps=0, keep_checkpoints=0,
    log_samples_steps=0, plot_steps=0, cpu_threads=0, seed=0, dynamic_sampling_max_batches=1, eval_prompts=0,
    eval_steps=0,
)  # fmt: skip
WHY = {"group_size": " (advantages compare samples within a group)", "lora_alpha": " (the LoRA scale is alpha / r)"}
SEED_MAX = 2**32 - 1  # numpy's seed range


def _in_range(cfg: Config, name: str, low: float, high: float, low_open=False, high_open=False) -> None:
    v = getattr(cfg, name)
    ok = math.isfinite(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {v}")


def _check_numbers(cfg: Config) -> None:
    for name, low in AT_LEAST.items():
        if getattr(cfg, name) < low:
            raise ValueError(f"{name} must be >= {low}{WHY.get(name, '')}, got {getattr(cfg, name)}")
    if cfg.seed > SEED_MAX:
        raise ValueError(f"seed must be <= {SEED_MAX}, got {cfg.seed}")
    _in_range(cfg, "learning_rate", 0, math.inf, low_open=True, high_open=True)
    _in_range(cfg, "max_grad_norm", 0, math.inf, low_open=True, high_open=True)  # <= 0 would flip or zero the step
    _in_range(cfg, "weight_decay", 0, math.inf, high_open=True)
    _in_range(cfg, "warmup_ratio", 0, 1)
    _in_range(cfg, "lora_dropout", 0, 1, high_open=True)
    _in_range(cfg, "top_p", 0, 1, low_open=True)
    checks.choice(cfg.loss_type, "loss_type", LOSS_TYPES)
    checks.positive_number(cfg.temperature, "temperature")
    checks.loss_options(loss_options(cfg))
    cache = cfg.soft_punish_cache
    if cache is not None and not 1 <= cache <= cfg.max_new_tokens:
        raise ValueError(f"soft_punish_cache must be in [1, max_new_tokens={cfg.max_new_tokens}], got {cache}")


def loss_options(cfg: Config) -> dict:
    """The fused loss op's options (`grpo_fast.LossOptions`, TRL's names) from the config's fields of the same name;
    dr_grpo's constant denominator is the completion budget."""
    names = [f.name for f in dataclasses.fields(LossOptions) if f.name != "max_completion_length"]
    return {name: getattr(cfg, name) for name in names} | {"max_completion_length": cfg.max_new_tokens}


def _check_rewards(cfg: Config) -> None:
    if not cfg.rewards:
        raise ValueError("rewards must name at least one reward function")
    if len(set(cfg.rewards)) != len(cfg.rewards):
        raise ValueError(f"rewards lists a function twice: {cfg.rewards}; weigh it with reward_weights instead")
    if cfg.reward_weights is None:
        return
    if len(cfg.reward_weights) != len(cfg.rewards):
        raise ValueError(f"reward_weights has {len(cfg.reward_weights)} values for {len(cfg.rewards)} rewards")
    if not all(math.isfinite(w) for w in cfg.reward_weights):
        raise ValueError(f"reward_weights must be finite, got {cfg.reward_weights}")
    if not any(cfg.reward_weights):
        raise ValueError("reward_weights are all 0: no reward would reach the loss")


def _check_choices(cfg: Config) -> None:
    checks.choice(cfg.scale_rewards, "scale_rewards", SCALE_REWARDS)
    checks.choice(cfg.compile_decode, "compile_decode", ("auto", "on", "off"))
    checks.choice(cfg.old_logps_from, "old_logps_from", ("training", "rollout"))
    names = ("rollout_is_mode", "rollout_is_min", "rollout_is_max")
    checks.importance_sampling_mode(cfg.rollout_is_mode, cfg.rollout_is_min, cfg.rollout_is_max, names)
    checks.choice(cfg.parallel, "parallel", ("ddp", "fsdp2"))
    for name in ("output_dir", "dataset", "prompt_column", "answer_column"):
        if not getattr(cfg, name).strip():
            raise ValueError(f"{name} must not be empty")
    if not cfg.lora_target_modules:
        raise ValueError("lora_target_modules must name at least one module (or all-linear)")
    if cfg.eval_dataset is not None and not cfg.eval_dataset.strip():
        raise ValueError("eval_dataset must not be empty (omit it, or none, for the default)")
    if cfg.eval_dataset is not None and cfg.eval_prompts == 0:
        raise ValueError(f"eval_dataset is {cfg.eval_dataset!r} but eval_prompts is 0: nothing would be evaluated")
    if cfg.load_in_4bit and not cfg.model:
        raise ValueError("load_in_4bit applies to a --model; the embedded tiny model is never quantized")
    if cfg.dataset in GENERATED_TASKS and (
        cfg.dataset_config is not None or cfg.dataset_split not in ("train", "test")
    ):
        raise ValueError(
            f"the built-in {cfg.dataset} task takes no dataset_config and dataset_split 'train' or 'test' (held out)"
        )


def validate(cfg: Config) -> Config:
    """Every check that needs no model or data: types (Config built in code too), ranges, choices, finiteness.
    Raises ValueError naming the field; returns the config with ints widened where a float is declared."""
    cfg = dataclasses.replace(
        cfg, **{f.name: coerce(f.name, getattr(cfg, f.name), "config") for f in dataclasses.fields(Config)}
    )
    _check_numbers(cfg)
    _check_rewards(cfg)
    _check_choices(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
