"""Tiny models of the three attention families (Llama, Gemma 3, Qwen 3), shared by the attention and KV-cache
tests (the structure and depth tests add GPT-2); their fixtures (tokenizer, loader, prompt) are in tests/conftest.py."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from utils.architectures import tiny_config

FAMILIES = {
    "llama": "meta-llama/Llama-3.2-1B",
    "gemma3": "google/gemma-3-270m",
    "qwen3": "Qwen/Qwen3-0.6B",
}
# Gemma 3 gets a sliding window shorter than the test texts, so that sliding and full attention
# really differ and a cache entry of the wrong type would change the output.
OVERRIDES = {"gemma3": {"sliding_window": 6}}


def _config(family, tokenizer):
    config = tiny_config(FAMILIES[family], len(tokenizer), special_token_ids={
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id})
    for key, value in OVERRIDES.get(family, {}).items():
        setattr(config, key, value)
    return config


def _tiny(family, tokenizer):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(family, tokenizer)).eval()
