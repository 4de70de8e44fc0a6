"""fused_linear_grpo_loss / fused_linear_logps against the float64 reference over materialized logits.

Two paths: the Triton kernels (interpreted on CPU) and the chunked torch path (TRITON_INTERPRET=0 on
CPU). Shapes are tiny and awkward: H and V are not multiples of the tile sizes (64), N spans several
token blocks; both paths' backward (and the torch path's forward) are forced into several token and
vocabulary chunks, the last ones partial.
"""

import pytest
import torch
import triton
import triton.language as tl
import variants

import grpo_fast
from grpo_fast import fused_linear, reference
from grpo_fast.kernels import fused_linear_grpo as kernels
from grpo_fast.kernels.logit_transform import tanh_and_slope

PATHS = ("triton", "torch")
B, T, H, V = 4, 7, 37, 131  # N = 28 spans two 16-token blocks; H, V odd against 64-wide tiles


@pytest.fixture
def path_device(request, monkeypatch, device):
    """Selects the path: "torch" runs on CPU with the interpreter off; both with tiny chunks."""
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr(fused_linear, "TOKEN_CHUNK", 5)
        monkeypatch.setattr(fused_linear, "CHUNK_ELEMENTS", 200)  # vocabulary chunks of 5 columns
        return torch.device("cpu")
    monkeypatch.setattr(kernels, "TOKEN_CHUNK", 16)  # N = 28: tiles of 16 and 12 tokens
    monkeypatch.setattr(kernels, "TILE_BYTES", 16 * 64 * 4)  # vocabulary chunks of 64 (fp32) or 128 (bf16)
    return device


def _head(device, dtype=torch.float32, bias=True, h=H, v=V):
    hidden = (torch.randn(B, T, h) * 0.6).to(device, dtype)
    weight = (torch.randn(v, h) * 0.4).to(device, dtype)
    b = (torch.randn(v) * 0.5).to(device, dtype) if bias else None
    return hidden, weight, b


def _logits64(hidden, weight, bias, scale=1.0, softcap=None):
    """float64 logits f(hidden @ weight.T + bias): f(z) = softcap * tanh(scale * z / softcap), or scale * z."""
    x = hidden.double() @ weight.double().T
    x = x + bias.double() if bias is not None else x
    return scale * x if softcap is None else softcap * torch.tanh(scale * x / softcap)


def _batch(hidden, weight, bias, temperature, head=(1.0, None)):
    """ids, mask (a padded row and an all-masked row), rewards, old/ref log-probs = current + noise."""
    dev = hidden.device
    ids = torch.randint(0, weight.shape[0], (B, T), device=dev)
    mask = torch.ones(B, T, device=dev)
    mask[1, 4:] = 0
    mask[2] = 0
    with torch.no_grad():
        logps = reference.selective_log_softmax(_logits64(hidden, weight, bias, *head), ids, temperature)
    log_ratio = torch.linspace(-0.6, 0.6, T, dtype=torch.float64, device=dev).expand(B, T)  # clips low and high
    old = (logps - log_ratio).float()
    ref = (logps + 0.3 * torch.randn(B, T, dtype=torch.float64, device=dev)).float()
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0], device=dev)
    return ids, mask, rewards, old, ref


def _fp32_atol(ref: torch.Tensor) -> float:
    """fp32 sums over V terms: a few ulps of the gradient's scale (torch's own fp32 error is ~2e-7 of it)."""
    return 2e-6 * float(ref.abs().max())


def _grads(loss, tensors):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    return dict(zip([id(t) for t in wanted], torch.autograd.grad(loss, wanted)))


