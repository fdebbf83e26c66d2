"""Solutions of CH05_NB01's exercises."""

from utils import structure


def params_removed(model, keep):
    """3 x hidden per removed neuron (gate row, up row, down column), plus their biases, in every block."""
    removed = 0
    for mlp in structure.glu_mlps(model):
        n = mlp.gate_proj.out_features - keep
        per_neuron = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
        biases = (mlp.gate_proj.bias is not None) + (mlp.up_proj.bias is not None)
        removed += n * (per_neuron + biases)
    return removed


def width_for_expansion(hidden, expansion, divisor):
    """round(expansion x hidden), rounded down to a multiple of divisor."""
    return int(round(expansion * hidden)) // divisor * divisor
