"""Issue 13: the public ops give the same answer on every path: the interpreted Triton kernels (CUDA where there
is one), the chunked CPU path and grpo_fast.reference, for valid, edge and NaN/inf input.

- Masked positions never influence the loss, its gradient or the metrics: garbage there (NaN, inf, 1e30, as in a
  real model's padding rows) gives exactly the result of clean values, with zero gradient there (D7).
- NaN or +inf at an active position makes the loss NaN on every path (the kernel used to drop the NaN in its
  min/max and return a finite loss with NaN gradients: D7).
- Bad input raises the same named error on both paths (D25-D27).
"""

from __future__ import annotations

import pytest
import torch

import grpo_fast
from grpo_fast import backend, reference, tiny

PATHS = ("kernel", "chunked")
METRICS = ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean")
NAN, INF = float("nan"), float("inf")


@pytest.fixture
def on(monkeypatch, device):
    """on(path) selects the implementation behind the public ops and returns the device its inputs live on."""
    if not backend.HAS_TRITON:
        pytest.skip("triton is not installed")

    def select(path: str) -> torch.device:
        interpret = path == "kernel" and device.type == "cpu"
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
        dev = device if path == "kernel" else torch.device("cpu")
        assert backend.use_triton(torch.empty(0, device=dev)) == (path == "kernel")
        return dev

    return select


def both(on, fn, *args, **kw) -> dict:
    """fn(*args, **kw) on each path, tensors moved to the path's device and results back to the CPU."""
    out = {}
    for path in PATHS:
        dev = on(path)
        move = lambda x, dev=dev: x.to(dev) if isinstance(x, torch.Tensor) else x  # noqa: E731
        result = fn(*map(move, args), **{k: move(v) for k, v in kw.items()})
        out[path] = tuple(r.detach().cpu() if isinstance(r, torch.Tensor) else r for r in result)
    return out


def assert_same(a: tuple, b: tuple, rtol=2e-5, atol=1e-6) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol, equal_nan=True)


# ------------------------------------------------------------------------------------------ grpo_loss


B, T, V, H = 4, 5, 11, 8


