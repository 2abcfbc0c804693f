"""KV compression before decoding: exact budgets, protected tokens, keep=1.0 identity, prefill signals."""

import pytest
import torch
from conftest import PASSAGES, QUESTION

from infoflow_rag.engine import Engine
from infoflow_rag.engine.compression import PromptMap
from infoflow_rag.store import DiskKVStore, MemoryKVStore
from infoflow_rag.store.keys import CacheKey


@pytest.fixture(scope="module")
def kvs(engine: Engine):
    return engine.prefill(PASSAGES)


def _kept(engine: Engine, kvs, **options):
    """(prompt map, prompt positions kept in the decode cache) for one prepared query."""
    prep = engine.prepare(QUESTION, kvs, max_new_tokens=8, **options)
    engine.compress(prep)
    return PromptMap.from_layout(prep.layout), prep.out.positions


@pytest.mark.parametrize("policy", ["snapkv", "infokv"])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9, 1, 17])
def test_budget_is_exact_and_prompt_and_sink_are_never_evicted(engine, kvs, policy, keep):
    prompt, kept = _kept(engine, kvs, selector="infoflow", compress=policy, keep=keep)
    n_context = int(prompt.context.sum())
    want = keep if isinstance(keep, int) else int(keep * n_context)
    assert int(prompt.context[kept].sum()) == want
    protected = (~prompt.context).nonzero()[:, 0]  # prefix (sink) + question block
    assert set(protected.tolist()) <= set(kept.tolist())
    assert kept.unique().numel() == kept.numel()
    assert protected.min() == 0 and len(engine.prefix) > 0


@pytest.mark.parametrize("policy", ["snapkv", "infokv"])
def test_keep_all_gives_the_uncompressed_answer_and_cache(engine, kvs, policy):
    plain = engine.answer(QUESTION, kvs, max_new_tokens=12)
    for keep in (1.0, sum(len(kv) for kv in kvs)):
        squeezed = engine.answer(QUESTION, kvs, compress=policy, keep=keep, max_new_tokens=12)
        assert squeezed.answer == plain.answer
        assert (squeezed.kv_tokens, squeezed.kv_bytes) == (plain.kv_tokens, plain.kv_bytes)
    a = engine.prepare(QUESTION, kvs)
    b = engine.prepare(QUESTION, kvs, compress=policy, keep=1.0)
    engine.compress(b)
    assert torch.equal(a.out.positions, b.out.positions)
    for la, lb in zip(a.out.cache.layers, b.out.cache.layers, strict=True):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_compression_shrinks_the_decode_cache_by_what_it_evicts(engine, kvs):
    plain = engine.answer(QUESTION, kvs, max_new_tokens=6)
    half = engine.answer(QUESTION, kvs, compress="snapkv", keep=0.5, max_new_tokens=6)
    evicted = plain.context_tokens - int(0.5 * plain.context_tokens)
    assert half.kv_tokens == plain.kv_tokens - evicted
    per_token = plain.kv_bytes / (plain.kv_tokens + plain.generated_tokens - 1)
    assert half.kv_bytes == per_token * (half.kv_tokens + half.generated_tokens - 1)
    assert half.timings.compress > 0 and plain.timings.compress == 0


def test_first_token_logits_are_computed_before_compression(engine, kvs):
    a = engine.prepare(QUESTION, kvs)
    b = engine.prepare(QUESTION, kvs, compress="infokv", keep=0.25)
    assert torch.equal(a.out.logits, b.out.logits)


def test_compression_runs_after_the_first_token_is_out(engine, kvs, monkeypatch):
    """TTFT never pays for compression: the first token is yielded, then the cache shrinks, then decoding goes on."""
    import infoflow_rag.engine.decoding as decoding
    import infoflow_rag.engine.facade as facade

    events = []
    real_compress, real_generate = facade.compress_cache, decoding.generate_tokens

    def compress_cache(*args, **kwargs):
        events.append("compress")
        return real_compress(*args, **kwargs)

    def generate_tokens(*args, **kwargs):
        for token in real_generate(*args, **kwargs):
            events.append("token")
            yield token

    monkeypatch.setattr(facade, "compress_cache", compress_cache)
    monkeypatch.setattr(decoding, "generate_tokens", generate_tokens)
    result = engine.answer(QUESTION, kvs, compress="snapkv", keep=0.5, max_new_tokens=4)
    assert result.generated_tokens == 4
    assert events == ["token", "compress", "token", "token", "token"]
    assert 0 < result.timings.ttft and result.timings.compress > 0


