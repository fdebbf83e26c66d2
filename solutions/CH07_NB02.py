"""Solutions of CH07_NB02's exercises."""


def lora_params(config, rank, targets):
    """r x (in + out) for every targeted projection of every block."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    per_block = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    return per_block * config.num_hidden_layers


def rank1_forward(x, weight, bias, a, b, alpha):
    """x W^T + bias + alpha * (x . a) b: the base layer plus a rank-1 update scaled by alpha / 1."""
    return x @ weight.T + bias + alpha * (x @ a)[..., None] * b