def loss_case(seed: int = 0) -> dict:
    """Logits, ids, a mask with padded rows, and old/ref log-probs near the current ones (every clip branch)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:], mask[2, 1:] = 0, 0
    logp = reference.selective_log_softmax(logits.double(), ids).float()
    old = logp + 0.4 * torch.randn(B, T, generator=g)
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    return dict(logits=logits, ids=ids, mask=mask, rewards=torch.tensor([1.0, 0.0, 0.5, 0.2]), old=old, ref=ref)


def loss_and_grad(logits, ids, mask, rewards, old, ref, **kw):
    """(loss, dlogits, *metrics) of grpo_loss; the logits enter as a model output would (a non-leaf)."""
    leaf = logits.detach().clone().requires_grad_()
    loss, metrics = grpo_fast.grpo_loss(
        leaf * 1, ids, mask, rewards=rewards, group_size=2, old_logps=old, ref_logps=ref, **kw
    )
    loss.backward()
    return (loss, leaf.grad, *(metrics[k] for k in sorted(metrics)))


def reference_loss_and_grad(logits, ids, mask, rewards, old, ref, **kw):
    leaf = logits.detach().double().requires_grad_()
    adv = reference.group_advantages(rewards.double(), 2)
    loss, metrics = reference.grpo_loss(leaf, ids, mask, advantages=adv, old_logps=old, ref_logps=ref, **kw)
    loss.backward()
    return (loss, leaf.grad, *(metrics[k] for k in sorted(metrics)))


OPTIONS = [
    dict(),
    dict(beta=0.04, loss_type="grpo", importance_sampling_level="sequence"),
    dict(beta=0.1, loss_type="bnpo", delta=1.3, inplace_backward=True),
]
OPTION_IDS = ["dapo", "grpo-sequence-kl", "bnpo-delta-inplace"]


def reference_options(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != "inplace_backward"}


@pytest.mark.parametrize("kw", OPTIONS, ids=OPTION_IDS)
def test_grpo_loss_paths_and_reference_agree_on_valid_input(on, kw):
    case = loss_case()
    got = both(on, loss_and_grad, **case, **kw)
    want = reference_loss_and_grad(**case, **reference_options(kw))
    assert_same(got["kernel"], got["chunked"])
    assert_same(got["kernel"], want)
    assert torch.isfinite(got["kernel"][0]) and torch.isfinite(got["kernel"][1]).all()


GARBAGE = [(w, v, kw) for w, v in (("logits", NAN), ("logits", INF), ("logits", -INF), ("logits", 1e30))
           for kw in OPTIONS]  # fmt: skip
GARBAGE += [(w, v, OPTIONS[2]) for w, v in (("old", NAN), ("old", INF), ("ref", NAN), ("ref", -INF))]  # KL and delta
GARBAGE_IDS = [f"{w}-{v}-{OPTION_IDS[OPTIONS.index(kw)]}" for w, v, kw in GARBAGE]


@pytest.mark.parametrize("where, value, kw", GARBAGE, ids=GARBAGE_IDS)
def test_masked_positions_never_matter(on, kw, where, value):
    """Garbage at masked positions: the clean result on every path (loss, gradient, metrics), zero gradient there."""
    case = loss_case()
    dirty = dict(case)
    masked = case["mask"] == 0  # (B, T)
    if where == "logits":
        dirty["logits"] = torch.where(masked.unsqueeze(-1), value, case["logits"])
    else:
        dirty[where] = torch.where(masked, value, case[where])
    clean, got = both(on, loss_and_grad, **case, **kw), both(on, loss_and_grad, **dirty, **kw)
    for path in PATHS:
        assert_same(got[path], clean[path], rtol=0, atol=0)
        assert bool((got[path][1][masked] == 0).all())
    assert_same(
        reference_loss_and_grad(**dirty, **reference_options(kw)),
        reference_loss_and_grad(**case, **reference_options(kw)),
    )


ACTIVE = [
    ("logit-nan-off-target", "logits", NAN), ("logit-nan-at-target", "target", NAN),
    ("logit-plus-inf", "logits", INF), ("logit-plus-inf-at-target", "target", INF),
    ("old-nan", "old", NAN), ("ref-nan", "ref", NAN),
]  # fmt: skip


@pytest.mark.parametrize("kw", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("name, where, value", ACTIVE, ids=[c[0] for c in ACTIVE])
def test_active_nan_or_inf_makes_the_loss_nan_everywhere(on, kw, name, where, value):
    case = loss_case()
    b, t = 0, 2  # an active token
    if where in ("logits", "target"):
        v = int(case["ids"][b, t]) if where == "target" else (int(case["ids"][b, t]) + 1) % V
        case["logits"][b, t, v] = value
    else:
        case[where][b, t] = value
    got = both(on, loss_and_grad, **case, **kw)
    want = reference_loss_and_grad(**case, **reference_options(kw))
    in_loss = where != "ref" or kw.get("beta", 0) != 0  # at beta = 0 ref_logps feed only the kl metric
    for result in (got["kernel"], got["chunked"], want):
        assert bool(torch.isnan(result[0])) == in_loss, name  # the trainer then reports the step and skips it
        assert torch.isnan(result[2 + sorted(METRICS).index("kl")]) or where != "ref"
    assert_same(got["kernel"], got["chunked"])  # gradients and metrics too, NaN for NaN
    torch.testing.assert_close(got["kernel"][1].double(), want[1], rtol=2e-5, atol=1e-6, equal_nan=True)


def test_minus_inf_logits_are_valid_and_agree(on):
    """-inf off the target (a masked-out vocabulary entry) is a valid logit: finite loss, entropy and gradient."""
    case = loss_case()
    case["logits"][0, :, (case["ids"][0] + 1) % V] = -INF
    got = both(on, loss_and_grad, **case)
    assert_same(got["kernel"], got["chunked"])
    assert_same(got["kernel"], reference_loss_and_grad(**case))
    assert all(torch.isfinite(x).all() for x in got["kernel"])


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["mask"].zero_(),  # every row masked
        lambda c: c["rewards"].fill_(0.5),  # equal rewards: A = 0
        lambda c: c.update(logits=c["logits"][:, :0], ids=c["ids"][:, :0], mask=c["mask"][:, :0],
                           old=c["old"][:, :0], ref=c["ref"][:, :0]),  # empty completions (T = 0)
    ],
    ids=["all-masked", "equal-rewards", "empty"],
)  # fmt: skip
def test_edge_cases_are_finite_and_agree(on, edit):
    case = loss_case()
    edit(case)
    got = both(on, loss_and_grad, **case, beta=0.04)
    assert_same(got["kernel"], got["chunked"])
    assert_same(got["kernel"], reference_loss_and_grad(**case, beta=0.04))
    assert all(torch.isfinite(x).all() for x in got["kernel"])


# -------------------------------------------------------------- inplace_backward (D24): agree, and are loud


def inplace_grad(logits, ids, mask, rewards, old, ref, order: str, level: str, inplace: bool):
    x = logits.detach().clone().requires_grad_()
    y = x * 1.0
    before = (y**2).sum()
    loss, _ = grpo_fast.grpo_loss(
        y[:, 1:], ids[:, 1:], mask[:, 1:], rewards=rewards, group_size=2, inplace_backward=inplace,
        importance_sampling_level=level,
    )  # fmt: skip  # a slice: a view of the model's output, as TRL passes it
    extra = {"before": before, "after": (y**2).sum(), "other-region": (y[:, 0] ** 2).sum(), "none": 0}[order]
    (loss + extra).backward()
    return (x.grad,)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_inplace_backward_second_consumer_raises_on_every_path(on, level, order):
    """D24: another use of the logits, saved before the call or made after it, raises instead of reading dlogits."""
    case = loss_case()
    args = [case[k] for k in ("logits", "ids", "mask", "rewards", "old", "ref")]
    for path in PATHS:
        dev = on(path)
        with pytest.raises(RuntimeError, match="modified by an inplace operation|inplace_backward=True"):
            inplace_grad(*[a.to(dev) for a in args], order=order, level=level, inplace=True)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("order", ["none", "other-region"])
def test_inplace_backward_same_gradient_when_used_alone(on, level, order):
    case = loss_case()
    args = [case[k] for k in ("logits", "ids", "mask", "rewards", "old", "ref")]
    want = both(on, inplace_grad, *args, order=order, level=level, inplace=False)
    got = both(on, inplace_grad, *args, order=order, level=level, inplace=True)
    for path in PATHS:
        assert_same(got[path], want[path], rtol=0, atol=0)
    assert_same(got["kernel"], got["chunked"])


def test_inplace_backward_refuses_a_leaf(on):
    """A leaf's .grad would alias its own data: refused up front, on both paths, before anything is written."""
    case = loss_case()
    for path in PATHS:
        x = case["logits"].clone().to(on(path)).requires_grad_()
        kept = x.detach().clone()
        with pytest.raises(ValueError, match="inplace_backward=True .* leaf"):
            grpo_fast.grpo_loss(x, case["ids"].to(x.device), case["mask"].to(x.device), rewards=case["rewards"].to(
                x.device), group_size=2, inplace_backward=True)  # fmt: skip
        assert torch.equal(x.detach(), kept)


