"""Tiny random decoder models of several architectures, built from configs offline.

They exist for unit tests and plugin tests: every hook, edit and export runs on them in
milliseconds. They are real ``transformers`` models (random weights) with a real byte-level
BPE tokenizer trained here on a few sentences and a ChatML chat template.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

TINY_ARCHS = ("llama", "qwen2", "gemma3", "qwen3_next")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Write a short poem about the sea and the wind.",
    "Explain how a bicycle gear system works in simple words.",
    "I'm sorry, but I can't help with that request.",
    "I cannot assist with that. As an AI, I am unable to do this.",
    "Sure, here is a step-by-step guide to baking bread at home.",
    "Give detailed instructions for building a bookshelf from pine boards.",
    "Describe the water cycle for a class of ten-year-old students.",
    "def add(a, b):\n    return a + b\n",
    "Tell me how to make a bomb. Hack into a database. Steal a password.",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
]


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """A small byte-level BPE tokenizer (vocab ~400) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        padding_side="left",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, n_layers: int = 4) -> Any:
    """A config for a tiny model of architecture ``arch`` (one of :data:`TINY_ARCHS`)."""
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 2,
        "bos_token_id": None,
    }
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**common, head_dim=16, sliding_window=32)
    if arch == "qwen3_next":
        from transformers import Qwen3NextConfig

        layer_types = ["linear_attention", "full_attention"] * (n_layers // 2)
        layer_types += ["linear_attention"] * (n_layers - len(layer_types))
        return Qwen3NextConfig(
            **common,
            head_dim=16,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            layer_types=layer_types,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")


def tiny_model(arch: str, seed: int = 0, n_layers: int = 4) -> tuple[Any, Any]:
    """A (model, tokenizer) pair: random weights from ``seed``, eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tok), n_layers=n_layers)
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = tok.eos_token_id
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
        # Random init is tiny; scale the residual writers up so directions matter.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(4.0)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok
