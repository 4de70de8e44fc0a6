"""Loss wiring: the trainer's loss and gradients on a fixed rollout (shared-prefix packed hidden states,
micro-batches of whole groups, fused linear loss) equal the float64 reference GRPO loss computed from
ordinary per-row forwards [prompt + completion] with materialized logits."""

import dataclasses

import pytest
import torch

from grpo_fast import config, reference, tiny, train
from grpo_fast.config import PRESETS, Config
from grpo_fast.rollout import Rollout

G = 3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spins when the CI cores are busy
    yield
    torch.set_num_threads(threads)


def fixed_rollout(vocab: int, gen: torch.Generator) -> Rollout:
    """3 prompts of different lengths, G completions each of lengths 0..5 (one empty, one full)."""
    prompts = [torch.randint(3, vocab, (n,), generator=gen) for n in (4, 2, 5)]
    lengths = torch.tensor([5, 3, 1, 0, 4, 5, 2, 5, 3])  # (B*G,)
    Tc = int(lengths.max())
    ids = torch.randint(3, vocab, (len(lengths), Tc), generator=gen)
    mask = (torch.arange(Tc) < lengths.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))  # pad id 0 after the end
    return Rollout(prompts, G, ids, mask, lengths, lengths < Tc, 0)


def per_row_logits(model, roll: Rollout) -> torch.Tensor:
    """(B*G, Tc, V): unshared forwards, the logit at position Lp-1+t scores completion token t."""
    out = []
    for i in range(roll.completion_ids.shape[0]):
        p = roll.prompts[i // G]
        seq = torch.cat([p, roll.completion_ids[i]]).unsqueeze(0)
        logits = model(input_ids=seq).logits[0]  # (Lp + Tc, V)
        out.append(logits[len(p) - 1 : len(p) - 1 + roll.completion_ids.shape[1]])
    return torch.stack(out)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# (loss_type, importance_sampling_level, beta, old log-probs, other options): every loss type, both levels, the KL
# with and without bias correction, and each option that needs the whole step's batch (entropy quantile and bonus,
# off-policy mask, vespo's and luspo's per-row terms) across micro-batches
CASES = [
    ("dapo", "token", 0.0, False, {}),
    ("grpo", "token", 0.04, True, {}),
    ("bnpo", "sequence", 0.0, True, {}),
    ("dr_grpo", "token", 0.1, True, dict(use_bias_correction_kl=False)),
    ("cispo", "token", 0.04, True, dict(epsilon_high=1.1)),
    ("sapo", "token", 0.04, True, dict(sapo_temperature_pos=0.9, sapo_temperature_neg=1.2)),
    ("luspo", "sequence", 0.0, True, {}),
    ("vespo", "token", 0.0, True, dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=2.5)),
    ("grpo", "token", 0.0, True, dict(top_entropy_quantile=0.5, entropy_coef=0.05)),
    ("dapo", "token", 0.04, True, dict(top_entropy_quantile=0.5, entropy_coef=-0.1, delta=1.2)),
    ("luspo", "token", 0.0, True, dict(entropy_coef=0.02, off_policy_mask_threshold=0.05)),
    ("dr_grpo", "sequence", 0.0, True, dict(top_entropy_quantile=0.5)),
    ("sapo", "token", 0.0, True, dict(top_entropy_quantile=0.55, entropy_coef=0.03)),
    ("cispo", "sequence", 0.04, True, dict(entropy_coef=0.01, epsilon_high=1.05)),
]


def case_id(case) -> str:
    loss_type, level, beta, old, extra = case
    return "-".join([loss_type, level, f"beta{beta}", "old" if old else "on", *sorted(extra)])


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trainer_loss_matches_reference(case, dtype):
    """accumulate over micro-batches of 2 + 1 groups equals the reference loss of the whole batch: every option of
    the config reaches the loss (config.loss_options names them all), reductions are the whole batch's."""
    loss_type, level, beta, old, extra = case
    gen = torch.Generator().manual_seed(0)
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, seed=1).to(dtype)
    cfg = dataclasses.replace(
        Config(**PRESETS["tiny"]),
        group_size=G,
        micro_batch_groups=2,  # 3 groups -> micro-batches of 2 + 1 groups
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        temperature=0.9,
        max_new_tokens=6,
        **(dict(epsilon=0.1, epsilon_high=0.15) | extra),
    )
    roll = fixed_rollout(len(tok), gen)
    adv = torch.randn(roll.completion_ids.shape[0], generator=gen, dtype=dtype)
    with torch.no_grad():  # old/ref log-probs near the current ones: some ratios clip low, some high
        logps = reference.selective_log_softmax(per_row_logits(model, roll).double() / 1.0, roll.completion_ids, 0.9)
    noise = lambda: 0.3 * torch.randn(logps.shape, generator=gen, dtype=torch.float64)  # noqa: E731
    old_logps, ref_logps = (logps + noise() if old else None), (logps + noise() if beta else None)

    mbs = train.micro_batches(roll, adv, cfg)
    row = 0
    for mb in mbs:  # the trainer's own split, with the fixed old/ref log-probs sliced to each micro-batch
        n, T = mb["ids"].shape
        mb["old"] = None if old_logps is None else old_logps[row : row + n, :T].to(dtype)
        mb["ref"] = None if ref_logps is None else ref_logps[row : row + n, :T].to(dtype)
        row += n
    model.zero_grad()
    loss, metrics = train.accumulate(model, mbs, cfg)
    got = grads(model)

    ref_model = tiny.build_model(tok, seed=1).double()
    logits = per_row_logits(ref_model, roll)
    want_loss, want_metrics = reference.grpo_loss(
        logits,
        roll.completion_ids,
        roll.completion_mask,
        advantages=adv.double(),
        old_logps=old_logps,
        ref_logps=ref_logps,
        temperature=0.9,
        **config.loss_options(cfg),
    )
    want_loss.backward()
    if loss_type == "cispo":  # some ratios capped, some not
        assert 0 < want_metrics["cispo_clip_ratio"] < 1
    elif old and level == "token" and loss_type != "vespo":  # the inputs hit both clip branches
        assert want_metrics["clip_ratio_low"] > 0 and want_metrics["clip_ratio_high"] > 0
    elif old:  # 9 per-row ratios: at least one row clips
        assert want_metrics["clip_ratio_region"] > 0
    if cfg.top_entropy_quantile < 1:  # the step's threshold keeps some tokens, not all, and sits between tokens:
        # a tiny random model's entropies lie within 1e-5 of each other, fp32 could not rank those the same way
        assert 0 < want_metrics["entropy_mask_ratio"] < 1
        entropy = reference.entropy_from_logits(logits.detach(), 0.9)[roll.completion_mask.bool()]
        assert (entropy - want_metrics["entropy_threshold"]).abs().min() > 1e-4
    want = grads(ref_model)
    # float64 agrees to ~1e-7, not 1e-15: RoPE tables are computed in fp32 inside transformers
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(loss.double(), want_loss.detach(), **tol)
    assert set(got) == set(want)
    for name in want:
        scale = want[name].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got[name].double() / scale, want[name] / scale, **tol, msg=name)
    assert set(metrics) == set(want_metrics)
    for key in want_metrics:
        torch.testing.assert_close(torch.tensor(metrics[key]).double(), want_metrics[key].double(), **tol, msg=key)