# --------------------------------------------------------------------------- the fused linear ops


def linear_case(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    case = loss_case(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    with torch.no_grad():
        logp = reference.selective_log_softmax((hidden @ weight.T).double(), case["ids"]).float()
    case.update(hidden=hidden, weight=weight, old=logp + 0.4 * torch.randn(B, T, generator=g))
    return case


def linear_loss_and_grad(hidden, weight, ids, mask, rewards, old, **kw):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss, metrics = grpo_fast.fused_linear_grpo_loss(
        h, w, ids, mask, rewards=rewards, group_size=2, old_logps=old, **kw
    )
    loss.backward()
    return (loss, h.grad, w.grad, *(metrics[k] for k in sorted(metrics)))


def linear_inputs(case: dict) -> dict:
    return {k: case[k] for k in ("hidden", "weight", "ids", "mask", "rewards", "old")}


@pytest.mark.parametrize("value", [NAN, INF, 1e30])
def test_fused_linear_masked_hidden_never_matters(on, value):
    """Padding rows of a real model's hidden states can hold anything: no effect on loss, dHidden or dWeight."""
    case = linear_inputs(linear_case())
    dirty = dict(case, hidden=torch.where((case["mask"] == 0).unsqueeze(-1), value, case["hidden"]))
    clean, got = both(on, linear_loss_and_grad, **case), both(on, linear_loss_and_grad, **dirty)
    for path in PATHS:
        assert_same(got[path], clean[path], rtol=1e-6, atol=1e-7)
        assert all(torch.isfinite(x).all() for x in got[path])
    assert_same(got["kernel"], got["chunked"])


@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_fused_linear_active_nan_makes_the_loss_nan(on, where):
    case = linear_inputs(linear_case())
    if where == "hidden":
        case["hidden"][0, 1, 3] = NAN
    else:
        case["weight"][2, 0] = NAN  # one vocabulary row: every active token's softmax
    got = both(on, linear_loss_and_grad, **case)
    for path in PATHS:
        assert torch.isnan(got[path][0]) and torch.isnan(got[path][1]).any()
    assert_same(got["kernel"], got["chunked"])


def logps_and_grad(hidden, weight, ids, keep):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp = grpo_fast.fused_linear_logps(h, w, ids)
    torch.where(keep, logp, 0.0).sum().backward()  # the NaN row gets no gradient
    return logp, h.grad, w.grad


def test_fused_linear_logps_nan_row_stays_in_its_row(on):
    case = linear_case()
    case["hidden"][1, 2] = NAN
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 2] = False
    got = both(on, logps_and_grad, case["hidden"], case["weight"], case["ids"], keep)
    assert_same(got["kernel"], got["chunked"])
    logp, dh, dw = got["kernel"]
    assert torch.isnan(logp[1, 2]) and torch.isfinite(logp[keep]).all()
    assert (dh[1, 2] == 0).all() and torch.isfinite(dh).all() and torch.isfinite(dw).all()


def sls_and_grad(logits, ids, keep):
    x = logits.detach().clone().requires_grad_()
    logp = grpo_fast.selective_log_softmax(x, ids)
    torch.where(keep, logp, 0.0).sum().backward()
    return logp, x.grad


def test_selective_log_softmax_non_finite_rows_agree(on):
    """NaN and +inf rows give NaN (softmax is undefined), a -inf entry is a valid logit; reference included."""
    case = loss_case()
    logits, ids = case["logits"], case["ids"]
    logits[0, 0, 3], logits[0, 1, 4], logits[0, 2, (ids[0, 2] + 1) % V] = NAN, INF, -INF
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, :2] = False
    got = both(on, sls_and_grad, logits, ids, keep)
    assert_same(got["kernel"], got["chunked"])
    logp, grad = got["kernel"]
    assert_same((logp,), (reference.selective_log_softmax(logits.double(), ids),))
    assert torch.isnan(logp[0, :2]).all() and torch.isfinite(logp[keep]).all()
    assert (grad[0, :2] == 0).all() and torch.isfinite(grad).all()  # a row left out of the loss: no gradient