def _check_against_reference(hidden, weight, bias, ids, mask, kwargs, rtol=1e-4, head=(1.0, None)):
    """Loss, metrics and gradients of fused_linear_grpo_loss vs float64 reference.grpo_loss; head = (scale, softcap)."""
    transform = dict(logit_scale=head[0], softcap=head[1])
    loss, metrics = grpo_fast.fused_linear_grpo_loss(hidden, weight, ids, mask, bias=bias, **kwargs, **transform)
    ours = [
        g for g in torch.autograd.grad(loss, [t for t in (hidden, weight, bias) if t is not None and t.requires_grad])
    ]
    leaves = [
        None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (hidden, weight, bias)
    ]
    ref_kwargs = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    ref_loss, ref_metrics = reference.grpo_loss(_logits64(*leaves, *head), ids, mask.double(), **ref_kwargs)
    theirs = torch.autograd.grad(ref_loss, [t for t in leaves if t is not None and t.requires_grad])
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=rtol * 1e-2)
    for k, v in ref_metrics.items():
        torch.testing.assert_close(metrics[k].double(), v, rtol=rtol, atol=rtol * 1e-2, msg=k)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        scale = b.abs().max().clamp(min=1e-6)
        assert float((a.double() - b).abs().max() / scale) < rtol * 10
    return ref_metrics


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
@pytest.mark.parametrize("loss_type", ("grpo", "bnpo", "dr_grpo", "dapo"))
@pytest.mark.parametrize("level", reference.IMPORTANCE_LEVELS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_reference(path_device, loss_type, level, beta):
    hidden, weight, bias = _head(path_device)
    ids, mask, rewards, old, ref = _batch(hidden, weight, bias, 0.7)
    hidden.requires_grad_()
    weight.requires_grad_(loss_type in ("dapo", "grpo"))  # frozen (LoRA) and trainable heads
    bias.requires_grad_(loss_type != "bnpo")
    kwargs = dict(rewards=rewards, group_size=2, old_logps=old, ref_logps=ref, beta=beta, temperature=0.7)
    kwargs.update(loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28)
    metrics = _check_against_reference(hidden, weight, bias, ids, mask, kwargs)
    if level == "token":  # the inputs hit every clip branch
        assert 0 < float(metrics["clip_ratio_low"]) and 0 < float(metrics["clip_ratio_high"])
        assert float(metrics["clip_ratio_region"]) < 1


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_variants_match_reference(path_device, name):
    """Every TRL option beyond the base four (tests/variants.py): dHidden, dWeight, dBias and the metrics."""
    hidden, weight, bias = _head(path_device)
    ids, mask, rewards, old, ref = _batch(hidden, weight, bias, 0.7)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    kwargs = dict(rewards=rewards, group_size=2, old_logps=old, ref_logps=ref, temperature=0.7)
    kwargs.update(variants.options(name), **variants.tensors(name, old, mask))
    _check_against_reference(hidden, weight, bias, ids, mask, kwargs)


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
def test_entropy_quantile_over_processes(path_device):
    """Two "processes" holding half the rows each, entropy_gather handing each the other's entropies and
    dapo normalized by the global tokens: their losses add up to the whole batch's, their dHidden rows are
    its rows, and both rank every token against the same global threshold (as TRL gathers)."""
    hidden, weight, bias = _head(path_device)
    ids, mask, rewards, old, _ = _batch(hidden, weight, bias, 0.7)
    adv = reference.group_advantages(rewards, 2)
    kw = dict(old_logps=old, top_entropy_quantile=0.3, num_items_in_batch=mask.sum(), temperature=0.7)

    def call(rows, gather=None):
        h = hidden[rows].detach().clone().requires_grad_()
        part = {k: (v[rows] if torch.is_tensor(v) and v.dim() else v) for k, v in kw.items()}
        loss, metrics = grpo_fast.fused_linear_grpo_loss(
            h, weight, ids[rows], mask[rows], bias=bias, advantages=adv[rows], entropy_gather=gather, **part
        )
        return loss, metrics, torch.autograd.grad(loss, h)[0]

    loss, metrics, grad = call(slice(None))
    halves, local = (slice(0, 2), slice(2, 4)), {}
    for i, rows in enumerate(halves):  # what each process holds
        call(rows, lambda x, i=i: local.setdefault(i, x))
    everyone = lambda x: torch.cat([local[0], local[1]])  # noqa: E731
    parts = [call(rows, everyone) for rows in halves]
    torch.testing.assert_close(parts[0][0] + parts[1][0], loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), grad, rtol=1e-6, atol=1e-7)
    for p in parts:
        assert p[1]["entropy_threshold"] == metrics["entropy_threshold"]
    assert 0 < metrics["entropy_mask_ratio"] < 1


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
def test_options_no_bias_no_old_logps(path_device):
    """No bias, old_logps = current (ratio 1), advantages given, delta and dr_grpo's length, T = 1."""
    hidden, weight, _ = _head(path_device, bias=False)
    ids, mask, _, _, _ = _batch(hidden, weight, None, 1.0)
    hidden.requires_grad_()
    weight.requires_grad_()
    adv = torch.tensor([0.5, -1.0, 0.0, 2.0], device=path_device)
    kwargs = dict(advantages=adv, delta=1.5, loss_type="dr_grpo", max_completion_length=9)
    _check_against_reference(hidden, weight, None, ids, mask, kwargs)


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
def test_bf16_inputs(path_device):
    """bf16 hidden and head: the fp32-accumulated result is within bf16 rounding of the float64 truth."""
    hidden, weight, bias = _head(path_device, dtype=torch.bfloat16)
    ids, mask, rewards, old, ref = _batch(hidden, weight, bias, 0.9)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    kwargs = dict(rewards=rewards, group_size=4, old_logps=old, ref_logps=ref, beta=0.1, temperature=0.9)
    _check_against_reference(hidden, weight, bias, ids, mask, kwargs, rtol=2e-3)


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
@pytest.mark.parametrize("name", ["one-pass-all", "entropy-bonus-sapo", "vespo-is", "off-policy", "luspo-seq"])
def test_variants_bf16(path_device, name):
    """bf16 hidden and head with TRL's other options, the entropy bonus' backward term included (no entropy
    quantile: a rank is not stable under bf16 rounding)."""
    hidden, weight, bias = _head(path_device, dtype=torch.bfloat16)
    ids, mask, rewards, old, ref = _batch(hidden, weight, bias, 0.9)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    kwargs = dict(rewards=rewards, group_size=2, old_logps=old, ref_logps=ref, temperature=0.9)
    kwargs.update(variants.options(name), **variants.tensors(name, old, mask))
    _check_against_reference(hidden, weight, bias, ids, mask, kwargs, rtol=2e-3)


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
def test_tied_embeddings(path_device):
    """weight shared with an nn.Embedding: the head's and the embedding's gradients add up."""
    emb = torch.nn.Embedding(V, H).to(path_device)
    mix = (torch.randn(H, H) / H**0.5).to(path_device)
    inputs = torch.randint(0, V, (B, T), device=path_device)
    ids, mask, rewards, old, ref = _batch(torch.tanh(emb(inputs) @ mix), emb.weight, None, 0.8)
    kwargs = dict(rewards=rewards, group_size=2, old_logps=old, temperature=0.8)
    loss, _ = grpo_fast.fused_linear_grpo_loss(torch.tanh(emb(inputs) @ mix), emb.weight, ids, mask, **kwargs)
    (ours,) = torch.autograd.grad(loss, emb.weight)
    w64 = emb.weight.detach().double().requires_grad_()
    hidden64 = torch.tanh(w64[inputs] @ mix.double())
    kwargs64 = dict(kwargs, rewards=rewards.double(), old_logps=old.double())
    ref_loss, _ = reference.grpo_loss(hidden64 @ w64.T, ids, mask.double(), **kwargs64)
    (theirs,) = torch.autograd.grad(ref_loss, w64)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
