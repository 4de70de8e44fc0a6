"""FastGRPOTrainer against TRL's own GRPOTrainer: same batch, same loss, gradients and metrics.

A tiny Qwen2 (GQA, 2 layers) is saved with save_pretrained and loaded by path by both trainers; the
batch comes from TRL's own generation and scoring, then gets off-policy old and reference log-probs
(current + noise) so that ratios clip low, high and not at all, and the sampler's log-probs and vLLM
importance ratios as TRL's vLLM path hands them to `_compute_loss` (no vLLM needed). Every TRL 1.16 loss
option is compared alone and in the combinations published recipes use. A tiny Gemma 2 (logit and attention
softcapping) and a tiny Granite (logits_scaling) check the heads whose logits are not hidden @ W^T.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
import trl
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, Gemma2Config, GraniteConfig, PreTrainedTokenizerFast, Qwen2Config

import grpo_fast
from grpo_fast.integrations import trl as fast_trl
from grpo_fast.integrations.trl import FastGRPOTrainer
from grpo_fast.reference import CLIP_LOSS_TYPES, IS_MODES, LOSS_TYPES

VOCAB = 71  # prime: not a multiple of any tile size
METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
METRICS += ("clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean")
METRICS += ("policy_loss", "entropy_coef")
# options TRL reads from the trainer itself; the others from trainer.args
TRAINER_ATTRS = ("loss_type", "beta", "epsilon_low", "epsilon_high", "importance_sampling_level")
TRAINER_ATTRS += ("off_policy_mask_threshold", "top_entropy_quantile", "entropy_coef", "_entropy_bonus_enabled")
TRAINER_ATTRS += ("use_adaptive_entropy", "_last_world_entropy", "_entropy_window_stats", "use_vllm")
TRAINER_ATTRS += ("vllm_importance_sampling_correction",)
ARGS_ATTRS = ("delta", "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos")
ARGS_ATTRS += ("vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_target", "entropy_coef_delta")


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


SMALL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
)  # fmt: skip
TRANSFORMED_HEADS = {  # logits = f(hidden @ W^T): transforms that matter for a tiny random model
    "gemma2": lambda: Gemma2Config(
        **SMALL,
        head_dim=8,
        query_pre_attn_scalar=8,
        final_logit_softcapping=2.0,
        attn_logit_softcapping=1.0,
        initializer_range=0.2,
        layer_types=["full_attention"] * 2,
        bos_token_id=None,
    ),  # fmt: skip
    "granite": lambda: GraniteConfig(**SMALL, logits_scaling=0.125),  # logits * 8
}


def _save_tiny(path, config) -> str:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("qwen2"), Qwen2Config(**SMALL))


def _reward(completions, **kwargs) -> list[float]:
    return [float(len(c) % 7) for c in completions]


def _trainer(cls, model_path: str, out, peft_config=None, **config):
    args = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=7, beta=0.04)
    args |= dict(use_bias_correction_kl=False)  # TRL's default is True: its tests set it explicitly
    args |= dict(gradient_accumulation_steps=2, bf16=False, report_to="none", save_strategy="no", logging_steps=1)
    args |= config
    prompts = Dataset.from_dict({"prompt": [f"w{i} w{i + 3} w{i + 7}" for i in range(2, 10)]})
    torch.manual_seed(0)
    return cls(
        model=model_path,
        reward_funcs=_reward,
        args=trl.GRPOConfig(output_dir=str(out), **args),
        train_dataset=prompts,
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_path),
        peft_config=peft_config,
    )


@pytest.fixture(scope="module")
def trainers(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    ref, fast = _trainer(trl.GRPOTrainer, model_path, out), _trainer(FastGRPOTrainer, model_path, out)
    for t in (ref, fast):
        t.model.train()
        t.current_gradient_accumulation_steps = 2
    return ref, fast


@pytest.fixture(scope="module")
def batch(trainers):
    return _off_policy_batch(trainers[0])


def _off_policy_batch(ref) -> dict:
    """TRL's own generated and scored batch, with off-policy old and reference log-probs."""
    rows = [{"prompt": f"w{i} w{i + 5}"} for i in (2, 2, 3, 3, 4, 4)]
    torch.manual_seed(1)
    batch = ref._generate_and_score_completions(rows)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = ref._get_per_token_logps_and_entropies(ref.model, ids, att, batch["completion_ids"].shape[1])
    B, T = logps.shape
    assert T == 7 and B == 6
    # rows 0/1 clip high/low at the sequence level too; row 2 stays inside the clip range
    row_shift = torch.tensor([-0.4, 0.4, 0.05, -0.3, 0.3, -0.3]).unsqueeze(1)  # (B, 1)
    batch["old_per_token_logps"] = logps + row_shift + 0.25 * torch.randn(B, T)
    batch["ref_per_token_logps"] = logps + 0.1 * torch.randn(B, T)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.7, -0.7, 0.0, 0.0])
    lengths = torch.tensor([7, 3, 7, 5, 0, 1]).unsqueeze(1)  # as if EOS ended them; row 4 is empty
    batch["completion_mask"] = (torch.arange(T) < lengths).long()  # (B, T)
    batch["completion_ids"] = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, 0)
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    # the sampler's own log-probs (vLLM's): old + noise, one token it could not score
    batch["sampling_per_token_logps"] = batch["old_per_token_logps"] + 0.1 * torch.randn(B, T)
    batch["sampling_per_token_logps"][0, 2] = math.nan
    return batch