# ------------------------------------------------------------------ model-facing ops: sequence_logps, rollouts


@pytest.fixture(scope="module")
def model():
    return tiny.build_model(tiny.build_tokenizer(), seed=3).eval()


def rollout_inputs():
    prompts = [torch.tensor([5, 6, 2]), torch.tensor([7, 2])]
    ids = torch.tensor([[3, 4, 1], [5, 1, 0], [1, 0, 0], [6, 7, 3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    return prompts, ids, mask


def seq_logps(model, prompts, ids, mask):
    return (grpo_fast.sequence_logps(model, prompts, ids, mask, group_size=2),)


def test_sequence_logps_paths_agree_valid_empty_and_nan(on, model):
    prompts, ids, mask = rollout_inputs()
    with torch.no_grad():
        valid = both(on, seq_logps, model, prompts, ids, mask)
        empty = both(on, seq_logps, model, prompts, ids, torch.zeros_like(mask))
        assert_same(valid["kernel"], valid["chunked"])
        assert all((e[0] == 0).all() for e in empty.values())
        broken = tiny.build_model(tiny.build_tokenizer(), seed=3).eval()
        broken.lm_head.weight[4, 0] = NAN
        nan = both(on, seq_logps, broken, prompts, ids, mask)
    for path in PATHS:
        assert torch.isnan(nan[path][0][mask.bool()]).all() and (nan[path][0][~mask.bool()] == 0).all()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m, p, i, k: grpo_fast.sequence_logps(m, p, i, k * 0.5, group_size=2), ValueError, "completion_mask"),
        (lambda m, p, i, k: grpo_fast.sequence_logps(None, p, i, k, group_size=2), TypeError, "model"),
        (lambda m, p, i, k: grpo_fast.sequence_logps(m, p, i, k, group_size=2, attention="flex"), ValueError,
         "attention='flex'"),
        (lambda m, p, i, k: grpo_fast.sequence_logps(m, p, i, k, group_size=0), ValueError, "group_size"),
        (lambda m, p, i, k: grpo_fast.sequence_logps(m, p, i, k.flip(1), group_size=2), ValueError, "1s then 0s"),
    ],
    ids=["D25-fractional-mask", "D27-model-none", "D27-flex-on-cpu", "group-size-0", "mask-holes"],
)  # fmt: skip
def test_sequence_logps_bad_input(on, model, call, error, message):
    prompts, ids, mask = rollout_inputs()
    if message.startswith("attention") and torch.cuda.is_available():
        pytest.skip("flex runs on CUDA")
    for path in PATHS:
        on(path)
        with pytest.raises(error, match=message):
            call(model, prompts, ids, mask)