def test_infokv_with_attention_only_keeps_what_snapkv_keeps(engine, kvs):
    _, snap = _kept(engine, kvs, compress="snapkv", keep=0.3)
    _, info = _kept(
        engine, kvs, compress="infokv", keep=0.3, compress_options={"attention": 1.0, "entropy": 0.0, "evolution": 0.0}
    )
    assert set(snap.tolist()) == set(info.tolist())


@pytest.mark.parametrize("signal", ["entropy", "evolution"])
def test_infokv_on_one_signal_keeps_the_tokens_highest_in_it(engine, kvs, signal):
    weights = {"attention": 0.0, "entropy": 0.0, "evolution": 0.0, signal: 1.0}
    prompt, kept = _kept(engine, kvs, compress="infokv", keep=20, compress_options=weights)
    context = prompt.context.nonzero()[:, 0]
    top = context[prompt.signals[signal][context].topk(20).indices]
    assert set(top.tolist()) == set(kept[prompt.context[kept]].tolist())


def test_signals_are_recorded_at_prefill_exactly(engine, kvs):
    for text, kv in zip(PASSAGES, kvs, strict=True):
        assert set(kv.signals) == {"entropy", "evolution"}
        ids = torch.cat([engine.prefix.token_ids, torch.tensor(engine.passage_ids(text))])
        with torch.inference_mode():
            logits = engine.model(input_ids=ids[None]).logits[0, len(engine.prefix) :].float()
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)  # (n,) from the full-vocabulary logits of a plain forward
        assert torch.allclose(kv.signals["entropy"], entropy, atol=1e-4)
        evolution = kv.signals["evolution"]
        assert evolution.shape == (len(kv),) and bool(((evolution >= 0) & (evolution <= 2)).all())


def test_prefill_without_signals_gives_the_same_cache(engine, kvs):
    bare = engine.prefill(PASSAGES, signals=False)
    for a, b in zip(bare, kvs, strict=True):
        assert a.signals == {}
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_signals_do_not_depend_on_the_batch(engine):
    together = engine.prefill(PASSAGES)
    alone = [engine.prefill([text])[0] for text in PASSAGES]
    for a, b in zip(together, alone, strict=True):
        for name in a.signals:
            assert torch.allclose(a.signals[name], b.signals[name], atol=1e-4), name


def test_stored_signals_round_trip_and_drive_the_same_compression(engine, kvs, tmp_path):
    for store in (MemoryKVStore(), DiskKVStore(tmp_path / "kv")):
        keys = [CacheKey.for_tokens(engine.fingerprint, kv.token_ids) for kv in kvs]
        for key, kv in zip(keys, kvs, strict=True):
            store.put(key, kv)
        loaded = [store.get(key) for key in keys]
        for got, want in zip(loaded, kvs, strict=True):
            for name, signal in want.signals.items():
                assert torch.equal(got.signals[name], signal)
        want_answer = engine.answer(QUESTION, kvs, compress="infokv", keep=0.4, max_new_tokens=8)
        got_answer = engine.answer(QUESTION, loaded, compress="infokv", keep=0.4, max_new_tokens=8)
        assert (got_answer.answer, got_answer.kv_tokens) == (want_answer.answer, want_answer.kv_tokens)


def test_infokv_refuses_passages_without_signals(engine, kvs):
    with pytest.raises(ValueError, match="prefill"):
        engine.answer(QUESTION, PASSAGES, selector="full", compress="infokv", keep=0.5)
    bare = [type(kv)(kv.token_ids, kv.keys, kv.values, kv.offset) for kv in kvs]
    with pytest.raises(ValueError, match="'entropy' signal"):
        engine.prepare(QUESTION, bare, compress="infokv", keep=0.5)  # refused before any token is decoded
    # snapkv needs no stored signal, and neither does infokv with those weights at 0
    assert engine.answer(QUESTION, bare, compress="snapkv", keep=0.5, max_new_tokens=4).kv_tokens > 0
    options = {"entropy": 0.0, "evolution": 0.0}
    assert engine.answer(QUESTION, bare, compress="infokv", keep=0.5, compress_options=options, max_new_tokens=4)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"compress": "h2o", "keep": 0.5}, "unknown compression policy 'h2o'"),
        ({"compress": "snapkv", "keep": 0.0}, r"keep=0.0 as a ratio must be in \(0, 1\]"),
        ({"compress": "snapkv", "keep": 1.5}, r"keep=1.5 as a ratio"),
        ({"compress": "snapkv", "keep": 0}, "keep=0 as a token count must be >= 1"),
        ({"compress": "snapkv", "keep": True}, "keep must be a float ratio"),
        ({"compress": "snapkv", "keep": "half"}, "keep 'half' is not a number"),
        ({"compress": "snapkv", "keep": 0.5, "compress_options": {"window": 0}}, "window must be >= 1"),
        ({"compress": "snapkv", "keep": 0.5, "compress_options": {"kernel": 4}}, "kernel must be a positive odd"),
        (
            {"compress": "infokv", "keep": 0.5, "compress_options": {"entropie": 1}},
            "bad options for compression policy",
        ),
        ({"compress": "infokv", "keep": 0.5, "compress_options": {"attention": -1}}, "weights must be >= 0"),
    ],
)
def test_bad_compression_arguments_are_named(engine, kvs, options, match):
    with pytest.raises(ValueError, match=match):
        engine.answer(QUESTION, kvs, **options)