def _vllm_batch(batch, mode: str) -> dict:
    """The batch as TRL's vLLM path hands it over: with the importance ratios of `mode`, whose bounds bind
    on this batch (token ratios lie in ~[0.9, 1.2], row ratios in ~[1.0, 1.65])."""
    clip = (0.95, 1.1) if mode.startswith("token") else (1.005, 1.4)
    args = (batch["old_per_token_logps"], batch["sampling_per_token_logps"], batch["completion_mask"], mode)
    ratio, _ = grpo_fast.importance_sampling_ratio(*args, *clip)
    active = ratio[batch["completion_mask"].bool()] if mode.startswith("token") else ratio
    bound = (active == 0) if mode.endswith("mask") else (active == clip[0]) | (active == clip[1])
    assert 0 < bound.sum() < bound.numel()
    return dict(batch, importance_sampling_ratio=ratio)


@pytest.fixture
def configure(trainers):
    """Sets TRL options on both trainers (on the trainer or its args, where TRL reads them); restored after."""
    saved = [
        (t, {n: getattr(t, n) for n in TRAINER_ATTRS}, {n: getattr(t.args, n) for n in ARGS_ATTRS}) for t in trainers
    ]

    def apply(**options):
        for t in trainers:
            for name, value in options.items():
                setattr(t if name in TRAINER_ATTRS else t.args, name, value)
                if name == "epsilon":
                    t.epsilon_low = value
                if name == "entropy_coef":
                    t._entropy_bonus_enabled = value != 0.0 or t.use_adaptive_entropy

    yield apply
    for t, attrs, args in saved:
        for name, value in attrs.items():
            setattr(t, name, value)
        for name, value in args.items():
            setattr(t.args, name, value)


def _step(trainer, batch, **options):
    for name, value in options.items():
        setattr(trainer, name, value)
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    logged = trainer._metrics["train"]
    assert set(logged) <= set(METRICS), set(logged) - set(METRICS)
    return loss.detach(), grads, {k: v[-1] for k, v in logged.items()}


def _assert_close_metrics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert (math.isnan(got[k]) and math.isnan(want[k])) or got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


def _assert_same_step(ref, fast, batch, **options) -> dict:
    loss_r, grads_r, metrics_r = _step(ref, batch, **options)
    loss_f, grads_f, metrics_f = _step(fast, batch, **options)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-7)
    assert grads_f.keys() == grads_r.keys() and len(grads_r) > 10
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)
    _assert_close_metrics(metrics_f, metrics_r)
    return metrics_r


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_grads_match_trl(trainers, batch, configure, loss_type, level):
    configure(epsilon_high=1.3 if loss_type == "cispo" else 0.28)  # cispo: the cap; binds on this batch
    metrics = _assert_same_step(*trainers, batch, loss_type=loss_type, importance_sampling_level=level, beta=0.04)
    if loss_type in CLIP_LOSS_TYPES:  # every branch is hit
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
        assert metrics["clip_ratio/region_mean"] < 1
    if loss_type == "cispo":
        assert 0 < metrics["cispo_clip_ratio"] < 1
    if loss_type == "vespo":
        assert metrics["vespo/phi_seq_mean"] > 0


