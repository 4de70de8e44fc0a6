"""How a causal LM turns its final hidden states into logits: the one place that reads it (DESIGN.md, "Architectures").

Most models score `z = hidden @ W^T (+ b)`. Some transform z first, and the engine must apply the same transform
wherever it forms logits (fused linear losses, rollout head, TRL drop-in) or its log-probs are silently wrong:

    logits = softcap * tanh(scale * z / softcap)    (scale * z without a softcap), then / temperature

The config fields each causal LM in transformers (5.24) uses for it, read from its forward:
    logit_scale                    logits * s          Cohere, Cohere2, Cohere2-MoE, CohereCompass
    output_multiplier              logits * s          MuseGlimmer, MuseSpark (before the softcap)
    lm_head_multiplier             logits * s          Falcon-H1
    logits_scaling                 logits / s          Granite, GraniteMoe(-Shared/-Hybrid/-SWA), GraniteDocling
                                   hidden / s          MiniCPM3 (a property: hidden_size / dim_model_base)
                                   logits * s          HyperCLOVA X
    logits_mup_width_multiplier    hidden / s          Inkling
    dim_model_base                 hidden * base / H   MiniCPM 1/2/4 (remote code, no `logits_scaling`)
    final_logit_softcapping        c * tanh(x / c)     Gemma 2/3/3n/4, VaultGemma, NanoChat, Beam, Inkling2,
                                                       MistralLarge4, MuseGlimmer, MuseSpark
    logits_soft_cap                c * tanh(x / c)     RecurrentGemma
    output_logit_soft_cap          c * tanh(x / c)     xLSTM
MPT's config carries a `logit_scale` that MptForCausalLM never applies: it is ignored here as there. Scaling the
hidden states instead of the logits is the same map when the head has no bias (none of those models has one); a
biased head, two scale fields at once, an LM head that computes more than `hidden @ W^T + b` (a learned per-token
scale, a LoRA-wrapped or quantized head) or an unknown config field that looks like a logit transform is refused
with an error naming it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# field -> (where the scale enters, multiply (True) or divide (False))
_SCALE_FIELDS = {
    "logit_scale": ("logits", True),
    "output_multiplier": ("logits", True),
    "lm_head_multiplier": ("logits", True),
    "logits_scaling": ("logits", False),
    "logits_mup_width_multiplier": ("hidden", False),
}
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
_IGNORED = {("mpt", "logit_scale")}  # MptForCausalLM.forward never reads config.logit_scale
_MULTIPLIES = {("hyperclovax", "logits_scaling")}  # HyperCLOVA X multiplies by logits_scaling (Granite divides)
_SCALES_HIDDEN = {("minicpm3", "logits_scaling")}  # MiniCPM3 divides the hidden states (same map without a bias)
# Config fields that look like a transform of the final logits. Unknown ones are refused, not ignored.
_LOOKS_LIKE = re.compile(r"(logit|lm_head).*(scal|cap|mult|temp)|(scal|cap|mult|temp).*logit")
_NOT_FINAL = re.compile(r"attn|attention|router|init|contrastive|max_logit|num_logits|output_.*_logits")


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap * tanh(scale * z / softcap) (scale * z when softcap is None), z = hidden @ W^T + b."""

    scale: float = 1.0  # multiplies z (Granite: 1 / logits_scaling, Cohere: logit_scale)
    softcap: float | None = None  # c of c * tanh(x / c) (Gemma 2: final_logit_softcapping)

    def __post_init__(self):
        _check_positive(self.scale, "logit_scale")
        if self.softcap is not None:
            _check_positive(self.softcap, "softcap")

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def kwargs(self) -> dict:
        """The keywords of fused_linear_logps / fused_linear_grpo_loss."""
        return {"logit_scale": self.scale, "softcap": self.softcap}

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The logits from z (..., V), in z's dtype."""
        if self.softcap is None:
            return z if self.scale == 1.0 else z * self.scale
        return self.softcap * torch.tanh(z * (self.scale / self.softcap))

    def derivative(self, z: torch.Tensor) -> torch.Tensor | float:
        """d logits / dz: scale * (1 - tanh^2(scale * z / softcap)) elementwise, or the constant scale."""
        if self.softcap is None:
            return self.scale
        t = torch.tanh(z * (self.scale / self.softcap))
        return self.scale * (1 - t * t)


