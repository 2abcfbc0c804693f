"""Every RMSNorm of an engine's model on torch's fused kernel (``F.rms_norm``): one op where transformers' forward
takes six (a square, a mean, an add, a reciprocal square root and two products), each a pass over the rows, with the
same float32 result bit for bit. In full prefill at 4K (SmolLM2, alternating in one process) the norms took 68.5
against 85.0 ms; one call on a question's 13 rows 15 against 21 us.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

_FUSED: dict[type, type] = {}  # a norm class -> its subclass on the fused kernel
_install_lock = threading.Lock()  # engines built in threads on one model swap each norm once


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)


def _fused_class(cls: type) -> type:
    """``cls`` with its forward on the fused kernel: a subclass, so the module stays an instance of its own class."""
    fused = _FUSED.get(cls)
    if fused is None:
        fused = _FUSED[cls] = type(cls.__name__, (cls,), {"forward": _fused_forward, "__module__": __name__})
    return fused


def _computes_rms_norm(module: nn.Module) -> bool:
    """Whether ``module``'s own forward is the plain RMSNorm (weight * x / rms(x)), checked on a probe bit for bit.
    A variant (Gemma's 1 + weight, a norm in another dtype) differs on it and keeps its forward."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return False
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, weight.shape[0], generator=generator) * 3
    with torch.inference_mode():  # its class's forward alone: the module's hooks do not run on the probe
        return torch.equal(type(module).forward(module, probe), F.rms_norm(probe, (weight.shape[0],), weight, eps))


def install(model: nn.Module) -> None:
    """Every RMSNorm of ``model`` whose forward is the plain one runs the fused kernel. Its class is swapped in place
    for a subclass (parameters and hooks stay); installing twice changes nothing."""
    with _install_lock:
        for module in model.modules():
            cls = type(module)
            if cls.__name__.endswith("RMSNorm") and cls not in _FUSED.values() and _computes_rms_norm(module):
                module.__class__ = _fused_class(cls)
