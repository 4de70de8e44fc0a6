"""Loading the policy: the embedded tiny model or a Hugging Face model (id, local path or GGUF file), LoRA
through peft, optional 4-bit base, gradient checkpointing; prompt encoding with the chat template."""

from __future__ import annotations

import copy
import importlib.util
from contextlib import nullcontext
from pathlib import Path

import torch

from . import gguf_models, tiny


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _check_model_dir(path: Path, name: str) -> None:
    """A local model directory holds a config and a tokenizer (save_pretrained of both): say which is missing."""
    if not path.is_dir():
        raise ValueError(f"model: no such local directory {name!r}")
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {name!r} has no config.json: not a directory written by save_pretrained")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(
            f"model: {name!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer there"
        )


def load_tokenizer(name: str):
    if not name:
        return tiny.build_tokenizer()
    from transformers import AutoTokenizer

    if _looks_local(name) and not gguf_models.is_gguf(name):
        _check_model_dir(Path(name).expanduser(), name)
    where, extra = gguf_models.pretrained_args(name)  # a .gguf file: checked there
    try:
        tok = AutoTokenizer.from_pretrained(where, **extra)
    except Exception as e:
        raise ValueError(f"model: cannot load a tokenizer from {name!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _hf_model(cfg, device: torch.device):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.bfloat16 if device.type == "cuda" and cfg.bf16 else torch.float32}
    # transformers' default attention (SDPA where the model supports it, else eager: GPT-OSS, Gemma 2); the engine
    # points the model at its own packed and cascade attention anyway (attention.py, cascade.py)
    gguf = gguf_models.is_gguf(cfg.model)
    if gguf and cfg.load_in_4bit:
        raise ValueError("load_in_4bit cannot be combined with a GGUF model (its weights are dequantized to train)")
    if cfg.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None or device.type != "cuda":
            raise ValueError("load_in_4bit needs bitsandbytes installed and a CUDA GPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        kwargs["device_map"] = {"": device.index or 0}
    where, extra = gguf_models.model_args(cfg.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs, **extra)
    except Exception as e:
        raise ValueError(f"model: cannot load {cfg.model!r}: {e}") from e
    if gguf:
        gguf_models.make_trainable(model, cfg.model)
    return model if cfg.load_in_4bit else model.to(device)


def load_policy(cfg, tokenizer, device: torch.device):
    """The trainable policy (a PeftModel with LoRA, or the full model) and its reference policy
    (None when beta == 0, the same model under `reference_context` with LoRA, a frozen copy otherwise)."""
    model = tiny.build_model(tokenizer, cfg.seed).to(device) if not cfg.model else _hf_model(cfg, device)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    ref = None
    if cfg.beta != 0:
        ref = model if cfg.lora else copy.deepcopy(model).eval().requires_grad_(False)
    return model, ref


def reference_context(model, ref):
    """Context under which `ref` computes reference log-probs: adapters disabled when ref is the policy."""
    return getattr(model, "policy", model).disable_adapter() if ref is model else nullcontext()  # fsdp2: a Runner


def max_positions(model) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None)


def check_positions(model, max_prompt_length: int, max_new_tokens: int) -> None:
    limit = max_positions(model)
    if limit is not None and max_prompt_length + max_new_tokens > limit:
        raise ValueError(
            f"max_prompt_length + max_new_tokens = {max_prompt_length + max_new_tokens} exceeds the "
            f"model's {limit} positions; lower max_prompt_length or max_new_tokens"
        )


def chat_messages(prompt) -> list[dict]:
    """The prompt as chat messages: a string is one user message; a list must hold dicts with `role` and
    `content` strings. Anything else is refused: a chat template would render None as "None" and a message
    without `content` as an empty turn, silently training on other text."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    ok = lambda m: isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)  # noqa: E731
    if isinstance(prompt, list) and prompt and all(ok(m) for m in prompt):
        return list(prompt)
    text = repr(prompt) if len(repr(prompt)) <= 80 else repr(prompt)[:77] + "..."
    raise ValueError(
        f"prompt must be a string or a non-empty list of {{'role': str, 'content': str}} messages, got {text}"
    )


def encode_prompt(tokenizer, prompt, system_prompt: str | None, max_length: int) -> list[int]:
    """Token ids of one prompt (text or chat messages, see chat_messages), chat template applied when the
    tokenizer has one; longer prompts keep their last `max_length` tokens."""
    messages = chat_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        if system_prompt:
            raise ValueError("system_prompt needs a tokenizer with a chat template; this one has none")
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in messages)
        ids = tokenizer(text).input_ids
    if not ids:
        raise ValueError(f"prompt encodes to no tokens: {prompt!r}")
    return ids[-max_length:]
