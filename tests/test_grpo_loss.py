"""grpo_fast.grpo_loss forward and backward against the float64 torch reference (reference.grpo_loss).

Every test runs on both implementations behind the public op: the Triton kernels (interpreted on CPU)
and the chunked torch path (TRITON_INTERPRET=0, CPU only). fp32 is held to tight tolerances; bf16 to
"no worse than 2x torch's own bf16 error against float64, plus a tiny floor".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import variants

import grpo_fast
from grpo_fast import backend, reference

PATHS = ("triton", "torch")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")
METRICS = ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean")
# Rows of a group of 2 get A = +/-0.707 (+, -, -, +). The per-row log-ratio shift makes row 0 clip high,
# row 1 (A < 0) exceed delta = 1.5, row 2 clip low and row 3 stay inside the clip range, at the sequence
# level too (where the token noise averages out).
REWARDS = (1.0, 0.0, 0.2, 0.8)
SHIFTS = (0.45, 0.6, -0.5, 0.0)


def use_path(path: str, monkeypatch, device: torch.device) -> None:
    """Selects the implementation: backend.use_triton reads TRITON_INTERPRET at call time."""
    if path == "torch":
        if device.type == "cuda":
            pytest.skip("the chunked torch path runs on CPU only")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    else:
        if not backend.HAS_TRITON:
            pytest.skip("triton is not installed")
        if device.type == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.use_triton(torch.empty(0, device=device)) == (path == "triton")


@dataclass
class Case:
    logits: torch.Tensor  # (B, T, V) in the dtype under test
    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) float {0, 1}
    rewards: torch.Tensor  # (B,) fp32
    old: torch.Tensor  # (B, T) fp32: current log-probs + row shift + noise
    ref: torch.Tensor  # (B, T) fp32: current log-probs + noise
    group_size: int


def make_case(B=4, T=3, V=11, dtype=torch.float32, temperature=1.0, device="cpu", lengths=None, group_size=2):
    logits = (torch.randn(B, T, V, dtype=torch.float64) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T))
    lengths = lengths if lengths is not None else [(T, T - 1, max(T - 1, 1), T)[i % 4] for i in range(B)]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    rewards = torch.tensor([REWARDS[i % 4] for i in range(B)])
    logp = reference.selective_log_softmax(logits.double(), ids, temperature)  # (B, T)
    shift = torch.tensor([SHIFTS[i % 4] for i in range(B)], dtype=torch.float64)[:, None]
    old = (logp - shift + 0.15 * torch.randn(B, T, dtype=torch.float64)).float()
    ref = (logp + 0.2 * torch.randn(B, T, dtype=torch.float64)).float()
    to = lambda t: t.to(device)  # noqa: E731
    return Case(to(logits), to(ids), to(mask), to(rewards), to(old), to(ref), group_size)


def inputs(case: Case, dtype=None, **kw) -> dict:
    """Keyword arguments of grpo_loss for `case`; float tensors cast to `dtype` when given."""
    cast = (lambda t: t if t is None or dtype is None else t.to(dtype)) if dtype else (lambda t: t)
    base = dict(rewards=cast(case.rewards), group_size=case.group_size, old_logps=cast(case.old))
    base.update(ref_logps=cast(case.ref))
    base.update(kw)
    return base


def run(fn, logits: torch.Tensor, case: Case, grad: bool = True, **kw):
    x = logits.detach().clone().requires_grad_(grad)
    loss, metrics = fn(x, case.ids, case.mask, **kw)
    if grad:
        loss.backward()
    return loss.detach(), metrics, x.grad


def run_reference(case: Case, dtype=torch.float64, **kw):
    """reference.grpo_loss with the logits (and, for float64, the companions) in `dtype`."""
    kw = inputs(case, dtype if dtype == torch.float64 else None, **kw)
    return run(reference.grpo_loss, case.logits.to(dtype), case, **kw)


def assert_matches(got, want, case: Case, level: str, torch_own=None) -> None:
    """got, want, torch_own: (loss, metrics, grad). fp32: tight; bf16: the 2x-torch rule."""
    (loss, metrics, grad), (loss64, metrics64, grad64) = got, want
    if torch_own is None:
        torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)
    else:
        for mine, truth, own, floor in ((loss, loss64, torch_own[0], 1e-6), (grad, grad64, torch_own[2], 1e-7)):
            err = (mine.double() - truth).abs().max().item()
            err_torch = (own.double() - truth).abs().max().item()
            assert err <= 2 * err_torch + floor, f"error {err:.3g} > 2 x torch bf16 error {err_torch:.3g}"
    count = case.mask.shape[0] if level == "sequence" else case.mask.sum().item()
    for name in METRICS:  # the kernels work in fp32 on the given logits: one clip flag may flip in bf16
        atol = (1.01 / count if "clip" in name else 1e-4) if torch_own is not None else 1e-5
        torch.testing.assert_close(metrics[name].double(), metrics64[name], rtol=1e-4, atol=atol, msg=name)


def assert_all_clip_branches(metrics64) -> None:
    assert metrics64["clip_ratio_low"] > 0 and metrics64["clip_ratio_high"] > 0
    assert metrics64["clip_ratio_region"] < 1


VALUES = ((0.0, 0.04), (None, 0.28), (None, 1.5), (1.0, 0.7))  # beta, epsilon_high, delta, temperature
GRID = list(itertools.product(LOSS_TYPES, LEVELS, *VALUES))
# bf16: every loss type x level, with (beta, epsilon_high, delta, temperature) from a
# strength-2 covering array (every pair of their values occurs).
PAIRS = [(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 1, 0), (1, 0, 0, 1), (0, 0, 1, 1), (1, 1, 0, 0), (0, 1, 0, 1), (1, 0, 1, 0)]
SUBSET = [
    (lt, lvl, *(values[bit] for values, bit in zip(VALUES, PAIRS[i])))
    for i, (lt, lvl) in enumerate(itertools.product(LOSS_TYPES, LEVELS))
]
BF16_GRID = [(path, *combo) for path in PATHS for combo in SUBSET]


def _grid_case(dtype, level, beta, epsilon_high, delta, temperature, device):
    case = make_case(dtype=dtype, temperature=temperature, device=device)
    kw = dict(beta=beta, epsilon_high=epsilon_high, delta=delta, temperature=temperature)
    return case, kw


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type,level,beta,epsilon_high,delta,temperature", GRID)
def test_grid_fp32(path, loss_type, level, beta, epsilon_high, delta, temperature, monkeypatch, device):
    use_path(path, monkeypatch, device)
    case, kw = _grid_case(torch.float32, level, beta, epsilon_high, delta, temperature, device)
    kw.update(loss_type=loss_type, importance_sampling_level=level)
    want = run_reference(case, **kw)
    assert_all_clip_branches(want[1])
    assert_matches(run(grpo_fast.grpo_loss, case.logits, case, **inputs(case, **kw)), want, case, level)


@pytest.mark.parametrize("path,loss_type,level,beta,epsilon_high,delta,temperature", BF16_GRID)
def test_grid_bf16(path, loss_type, level, beta, epsilon_high, delta, temperature, monkeypatch, device):
    use_path(path, monkeypatch, device)
    case, kw = _grid_case(torch.bfloat16, level, beta, epsilon_high, delta, temperature, device)
    kw.update(loss_type=loss_type, importance_sampling_level=level)
    want = run_reference(case, **kw)
    assert_all_clip_branches(want[1])
    torch_own = run_reference(case, torch.bfloat16, **kw)
    got = run(grpo_fast.grpo_loss, case.logits, case, **inputs(case, **kw))
    assert_matches(got, want, case, level, torch_own)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "B,T,V,dtype",
    [
        (3, 7, 131, torch.float32),
        (2, 5, 97, torch.bfloat16),
        (2, 1, 65537, torch.float32),
        (1, 2, 70001, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("level", LEVELS)
def test_awkward_shapes(path, B, T, V, dtype, level, monkeypatch, device):
    """Odd and prime T and V (several vocabulary blocks), V above 65,536, padded rows."""
    use_path(path, monkeypatch, device)
    case = make_case(B, T, V, dtype, 0.7, device, group_size=B if B % 2 else 2)
    kw = dict(beta=0.04, temperature=0.7, loss_type="grpo", importance_sampling_level=level)
    want = run_reference(case, **kw)
    torch_own = run_reference(case, torch.bfloat16, **kw) if dtype == torch.bfloat16 else None
    assert_matches(run(grpo_fast.grpo_loss, case.logits, case, **inputs(case, **kw)), want, case, level, torch_own)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ("grpo", "dapo"))
def test_all_masked_rows(path, level, loss_type, monkeypatch, device):
    use_path(path, monkeypatch, device)
    case = make_case(B=4, T=3, device=device, lengths=[3, 0, 2, 0])
    kw = dict(beta=0.04, loss_type=loss_type, importance_sampling_level=level)
    loss, metrics, grad = got = run(grpo_fast.grpo_loss, case.logits, case, **inputs(case, **kw))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert grad[1].abs().max() == 0 and grad[3].abs().max() == 0
    assert_matches(got, run_reference(case, **kw), case, level)
    case.mask.zero_()  # nothing active at all
    loss, metrics, grad = run(grpo_fast.grpo_loss, case.logits, case, **inputs(case, **kw))
    assert loss == 0 and grad.abs().max() == 0 and all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", LEVELS)
def test_equal_rewards_give_zero_advantage(path, level, monkeypatch, device):
    use_path(path, monkeypatch, device)
    case = make_case(B=4, T=3, device=device)
    case.rewards = torch.tensor([1.0, 1.0, 0.2, 0.8], device=device)
    kw = dict(loss_type="bnpo", importance_sampling_level=level, scale_rewards="group")
    got = run(grpo_fast.grpo_loss, case.logits, case, **inputs(case, **kw))
    assert got[2][:2].abs().max() == 0  # A = 0 and beta = 0: no gradient in that group
    assert got[2][2:].abs().max() > 0
    assert_matches(got, run_reference(case, **kw), case, level)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("scale_rewards", ("group", "batch", "none"))
def test_rewards_path_equals_advantages_path(path, level, scale_rewards, monkeypatch, device):
    use_path(path, monkeypatch, device)
    case = make_case(B=6, T=2, device=device, group_size=3)
    case.rewards = torch.tensor([0.1, 0.7, 0.4, 1.0, 0.0, 0.5], device=device)
    kw = dict(beta=0.04, loss_type="dr_grpo", importance_sampling_level=level, scale_rewards=scale_rewards)
    by_rewards = run(grpo_fast.grpo_loss, case.logits, case, **inputs(case, **kw))
    adv = grpo_fast.group_advantages(case.rewards, 3, scale_rewards)
    by_adv = run(grpo_fast.grpo_loss, case.logits, case, **inputs(case, **kw, rewards=None, advantages=adv))
    for a, b in zip(by_rewards[::2], by_adv[::2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert_matches(by_rewards, run_reference(case, **kw), case, level)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", LEVELS)
def test_inplace_backward(path, level, monkeypatch, device):
    """Same gradient; the logits buffer (a non-leaf, as a model's output) itself now holds it."""
    use_path(path, monkeypatch, device)
    case = make_case(B=4, T=3, dtype=torch.bfloat16, device=device)
    kw = inputs(case, beta=0.04, importance_sampling_level=level)
    _, _, grad = run(grpo_fast.grpo_loss, case.logits, case, **kw)
    x = case.logits.clone().requires_grad_()
    y = x * 1
    loss, _ = grpo_fast.grpo_loss(y, case.ids, case.mask, inplace_backward=True, **kw)
    loss.backward()
    torch.testing.assert_close(x.grad, grad, rtol=0, atol=0)
    torch.testing.assert_close(y.detach(), grad, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("level", LEVELS)
def test_forward_only_and_grad_scale(path, level, monkeypatch, device):
    """No grad: the same loss and metrics, logits untouched even with inplace_backward. 3 * loss: 3 * grad."""
    use_path(path, monkeypatch, device)
    case = make_case(B=4, T=3, device=device)
    kw = inputs(case, beta=0.04, importance_sampling_level=level, loss_type="grpo")
    loss, metrics, grad = run(grpo_fast.grpo_loss, case.logits, case, **kw)
    x = case.logits.clone()
    with torch.no_grad():
        loss_ng, metrics_ng = grpo_fast.grpo_loss(x.requires_grad_(), case.ids, case.mask, inplace_backward=True, **kw)
    assert loss_ng.grad_fn is None and torch.equal(x, case.logits)
    torch.testing.assert_close(loss_ng, loss, rtol=1e-6, atol=0)
    for name in METRICS:
        torch.testing.assert_close(metrics_ng[name], metrics[name], rtol=1e-6, atol=0)
    x = case.logits.clone().requires_grad_()
    (3 * grpo_fast.grpo_loss(x, case.ids, case.mask, **kw)[0]).backward()
    torch.testing.assert_close(x.grad, 3 * grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_type="dapo", num_items_in_batch=7.0),
        dict(loss_type="dapo", num_items_in_batch=torch.tensor(5.0)),
        dict(loss_type="dr_grpo", max_completion_length=10),
        dict(old_logps=None, ref_logps=None),  # ratio 1, no KL
        dict(old_logps=None, beta=0.04, importance_sampling_level="sequence"),
        dict(ref_logps=None, delta=1.2, epsilon=0.1, epsilon_high=0.3),  # delta below 1 + epsilon_high
    ],
    ids=["dapo-num-items", "dapo-num-items-tensor", "dr_grpo-max-len", "no-old-no-ref", "seq-no-old", "no-ref"],
)
def test_options(path, kw, monkeypatch, device):
    use_path(path, monkeypatch, device)
    case = make_case(B=4, T=3, device=device)
    level = kw.get("importance_sampling_level", "token")
    assert_matches(
        run(grpo_fast.grpo_loss, case.logits, case, **inputs(case, **kw)), run_reference(case, **kw), case, level
    )