@pytest.mark.parametrize("arch", TRANSFORMED_HEADS)
def test_transformed_heads_match_trl(arch, tmp_path):
    """Gemma 2's soft-capped and Granite's scaled logits: accepted, and the same step as TRL's GRPOTrainer."""
    path = _save_tiny(tmp_path / arch, TRANSFORMED_HEADS[arch]())
    ref, fast = _trainer(trl.GRPOTrainer, path, tmp_path), _trainer(FastGRPOTrainer, path, tmp_path)
    for t in (ref, fast):
        t.model.train()
        t.current_gradient_accumulation_steps = 2
    batch = _off_policy_batch(ref)
    metrics = _assert_same_step(ref, fast, batch, loss_type="dapo", importance_sampling_level="token", beta=0.04)
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0


def test_on_policy_no_kl_delta_matches_trl(trainers, batch):
    on_policy = {k: v for k, v in batch.items() if k not in ("old_per_token_logps", "ref_per_token_logps")}
    metrics = _assert_same_step(*trainers, on_policy, loss_type="dapo", importance_sampling_level="token", beta=0.0)
    assert metrics["clip_ratio/region_mean"] == 0 and "kl" not in metrics
    ref, fast = trainers
    ref.args.delta = fast.args.delta = 1.1
    try:
        _assert_same_step(ref, fast, batch, loss_type="grpo", beta=0.04, epsilon_high=0.28)
    finally:
        ref.args.delta = fast.args.delta = None
        ref.epsilon_high = fast.epsilon_high = ref.epsilon_low


