"""Placement's key rotation on the compiled kernel (engine/key_rotation.cpp) against a float64 rotation and the torch
path, where the kernel applies and where it does not."""

import types

import pytest
import torch

from infoflow_rag.engine import kernels, placement


def _inv_freq(head_dim: int) -> torch.Tensor:
    """A model's frequency vector: float32, as transformers keeps it."""
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _rotated_in_float64(keys: torch.Tensor, deltas: torch.Tensor, head_dim: int) -> torch.Tensor:
    """k cos + rotate_half(k) sin, every step after the frequency vector in float64."""
    cos, sin = placement.delta_cos_sin(deltas, _inv_freq(head_dim))
    k = keys.double()
    return k * cos + placement.rotate_half(k) * sin


def _kernel_calls(monkeypatch) -> list[tuple]:
    """Record the shapes of every call placement makes to the kernel (which must have built)."""
    kernel, calls = kernels.load(), []
    assert kernel is not None, "the compiled kernels did not build: see the RuntimeWarning"

    def rotate_keys_into(out, keys, cos, sin):
        calls.append((tuple(keys.shape), cos.stride(0)))
        return kernel.rotate_keys_into(out, keys, cos, sin)

    def for_tensors(*tensors):  # the real choice, with the kernel it gives spied on
        chosen = kernels.for_tensors(*tensors)
        return None if chosen is None else types.SimpleNamespace(rotate_keys_into=rotate_keys_into)

    spy = types.SimpleNamespace(for_tensors=for_tensors)
    monkeypatch.setattr(placement, "kernels", spy)
    return calls


@pytest.mark.parametrize("head_dim", [64, 80, 12])  # whole vectors; vectors and a scalar tail; the tail alone
@pytest.mark.parametrize("shared", [True, False])  # one delta for the passage (placement's) or one per token
def test_kernel_rotates_into_a_buffer_view_as_float64_does(monkeypatch, head_dim, shared):
    torch.manual_seed(0)
    n = 37
    keys = torch.randn(3, 2, n, head_dim)
    deltas = torch.full((n,), 2900) if shared else torch.arange(n) * 97 + 5
    buffer = torch.full((3, 2, 100, head_dim), 7.0)  # the prompt's buffer: heads 100 rows apart
    calls = _kernel_calls(monkeypatch)
    out = placement.rotate_keys(keys, deltas, _inv_freq(head_dim), out=buffer[:, :, 40 : 40 + n])
    assert calls == [((3, 2, n, head_dim), 0 if shared else head_dim)]
    assert out.data_ptr() == buffer[:, :, 40:].data_ptr()
    exact = _rotated_in_float64(keys, deltas, head_dim)
    assert (out - exact).abs().max() <= 4e-6 * exact.abs().max()  # float32 rounding of |k| ~4
    untouched = torch.cat([buffer[:, :, :40], buffer[:, :, 40 + n :]], dim=2)
    assert torch.equal(untouched, torch.full_like(untouched, 7.0))


def test_kernel_and_torch_path_agree_and_the_torch_path_takes_what_the_kernel_cannot(monkeypatch):
    torch.manual_seed(1)
    keys, deltas, inv_freq = torch.randn(2, 3, 20, 64), torch.full((20,), 1234), _inv_freq(64)
    on_kernel = placement.rotate_keys(keys, deltas, inv_freq)
    calls = _kernel_calls(monkeypatch)
    # Not float32, not 4-d, rows not contiguous in out: the torch path, the same rotation to float rounding.
    in_float64 = placement.rotate_keys(keys.double(), deltas, inv_freq.double())
    three_d = placement.rotate_keys(keys[0], deltas, inv_freq)
    strided_out = torch.empty(2, 3, 20, 128)[..., ::2]
    placement.rotate_keys(keys, deltas, inv_freq, out=strided_out)
    assert calls == []
    assert (in_float64 - on_kernel).abs().max() < 1e-5
    assert (three_d - on_kernel[0]).abs().max() < 1e-5
    assert (strided_out - on_kernel).abs().max() < 1e-5
    # No move: the keys themselves, or copied into out, without the kernel.
    assert placement.rotate_keys(keys, torch.zeros(20, dtype=torch.long), inv_freq) is keys
    assert calls == []


@pytest.mark.parametrize("deltas", [torch.full((5,), 7), torch.arange(5), torch.full((37, 1), 7)])
def test_deltas_not_one_per_key_are_refused_naming_both_shapes(deltas):
    # A passage's one shared delta must still come once per key: a shorter vector would broadcast silently.
    with pytest.raises(
        ValueError, match=r"deltas must be one per key, shape \(37,\) for keys of shape \(2, 3, 37, 64\)"
    ):
        placement.rotate_keys(torch.randn(2, 3, 37, 64), deltas, _inv_freq(64))


def test_kernel_refuses_bad_shapes():
    kernel = kernels.load()
    keys, trig = torch.randn(2, 3, 5, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match=r"keys and out \(L, H, n, d\) of one shape; got keys \[2, 3, 5, 8\]"):
        kernel.rotate_keys_into(torch.empty(2, 3, 6, 8), keys, trig, trig)
    with pytest.raises(RuntimeError, match=r"cos and sin must be \(n, d\) = \(5, 8\)"):
        kernel.rotate_keys_into(torch.empty_like(keys), keys, torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="out's rows must be contiguous"):
        kernel.rotate_keys_into(torch.empty(2, 3, 5, 16)[..., ::2], keys, trig, trig)
    with pytest.raises(RuntimeError, match="takes float32 tensors"):
        kernel.rotate_keys_into(torch.empty_like(keys), keys.double(), trig, trig)