def test_large_vocabulary(path_device, monkeypatch):
    """V above 65,536 with a tiny N: vocabulary offsets past 2**16, a target in the last tile."""
    v = 65_600
    monkeypatch.setattr(kernels, "TILE_BYTES", 3 * 32768 * 4)  # backward vocabulary chunks of 32768 (3 of them)
    hidden = (torch.randn(1, 3, 16) * 0.5).to(path_device).requires_grad_()
    weight = (torch.randn(v, 16) * 0.5).to(path_device).requires_grad_()
    ids = torch.tensor([[v - 1, 70_000 % v, 3]], device=path_device)
    ours = grpo_fast.fused_linear_logps(hidden, weight, ids, temperature=1.3)
    dh, dw = torch.autograd.grad(ours.sum(), (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    theirs = reference.selective_log_softmax(h64 @ w64.T, ids, 1.3)
    rh, rw = torch.autograd.grad(theirs.sum(), (h64, w64))
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double(), rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), rw, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
def test_logps_forward_backward_and_no_grad(path_device):
    hidden, weight, bias = _head(path_device)
    ids = torch.randint(0, V, (B, T), device=path_device)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    ours = grpo_fast.fused_linear_logps(hidden, weight, ids, bias=bias, temperature=0.6)
    upstream = torch.randn(B, T, device=path_device)
    grads = torch.autograd.grad((ours * upstream).sum(), leaves)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    theirs = reference.selective_log_softmax(_logits64(*l64), ids, 0.6)
    ref_grads = torch.autograd.grad((theirs * upstream.double()).sum(), l64)
    assert ours.dtype == torch.float32 and ours.shape == (B, T)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=_fp32_atol(b))
    with torch.no_grad():
        fast = grpo_fast.fused_linear_logps(hidden, weight, ids, bias=bias, temperature=0.6)
    assert fast.grad_fn is None
    torch.testing.assert_close(fast, ours.detach())


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
def test_float64_inputs(path_device):
    """float64 inputs take the chunked torch path and return float64 log-probs."""
    hidden, weight, bias = _head(path_device, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), device=path_device)
    ours = grpo_fast.fused_linear_logps(hidden, weight, ids, bias=bias)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference.selective_log_softmax(_logits64(hidden, weight, bias), ids))


