"""grpo_fast.selective_log_softmax forward and backward against float64 torch, on both implementations
(Triton, interpreted on CPU, and the chunked torch path), plus the kernel's entropy output."""

from __future__ import annotations

import pytest
import torch
from test_grpo_loss import PATHS, use_path

import grpo_fast
from grpo_fast import inplace, reference

SHAPES = [(13, 37), (2, 3, 101), (50,), (2, 1, 4, 16)]  # leading dims x V: odd, prime, 1-D, size-1 dims


def _check(path, shape, dtype, temperature, monkeypatch, device, make_view=lambda t: t):
    use_path(path, monkeypatch, device)
    V = shape[-1]
    logits = (torch.randn(shape, dtype=torch.float64, device=device) * 3).to(dtype)
    ids = torch.randint(0, V, shape[:-1], device=device)
    upstream = torch.randn(shape[:-1], dtype=torch.float64, device=device)
    upstream[upstream.abs() < 0.3] = 0.0  # rows with a zero gradient are skipped by the kernel: still zero
    upstream, ids_view = (make_view(t[..., None])[..., 0] for t in (upstream, ids))
    results = []
    for fn, dt in ((grpo_fast.selective_log_softmax, dtype), (reference.selective_log_softmax, torch.float64)):
        x = logits.to(dt).clone().requires_grad_()
        logp = fn(make_view(x), ids_view, temperature)
        logp.backward(upstream.to(logp.dtype))
        results.append((logp.detach(), x.grad))
    (logp, grad), (logp64, grad64) = results
    assert logp.dtype == torch.float32 and logp.shape == logp64.shape and grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(logp.double(), logp64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)
    else:  # torch's own bf16 computation sets the bar
        x = logits.clone().requires_grad_()
        own = reference.selective_log_softmax(make_view(x), ids_view, temperature)
        own.backward(upstream.to(own.dtype))
        for mine, truth, theirs in ((logp, logp64, own.detach()), (grad, grad64, x.grad)):
            err, err_torch = ((t.double() - truth).abs().max().item() for t in (mine, theirs))
            assert err <= 2 * err_torch + 1e-6, f"error {err:.3g} > 2 x torch bf16 error {err_torch:.3g}"
    zero_rows = make_view(grad)[upstream == 0]
    assert zero_rows.numel() == 0 or zero_rows.abs().max() == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("temperature", (1.0, 0.7))
def test_matches_float64(path, shape, dtype, temperature, monkeypatch, device):
    _check(path, shape, dtype, temperature, monkeypatch, device)


@pytest.mark.parametrize("path", PATHS)
def test_strided_leading_dims(path, monkeypatch, device):
    """Every other row of a (B, T, V) tensor: the leading dims do not merge into one stride."""
    _check(path, (3, 8, 29), torch.float32, 0.9, monkeypatch, device, make_view=lambda t: t[:, ::2])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_kernel_entropy_and_inplace(dtype, monkeypatch, device):
    """The forward's optional entropy output, and the in-place backward used by the GSPO path."""
    use_path("triton", monkeypatch, device)
    from grpo_fast.kernels.selective_log_softmax import SelectiveLogSoftmax

    logits = (torch.randn(11, 300, device=device) * 4).to(dtype)
    ids = torch.randint(0, 300, (11,), device=device)
    x = logits.clone().requires_grad_()
    logp, ent = SelectiveLogSoftmax.apply(x, ids, 0.8, True, False)
    torch.testing.assert_close(ent.double(), reference.entropy_from_logits(logits.double(), 0.8), rtol=0, atol=1e-5)
    logp.sum().backward()
    buffer = logits.clone().requires_grad_() * 1  # a non-leaf, as a model's output
    logp2, _ = SelectiveLogSoftmax.apply(buffer, ids, 0.8, False, True)
    inplace.consume(buffer)  # the contract of an in-place backward: its caller tells autograd
    logp2.sum().backward()
    torch.testing.assert_close(logp2, logp, rtol=0, atol=0)
    torch.testing.assert_close(buffer.detach(), x.grad, rtol=0, atol=0)
