"""The last decoder layer computes only what its forward's caller reads: the last row's output in full prefill and the
recompute, nothing past its K/V in a prefill without signals. Same K/V everywhere, the same first-token logits to
the few-row kernel's rounding."""

import contextlib

import pytest
import torch
from conftest import PASSAGES, QUESTION, without_attention_kernel
from tiny import tiny_model

from infoflow_rag.engine import Engine, last_layer, recompute
from infoflow_rag.engine.cache import stacked
from infoflow_rag.engine.prefill import full_prefill


def _whole(monkeypatch) -> None:
    """Every layer runs every row, as before this module."""
    monkeypatch.setattr(last_layer, "last_row_only", lambda model: contextlib.nullcontext())
    monkeypatch.setattr(last_layer, "keys_values_only", lambda model: contextlib.nullcontext())


def _mlp_rows(engine: Engine, run) -> tuple[object, list[int]]:
    """``run()``'s result and the row count of every call to the last decoder layer's MLP during it."""
    rows: list[int] = []
    handle = (
        engine.model.get_decoder()
        .layers[-1]
        .mlp.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[1]))
    )
    try:
        return run(), rows
    finally:
        handle.remove()


def _kv(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's keys and values, copied: a recompute run again writes into the same placed buffers."""
    keys, values = stacked(cache)
    return keys.clone(), values.clone()


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_full_prefill_runs_the_last_layer_for_the_last_row(family_engine, monkeypatch, path):
    # Where the attention kernel does not run, the torch path attends for every row; the hooks still keep the last.
    if path == "torch":
        without_attention_kernel(monkeypatch)
    ids = family_engine.prompt_ids(QUESTION, PASSAGES)
    short, rows = _mlp_rows(family_engine, lambda: full_prefill(family_engine.model, ids))
    assert rows == [1]
    _whole(monkeypatch)
    whole, rows = _mlp_rows(family_engine, lambda: full_prefill(family_engine.model, ids))
    assert rows == [len(ids)]
    for a, b in zip(_kv(short.cache), _kv(whole.cache), strict=True):
        assert torch.equal(a, b)  # every layer's K/V, the last one's too, for every row
    assert (short.logits - whole.logits).abs().max() <= 1e-5


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("selector", ["infoflow", "epic"])
def test_recompute_runs_the_last_layer_for_the_last_row(family_engine, monkeypatch, selector, path):
    if path == "torch":
        without_attention_kernel(monkeypatch)
    prep = family_engine.prepare(QUESTION, family_engine.prefill(PASSAGES), selector=selector, ratio=0.4)
    fresh = prep.layout.segments[-1]
    start = prep.layout.length - len(fresh)
    args = (family_engine.model, prep.placed, prep.chosen, fresh.token_ids, start + torch.arange(len(fresh)))
    short, rows = _mlp_rows(family_engine, lambda: recompute.recompute(*args))
    assert rows == [1]
    short_kv = _kv(short.cache)
    _whole(monkeypatch)
    whole, rows = _mlp_rows(family_engine, lambda: recompute.recompute(*args))
    assert rows == [prep.chosen.numel() + len(fresh)]
    for a, b in zip(short_kv, _kv(whole.cache), strict=True):
        assert torch.equal(a, b)
    assert (short.logits - whole.logits).abs().max() <= 1e-5


def test_prefill_without_signals_stops_after_the_last_keys_and_values(engine, monkeypatch):
    kvs, rows = _mlp_rows(engine, lambda: engine.prefill(PASSAGES, signals=False))
    assert rows == []  # the last layer's MLP never ran
    with_signals, rows = _mlp_rows(engine, lambda: engine.prefill(PASSAGES, signals=True))
    assert rows  # the signals read every layer's output: the forward ran whole
    for kv, whole in zip(kvs, with_signals, strict=True):
        assert torch.equal(kv.keys, whole.keys) and torch.equal(kv.values, whole.values)
    _whole(monkeypatch)
    for kv, whole in zip(kvs, engine.prefill(PASSAGES, signals=False), strict=True):
        assert torch.equal(kv.keys, whole.keys) and torch.equal(kv.values, whole.values)


def test_a_layer_of_unknown_shape_runs_whole(monkeypatch):
    # The hooks rely on the decoder layer's forward; a layer class not in LAYERS is never hooked, and runs every row.
    monkeypatch.setattr(last_layer, "LAYERS", ())
    engine = Engine.load(tiny_model("llama"), lead_in=None)
    ids = engine.prompt_ids(QUESTION, PASSAGES)
    _, rows = _mlp_rows(engine, lambda: full_prefill(engine.model, ids))
    assert rows == [len(ids)]
    answer = engine.answer(QUESTION, engine.prefill(PASSAGES), selector="infoflow", ratio=1.0, max_new_tokens=6)
    assert answer.answer == engine.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=6)[0]