@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_head_skips_dweight(monkeypatch, device, trainable):
    """Frozen weight: the backward runs one GEMM accumulation per tile (dHidden), never the dWeight one,
    and weight gets no gradient; a trainable head runs both."""
    calls = []
    add_matmul = kernels._add_matmul
    monkeypatch.setattr(kernels, "_add_matmul", lambda acc, a, b: calls.append(1) or add_matmul(acc, a, b))
    monkeypatch.setattr(kernels, "TOKEN_CHUNK", 16)
    monkeypatch.setattr(kernels, "TILE_BYTES", 16 * 64 * 4)
    hidden, weight, _ = _head(device, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_(trainable)
    ids = torch.randint(0, V, (B, T), device=device)
    grpo_fast.fused_linear_logps(hidden, weight, ids).sum().backward()
    tiles = 2 * 3  # ceil(28 / 16) token chunks x ceil(131 / 64) vocabulary chunks
    assert len(calls) == tiles * (2 if trainable else 1)
    assert hidden.grad is not None and (weight.grad is not None) == trainable


def test_zero_gradient_tokens_are_skipped(monkeypatch, device):
    """Tokens with a zero upstream gradient (padding, zero advantages) enter no backward tile; their
    dHidden is exactly 0 and every gradient still matches the reference."""
    rows, backward_rows = [], kernels.backward_rows

    def counting(g, x, *args, **kwargs):
        rows.append(len(x))
        return backward_rows(g, x, *args, **kwargs)

    monkeypatch.setattr(kernels, "backward_rows", counting)
    monkeypatch.setattr(kernels, "TOKEN_CHUNK", 16)
    monkeypatch.setattr(kernels, "TILE_BYTES", 16 * 64 * 4)
    hidden, weight, bias = _head(device)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    ids = torch.randint(0, V, (B, T), device=device)
    upstream = torch.randn(B, T, device=device) * (torch.rand(B, T, device=device) < 0.5)  # ~14 of 28 live
    live = int((upstream != 0).sum())
    ours = grpo_fast.fused_linear_logps(hidden, weight, ids, bias=bias)
    grads = torch.autograd.grad((ours * upstream).sum(), leaves)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref_grads = torch.autograd.grad((reference.selective_log_softmax(_logits64(*l64), ids) * upstream).sum(), l64)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=_fp32_atol(b))
    assert (grads[0][upstream == 0] == 0).all()
    assert sum(rows) == live * 3  # each live token in each of the 3 vocabulary chunks, no other


def _call(hidden, weight, ids, **kw):
    mask = torch.ones(ids.shape)
    return grpo_fast.fused_linear_grpo_loss(hidden, weight, ids, mask, advantages=torch.zeros(ids.shape[0]), **kw)