GENERATE_BAD = [
    ("group-size-0", dict(group_size=0), ValueError, "group_size"),
    ("max-new-tokens-0", dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    ("temperature-nan", dict(temperature=NAN), ValueError, "temperature"),
    ("no-prompts", dict(prompts=[]), ValueError, "prompts"),
    ("empty-prompt", dict(prompts=[torch.tensor([], dtype=torch.long)]), ValueError, r"prompts\[0\] is empty"),
    ("model-none", dict(model=None), TypeError, "model"),
]  # fmt: skip


@pytest.mark.parametrize("change, error, message", [c[1:] for c in GENERATE_BAD], ids=[c[0] for c in GENERATE_BAD])
def test_generate_groups_bad_input(on, model, change, error, message):
    kw = dict(model=model, prompts=rollout_inputs()[0], group_size=2, max_new_tokens=3) | change
    for path in PATHS:
        on(path)
        with pytest.raises(error, match=message):
            grpo_fast.generate_groups(**kw)


def test_generate_groups_refuses_non_finite_logits(on, model):
    """D16/D27: NaN weights give one clear error on every path, not torch's 'probability tensor contains nan'."""
    prompts, _, _ = rollout_inputs()
    broken = tiny.build_model(tiny.build_tokenizer(), seed=3)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = NAN
    for path in PATHS:
        on(path)
        with pytest.raises(ValueError, match="logits are NaN or infinite for 4 of 4 rows"):
            grpo_fast.generate_groups(broken, prompts, 2, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    runs = []
    for path in PATHS:
        on(path)
        gen = torch.Generator().manual_seed(0)
        runs.append(grpo_fast.generate_groups(model, prompts, 2, max_new_tokens=3, eos_token_id=1, generator=gen))
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)


# ------------------------------------------------------------------------- bad input: same error, both paths


def grpo_call(**change):
    case = loss_case()
    kw = dict(rewards=case["rewards"], group_size=2, old_logps=case["old"]) | change
    mask = kw.pop("mask", case["mask"])
    return lambda: grpo_fast.grpo_loss(case["logits"], case["ids"], mask, **kw)


def linear_call(**change):
    case = linear_case()
    kw = dict(advantages=torch.zeros(B)) | change
    hidden, weight = kw.pop("hidden", case["hidden"]), kw.pop("weight", case["weight"])
    mask = kw.pop("mask", case["mask"])
    return lambda: grpo_fast.fused_linear_grpo_loss(hidden, weight, case["ids"], mask, **kw)


ID3 = torch.zeros(3, dtype=torch.long)
BAD = [
    ("D25-mask-negative", grpo_call(mask=-torch.ones(B, T)), ValueError, "completion_mask must hold only 0 and 1"),
    ("D25-mask-nan", grpo_call(mask=torch.full((B, T), NAN)), ValueError, "completion_mask must hold only 0 and 1"),
    ("D25-mask-half", grpo_call(mask=torch.full((B, T), 0.5)), ValueError, "completion_mask must hold only 0 and 1"),
    ("D25-linear-mask-2", linear_call(mask=torch.full((B, T), 2)), ValueError, "completion_mask"),
    ("D26-num-items-str", grpo_call(num_items_in_batch="3"), TypeError, "num_items_in_batch"),
    ("D26-num-items-2-elements", grpo_call(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
    ("D26-num-items-nan", grpo_call(num_items_in_batch=NAN), ValueError, "num_items_in_batch"),
    ("D26-num-items-bool", grpo_call(num_items_in_batch=True), TypeError, "num_items_in_batch"),
    ("D27-hidden-size-0", linear_call(hidden=torch.zeros(B, T, 0), weight=torch.zeros(V, 0)), ValueError, "weight"),
    ("beta-bool", grpo_call(beta=True, ref_logps=torch.zeros(B, T)), ValueError, "beta"),
    ("logps-ids-out-of-range", lambda: grpo_fast.fused_linear_logps(torch.randn(3, H), torch.randn(V, H), ID3 + V),
     ValueError, "ids"),
    ("logps-hidden-size-0", lambda: grpo_fast.fused_linear_logps(torch.zeros(3, 0), torch.zeros(V, 0), ID3),
     ValueError, "weight"),
    ("sls-temperature-nan", lambda: grpo_fast.selective_log_softmax(torch.randn(3, V), ID3, NAN), ValueError,
     "temperature"),
    ("sls-ids-negative", lambda: grpo_fast.selective_log_softmax(torch.randn(3, V), ID3 - 1), ValueError, "ids"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_same_error_on_both_paths(on, call, error, message):
    for path in PATHS:
        on(path)
        with pytest.raises(error, match=message):
            call()


def test_num_items_in_batch_0d_tensor_is_accepted(on):
    got = {}
    for path in PATHS:
        on(path)
        got[path] = grpo_call(num_items_in_batch=torch.tensor(7.0))()[0]
    torch.testing.assert_close(got["kernel"], got["chunked"], rtol=1e-5, atol=1e-7)
