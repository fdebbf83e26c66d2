"""Weight quantisation from scratch (CH07): int absmax, NF4 and FP4, per tensor or per block.

Every format here works the same way. A weight tensor is flattened and cut into blocks of
``block_size`` values (or kept whole: ``block_size=None``, "per tensor"). Each block is divided
by its absolute maximum (its *absmax*, one float per block), which puts its values in [-1, 1],
and every value is replaced by the index of the nearest entry of a short, sorted table of
*levels* in [-1, 1]. De-quantising looks the index up in the table and multiplies by the
block's absmax. The formats differ only in the table:

``int`` (``bits`` = 2..8)
    Evenly spaced, symmetric: ``k / (2**(bits-1) - 1)`` for ``k = -(2**(bits-1)-1) .. 2**(bits-1)-1``
    (int8: 255 levels, int4: 15 levels; the most negative code of two's complement is unused).
``nf4``
    NormalFloat-4 (Dettmers et al., 2023, *QLoRA*): levels at quantiles of a standard normal
    distribution, so that a normally distributed block fills each level about equally. See
    :func:`nf4_levels`.
``fp4``
    A 4-bit float with 1 sign, 2 exponent and 1 mantissa bit (E2M1, the element format of the
    OCP Microscaling (MX) specification): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, divided by 6 so
    that the largest is 1. bitsandbytes' ``fp4`` uses the same grid except for its smallest
    non-zero magnitude (0.0625/12 instead of 0.5/6).

Storage cost is counted by :func:`bits_per_parameter`, which also covers QLoRA's *double
quantisation* (the per-block absmax constants themselves quantised to 8 bits).

Real 4-bit models (bitsandbytes, QLoRA) are loaded with :func:`load_4bit_model`, which works around
bitsandbytes' CPU limits so that the same code runs on every CPU, with or without AVX512-BF16: see
:func:`bnb_cpu_packing_fits` and :func:`bnb_cpu_dequantize_fits`.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

KINDS: tuple[str, ...] = ("nf4", "fp4", "int")
INT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)

#: Probability of the largest NF4 level: the midpoint of 1 - 1/(2*15) and 1 - 1/(2*16), the two
#: natural choices for the outermost quantile of a 15- and a 16-level table (QLoRA appendix; the
#: value bitsandbytes uses). Using it instead of 1.0 keeps the largest quantile finite.
NF4_OFFSET = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))

#: Double quantisation (QLoRA): the absmax constants are stored as 8-bit codes in blocks of 256,
#: with one 32-bit constant per block of constants.
DQ_BITS = 8
DQ_BLOCK_SIZE = 256

BITSANDBYTES_HINT = ("bitsandbytes is not installed, so the comparison with its tables is skipped. It is optional "
                     "(CH07 only): `pip install 'bitsandbytes>=0.50'` (it runs on CPU as well as on a GPU).")

#: bitsandbytes' packed CPU layout groups a 4-bit weight's output rows by this many (``block_n`` of its
#: ``_convert_weight_packed_for_cpu``, bitsandbytes 0.50).
BNB_CPU_BLOCK_N = 32
#: The block size of bitsandbytes' 4-bit formats as transformers loads them (one absmax per 64 weights).
BNB_BLOCKSIZE = 64


# --- level tables --------------------------------------------------------------------------------

def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat-4 levels of QLoRA, sorted, from -1 to 1 (float32).

    How they are built: NF4 wants each level to be hit equally often by normally distributed
    weights, so the levels are *quantiles* of the standard normal N(0, 1). An exact zero is
    wanted too (padding and zero weights stay exact), which a symmetric 16-level table cannot
    have, so the table is asymmetric: 8 positive levels, 7 negative ones and 0.

    - positive side: the normal quantiles at 9 probabilities evenly spaced from 0.5 to
      :data:`NF4_OFFSET` (about 0.968), dropping the one at 0.5 (it is 0) -> 8 values;
    - negative side: minus the quantiles at 8 probabilities evenly spaced from 0.5 to
      :data:`NF4_OFFSET`, dropping the one at 0.5 -> 7 values;
    - add 0, and divide everything by the largest value so that the table spans [-1, 1].

    The quantile function is ``torch.special.ndtri`` (inverse of the normal CDF), computed in
    float64. The result matches the table printed in the QLoRA paper's appendix and used by
    bitsandbytes (see :func:`bitsandbytes_levels`).
    """
    quantile = torch.special.ndtri
    positive = quantile(torch.linspace(0.5, NF4_OFFSET, 9, dtype=torch.float64)[1:])
    negative = -quantile(torch.linspace(0.5, NF4_OFFSET, 8, dtype=torch.float64)[1:])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