@pytest.mark.parametrize(
    "case, error, name",
    [
        ("h_mismatch", ValueError, "hidden"),
        ("ids_range", ValueError, "completion_ids"),
        ("int_hidden", TypeError, "hidden"),
        ("fp16_cpu", TypeError, "hidden"),
        ("weight_dtype", TypeError, "weight"),
        ("bias_shape", ValueError, "bias"),
        ("weight_device", ValueError, "weight"),
        ("hidden_2d", ValueError, "hidden"),
        ("loss_type", ValueError, "loss_type"),
    ],
)
def test_bad_input(case, error, name):
    hidden, weight, ids = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))
    kw = {}
    if case == "h_mismatch":
        weight = torch.randn(11, 9)
    elif case == "ids_range":
        ids[0, 0] = 11
    elif case == "int_hidden":
        hidden = hidden.long()
    elif case == "fp16_cpu":
        hidden, weight = hidden.half(), weight.half()
    elif case == "weight_dtype":
        weight = weight.double()
    elif case == "bias_shape":
        kw["bias"] = torch.randn(10)
    elif case == "weight_device":
        weight = torch.empty(11, 8, device="meta")
    elif case == "hidden_2d":
        hidden = hidden[0]
    elif case == "loss_type":
        kw["loss_type"] = "ppo"
    with pytest.raises(error, match=name):
        _call(hidden, weight, ids, **kw)


def test_logps_bad_ids_shape_and_range():
    hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match="ids"):
        grpo_fast.fused_linear_logps(hidden, weight, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        grpo_fast.fused_linear_logps(hidden, weight, torch.full((5,), -1))
    with pytest.raises(TypeError, match="ids"):
        grpo_fast.fused_linear_logps(hidden, weight, torch.zeros(5))


# ---- logit transforms: f(z) = softcap * tanh(scale * z / softcap) (scale * z without a softcap) ----

HEADS = {"scale": (0.25, None), "softcap": (1.0, 0.8), "scale+softcap": (3.0, 1.5)}  # (logit_scale, softcap)


def _assert_tanh_branches(hidden, weight, bias, head):
    """The softcap's tanh saturates (|u| > 5: 1 - tanh^2 < 2e-4) for some logits, and some take the kernel's
    small-|u| series (|u| < 0.3)."""
    scale, softcap = head
    if softcap is not None:
        u = (_logits64(hidden, weight, bias) * (scale / softcap)).abs()
        assert (u > 5).any() and (u < 0.3).any() and ((u > 0.3) & (u < 5)).any()


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
def test_logps_logit_transform(path_device, head):
    """log-probs and dHidden, dWeight, dBias against float64 autograd through f, softcap small enough to saturate."""
    hidden, weight, bias = _head(path_device)
    _assert_tanh_branches(hidden, weight, bias, head)
    ids = torch.randint(0, V, (B, T), device=path_device)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    ours = grpo_fast.fused_linear_logps(
        hidden, weight, ids, bias=bias, temperature=0.7, logit_scale=head[0], softcap=head[1]
    )
    upstream = torch.randn(B, T, device=path_device)
    grads = torch.autograd.grad((ours * upstream).sum(), leaves)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    theirs = reference.selective_log_softmax(_logits64(*l64, *head), ids, 0.7)
    ref_grads = torch.autograd.grad((theirs * upstream.double()).sum(), l64)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=_fp32_atol(b))
    with torch.no_grad():
        fast = grpo_fast.fused_linear_logps(
            hidden, weight, ids, bias=bias, temperature=0.7, logit_scale=head[0], softcap=head[1]
        )
    torch.testing.assert_close(fast, ours.detach())


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
@pytest.mark.parametrize("head", [HEADS["softcap"], HEADS["scale+softcap"]], ids=["softcap", "scale+softcap"])
@pytest.mark.parametrize("level", reference.IMPORTANCE_LEVELS)
def test_loss_logit_transform(path_device, head, level):
    """The GRPO loss, metrics and gradients through f, old/ref log-probs near f's log-probs (every clip branch)."""
    hidden, weight, bias = _head(path_device)
    ids, mask, rewards, old, ref = _batch(hidden, weight, bias, 0.8, head)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    kwargs = dict(rewards=rewards, group_size=2, old_logps=old, ref_logps=ref, beta=0.04, temperature=0.8)
    kwargs.update(importance_sampling_level=level, epsilon_high=0.28)
    metrics = _check_against_reference(hidden, weight, bias, ids, mask, kwargs, head=head)
    if level == "token":
        assert 0 < float(metrics["clip_ratio_low"]) and 0 < float(metrics["clip_ratio_high"])


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
@pytest.mark.parametrize("options", [dict(entropy_coef=0.05), dict(entropy_coef=0.05, top_entropy_quantile=0.5),
                                     dict(loss_type="cispo", epsilon_high=1.2)],
                         ids=["bonus", "bonus+quantile", "cispo"])  # fmt: skip
