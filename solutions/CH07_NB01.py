"""Solutions of CH07_NB01's exercises."""

import torch


def int_quantize_blocks(w, bits, block_size):
    """Symmetric absmax int quantisation per block of `block_size` values; returns the restored weights."""
    levels = 2 ** (bits - 1) - 1
    flat = w.reshape(-1)
    pad = (-flat.numel()) % block_size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(blocks.dtype).tiny)
    codes = torch.round(blocks / absmax * levels)
    restored = (codes / levels * absmax).reshape(-1)[: flat.numel()]
    return restored.reshape(w.shape)


def bits_per_weight(bits, block_size, double_quant):
    """Bits a weight costs, its block's constant included (QLoRA's double quantisation optional)."""
    if double_quant:
        return bits + 8 / block_size + 32 / (block_size * 256)
    return bits + 32 / block_size
