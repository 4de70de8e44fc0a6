"""The decode loop of generate_groups: one function per generated token, compiled whole and replayed as a CUDA graph.

A decode step feeds every row's last token through the decoder over the cascade cache (cascade.py), forms the
next-token logits with the model's LM head and logit transform, samples from them (sampling.py, noise drawn up
front) and writes the token, its log-prob and the row's done flag into preallocated buffers. Every tensor it reads
or writes exists before the first step (`DecodeBuffers`, the cascade's K/V), the step index is a 0-d tensor, and
nothing in it asks the host for a value, so:

- `torch.compile(step, fullgraph=True)` traces it as ONE graph: a graph break or a host sync added later fails
  the compile (and tests/test_decode.py), instead of silently splitting it;
- on CUDA the compiled step is captured once per rollout into a `torch.cuda.CUDAGraph` on those static buffers and
  each token is one `replay()`: no Python, no dispatcher, no per-kernel launch on the host. The graph is captured
  directly rather than through `mode="reduce-overhead"`: cudagraph trees copy every input that is not a parameter
  into their own static buffers on each call (the whole KV cache, per token) unless it is marked static, and skip
  graphs quietly on input mutation; here every buffer is ours and static, the step mutates them in place, and
  capture either works or raises (an op that cannot be captured: one logged line, then the compiled step is
  launched per token). A graph is captured per rollout call, on that call's buffers (one step runs first on a side
  stream as the capture's warm-up, the others replay): capturing costs about one step. The compiled code is cached
  across calls: new buffers of the same shapes reuse it; a second prompt-slot count (cascade.PREFIX_BUCKET) makes
  dynamo recompile it dynamic in that size, once; a new row count, budget or sampling setting compiles anew.

The host syncs once every `CHECK_EVERY` steps to stop when every row has finished. A model whose step does not
compile whole (an op dynamo cannot trace, a host sync) decodes eagerly after ONE logged warning naming the
reason; the eager step runs the same function, so tokens agree. With torch 2.13 on CPU, every architecture of
tests/test_model_coverage.py that the rollouts serve traced whole (MoE routing included) and gave the eager tokens;
under inductor that was checked for Llama, Qwen2, Gemma 2, GPT-OSS, Mixtral, DeepSeek-V3, Phi, GPT-2 and Granite.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sampling import sample, token_logps

CHECK_EVERY = 8  # decode steps between host syncs that test "all rows finished"
log = logging.getLogger("grpo_fast")


@dataclass
class DecodeBuffers:
    """Everything a decode step reads and writes besides the weights and the cascade K/V; N = B*G rows, T the
    budget. Column t of tokens / logps / was_done is the row's t-th completion token."""

    step: torch.Tensor  # () long: the column of the token being fed (its own-K/V slot); the step writes step + 1
    last: torch.Tensor  # (N,) long: the token being fed
    positions: torch.Tensor  # (N,) long: the position of each row's first completion token (its prompt length)
    noise: torch.Tensor  # (T, N) float64 uniforms, sampling.draw_noise
    eos: torch.Tensor  # (E,) long end-of-sequence ids
    pad: int
    tokens: torch.Tensor  # (N, T) long, pad after EOS and in columns never decoded
    was_done: torch.Tensor  # (N, T) bool: the row had finished before column t (True in columns never decoded)
    logps: torch.Tensor | None  # (N, T) fp32 log-prob of each sampled token, 0 where done; None: not asked for
    done: torch.Tensor  # (N,) bool
    bad: torch.Tensor  # (N,) bool: the row's logits were not finite at some step

    @classmethod
    def allocate(cls, positions, noise, eos: list[int], pad: int, with_logps: bool) -> DecodeBuffers:
        (N,), T, dev = positions.shape, noise.shape[0], positions.device
        return cls(
            step=torch.zeros((), dtype=torch.long, device=dev),
            last=torch.full((N,), pad, dtype=torch.long, device=dev),
            positions=positions,
            noise=noise,
            eos=torch.tensor(eos, dtype=torch.long, device=dev),
            pad=pad,
            tokens=torch.full((N, T), pad, dtype=torch.long, device=dev),
            was_done=torch.ones(N, T, dtype=torch.bool, device=dev),
            logps=torch.zeros(N, T, dtype=torch.float32, device=dev) if with_logps else None,
            done=torch.zeros(N, dtype=torch.bool, device=dev),
            bad=torch.zeros(N, dtype=torch.bool, device=dev),
        )


def head_logits(hidden: torch.Tensor, head: tuple) -> torch.Tensor:
    """The model's next-token logits (N, V) fp32 from final hidden states (N, H): head = (weight, bias, transform),
    the transform (logit scale, softcap) applied as the model's forward does, before any temperature."""
    weight, bias, transform = head
    return transform(F.linear(hidden, weight, bias).float())