def _variant(case: Case, name: str) -> dict:
    """grpo_loss keywords of a TRL option variant (tests/variants.py) on `case`."""
    return dict(variants.options(name), **variants.tensors(name, case.old, case.mask))


def _assert_variant(got, want, case: Case, name: str, torch_own=None) -> None:
    level = variants.options(name).get("importance_sampling_level", "token")
    assert_matches(got, want, case, level, torch_own)
    assert set(got[1]) == set(want[1]), (sorted(got[1]), sorted(want[1]))
    extra = [k for k in want[1] if k not in METRICS]
    for k in extra:  # policy_loss, cispo_clip_ratio, vespo_phi_seq_mean, entropy_threshold / _mask_ratio
        count = case.mask.shape[0] if level == "sequence" or k == "vespo_phi_seq_mean" else case.mask.sum().item()
        atol = (1.01 / count if "ratio" in k else 2e-3) if torch_own is not None else 1e-5
        torch.testing.assert_close(got[1][k].double(), want[1][k].double(), rtol=1e-4, atol=atol, msg=k)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_variants_fp32(path, name, monkeypatch, device):
    """Every TRL option beyond the base four, forward and backward; on the Triton path the per-token ones
    must take the one-pass kernel and the others the two-pass route."""
    use_path(path, monkeypatch, device)
    case = make_case(B=4, T=5, device=device)
    kw = _variant(case, name)
    want = run_reference(case, **kw)
    x = case.logits.detach().clone().requires_grad_()
    loss, metrics = grpo_fast.grpo_loss(x, case.ids, case.mask, **inputs(case, **kw))
    if path == "triton":  # one launch, or the selective log-softmax's forward and backward around torch terms
        route = "_GRPOTokenLossBackward" if variants.one_pass(name) else "SelectiveLogSoftmaxBackward"
        assert route in _graph(loss.grad_fn), _graph(loss.grad_fn)
    loss.backward()
    _assert_variant((loss.detach(), metrics, x.grad), want, case, name)


