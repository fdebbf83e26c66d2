"""Solutions of CH08_NB01's exercises."""

from utils import kv_cache


def kv_bytes(config, tokens, bytes_per_value):
    """2 (K and V) x layers x key/value heads x head_dim x bytes per value x tokens."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * bytes_per_value * tokens


def tokens_that_fit(model, gigabytes):
    """Whole tokens of KV cache in a budget of ``gigabytes`` (1 GB = 1e9 bytes)."""
    return int(gigabytes * 1e9 // kv_cache.kv_bytes_per_token(model))
