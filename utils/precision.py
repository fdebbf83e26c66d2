"""One precision-and-device policy for the whole course.

Which dtype a model is loaded in, which dtype training computes in, and whether the loss needs scaling
all follow from two facts about the hardware: is there a CUDA GPU, and does it do bfloat16 natively?

=============================  =================  ====================  ===========
hardware                       load dtype         training computes in  GradScaler
=============================  =================  ====================  ===========
CPU                            float32            float32               no
GPU with native bfloat16       bfloat16           bfloat16              no
GPU without (a Colab T4)       float16            float16               yes
  ... Gemma 3 on that GPU      float32            float32               no
=============================  =================  ====================  ===========

Gemma 3's activations overflow float16, so on a T4 it stays in float32. ``torch.cuda.is_bf16_supported()``
answers True on a T4 because PyTorch can *emulate* bfloat16 there (slowly); the policy asks for native
support only (``including_emulation=False``).

The hardware can be simulated: ``RLLM_HARDWARE=t4`` makes a CPU take every decision a free Colab T4 would
take (half-precision models, float16 autocast, a GradScaler), while the tensors stay on the CPU. That is
what ``make rehearse`` runs every notebook under, so a cell that only works in float32 fails here before it
fails on Colab.

    from utils import precision
    policy = precision.precision_policy()
    policy.load_dtype("llama")              # torch.float16 on a T4
    batch = precision.to_device(batch, model)
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

#: Environment variable that overrides the detected hardware: ``auto`` (default), ``cpu`` or ``t4``.
HARDWARE_ENV = "RLLM_HARDWARE"
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Hardware:
    """What the precision policy needs to know about a machine.

    Attributes:
        name: for printing, e.g. ``"Tesla T4"``.
        cuda: decisions are made as for a CUDA GPU.
        native_bf16: the GPU computes in bfloat16 natively (Ampere and later; not a T4).
        simulated: the decisions are a T4's whatever the machine: the tensors stay on a CPU, or go to
            another GPU (a rehearsal of Colab on, say, an H100).
    """

    name: str
    cuda: bool
    native_bf16: bool
    simulated: bool = False


#: A CPU with no GPU.
CPU = Hardware("CPU", cuda=False, native_bf16=False)
#: A free Colab T4's decisions (``RLLM_HARDWARE=t4``): on a CPU the tensors stay there; on another GPU
#: (``scripts/rehearse_cuda.sh``) they go to it, with the T4's dtypes.
SIMULATED_T4 = Hardware("Tesla T4 (simulated)", cuda=True, native_bf16=False, simulated=True)
_NAMED = {"cpu": CPU, "t4": SIMULATED_T4}


def detect_hardware() -> Hardware:
    """The hardware the policy decides for: ``RLLM_HARDWARE`` if set, else what PyTorch sees.

    Raises:
        ValueError: ``RLLM_HARDWARE`` holds something other than ``auto``, ``cpu`` or ``t4``.
    """
    raw = os.environ.get(HARDWARE_ENV, "")
    value = raw.strip().lower() or "auto"
    if value in _NAMED:
        return _NAMED[value]
    if value != "auto":
        raise ValueError(f"{HARDWARE_ENV}={raw!r} is not known. Use auto (what PyTorch sees), cpu, or t4 (a free "
                         "Colab T4 simulated on the CPU: half-precision models, float16 training with loss scaling).")
    if not torch.cuda.is_available():
        return CPU
    return Hardware(torch.cuda.get_device_name(), cuda=True,
                    native_bf16=torch.cuda.is_bf16_supported(including_emulation=False))


def _is_gemma(model_type: str | None) -> bool:
    return bool(model_type) and str(model_type).startswith("gemma")


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtype decisions for one :class:`Hardware` (build it with :func:`precision_policy`)."""

    hardware: Hardware

    @property
    def simulated(self) -> bool:
        return self.hardware.simulated

    def on(self, device: torch.device | str) -> PrecisionPolicy:
        """The policy for tensors on ``device``: a CPU's, unless the device is a GPU or the hardware is
        simulated (a simulated T4 keeps the T4's decisions for tensors on the CPU)."""
        if torch.device(device).type == "cuda" or self.simulated:
            return self
        return PrecisionPolicy(CPU)

    def load_dtype(self, model_type: str | None = None) -> torch.dtype:
        """The dtype to load a model of ``model_type`` (``config.model_type``, e.g. ``"llama"``) in."""
        if not self.hardware.cuda:
            return torch.float32
        if self.hardware.native_bf16:
            return torch.bfloat16
        return torch.float32 if _is_gemma(model_type) else torch.float16

    def compute_dtype(self, model_type: str | None = None) -> torch.dtype:
        """The dtype matrix products run in (bitsandbytes' ``bnb_4bit_compute_dtype``, autocast)."""
        return self.load_dtype(model_type)

    def autocast_dtype(self, param_dtype: torch.dtype, model_type: str | None = None) -> torch.dtype | None:
        """The autocast dtype for training a model whose weights are ``param_dtype``; None for none.

        A half-precision model computes in its own dtype; a float32 model is autocast to the
        hardware's half dtype on a GPU (not for Gemma), and runs in float32 on a CPU.
        """
        if param_dtype in HALF_DTYPES:
            return param_dtype
        if not self.hardware.cuda:
            return None  # a float32 model on a CPU: no autocast
        return None if self.load_dtype(model_type) == torch.float32 else self.load_dtype(model_type)

    @staticmethod
    def needs_grad_scaler(autocast_dtype: torch.dtype | None) -> bool:
        """float16 gradients underflow without loss scaling; bfloat16 and float32 ones do not."""
        return autocast_dtype == torch.float16

    def describe(self) -> str:
        """One line for the top of a notebook: the hardware and what it gets."""
        return (f"{self.hardware.name}: models load in {_name(self.load_dtype())} "
                f"(Gemma 3 in {_name(self.load_dtype('gemma3'))}); training "
                + ("keeps float32 master weights, with loss scaling"
                   if self.needs_grad_scaler(self.autocast_dtype(self.load_dtype()))
                   else "runs in " + _name(self.load_dtype())))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def precision_policy(hardware: Hardware | None = None) -> PrecisionPolicy:
    """The policy for ``hardware`` (default: :func:`detect_hardware`)."""
    if hardware is not None and not isinstance(hardware, Hardware):
        raise TypeError(f"hardware must be a utils.precision.Hardware (e.g. precision.SIMULATED_T4), got "
                        f"{type(hardware).__name__}.")
    return PrecisionPolicy(hardware or detect_hardware())


