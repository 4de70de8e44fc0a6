"""GGUF files (llama.cpp, Ollama) as `--model`: a local `.gguf` loads through transformers' `gguf_file=` (the
`gguf` package reads it) as a dense, trainable model in the training dtype, with the tokenizer and chat
template the file carries.

Every weight is dequantized at load time (`GgufConfig(dequantize=True)` where transformers has it; older
versions always dequantize): training needs dense weights, and the packed GGUF matmul kernels that newer
transformers can keep are inference-only. A GGUF model loaded without that option is dense but marked
quantized (transformers 5.17 and 5.24), and `save_pretrained` refuses it; `make_trainable` checks that nothing
packed is left and removes any such mark, so checkpoints and `final/` hold an ordinary transformers model (full
fine-tuning) or a peft adapter whose `base_model_name_or_path` is the GGUF file (LoRA: load the base with
`gguf_file=`, then `PeftModel`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

# peft looks for a config.json at the adapter's base to tell whether the vocabulary was resized; a GGUF base has
# none (and nothing here resizes it), so its warning on every adapter save would say nothing.
warnings.filterwarnings("ignore", message=r"Could not find a config file in .*\.gguf", category=UserWarning)


def is_gguf(name: str) -> bool:
    return bool(name) and name.lower().endswith(".gguf")


def _path(name: str) -> Path:
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"model: no such GGUF file {name!r}")
    return path


def pretrained_args(name: str) -> tuple[str, dict]:
    """(`pretrained_model_name_or_path`, extra kwargs) for transformers' from_pretrained: the file's directory
    and `gguf_file=` for a .gguf path, else (name, {})."""
    if not is_gguf(name):
        return name, {}
    path = _path(name)
    return str(path.parent), {"gguf_file": str(path)}


def model_args(name: str) -> tuple[str, dict]:
    """pretrained_args for a model: a .gguf file loads dequantized."""
    where, kwargs = pretrained_args(name)
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers before GgufConfig: GGUF weights are always dequantized
        return where, kwargs
    return where, kwargs | ({"quantization_config": GgufConfig(dequantize=True)} if kwargs else {})


def _packed(model) -> list[str]:
    """Names of modules or parameters that are not dense floating-point: GGUF blocks kept packed."""
    modules = [n for n, m in model.named_modules() if "gguf" in type(m).__module__.lower()]
    return modules + [n for n, p in model.named_parameters() if not p.is_floating_point()]


def make_trainable(model, name: str):
    """Checks that the model loaded from GGUF file `name` is dense, removes transformers' quantized mark (so
    save_pretrained works and peft sees a plain model) and records the file as the model's source."""
    packed = _packed(model)
    if packed:
        raise ValueError(f"model: {name!r} loaded with packed GGUF weights that cannot be trained: {packed[:3]}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # drops hf_quantizer and config.quantization_config
    elif getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.name_or_path = model.config._name_or_path = str(_path(name))  # peft: the adapter's base_model_name_or_path
    return model
