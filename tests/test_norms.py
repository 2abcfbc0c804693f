"""RMSNorm on torch's fused kernel (engine/norms.py): every plain RMSNorm of every supported family swapped, the same
result bit for bit, a variant left alone."""

import torch
from torch import nn

from infoflow_rag.engine import norms


def _rms_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def test_every_rms_norm_of_every_family_runs_fused_with_the_same_result(family_engine):
    found = _rms_norms(family_engine.model)
    assert len(found) >= 2 * family_engine.num_layers + 1  # two a layer and the final one (Qwen3: q/k norms too)
    torch.manual_seed(0)
    for module in found:
        (original,) = type(module).__bases__  # the model's own class, which the fused one subclasses
        assert original.__module__.startswith("transformers.models.") and type(module).forward is norms._fused_forward
        x = torch.randn(2, 5, module.weight.shape[0]) * 4
        with torch.inference_mode():
            assert torch.equal(module(x), original.forward(module, x))


class _OnePlusWeightRMSNorm(nn.Module):
    """Gemma's form: x / rms(x) * (1 + weight), which the fused kernel does not compute."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1.0 + self.weight)


def test_a_variant_keeps_its_forward_and_installing_twice_changes_nothing(family_engine):
    variant = _OnePlusWeightRMSNorm(8)
    norms.install(variant)
    assert type(variant) is _OnePlusWeightRMSNorm
    before = [type(m) for m in _rms_norms(family_engine.model)]
    norms.install(family_engine.model)
    assert [type(m) for m in _rms_norms(family_engine.model)] == before
    assert all(cls.__bases__[0].__module__.startswith("transformers.models.") for cls in before)  # not fused twice