def fp4_levels() -> torch.Tensor:
    """The 15 distinct E2M1 4-bit float values, sorted, scaled to [-1, 1] (float32).

    E2M1: 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit. Exponent 0 is subnormal
    (0 and 0.5); the others give 1, 1.5, 2, 3, 4, 6. With the sign that is 16 codes, of which
    +0 and -0 are the same value, hence 15 levels. Divided by 6 so that the largest is 1.
    """
    magnitudes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    values = sorted({sign * m / 6.0 for m in magnitudes for sign in (1.0, -1.0)})
    return torch.tensor(values, dtype=torch.float32)


def int_levels(bits: int = 8) -> torch.Tensor:
    """Symmetric absmax integer levels ``k / (2**(bits-1) - 1)`` for ``bits`` in 2..8 (float32)."""
    _check_kind_bits("int", bits)
    top = 2 ** (bits - 1) - 1
    return torch.arange(-top, top + 1, dtype=torch.float32) / top


def quantization_levels(kind: str = "nf4", bits: int = 4) -> torch.Tensor:
    """The sorted table of levels in [-1, 1] of a format: ``"nf4"``, ``"fp4"`` or ``"int"`` with ``bits``."""
    kind = _check_kind_bits(kind, bits)
    if kind == "int":
        return int_levels(bits)
    return nf4_levels() if kind == "nf4" else fp4_levels()


def bitsandbytes_levels(kind: str = "nf4") -> torch.Tensor | None:
    """bitsandbytes' own 16-entry code table for ``"nf4"`` or ``"fp4"``, or ``None`` (with a note).

    bitsandbytes is optional: when it cannot be imported, a line saying how to install it is
    printed and ``None`` is returned, so a notebook can skip the comparison instead of failing.
    Note that its ``fp4`` table differs from :func:`fp4_levels` in its smallest magnitude.
    """
    if kind not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes has 4-bit tables for 'nf4' and 'fp4' only, not {kind!r}.")
    try:
        from bitsandbytes.functional import get_4bit_type
    except ImportError:  # also catches a broken install that fails while importing
        print(BITSANDBYTES_HINT)
        return None
    return get_4bit_type(kind, device="cpu").float().sort().values


# --- quantise / de-quantise ----------------------------------------------------------------------

@dataclass
class QuantizedTensor:
    """A tensor stored as level indices plus one absmax constant per block.

    Attributes:
        codes: ``uint8`` indices into ``levels``, flattened and padded to whole blocks.
        absmax: float32, one per block (``None`` when double quantisation stores them instead
            in ``absmax_quantized`` + ``absmax_offset``).
        levels: the format's table (see :func:`quantization_levels`).
        shape, dtype: of the original tensor, restored by :func:`dequantize_blockwise`.
        kind, bits, block_size: the format (``block_size=None``: one block for the whole tensor).
    """

    codes: torch.Tensor
    absmax: torch.Tensor | None
    levels: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    kind: str
    bits: int
    block_size: int | None
    absmax_quantized: QuantizedTensor | None = None
    absmax_offset: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax_quantized is not None

    def block_absmax(self) -> torch.Tensor:
        """The absmax of each block as used for de-quantising (after double quantisation, if any)."""
        if self.absmax_quantized is None:
            return self.absmax
        return dequantize_blockwise(self.absmax_quantized) + self.absmax_offset

    def bits_per_parameter(self) -> float:
        """Storage cost of this tensor in bits per original value (see :func:`bits_per_parameter`)."""
        return bits_per_parameter(self.bits, self.block_size, double_quant=self.double_quant, numel=self.numel)


def _check_kind_bits(kind, bits) -> str:
    if not isinstance(kind, str) or kind.lower() not in KINDS:
        raise ValueError(f"kind={kind!r} is not a known format; use one of {', '.join(map(repr, KINDS))} "
                         "(for int8 or int4 write kind='int', bits=8 or bits=4).")
    kind = kind.lower()
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an int, got {bits!r}.")
    if kind in ("nf4", "fp4") and bits != 4:
        raise ValueError(f"{kind} is a 4-bit format: use bits=4 (or kind='int' for {bits} bits).")
    if kind == "int" and bits not in INT_BITS:
        raise ValueError(f"kind='int' supports bits from {INT_BITS[0]} to {INT_BITS[-1]}, got {bits}.")
    return kind