def _check_positive(x, name: str) -> None:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {x!r}")


def _text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "get_text_config"):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    return config.get_text_config()


def _scale(config) -> tuple[float, str | None, str]:
    """(scale, the field it came from or None, where it enters: "logits" or "hidden")."""
    model_type = getattr(config, "model_type", "")
    found = []
    for name, (where, multiplies) in _SCALE_FIELDS.items():
        value = getattr(config, name, None)
        if value is None or (model_type, name) in _IGNORED:
            continue
        _check_positive(value, f"{type(config).__name__}.{name}")
        multiplies = multiplies or (model_type, name) in _MULTIPLIES
        where = "hidden" if (model_type, name) in _SCALES_HIDDEN else where
        found.append((float(value) if multiplies else 1.0 / float(value), name, where))
    base = getattr(config, "dim_model_base", None)
    if base is not None and not any(name == "logits_scaling" for _, name, _ in found):
        _check_positive(base, f"{type(config).__name__}.dim_model_base")
        found.append((float(base) / config.hidden_size, "dim_model_base", "hidden"))
    found = [f for f in found if f[0] != 1.0]
    if len(found) > 1:
        names = ", ".join(f"{name}={getattr(config, name)!r}" for _, name, _ in found)
        raise ValueError(f"{type(config).__name__} sets {names}: cannot tell how these combine into one logit scale")
    return found[0] if found else (1.0, None, "logits")


def _softcap(config) -> float | None:
    caps = [(name, getattr(config, name)) for name in _SOFTCAP_FIELDS if getattr(config, name, None) is not None]
    if len(caps) > 1:
        raise ValueError(f"{type(config).__name__} sets several logit softcaps: {caps}")
    if not caps:
        return None
    name, value = caps[0]
    _check_positive(value, f"{type(config).__name__}.{name}")
    return float(value)


def _refuse_unknown(config) -> None:
    """A config field that reads like a final-logit transform but is not in the table above."""
    known = set(_SCALE_FIELDS) | set(_SOFTCAP_FIELDS) | {"dim_model_base"}
    for name, value in config.to_dict().items():
        neutral = value is None or value is False or (type(value) in (int, float) and value == 1)
        if name in known or neutral or isinstance(value, (dict, list)):
            continue
        if _LOOKS_LIKE.search(name) and not _NOT_FINAL.search(name):
            raise ValueError(
                f"{type(config).__name__}.{name}={value!r} looks like a transform of the final logits that grpo_fast "
                "does not know; refusing rather than computing wrong log-probs"
            )


def check_head(head) -> None:
    """Refuse an LM head that computes more than hidden @ weight^T + bias (the engine reads weight and bias only)."""
    name = type(head).__name__
    if hasattr(head, "lora_A"):
        raise ValueError(f"the LM head is LoRA-wrapped ({name}): remove lm_head from the LoRA target_modules")
    if isinstance(head, torch.nn.Linear) and type(head).forward is not torch.nn.Linear.forward:
        raise ValueError(f"the LM head {name} computes more than hidden @ weight^T + bias; grpo_fast cannot fuse it")


def logit_transform(model_or_config) -> LogitTransform:
    """The LogitTransform of a transformers causal LM (a model, a peft wrapper around one, or its config).

    Raises ValueError naming the field for a transform it cannot express (module docstring).
    """
    model = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
    config = _text_config(model)
    scale, name, where = _scale(config)
    softcap = _softcap(config)
    _refuse_unknown(config)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        check_head(head)
        if where == "hidden" and getattr(head, "bias", None) is not None:
            raise ValueError(
                f"{type(config).__name__}.{name} scales the hidden states before a biased LM head: "
                "not a scale of the logits"
            )
    return LogitTransform(scale, softcap)