def test_lora_matches_trl_and_trains(model_path, batch, tmp_path):
    """PEFT-wrapped policy (reference = adapters disabled); then one real TRL training step with it."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    config = dict(peft_config=lora, max_steps=1, gradient_accumulation_steps=1, learning_rate=1e-2)
    ref, fast = (_trainer(cls, model_path, tmp_path, **config) for cls in (trl.GRPOTrainer, FastGRPOTrainer))
    for t in (ref, fast):
        t.model.train()
        t.current_gradient_accumulation_steps = 1
    _assert_same_step(ref, fast, batch, loss_type="dapo", importance_sampling_level="token")
    before = {n: p.detach().clone() for n, p in fast.model.named_parameters() if p.requires_grad}
    fast.train()
    logged = fast.state.log_history[0]
    assert {"loss", "entropy", "kl", "clip_ratio/low_min", "clip_ratio/high_max"} <= logged.keys()
    assert all(math.isfinite(logged[k]) for k in ("loss", "entropy", "kl"))
    changed = [n for n, p in fast.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


OPTIONS = {  # each TRL option alone, on top of dapo at the token level
    "bias-corrected-kl": dict(beta=0.04, use_bias_correction_kl=True),
    "bias-corrected-kl-sequence": dict(beta=0.04, use_bias_correction_kl=True, importance_sampling_level="sequence"),
    "top-entropy-quantile": dict(top_entropy_quantile=0.3),
    "off-policy-mask": dict(off_policy_mask_threshold=0.05),
    "entropy-bonus": dict(entropy_coef=0.05),
    "sapo-temperatures": dict(loss_type="sapo", sapo_temperature_pos=1.5, sapo_temperature_neg=3.0),
    "vespo-k-lambda": dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=2.0, vespo_k_neg=2.0),
}
RECIPES = {
    "dapo": dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28),  # DAPO (arXiv 2503.14476): clip-higher
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),  # GSPO
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),  # MiniMax-M1 / ScaleRL: epsilon_max = 5
    "dr_grpo": dict(loss_type="dr_grpo", beta=0.0),  # Dr. GRPO (with scale_rewards="none" upstream)
    "sapo": dict(loss_type="sapo", beta=0.04),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "80-20": dict(loss_type="dapo", epsilon_high=0.28, top_entropy_quantile=0.2),  # Beyond the 80/20 rule
    "deepseek-v3.2": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, off_policy_mask_threshold=0.05),
    "everything": dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=True, off_policy_mask_threshold=0.05)
    | dict(top_entropy_quantile=0.4, entropy_coef=0.01, delta=1.5, epsilon_high=0.28),
}


@pytest.mark.parametrize("name", list(OPTIONS) + [f"recipe-{r}" for r in RECIPES])
def test_options_and_recipes_match_trl(trainers, batch, configure, name):
    configure(**(OPTIONS[name] if name in OPTIONS else RECIPES[name.removeprefix("recipe-")]))
    _assert_same_step(*trainers, batch)


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "vespo"])
def test_vllm_importance_sampling_matches_trl(trainers, batch, configure, loss_type, mode):
    """TRL's vLLM correction as _compute_loss consumes it: importance_sampling_ratio (and, for the off-policy
    mask, sampling_per_token_logps) in the inputs, use_vllm and vllm_importance_sampling_correction set."""
    if loss_type == "vespo" and mode.startswith("sequence"):
        pytest.skip("TRL refuses vespo with the sequence-level IS modes")
    configure(use_vllm=True, vllm_importance_sampling_correction=True, loss_type=loss_type, epsilon_high=1.3)
    configure(off_policy_mask_threshold=0.05 if loss_type == "grpo" else None)
    _assert_same_step(*trainers, _vllm_batch(batch, mode))


@pytest.mark.parametrize("quantile", [1.0, 0.5])
def test_adaptive_entropy_control_matches_trl(trainers, batch, configure, quantile):
    """Two steps: the first applies no bonus (no entropy measured yet), then both controllers move
    entropy_coef the same way and the second applies it."""
    configure(use_adaptive_entropy=True, entropy_coef=0.02, entropy_target=10.0, entropy_coef_delta=0.01)
    configure(top_entropy_quantile=quantile, _last_world_entropy=math.inf, _entropy_window_stats=None)
    ref, fast = trainers
    for _ in range(2):
        _assert_same_step(ref, fast, batch)
        assert fast.entropy_coef == ref.entropy_coef and fast._last_world_entropy == pytest.approx(
            ref._last_world_entropy, rel=1e-6
        )
    assert fast.entropy_coef == pytest.approx(0.04) and fast._last_world_entropy < 10.0


def test_eval_mode_matches_trl(trainers, batch, configure):
    """Evaluation: no accumulation scaling, dapo's normalizer is the batch's own tokens."""
    configure(loss_type="cispo", epsilon_high=1.3, entropy_coef=0.05)
    for t in trainers:
        t.model.eval()
    try:
        loss_r, metrics_r = _eval_step(trainers[0], batch)
        loss_f, metrics_f = _eval_step(trainers[1], batch)
    finally:
        for t in trainers:
            t.model.train()
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-7)
    _assert_close_metrics(metrics_f, metrics_r)


def _eval_step(trainer, batch):
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def test_unsupported_options_raise(trainers, batch):
    """What the fused loss does not compute is refused by name: MoE router aux loss, images."""
    _, fast = trainers
    fast.aux_loss_enabled = True
    try:
        with pytest.raises(ValueError, match="router_aux_loss_coef"):
            fast.compute_loss(fast.model, batch)
    finally:
        fast.aux_loss_enabled = False
    with pytest.raises(ValueError, match="images"):
        fast.compute_loss(fast.model, dict(batch, pixel_values=torch.zeros(1, 3, 4, 4)))


def test_version_check_and_import_without_trl():
    with pytest.raises(ImportError, match=re.escape(f"supports {fast_trl.SUPPORTED_TRL}, but trl 0.24.0 is installed")):
        fast_trl.check_trl_version("0.24.0")
    fast_trl.check_trl_version(trl.__version__)
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "from grpo_fast.integrations.trl import FastGRPOTrainer\n"
        "try:\n    FastGRPOTrainer()\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"ImportError: FastGRPOTrainer needs {fast_trl.SUPPORTED_TRL}" in out.stdout