def _check_block_size(block_size) -> None:
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int (e.g. 64), or None for one block per tensor; "
                         f"got {block_size!r}.")


def _check_tensor(w, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (e.g. layer.weight.data), got {type(w).__name__}.")
    if not w.is_floating_point():
        raise TypeError(f"{name} must hold floating-point values, got dtype {w.dtype}.")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty: there is nothing to quantise.")


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every value of ``x`` (``levels`` sorted)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, midpoints)


def quantize_blockwise(w: torch.Tensor, kind: str = "nf4", bits: int = 4, block_size: int | None = 64, *,
                       double_quant: bool = False) -> QuantizedTensor:
    """Quantise ``w`` to ``kind`` ("nf4", "fp4" or "int") with one absmax per block of ``block_size`` values.

    Args:
        w: a floating-point tensor of any shape (flattened in row-major order, so a block of 64
            covers 64 consecutive inputs of one output row of a Linear weight when the row is
            long enough).
        kind: ``"nf4"`` and ``"fp4"`` need ``bits=4``; ``"int"`` takes ``bits`` from 2 to 8.
        block_size: values sharing one absmax; ``None`` = per tensor (a single absmax).
        double_quant: also quantise the absmax constants (QLoRA's double quantisation):
            subtract their mean, then store them as int8 absmax codes in blocks of 256 (the
            paper and bitsandbytes use an 8-bit float code for this step; the storage cost is
            the same).

    Returns:
        a :class:`QuantizedTensor`; :func:`dequantize_blockwise` turns it back into a tensor.

    Blocks that are all zero get an absmax of 0 and de-quantise to zeros.
    """
    _check_tensor(w)
    kind = _check_kind_bits(kind, bits)
    _check_block_size(block_size)
    levels = quantization_levels(kind, bits).to(w.device)
    flat = w.detach().reshape(-1).float()
    size = flat.numel() if block_size is None else block_size
    pad = (-flat.numel()) % size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    codes = _nearest(scaled, levels).to(torch.uint8).reshape(-1)
    q = QuantizedTensor(codes=codes, absmax=absmax, levels=levels, shape=w.shape, dtype=w.dtype, kind=kind,
                        bits=bits, block_size=block_size)
    if double_quant:
        offset = absmax.mean()
        q.absmax_quantized = quantize_blockwise(absmax - offset, "int", DQ_BITS, DQ_BLOCK_SIZE)
        q.absmax_offset = float(offset)
        q.absmax = None
    return q