def test_entropy_terms_through_softcap(path_device, options):
    """The entropy bonus' gradient (dH/dy) and the entropy mask pass through the softcap's derivative, on the
    kernels' backward tiles and the chunked path alike (float64 reference: autograd through f)."""
    hidden, weight, bias = _head(path_device)
    head = HEADS["scale+softcap"]
    ids, mask, rewards, old, ref = _batch(hidden, weight, bias, 0.8, head)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    kwargs = dict(rewards=rewards, group_size=2, old_logps=old, ref_logps=ref, beta=0.04, temperature=0.8, **options)
    _check_against_reference(hidden, weight, bias, ids, mask, kwargs, head=head)


@pytest.mark.parametrize("path_device", PATHS, indirect=True)
def test_bf16_logit_transform(path_device):
    """bf16 hidden and head with scale and softcap: within bf16 rounding of the float64 truth."""
    hidden, weight, bias = _head(path_device, dtype=torch.bfloat16)
    head = HEADS["scale+softcap"]
    ids, mask, rewards, old, ref = _batch(hidden, weight, bias, 0.9, head)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    kwargs = dict(rewards=rewards, group_size=4, old_logps=old, ref_logps=ref, beta=0.1, temperature=0.9)
    _check_against_reference(hidden, weight, bias, ids, mask, kwargs, rtol=2e-3, head=head)


@pytest.mark.parametrize("name, value", [("logit_scale", 0.0), ("logit_scale", -2.0), ("logit_scale", True),
                                         ("softcap", 0.0), ("softcap", float("inf")), ("softcap", float("nan")),
                                         ("softcap", "30")])  # fmt: skip
def test_bad_logit_transform(name, value):
    hidden, weight, ids = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))
    with pytest.raises(ValueError, match=name):
        grpo_fast.fused_linear_logps(hidden, weight, ids, **{name: value})
    with pytest.raises(ValueError, match=name):
        _call(hidden, weight, ids, **{name: value})


@triton.jit
def _tanh_kernel(t_ptr, slope_ptr, u_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t, slope = tanh_and_slope(tl.load(u_ptr + offs, mask=offs < N, other=0.0))
    tl.store(t_ptr + offs, t, mask=offs < N)
    tl.store(slope_ptr + offs, slope, mask=offs < N)


def test_kernel_tanh_and_slope(device):
    """The kernels' exp-only tanh is within 4 fp32 ulps of tanh everywhere (tiny, series/exp boundary, saturated),
    its slope 1 - tanh^2 within 1e-6 relative even where tanh rounds to 1 (no cancellation)."""
    mags = torch.cat([torch.logspace(-10, 2, 3000, dtype=torch.float64), torch.tensor([0.0, 0.3, 0.5, 9.0, 44.0])])
    u = torch.cat([mags, -mags]).float().to(device)
    t, slope = torch.empty_like(u), torch.empty_like(u)
    _tanh_kernel[(triton.cdiv(u.numel(), 1024),)](t, slope, u, u.numel(), BLOCK=1024)
    want = torch.tanh(u.double())
    ulp = (torch.nextafter(want.float().abs(), torch.tensor(float("inf"), device=device)) - want.float().abs()).double()
    assert ((t.double() - want).abs() <= 4 * ulp.clamp(min=1e-45)).all()
    want_slope = 1 / torch.cosh(u.double()) ** 2
    normal = want_slope > 1e-37
    assert normal.sum() > 5000 and (t.abs() == 1)[normal].any()  # saturated tanh, slope still exact
    torch.testing.assert_close(slope.double()[normal], want_slope[normal], rtol=1e-6, atol=0)