def test_an_engine_without_signals_prefills_none_and_keys_its_store_apart(engine):
    bare = engine.replace(record_signals=False)
    kvs = bare.prefill(PASSAGES)
    assert all(kv.signals == {} for kv in kvs)
    assert bare.fingerprint != engine.fingerprint  # its signal-less entries never reach a recording engine
    with_signals = engine.prefill(PASSAGES)
    for a, b in zip(kvs, with_signals, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)  # recording changes nothing else
    with pytest.raises(ValueError, match="'entropy' signal"):
        bare.answer(QUESTION, kvs, compress="infokv", keep=0.5)


def test_bench_prefill_times_both_ways_on_the_same_passages(engine):
    from infoflow_rag.bench import bench_prefill

    row = bench_prefill(engine, n_tokens=2000, repeats=1)
    assert row.passages >= 1 and 0 < row.tokens <= 2000
    assert row.no_signals_s > 0 and row.signals_s > 0 and row.runs == 1
    assert row.no_lead_in_s is None and row.lead_in_overhead is None  # this engine has no lead-in to compare
    with pytest.raises(ValueError, match="no passage fits in 10 tokens"):
        bench_prefill(engine, n_tokens=10)


def test_bench_prefill_sets_a_lead_in_engine_beside_its_plain_sibling(engine, monkeypatch):
    from infoflow_rag.bench import bench_prefill
    from infoflow_rag.engine import Engine
    from infoflow_rag.engine.lead_in import NEUTRAL_LEAD_IN

    calls = []
    prefill = Engine.prefill

    def recording(self, texts, progress=False, signals=None):
        calls.append((self.lead_in, signals))
        return prefill(self, texts, progress, signals)

    monkeypatch.setattr(Engine, "prefill", recording)
    row = bench_prefill(engine.replace(lead_in=NEUTRAL_LEAD_IN), n_tokens=600, repeats=1)
    # Warm-up and one timed repeat, each: the lead-in engine without and with signals, its plain sibling with them.
    assert calls == 2 * [(NEUTRAL_LEAD_IN, False), (NEUTRAL_LEAD_IN, True), (None, True)]
    assert row.no_lead_in_s > 0 and row.lead_in_overhead == row.signals_s / row.no_lead_in_s - 1


def test_decoding_from_the_compressed_cache_equals_masking_the_evicted_entries(engine, kvs):
    """Independent reference: the uncompressed cache with the evicted entries masked out of attention."""
    from infoflow_rag.engine.cache import position_mask

    full = engine.prepare(QUESTION, kvs)
    squeezed = engine.prepare(QUESTION, kvs, compress="infokv", keep=0.3)
    engine.compress(squeezed)
    token = torch.tensor([[int(full.out.logits.argmax())]])
    position = torch.tensor([[full.out.next_position]])
    with torch.inference_mode():
        got = engine.model(input_ids=token, position_ids=position, cache=squeezed.out.cache).logits[0, -1]
        # Hidden entries get a position past the query's, so the causal rule masks them.
        keys_pos = torch.where(
            torch.isin(full.out.positions, squeezed.out.positions), full.out.positions, full.out.next_position + 1
        )
        mask = position_mask(position[0], torch.cat([keys_pos, position[0]]), engine.model.dtype)
        want = engine.model(input_ids=token, position_ids=position, attention_mask=mask, cache=full.out.cache).logits[
            0, -1
        ]
    assert squeezed.out.cache.get_seq_length() < full.out.cache.get_seq_length()
    assert (got - want).abs().max() <= 1e-4