def dequantize_blockwise(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor that ``q`` stands for: ``levels[codes] * absmax`` per block, original shape.

    ``dtype`` defaults to the dtype of the tensor that was quantised.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize_blockwise expects what quantize_blockwise returned, got {type(q).__name__}.")
    absmax = q.block_absmax()
    values = q.levels[q.codes.long()].view(absmax.numel(), -1) * absmax.unsqueeze(1)
    return values.reshape(-1)[: q.numel].reshape(q.shape).to(dtype or q.dtype)


def quantization_error(original: torch.Tensor, quantized: torch.Tensor | QuantizedTensor) -> dict[str, float]:
    """How far a quantised tensor is from the original.

    ``quantized`` is either a :class:`QuantizedTensor` or an already de-quantised tensor of the
    same shape. Returns ``mse`` (mean squared error), ``mean_abs`` and ``max_abs`` (absolute
    errors), ``relative`` (``||w - q|| / ||w||``, Frobenius norms) and ``sqnr_db`` (signal to
    quantisation-noise ratio, ``10 log10(||w||^2 / ||w - q||^2)``; infinite when exact).
    """
    _check_tensor(original, "original")
    if isinstance(quantized, QuantizedTensor):
        quantized = dequantize_blockwise(quantized)
    _check_tensor(quantized, "quantized")
    if quantized.shape != original.shape:
        raise ValueError(f"Shapes differ: original {tuple(original.shape)} vs quantized {tuple(quantized.shape)}.")
    w = original.detach().double()
    err = w - quantized.detach().double().to(w.device)
    sq_err, sq_w = float(err.pow(2).sum()), float(w.pow(2).sum())
    return {
        "mse": sq_err / w.numel(),
        "mean_abs": float(err.abs().mean()),
        "max_abs": float(err.abs().max()),
        "relative": math.sqrt(sq_err / sq_w) if sq_w > 0 else (0.0 if sq_err == 0 else math.inf),
        "sqnr_db": 10 * math.log10(sq_w / sq_err) if sq_err > 0 else math.inf,
    }


def bits_per_parameter(bits: int = 4, block_size: int | None = 64, *, double_quant: bool = False,
                       absmax_bits: int = 32, numel: int | None = None) -> float:
    """Storage cost in bits per weight of a blockwise format, constants included.

    Without double quantisation every block of ``block_size`` weights stores one
    ``absmax_bits``-bit constant (float32)::

        bits + absmax_bits / block_size                       # NF4, block 64: 4 + 32/64 = 4.5

    With double quantisation (Dettmers et al., 2023, QLoRA §3) the constants are stored as 8-bit
    codes, and every block of 256 constants adds one 32-bit constant of its own::

        bits + 8 / block_size + absmax_bits / (block_size * 256)   # NF4, block 64: 4.127

    Args:
        bits: bits per weight code (4 for NF4/FP4, 8 for int8...).
        block_size: weights per constant; ``None`` = one constant per tensor (needs ``numel``).
        double_quant: count the constants as double-quantised.
        absmax_bits: width of a full-precision constant (32 for float32, 16 for float16).
        numel: number of weights in the tensor. When given, the count is exact for that tensor
            (whole blocks, padding included, plus the one 32-bit mean that double quantisation
            subtracts from the constants); when ``None``, the large-tensor limit above.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
        raise ValueError(f"bits must be a positive int, got {bits!r}.")
    _check_block_size(block_size)
    if numel is not None and (isinstance(numel, bool) or not isinstance(numel, int) or numel <= 0):
        raise ValueError(f"numel must be a positive int (the tensor's number of values), got {numel!r}.")
    if block_size is None:
        if numel is None:
            raise ValueError("block_size=None means one constant for the whole tensor: pass numel=w.numel() "
                             "so that its share can be counted.")
        block_size = numel
    if numel is None:
        if not double_quant:
            return bits + absmax_bits / block_size
        return bits + DQ_BITS / block_size + absmax_bits / (block_size * DQ_BLOCK_SIZE)
    n_blocks = math.ceil(numel / block_size)
    total = n_blocks * block_size * bits
    if double_quant:
        total += n_blocks * DQ_BITS + math.ceil(n_blocks / DQ_BLOCK_SIZE) * 32 + 32
    else:
        total += n_blocks * absmax_bits
    return total / numel


# --- whole models ---------------------------------------------------------------------------------

def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(s in parts or name == s for s in skip)


def fake_quantize_model(model: nn.Module, kind: str = "nf4", bits: int = 4, block_size: int | None = 64, *,
                        double_quant: bool = False, skip: tuple[str, ...] | list[str] = ("lm_head",),
                        inplace: bool = False) -> nn.Module:
    """A model whose ``nn.Linear`` weights are replaced by their quantised-then-de-quantised values.

    "Fake" quantisation: the weights keep their dtype and the model runs as before, but every
    value is one that the format can represent, so the model's quality (e.g. perplexity) is that
    of the quantised model. Real 4-bit inference (bitsandbytes) stores the codes and de-quantises
    on the fly, with the same values.

    Args:
        model: any ``nn.Module``; only ``nn.Linear`` weights change (biases stay as they are).
        kind, bits, block_size, double_quant: the format (see :func:`quantize_blockwise`).
        skip: Linear modules whose dotted name contains one of these parts are left in full
            precision. Default ``("lm_head",)``: the output projection stays, as in the usual
            4-bit setups (bitsandbytes via transformers). Embeddings (``nn.Embedding``) are never
            touched: they are not Linear layers — and a tied ``lm_head`` shares their weight.
        inplace: ``False`` (default) works on a deep copy and leaves ``model`` unchanged;
            ``True`` overwrites ``model``'s weights (saves memory) and returns it.

    Returns:
        the fake-quantised model (a copy unless ``inplace``). Its attribute
        ``fake_quantized`` lists the names of the Linear layers that were changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fake_quantize_model expects a torch.nn.Module, got {type(model).__name__}.")
    kind = _check_kind_bits(kind, bits)
    _check_block_size(block_size)
    if isinstance(skip, str):
        skip = (skip,)
    target = model if inplace else copy.deepcopy(model)
    changed = []
    with torch.no_grad():
        for name, module in target.named_modules():
            if isinstance(module, nn.Linear) and not _skipped(name, tuple(skip)):
                q = quantize_blockwise(module.weight, kind, bits, block_size, double_quant=double_quant)
                module.weight.copy_(dequantize_blockwise(q))
                changed.append(name)
    if not changed:
        raise ValueError("No nn.Linear layer was quantised: the model has none, or `skip` excludes them all.")
    target.fake_quantized = changed
    return target


# --- real 4-bit models (bitsandbytes) ------------------------------------------------------------

def bnb_cpu_packed_path_available() -> bool:
    """Whether bitsandbytes takes its packed CPU path on this machine (False without bitsandbytes).

    bitsandbytes >= 0.50 runs 4-bit layers on a CPU two ways. Every CPU can de-quantise the weight and
    multiply (the generic path). On a CPU with AVX512-BF16 (recent Intel Xeon, AMD Zen 4 and later), a
    ``Linear4bit`` layer used for inference (``eval()`` mode, no gradient) first repacks its weight, once,
    into the layout of a fused bfloat16 kernel. That repacking accepts only some shapes: see
    :func:`bnb_cpu_packing_fits`.
    """
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def _check_features(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")


def bnb_cpu_packing_fits(out_features: int, in_features: int, blocksize: int = BNB_BLOCKSIZE) -> bool:
    """Whether bitsandbytes' packed CPU layout (CPUs with AVX512-BF16) can hold a 4-bit weight of this shape.

    The repacking (``bitsandbytes.functional._convert_weight_packed_for_cpu``, 0.50) groups output rows
    by :data:`BNB_CPU_BLOCK_N` and asserts ``N must be divisible by block_n`` otherwise; it also lays the
    scales out as ``in_features / blocksize`` per output row. So it needs ``out_features`` divisible by
    32 and ``in_features`` divisible by ``blocksize``. It checks neither before the layer's first
    inference call. Real models fit (SmolLM2-135M: 576, 192 and 1536 features); the ``tiny`` profile's
    models do not (a key projection of 16 outputs, an MLP of 176).
    """
    _check_features(out_features=out_features, in_features=in_features, blocksize=blocksize)
    return out_features % BNB_CPU_BLOCK_N == 0 and in_features % blocksize == 0


def bnb_cpu_dequantize_fits(in_features: int, blocksize: int = BNB_BLOCKSIZE) -> bool:
    """Whether bitsandbytes' CPU de-quantisation gives the right values for layers with ``in_features`` inputs.

    Its native CPU kernel (0.50, AVX512 build) de-quantises a weight row by row and assumes that every row
    holds whole blocks (``in_features / blocksize`` scales per row). When ``in_features`` is not a multiple
    of ``blocksize`` the blocks straddle rows and the kernel applies the wrong scales (it silently returns
    weights several times further from the original than NF4's own error). Real models fit; the ``tiny``
    profile's ``down_proj`` (176 inputs) does not.
    """
    _check_features(in_features=in_features, blocksize=blocksize)
    return in_features % blocksize == 0


def keep_bnb_cpu_packing_safe(model: nn.Module) -> list[str]:
    """Switch bitsandbytes' packed CPU path off on the 4-bit layers of ``model`` that it cannot take.

    A ``bitsandbytes.nn.Linear4bit`` decides when it is built whether to use the packed path (its
    ``support_avx512bf16_for_cpu`` attribute, True on CPUs with AVX512-BF16) and repacks its weight at
    its first inference call on a CPU without checking the shape; on a layer that
    :func:`bnb_cpu_packing_fits` rejects, that raises ``AssertionError: N must be divisible by block_n``.
    Turning the attribute off on those layers keeps them on the generic path, which every CPU runs, with
    the same weights; layers that fit keep the faster packed path. Nothing changes on a CPU without
    AVX512-BF16, or for layers on a GPU.

    Returns:
        the names of the layers switched to the generic path (empty when none needed it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"keep_bnb_cpu_packing_safe expects a torch.nn.Module, got {type(model).__name__}.")
    switched = []
    for name, module in model.named_modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            continue  # already packed, so it fitted
        blocksize = getattr(state, "blocksize", None) or BNB_BLOCKSIZE
        if not bnb_cpu_packing_fits(module.out_features, module.in_features, blocksize):
            module.support_avx512bf16_for_cpu = False
            switched.append(name)
    return switched


def _modules_kept_in_float(path, on_cpu: bool) -> tuple[list[str], list[str]]:
    """(modules transformers keeps unquantised by default, Linear layers bitsandbytes' CPU kernels de-quantise
    wrongly): read from the model's config on the meta device, without loading any weight."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    defaults = get_keys_to_not_convert(skeleton)
    misfits = [name for name, module in skeleton.named_modules()
               if on_cpu and isinstance(module, nn.Linear) and name not in defaults
               and not bnb_cpu_dequantize_fits(module.in_features)]
    return defaults, misfits


def load_4bit_model(path: str | os.PathLike, *, compute_dtype: torch.dtype | None = None, quant_type: str = "nf4",
                    double_quant: bool = True, dtype: torch.dtype = torch.float32,
                    device: str | torch.device | None = None, cpu_packing: bool = False) -> nn.Module:
    """A causal LM saved in ``path`` (``save_pretrained``), loaded with 4-bit weights by bitsandbytes (QLoRA).

    Every ``nn.Linear`` but the output layer becomes a ``bitsandbytes.nn.Linear4bit`` that stores NF4 (or
    FP4) codes with one absmax per block of 64 weights (double-quantised to 8 bits when ``double_quant``)
    and de-quantises on the fly to compute in ``compute_dtype``. Works on a GPU and, with
    bitsandbytes >= 0.50, on any CPU, with or without AVX512-BF16:

    - bitsandbytes' packed CPU path (CPUs with AVX512-BF16 only, see :func:`bnb_cpu_packed_path_available`)
      is off unless ``cpu_packing=True``, so every CPU computes the same numbers the same way. With
      ``cpu_packing=True``, layers it cannot take stay on the generic path
      (:func:`keep_bnb_cpu_packing_safe`) instead of failing at their first inference call;
    - on a CPU, layers whose input size is not a multiple of 64 stay in ``dtype``, unquantised, because
      bitsandbytes' CPU kernel de-quantises them wrongly (:func:`bnb_cpu_dequantize_fits`). Real models
      have none; the ``tiny`` profile's ``down_proj`` layers are such (a line says so). Their names are in
      the model's attribute ``kept_unquantized``.

    Args:
        path: a folder written by ``model.save_pretrained(path)``.
        compute_dtype: the dtype the matrix products run in. Default: the course's precision policy
            (:func:`utils.precision.precision_policy`), for the model's type: float32 on a CPU, bfloat16 on
            GPUs that have it natively, float16 on a T4.
        quant_type: ``"nf4"`` (QLoRA) or ``"fp4"``.
        double_quant: also quantise the absmax constants (QLoRA's double quantisation).
        dtype: the dtype of the modules that stay unquantised (embeddings, norms, ``lm_head``); float32
            keeps them stable in training, as the QLoRA recipe does.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... Default: CUDA when available.
        cpu_packing: let bitsandbytes repack layers for its faster bfloat16 CPU kernel at their first
            inference call. For inference only: in bitsandbytes 0.50 a packed layer passes no gradient
            back, so a model evaluated (``eval()``, ``no_grad``) and then trained would silently stop
            training every adapter below its last packed layer. Ignored on a GPU and on CPUs without
            AVX512-BF16.

    Raises:
        ImportError: bitsandbytes is not installed (the message says how to install it).
    """
    from .precision import default_device, precision_policy

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4' (bitsandbytes' 4-bit formats), got {quant_type!r}.")
    if not os.path.isdir(os.fspath(path)):
        raise ValueError(f"{os.fspath(path)!r} is not a folder: save the model first with "
                         "model.save_pretrained(folder).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError("load_4bit_model needs bitsandbytes: `pip install 'bitsandbytes>=0.50'` (it runs on CPU "
                          "as well as on a GPU).") from exc
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    target = torch.device(device or default_device())
    if compute_dtype is None:
        compute_dtype = precision_policy().compute_dtype(AutoConfig.from_pretrained(path).model_type)
    defaults, misfits = _modules_kept_in_float(path, on_cpu=target.type == "cpu")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                                llm_int8_skip_modules=[*defaults, *map(re.escape, misfits)])
    place = (target.index or 0) if target.type == "cuda" else str(target)  # device_map takes a GPU's index
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype,
                                                 device_map={"": place})
    if cpu_packing:
        keep_bnb_cpu_packing_safe(model)
    else:
        for module in model.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
    if misfits:
        print(f"load_4bit_model: {len(misfits)} linear layers have an input size that is not a multiple of "
              f"{BNB_BLOCKSIZE} ({misfits[0]}, ...): they stay in {str(dtype).replace('torch.', '')}, because "
              "bitsandbytes' CPU kernel de-quantises such layers wrongly. Real models have none.")
    model.kept_unquantized = misfits
    return model
