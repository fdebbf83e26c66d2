"""Solutions of CH03_NB01's exercises."""


def mlp_params(spec):
    """gate, up and down: 3 x hidden x intermediate per block."""
    return 3 * spec.hidden_size * spec.intermediate_size * spec.num_layers


def attention_params(spec):
    """q and o: hidden x heads x head_dim each; k and v: hidden x kv_heads x head_dim each; per block."""
    q_and_o = 2 * spec.hidden_size * spec.num_heads * spec.head_dim
    k_and_v = 2 * spec.hidden_size * spec.num_kv_heads * spec.head_dim
    return (q_and_o + k_and_v) * spec.num_layers
