"""Every linear layer of an engine's model: a few rows on the compiled kernel (:mod:`.few_rows`: one row per decoded
token, the first token's logits), more rows on oneDNN's product over weights reordered once into its blocked layout
(prefills, the scoring pass's question rows, the recompute), else ``F.linear`` (MKL's sgemm).

oneDNN over prepacked weights against MKL's sgemm, on this project's 2-core EPYC (SmolLM2, 4K, alternating in one
process; README, "Linear layers of many rows"): full prefill 10.97 -> 9.11 s, InfoFlow's TTFT 2.30 -> 2.14 s; one
4000-row gate_proj product 55 -> 36 ms. A row's product does not depend on how many rows run with it (from 2 rows
up, as with MKL), so a passage prefilled alone and the same tokens inside full prefill or a 100 % recompute get the
same K/V, bit for bit. The price is memory: each packed layer keeps a second copy of its weight, and where the CPU
runs bfloat16 products a third at half the size, for scoring passes (the output embedding is not packed: it runs one
row, on the kernel).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from . import few_rows

# oneDNN's batch-size hint for the blocked layout; any row count runs on it. On SmolLM2's gate_proj, 64 was as fast
# as 512 and 4000 from 13 to 4000 rows; 1 was slower from 13 rows up. A speed choice: a row's product is the same for
# any hint from 2 rows up.
PACK_ROWS = 64
_batched_only: ContextVar[bool] = ContextVar("batched_linears_only", default=False)

# The weights a scoring pass's products may run on (QueryOptions.score_dtype). A question's dozen rows stream every
# weight from memory and do little with each, so bfloat16 copies, half the bytes, make them faster (README, "The
# scoring pass in bfloat16"); inputs and outputs are rounded to bfloat16 (the sums run in float32), returned as float32.
PRODUCT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_product_dtype: ContextVar[torch.dtype] = ContextVar("product_dtype", default=torch.float32)


@contextlib.contextmanager
def batched_linears():
    """Within: every linear layer runs its many-row product, a few rows too. Prefills run so: the kernel sums in
    another order, so a prefix or passage prefilled on it would not have the K/V that full prefill computes for the
    same tokens, bit for bit, and 100 % recompute would no longer equal full prefill exactly (the correctness gate)."""
    token = _batched_only.set(True)
    try:
        yield
    finally:
        _batched_only.reset(token)


@contextlib.contextmanager
def products_in(dtype: str):
    """Within: many-row products run on the weights' ``dtype`` copies (a name of PRODUCT_DTYPES), where the layer
    has one (:meth:`EngineLinear.pack`); a few rows still take the float32 kernel."""
    token = _product_dtype.set(PRODUCT_DTYPES[dtype])
    try:
        yield
    finally:
        _product_dtype.reset(token)


def bfloat16_products() -> bool:
    """Whether oneDNN runs bfloat16 products on this CPU (AVX-512 BF16 or AMX); elsewhere they would be emulated,
    slower than float32, so layers keep no bfloat16 copy and ``score_dtype="bfloat16"`` runs float32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def blocked_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """``weight`` (N, K) as ``dtype`` in oneDNN's blocked layout, or None where oneDNN cannot run it (not built with
    it, not float32 on the CPU)."""
    if not (torch.backends.mkldnn.is_available() and weight.dtype == torch.float32 and weight.device.type == "cpu"):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), PACK_ROWS)


class EngineLinear(nn.Linear):
    """An ``nn.Linear`` whose forward of a few rows runs the kernel and of more rows oneDNN's product over its packed
    weight (repacked if the weight was changed in place or replaced), in bfloat16 within ``products_in("bfloat16")``,
    where they apply; ``F.linear`` otherwise."""

    packed: torch.Tensor | None = None  # the weight in oneDNN's layout; None: not packed (F.linear)
    packed_from: tuple[int, int] | None = None  # (data_ptr, version) of the weight it was packed from
    packed_bfloat16: torch.Tensor | None = None  # the weight in bfloat16, the same layout; None: no such copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _batched_only.get() and (out := few_rows.few_row_linear(x, self.weight, self.bias)) is not None:
            return out
        packed = self._packed_for(x)
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        if _product_dtype.get() is torch.bfloat16 and self.packed_bfloat16 is not None:
            # (..., K) -> (..., N) in bfloat16 (float32 sums); the bias is added in float32.
            out = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), self.packed_bfloat16, None, "none", [], "").float()
            return out if self.bias is None else out.add_(self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")  # (..., K) -> (..., N)

    def _packed_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The packed weight if this product may run on it: the layer is packed and no gradient is recorded
        (oneDNN's product has no backward here). An x of another dtype or device than the weight's fails either way."""
        if self.packed_from is None:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return None
        if self.packed_from != (self.weight.data_ptr(), self.weight._version):
            self.pack()
        return self.packed

    def pack(self) -> None:
        """Pack the weight now, in float32 and, where the CPU runs bfloat16 products, in bfloat16 (and note what it
        was packed from), or mark the layer unpacked where oneDNN cannot run it."""
        self.packed = blocked_weight(self.weight)
        self.packed_from = None if self.packed is None else (self.weight.data_ptr(), self.weight._version)
        with_bfloat16 = self.packed is not None and bfloat16_products()
        self.packed_bfloat16 = blocked_weight(self.weight, torch.bfloat16) if with_bfloat16 else None


def install(model: nn.Module) -> None:
    """Every ``nn.Linear`` of ``model`` becomes an :class:`EngineLinear`, its weight packed (but the output
    embedding's). Its class is swapped in place, not the module copied: parameters, tied weights and hooks stay as
    they are. Installing twice changes nothing."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = EngineLinear
            if module is not output:
                module.pack()