def _graph(fn) -> set[str]:
    """Names of the autograd nodes behind `fn`."""
    seen, todo = set(), [fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [nxt for nxt, _ in node.next_functions]
    return {type(node).__name__ for node in seen}


BF16_VARIANTS = [n for n in variants.VARIANTS if "quantile" not in n]  # an entropy rank is not bf16-stable


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", BF16_VARIANTS)
def test_variants_bf16(path, name, monkeypatch, device):
    use_path(path, monkeypatch, device)
    case = make_case(B=4, T=5, dtype=torch.bfloat16, device=device)
    kw = _variant(case, name)
    want = run_reference(case, **kw)
    torch_own = run_reference(case, torch.bfloat16, **kw)
    got = run(grpo_fast.grpo_loss, case.logits, case, **inputs(case, **kw))
    _assert_variant(got, want, case, name, torch_own)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["entropy-bonus", "two-pass-all", "one-pass-all"])
def test_variants_inplace_and_all_masked(path, name, monkeypatch, device):
    """inplace_backward (on a non-leaf buffer, as a model's output) gives the same gradient; an all-masked row
    gets none, and finite metrics."""
    use_path(path, monkeypatch, device)
    case = make_case(B=4, T=5, device=device, lengths=[5, 0, 3, 4])
    kw = inputs(case, **_variant(case, name))
    loss, metrics, grad = run(grpo_fast.grpo_loss, case.logits, case, **kw)
    assert grad[1].abs().max() == 0 and torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    x = case.logits.clone().requires_grad_()
    grpo_fast.grpo_loss(x * 1, case.ids, case.mask, inplace_backward=True, **kw)[0].backward()
    torch.testing.assert_close(x.grad, grad, rtol=0, atol=0)
