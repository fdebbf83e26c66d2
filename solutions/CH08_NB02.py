"""Solutions of CH08_NB02's exercises."""

from utils import structure


def attention_params_removed(model, blocks):
    """Every parameter of the attention modules of `blocks`, and of the norm(s) that only serve them."""
    layers = structure.decoder_blocks(model)
    total = 0
    for i in blocks:
        names = ["self_attn", "input_layernorm"]
        if hasattr(layers[i], "pre_feedforward_layernorm"):  # Gemma 3: a separate norm after the attention
            names.append("post_attention_layernorm")
        total += sum(p.numel() for name in names for p in getattr(layers[i], name).parameters())
    return total


def cut_cache_bytes(config, removed, tokens, bytes_per_value):
    """2 x attentions left x kv_heads x head_dim x bytes per value x tokens."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    left = config.num_hidden_layers - len(removed)
    return 2 * left * kv_heads * head_dim * bytes_per_value * tokens