def next_logits(decoder, head, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Feeds one token per row (N,) at `positions` (N,) through the decoder (its attention on the cascade state in
    decode mode); returns the next-token logits (N, V) fp32."""
    out = decoder(input_ids=tokens[:, None], position_ids=positions[:, None], use_cache=False)
    return head_logits(out.last_hidden_state[:, -1], head)


def record(buf: DecodeBuffers, logits: torch.Tensor, column: torch.Tensor, sampling: tuple) -> None:
    """Samples column `column` (0-d long) of every row from its logits (N, V) fp32 and writes it into `buf`.
    A row whose logits are NaN or +inf (or all -inf) is flagged in buf.bad and samples from zeros meanwhile."""
    temperature, top_k, top_p = sampling
    bad = buf.bad | ~torch.isfinite(logits.amax(-1))  # amax is NaN for any NaN, +inf for any +inf, -inf if all are
    logits = torch.where(bad.unsqueeze(1), 0.0, logits)
    u = buf.noise.index_select(0, column.view(1)).squeeze(0)  # (N,)
    tok = torch.where(buf.done, buf.pad, sample(logits, u, temperature, top_k, top_p))  # (N,)
    col = column.view(1)
    buf.tokens.index_copy_(1, col, tok[:, None])
    buf.was_done.index_copy_(1, col, buf.done[:, None])
    if buf.logps is not None:
        logp = torch.where(buf.done, 0.0, token_logps(logits, tok, temperature))
        buf.logps.index_copy_(1, col, logp[:, None])
    buf.done.copy_(buf.done | torch.isin(tok, buf.eos))
    buf.bad.copy_(bad)
    buf.last.copy_(tok)


def step(decoder, head, buf: DecodeBuffers, sampling: tuple) -> None:
    """One decode step: feeds column buf.step, samples column buf.step + 1, advances buf.step. The cascade state
    (cascade.py) must be in decode mode with its `step` being buf.step."""
    logits = next_logits(decoder, head, buf.last, buf.positions + buf.step)
    record(buf, logits, buf.step + 1, sampling)
    buf.step.add_(1)


_compiled_step = torch.compile(step, fullgraph=True)
_NOT_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> why its step runs eagerly
_COMPILE_ERRORS: tuple = (torch._dynamo.exc.TorchDynamoException,)
try:  # inductor's own errors (a C++/Triton compile failure) are not dynamo exceptions in every torch version
    from torch._inductor.exc import InductorError

    _COMPILE_ERRORS += (InductorError,)
except ImportError:  # pragma: no cover - older torch
    pass


def _sharded(decoder) -> bool:
    """FSDP2 shards parameters as DTensors and gathers them in forward hooks: its collectives are not captured."""
    return any(type(p).__name__ == "DTensor" for p in decoder.parameters())


def _eager_reason(model, decoder) -> str | None:
    if model in _NOT_COMPILED:
        return _NOT_COMPILED[model]
    if _sharded(decoder):
        return "its parameters are FSDP2-sharded (DTensor), gathered by hooks a CUDA graph cannot replay"
    return None


def _fall_back(model, reason: str) -> None:
    _NOT_COMPILED[model] = reason
    log.warning(f"generate_groups: decoding {type(model).__name__} eagerly: its decode step does not compile whole "
                f"({reason})")  # fmt: skip


class _Stepper:
    """Runs decode steps: eagerly, compiled, or (CUDA) compiled and replayed from a captured graph."""

    def __init__(self, model, decoder, head, buf: DecodeBuffers, sampling: tuple, compiled: bool, capture: bool):
        self.args, self.model, self.graph = (decoder, head, buf, sampling), model, None
        reason = _eager_reason(model, decoder) if compiled else None
        if reason is not None and model not in _NOT_COMPILED:
            _fall_back(model, reason)
        self.compiled = compiled and reason is None
        self.capture = self.compiled and capture and buf.tokens.is_cuda

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif not self.compiled:
            step(*self.args)
        elif self.capture:
            self._first_step_then_capture()
        else:
            self._run_compiled()

    def _run_compiled(self) -> None:
        try:
            _compiled_step(*self.args)
        except _COMPILE_ERRORS as e:  # raised while tracing or compiling, before the step ran: nothing was written
            _fall_back(self.model, f"{type(e).__name__}: {_first_line(e)}")
            self.compiled = self.capture = False
            step(*self.args)

    def _first_step_then_capture(self) -> None:
        """Runs this step compiled on a side stream (the capture's warm-up), then records the next one: capture
        launches nothing, so the buffers still hold this step's results and the first replay is the next step."""
        self.capture = False
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run_compiled()
        torch.cuda.current_stream().wait_stream(side)
        if not self.compiled:
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                _compiled_step(*self.args)
        except RuntimeError as e:  # an op that cannot be captured: keep the compiled step, launched per token
            log.warning(f"generate_groups: the compiled decode step of {type(self.model).__name__} could not be "
                        f"captured as a CUDA graph ({_first_line(e)}); launching its kernels per token")  # fmt: skip
            return
        self.graph = graph


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{lines[0][:300] if lines else type(e).__name__}"


def decode(model, decoder, head, buf: DecodeBuffers, first_logits: torch.Tensor, sampling: tuple, compiled: bool):
    """Fills `buf` with up to T tokens per row: column 0 from `first_logits` (N, V) (the prefill's), then a decode
    step per column until the budget is spent or (checked every CHECK_EVERY steps) every row has finished."""
    T = buf.tokens.shape[1]
    record(buf, first_logits, buf.step, sampling)
    stepper = _Stepper(model, decoder, head, buf, sampling, compiled, capture=T > 2)  # a graph replays T - 2 steps
    for column in range(1, T):
        stepper()
        if (column + 1) % CHECK_EVERY == 0 and bool(buf.done.all()):
            break