def default_device() -> str:
    """``"cuda"`` when a GPU is present, else ``"cpu"`` (a simulated T4 stays on the CPU)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def free_memory() -> int | None:
    """Hand back the memory of objects no longer referenced: ``gc.collect()``, then, on a GPU,
    ``torch.cuda.empty_cache()``. Call it after ``del``-ing a model copy, before building the next one.

    ``del`` alone can leave a model alive (reference cycles wait for the collector), and a GPU's caching
    allocator keeps freed blocks for itself; a notebook that holds two 3B models on a T4 cannot afford either.

    Returns the bytes of CUDA memory still allocated to tensors afterwards, or ``None`` without CUDA.
    """
    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (where its inputs must go)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"device_of expects a torch.nn.Module, got {type(model).__name__}.")
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter (float32 when it has none)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"dtype_of expects a torch.nn.Module, got {type(model).__name__}.")
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def to_device(batch, target: torch.nn.Module | torch.device | str):
    """``batch`` with every tensor moved to ``target`` (a model: its device), structure kept.

    Takes a tensor, a dict or ``BatchEncoding`` (a plain dict comes back), a list or a tuple of them;
    anything else is returned as it is. Token ids and masks keep their dtype.
    """
    device = device_of(target) if isinstance(target, torch.nn.Module) else torch.device(target)
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch
