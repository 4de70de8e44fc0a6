"""Issue 13, the entry script under hostile input: every case runs `train.main(argv)` in-process (as
`python -m grpo_fast.train` does) and must exit 2 with one line on stderr naming the culprit and no traceback;
most fail before the model loads, all before a metrics row is written. Case ids carry the report's defect number.

Files a case needs are built by name (FILES) in the test's own directory; `{tmp}` in an argument is that directory.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from test_train_run import char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_fast import config, heldout, train

pytestmark = pytest.mark.usefixtures("trainer_cpu_path")

BASE = ["--no-progress", "--max-steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--save-steps", "0"]
WORDS = [a + b + c for a in "abcd" for b in "abcd" for c in "ab"]  # 32 words of the tiny task's letters


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def task_rows(bad_index: int | None = None, bad_row=None) -> list:
    rows = [{"prompt": w + "=", "answer": w[::-1]} for w in WORDS]
    if bad_index is not None:
        rows[bad_index] = bad_row
    return rows


FILES = {  # name -> text
    "null-prompt.jsonl": jsonl(task_rows(30, {"prompt": None, "answer": "abc"})),
    "number-prompt.jsonl": jsonl(task_rows(7, {"prompt": 12, "answer": "abc"})),
    "dict-prompt.jsonl": jsonl(task_rows(5, {"prompt": {"role": "user", "content": "abc="}, "answer": "cba"})),
    "no-content.jsonl": jsonl([{"prompt": [{"role": "user", "text": w + "="}], "answer": w[::-1]} for w in WORDS]),
    "empty-prompt.jsonl": jsonl(task_rows(3, {"prompt": "", "answer": "abc"})),
    "strings-prompt.jsonl": jsonl(
        [
            {"prompt": [w[:2], w[2:]] if i == 2 else [{"role": "user", "content": w}], "answer": w[::-1]}
            for i, w in enumerate(WORDS)
        ]
    ),
    "no-prompt-key.jsonl": jsonl(task_rows(4, {"answer": "abc"})),
    "no-answer.jsonl": jsonl(task_rows(9, {"prompt": "abc=", "answer": None})),
    "words.csv": "prompt,answer\nabc=,cba\n",
    "words.txt": "abc=\n",
    "empty.jsonl": "",
    "with-extra.jsonl": jsonl([r | {"extra": 1} for r in task_rows()]),
    "held.jsonl": jsonl(task_rows()[:4]),
    "lora-false.yaml": 'lora: "false"\n',
    "lora-no.json": json.dumps({"lora": "no"}),
    "bias-yes.yaml": 'use_bias_correction_kl: "yes"\n',
    "steps-float.yaml": "max_steps: 3.7\n",
    "weights-scalar.yaml": "reward_weights: 1.0\n",
    "lr-list.yaml": "learning_rate: [0.1]\n",
    "steps-null.yaml": "max_steps: null\n",
    "seed-null.yaml": "seed: null\n",
    "outdir-null.yaml": "output_dir: null\n",
    "broken.yaml": "max_steps: [3\n",
    "rewards-string.yaml": "rewards: reverse\n",
    "trailing-comma.json": '{"max_steps": 3,}',
    "config.toml": "max_steps = 3\n",
    "list.yaml": "- max_steps\n",
    "a-file": "x",
    "rw.py": """
import torch
def lists(prompts, completions, completion_ids, **kw): return [[1.0] for _ in completions]
def words(prompts, completions, completion_ids, **kw): return ["good" for _ in completions]
def dicts(prompts, completions, completion_ids, **kw): return [{"r": 1} for _ in completions]
def complex_(prompts, completions, completion_ids, **kw): return [1j for _ in completions]
def pairs(prompts, completions, completion_ids, **kw): return torch.ones(len(completions), 2)
def extra(prompts, completions, completion_ids, *, extra, **kw): return [float(e) for e in extra]
""",
}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama saved with a chat-template tokenizer: the D4 path (chat templates render what they get)."""
    path = tmp_path_factory.mktemp("chat") / "lm"
    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, eos_token_id=1,
                      pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished 2-step run (checkpoint-0000002) of the BASE config to resume from."""
    out = tmp_path_factory.mktemp("done") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)  # the trainer's CPU path (module scope: no trainer_cpu_path)
        assert train.main([*BASE, "--max-steps", "2", "--output-dir", str(out)]) == 0
    return out


def prepare(tmp_path, monkeypatch) -> None:
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "emptydir").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))  # reward modules: module:function


def run_cli(tmp_path, capsys, args: list[str], out=None) -> tuple[int, str]:
    argv = [*BASE, "--output-dir", str(out or tmp_path / "run"), *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    rc = train.main(argv)
    return rc, capsys.readouterr().err


CASES = [
    # D1: clipping that would reverse or zero the gradient
    ("D1-max-grad-norm-negative", ["--max-grad-norm=-1"], r"max_grad_norm must be in \(0, inf\), got -1"),
    ("D1-max-grad-norm-zero", ["--max-grad-norm", "0"], r"max_grad_norm must be in \(0, inf\), got 0"),
    # D3/D4: every row checked before step 1
    ("D3-null-prompt", ["--dataset", "{tmp}/null-prompt.jsonl"], r"dataset row 30: prompt must be a string .*got None"),
    ("D3-number-prompt", ["--dataset", "{tmp}/number-prompt.jsonl"], r"dataset row 7: prompt must be .*got 12"),
    ("D3-dict-prompt", ["--dataset", "{tmp}/dict-prompt.jsonl"], r"dataset row 5: prompt must be .*got \{'role'"),
    ("D3-message-without-content", ["--dataset", "{tmp}/no-content.jsonl"], r"dataset row 0: prompt must be"),
    ("D3-list-of-strings", ["--dataset", "{tmp}/strings-prompt.jsonl"], r"dataset row 2: prompt must be .*\['ab'"),
    ("D3-missing-prompt-key", ["--dataset", "{tmp}/no-prompt-key.jsonl"], r"dataset row 4: prompt must be .*None"),
    ("D3-empty-prompt", ["--dataset", "{tmp}/empty-prompt.jsonl"], r"dataset row 3: prompt encodes to no tokens"),
    ("D3-missing-answer", ["--dataset", "{tmp}/no-answer.jsonl"], r"dataset row 9: no answer in column 'answer'"),
    ("D3-missing-prompt-column", ["--dataset", "{tmp}/words.csv", "--prompt-column", "q"], r"no prompt column 'q'"),
    ("D3-missing-answer-column", ["--dataset", "{tmp}/words.csv", "--answer-column", "sol"],
     r"dataset has no answer column 'sol'"),
    # D5/D6: config files: types checked per field, errors name the file
    ("D5-lora-string-false", ["--config", "{tmp}/lora-false.yaml"], r"lora-false.yaml: lora must be true or false"),
    ("D5-lora-string-no-json", ["--config", "{tmp}/lora-no.json"], r"lora-no.json: lora must be true or false"),
    ("D6-int-field-float", ["--config", "{tmp}/steps-float.yaml"], r"steps-float.yaml: max_steps must be an integer"),
    ("D6-list-field-scalar", ["--config", "{tmp}/weights-scalar.yaml"], r"reward_weights must be a list of numbers"),
    ("D6-float-field-list", ["--config", "{tmp}/lr-list.yaml"], r"lr-list.yaml: learning_rate must be a number"),
    ("D6-null-int", ["--config", "{tmp}/steps-null.yaml"], r"max_steps must be an integer, got None"),
    ("D6-null-seed", ["--config", "{tmp}/seed-null.yaml"], r"seed must be an integer, got None"),
    ("D6-null-output-dir", ["--config", "{tmp}/outdir-null.yaml"], r"output_dir must be a string, got None"),
    ("D6-yaml-syntax", ["--config", "{tmp}/broken.yaml"], r"config file .*broken.yaml: cannot parse it"),
    ("D6-missing-file", ["--config", "{tmp}/nope.yaml"], r"config file .*nope.yaml: cannot read it: No such file"),
    ("D6-rewards-string", ["--config", "{tmp}/rewards-string.yaml"],
     r"rewards must be a list of strings, got 'reverse' \(write \[reverse\]\)"),
    ("D6-json-syntax", ["--config", "{tmp}/trailing-comma.json"], r"trailing-comma.json: cannot parse it: Expecting"),
    ("D6-toml", ["--config", "{tmp}/config.toml"], r"config.toml: unsupported type '.toml'"),
    ("D6-not-a-mapping", ["--config", "{tmp}/list.yaml"], r"list.yaml must hold a mapping"),
    # D8: a reward that can score nothing, found from the data
    ("D8-math-on-words", ["--rewards", "math"], r"the math reward finds no number in column 'answer'"),
    # D10: the output directory is created and probed before anything loads
    ("D10-output-dir-is-a-file", ["--output-dir", "{tmp}/a-file"], r"cannot write .*a-file: File exists"),
    ("D10-output-dir-under-a-file", ["--output-dir", "{tmp}/a-file/sub"], r"cannot write .*a-file/sub: Not a dir"),
    # D11/D21/D23: datasets and models named by path
    ("D11-unsupported-file-type", ["--dataset", "{tmp}/words.txt"], r"unsupported file type '.txt'"),
    ("D11-missing-local-file", ["--dataset", "{tmp}/nope.csv"], r"dataset: no such file"),
    ("D21-split-of-a-local-file", ["--dataset", "{tmp}/words.csv", "--dataset-split", "test"],
     r"dataset_config and dataset_split apply to Hugging Face datasets"),
    ("D21-config-of-a-local-file", ["--dataset", "{tmp}/words.csv", "--dataset-config", "main"], r"dataset_config"),
    ("D21-split-of-the-builtin-task", ["--dataset-split", "validation"], r"built-in reverse task takes no"),
    ("D23-empty-dataset-file", ["--dataset", "{tmp}/empty.jsonl"], r"dataset file .*empty.jsonl' is empty"),
    ("D23-empty-model-dir", ["--model", "{tmp}/emptydir"], r"emptydir' has no config.json"),
    ("missing-model-dir", ["--model", "{tmp}/nodir"], r"model: no such local directory"),
    # D15: reward values of the wrong type name the function and the index
    ("D15-reward-lists", ["--rewards", "rw:lists"], r"'rw:lists' returned list \[1.0\] at index 0"),
    ("D15-reward-strings", ["--rewards", "rw:words"], r"'rw:words' returned str 'good' at index 0"),
    ("D15-reward-dicts", ["--rewards", "rw:dicts"], r"'rw:dicts' returned dict"),
    ("D15-reward-complex", ["--rewards", "rw:complex_"], r"'rw:complex_' returned complex 1j"),
    ("D15-reward-pairs", ["--rewards", "rw:pairs"], r"'rw:pairs' returned Tensor tensor\(\[1., 1.\]\) at index 0"),
    ("reward-unknown", ["--rewards", "nope"], r"unknown reward 'nope'"),
    ("reward-missing-module", ["--rewards", "no_module:f"], r"cannot load reward function 'no_module:f'"),
    ("reward-twice", ["--rewards", "reverse", "reverse"], r"rewards lists a function twice"),
    ("reward-weights-all-zero", ["--reward-weights", "0"], r"reward_weights are all 0"),
    # D18-D21: options checked in config.validate, before anything loads
    ("D18-lora-alpha-zero", ["--lora", "--lora-alpha", "0"], r"lora_alpha must be >= 1 \(the LoRA scale"),
    ("D18-lora-rank-zero", ["--lora", "--lora-rank", "0"], r"lora_rank must be >= 1"),
    ("D19-cpu-threads-negative", ["--cpu-threads=-1"], r"cpu_threads must be >= 0"),
    ("D20-epsilon-negative", ["--epsilon=-0.5"], r"epsilon must be a finite positive number"),
    ("D20-epsilon-nan", ["--epsilon", "nan"], r"epsilon must be a finite positive number"),
    ("D20-epsilon-high-negative", ["--epsilon-high=-1"], r"epsilon_high must be a finite positive number"),
    ("D20-beta-negative", ["--beta=-1"], r"beta must be a finite number >= 0"),
    ("D20-beta-nan", ["--beta", "nan"], r"beta must be a finite number >= 0"),
    ("D20-temperature-nan", ["--temperature", "nan"], r"temperature must be a finite positive number"),
    ("D20-temperature-inf", ["--temperature", "inf"], r"temperature must be a finite positive number"),
    ("D20-reward-weights-nan", ["--reward-weights", "nan"], r"reward_weights must be finite"),
    ("D21-warmup-ratio-2", ["--warmup-ratio", "2"], r"warmup_ratio must be in \[0, 1\]"),
    ("D21-log-samples-negative", ["--log-samples-steps=-1"], r"log_samples_steps must be >= 0"),
    ("D21-plot-steps-negative", ["--plot-steps=-1"], r"plot_steps must be >= 0"),
    ("D21-keep-checkpoints-negative", ["--keep-checkpoints=-1"], r"keep_checkpoints must be >= 0"),
    ("D21-output-dir-empty", ["--output-dir", ""], r"output_dir must not be empty"),
    ("D21-4bit-embedded-model", ["--load-in-4bit"], r"load_in_4bit applies to a --model"),
    ("learning-rate-zero", ["--learning-rate", "0"], r"learning_rate must be in \(0, inf\)"),
    ("lora-dropout-one", ["--lora-dropout", "1"], r"lora_dropout must be in \[0, 1\)"),
    ("seed-negative", ["--seed=-1"], r"seed must be >= 0"),
    ("seed-too-large", ["--seed", str(2**32)], r"seed must be <= 4294967295"),
    ("group-size-one", ["--group-size", "1"], r"group_size must be >= 2"),
    ("max-new-tokens-too-many", ["--max-new-tokens", "100"], r"exceeds the model's 64 positions"),
    ("loss-type-unknown", ["--loss-type", "ppo"], r"loss_type must be one of"),
    # issue 11: TRL's loss options, overlong punishment, dynamic sampling, recipe presets
    ("top-entropy-quantile-above-1", ["--top-entropy-quantile", "1.5"], r"top_entropy_quantile must lie in \[0, 1\]"),
    ("top-entropy-quantile-negative", ["--top-entropy-quantile=-0.1"], r"top_entropy_quantile must be a finite num"),
    ("sapo-temperature-zero", ["--sapo-temperature-neg", "0"], r"sapo_temperature_neg must be a finite positive"),
    ("vespo-k-nan", ["--vespo-k-pos", "nan"], r"vespo_k_pos must be a finite number, got nan"),
    ("entropy-coef-inf", ["--entropy-coef", "inf"], r"entropy_coef must be a finite number, got inf"),
    ("off-policy-threshold-nan", ["--off-policy-mask-threshold", "nan"], r"off_policy_mask_threshold must be a finite"),
    ("delta-zero", ["--delta", "0"], r"delta must be a finite positive number, got 0"),
    ("bias-correction-string", ["--config", "{tmp}/bias-yes.yaml"], r"use_bias_correction_kl must be true or false"),
    ("soft-punish-cache-zero", ["--soft-punish-cache", "0"], r"soft_punish_cache must be in \[1, max_new_tokens=3\]"),
    ("soft-punish-cache-above-budget", ["--soft-punish-cache", "5"], r"soft_punish_cache must be in \[1, max_new_toke"),
    ("dynamic-sampling-max-batches-zero", ["--dynamic-sampling-max-batches", "0"],
     r"dynamic_sampling_max_batches must be >= 1, got 0"),
    ("preset-unknown", ["--preset", "dapo", "ppo"], r"--preset must name presets of \[.*\], got \['ppo'\]"),
    ("top-p-zero", ["--top-p", "0"], r"top_p must be in \(0, 1\]"),
    ("preset-without-its-model", ["--preset", "smollm2-arithmetic"],
     r"--preset smollm2-arithmetic needs --model: the SmolLM2-135M-Instruct GGUF file \(README\) or Hugging"),
    # issue 10: held-out evaluation
    ("eval-prompts-negative", ["--eval-prompts=-1"], r"eval_prompts must be >= 0, got -1"),
    ("eval-steps-negative", ["--eval-steps=-5"], r"eval_steps must be >= 0, got -5"),
    ("eval-dataset-empty", ["--eval-dataset", " "], r"eval_dataset must not be empty"),
    ("eval-dataset-without-prompts", ["--eval-dataset", "reverse", "--eval-prompts", "0"],
     r"eval_dataset is 'reverse' but eval_prompts is 0: nothing would be evaluated"),
    ("eval-dataset-hub-id", ["--eval-dataset", "org/held-out"],
     r"eval_dataset must be a built-in task \(reverse, gsm8k, arithmetic, countdown\) or a local .*'org/held-out'"),
    ("eval-dataset-text-file", ["--eval-dataset", "{tmp}/words.txt"], r"eval_dataset must be a built-in task"),
    ("eval-dataset-missing-file", ["--eval-dataset", "{tmp}/nope.jsonl"],
     r"eval_dataset '.*nope.jsonl': dataset: no such file"),
    ("eval-dataset-is-the-training-file", ["--dataset", "{tmp}/words.csv", "--eval-dataset", "{tmp}/words.csv"],
     r"eval_dataset '.*words.csv' is the training dataset: held-out prompts must be others"),
    ("eval-dataset-trained-on", ["--dataset-split", "test", "--eval-dataset", "reverse"],
     r"eval_dataset 'reverse' is its held-out split, which this run trains on"),
    ("eval-dataset-row-without-answer", ["--eval-dataset", "{tmp}/no-answer.jsonl"],
     r"eval_dataset '.*no-answer.jsonl': dataset row 9: no answer in column 'answer'"),
    ("eval-dataset-reward-fails",
     ["--dataset", "{tmp}/with-extra.jsonl", "--rewards", "rw:extra", "--eval-dataset", "{tmp}/held.jsonl"],
     r"eval_dataset .*held.jsonl': reward function 'rw:extra' raised"),
    # argparse's own errors: exit 2 with its usage line
    ("flag-not-an-int", ["--group-size", "abc"], r"argument --group-size: invalid int value: 'abc'"),
    ("flag-unknown", ["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    prepare(tmp_path, monkeypatch)
    rc, err = run_cli(tmp_path, capsys, args)
    assert rc == 2, err
    assert "Traceback" not in err
    assert any(line.startswith(("error: ", "usage: ")) for line in err.splitlines()), err
    error_line = next(
        line for line in err.splitlines() if line.startswith(("error: ", "python -m grpo_fast.train: error"))
    )
    assert re.search(message, error_line), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_chat_template_prompts_are_checked_too(tmp_path, capsys, monkeypatch, chat_model):
    """D4: with a chat template, None and messages without `content` used to train as "None" and empty turns."""
    prepare(tmp_path, monkeypatch)
    common = ["--model", str(chat_model), "--rewards", "reverse", "--max-prompt-length", "16", "--max-new-tokens", "4"]
    for data, message in (("null-prompt.jsonl", "dataset row 30: prompt must be"),
                          ("no-content.jsonl", "dataset row 0: prompt must be")):  # fmt: skip
        rc, err = run_cli(tmp_path, capsys, [*common, "--dataset", str(tmp_path / data)])
        assert rc == 2 and message in err and "Traceback" not in err


RESUME_CASES = [
    ("D9-group-size", ["--resume", "--group-size", "4"], r"group_size: 2 -> 4"),
    ("D9-seed-and-learning-rate", ["--resume", "--seed", "5", "--learning-rate", "0.5"],
     r"learning_rate: 0.0003 -> 0.5; seed: 0 -> 5"),
    ("D9-prompts-per-step", ["--resume", "--prompts-per-step", "4"], r"prompts_per_step: 2 -> 4"),
    ("D9-lora-on", ["--resume", "--lora"], r"lora: False -> True"),
    ("D9-dataset", ["--resume", "--dataset", "{tmp}/words.csv"], r"dataset: 'reverse' -> "),
    ("D9-max-steps-not-above-checkpoint", ["--resume", "--max-steps", "2"],
     r"max_steps=2 but checkpoint .* is at step 2"),
    ("D9-max-steps-below-checkpoint", ["--resume", "--max-steps", "1"], r"nothing to train; raise --max-steps"),
    ("no-resume-flag", [], r"already has checkpoints: pass --resume"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_resume_refuses_changed_settings(tmp_path, capsys, monkeypatch, checkpointed, args, message):
    """D9: a resumed run cannot silently change what it computes; config.json is left as it was."""
    prepare(tmp_path, monkeypatch)
    out = tmp_path / "copy"
    shutil.copytree(checkpointed, out)
    before = (out / "config.json").read_text(), (out / "metrics.jsonl").read_text()
    rc, err = run_cli(tmp_path, capsys, ["--max-steps", "4", *args], out=out)
    assert rc == 2 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert ((out / "config.json").read_text(), (out / "metrics.jsonl").read_text()) == before


def test_resume_reports_the_checkpoint_of_an_incompatible_older_run(tmp_path, capsys, monkeypatch, checkpointed):
    """D12: a checkpoint without a stored config (older version) that does not fit: the checkpoint and the cause."""
    prepare(tmp_path, monkeypatch)
    out = tmp_path / "copy"
    shutil.copytree(checkpointed, out)
    state_file = out / "checkpoints" / "checkpoint-0000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]
    state_file.write_text(json.dumps(state))
    rc, err = run_cli(tmp_path, capsys, ["--max-steps", "4", "--resume", "--lora"], out=out)
    assert rc == 2 and "Traceback" not in err
    assert "stores no config" in err
    assert (
        "checkpoint-0000002 does not fit this run (it holds full weights (a --no-lora run) and this run has --lora)"
        in err
    )


def test_config_file_values_that_are_valid(tmp_path):
    """YAML 1.1 reads 1e-5 as a string (no dot): still a number; ints widen to floats; true/false are booleans."""
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-5\nreward_weights: [1, 0.5]\nrewards: [reverse, length]\n"
                                     "lora: false\nepsilon_high: null\nmax_steps: 7\n")  # fmt: skip
    cfg = config.parse(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.learning_rate, cfg.reward_weights, cfg.lora, cfg.epsilon_high, cfg.max_steps) == (
        1e-5, [1.0, 0.5], False, None, 7)  # fmt: skip
    assert isinstance(cfg.reward_weights[0], float)


def test_resume_from_a_checkpoint_older_than_the_kl_bias_correction(tmp_path, capsys, monkeypatch, checkpointed):
    """A config stored before use_bias_correction_kl existed ran without it: with a KL term, resuming under today's
    default (TRL's, True) would change the gradient, and is refused; without a KL term it changes nothing."""
    prepare(tmp_path, monkeypatch)
    out = tmp_path / "copy"
    shutil.copytree(checkpointed, out)
    state_file = out / "checkpoints" / "checkpoint-0000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["use_bias_correction_kl"]
    state_file.write_text(json.dumps(state | {"config": state["config"] | {"beta": 0.04}}))
    rc, err = run_cli(tmp_path, capsys, ["--max-steps", "3", "--resume", "--beta", "0.04"], out=out)
    assert rc == 2 and "use_bias_correction_kl: False -> True" in err, err
    uncorrected = ["--max-steps", "3", "--resume", "--beta", "0.04", "--no-use-bias-correction-kl"]
    rc, err = run_cli(tmp_path, capsys, uncorrected, out=out)
    assert rc == 0 and "resumed from" in err, err
    state_file.write_text(json.dumps(state))  # beta 0, as the run was
    shutil.rmtree(out / "checkpoints" / "checkpoint-0000003")
    rc, err = run_cli(tmp_path, capsys, ["--max-steps", "3", "--resume"], out=out)
    assert rc == 0 and "resumed from" in err, err


def test_the_smollm2_preset_takes_the_model_it_is_given(tmp_path):
    """The preset names no model (the user's GGUF file or hub id): --model is used, the tiny base never applies."""
    gguf = str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = config.parse(["--preset", "smollm2-arithmetic", "--model", gguf, "--max-steps", "3"])
    assert cfg.model == gguf and cfg.max_steps == 3 and cfg.lora  # flags after the preset win
    preset = {k: v for k, v in config.PRESETS["smollm2-arithmetic"].items() if k != "max_steps"}
    assert all(getattr(cfg, k) == v for k, v in preset.items())
    assert heldout.source(cfg) == ("arithmetic", "test")  # its evaluations: the task's held-out split
