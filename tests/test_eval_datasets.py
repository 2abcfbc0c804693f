"""Loaders over the shipped HotpotQA, SQuAD v2 and Paul Graham essay files."""

import json

import pytest

from infoflow_rag.corpus import data_file
from infoflow_rag.eval.datasets import (
    NIAH_NEEDLE,
    fixed_windows,
    load_hotpotqa,
    load_niah,
    load_squad,
)


@pytest.fixture(scope="module")
def hotpot():
    return load_hotpotqa(limit=40)


def test_hotpotqa_passage_split(hotpot):
    # The first 27 questions all have 10 paragraphs (question 27 is the first with fewer).
    assert [len(ex.passages) for ex in hotpot[:27]] == [10] * 27
    assert all(ex.answers and all(a.strip() for a in ex.answers) for ex in hotpot)
    first = hotpot[0]
    assert (first.id, first.answers, first.dataset) == ("5a8b57f25542995d1e6f1371", ["yes"], "hotpotqa")
    assert first.passages[1].startswith("Scott Derrickson: Scott Derrickson (born July 16, 1966) is an American")
    assert "director, screenwriter and producer. He lives in Los Angeles" in first.passages[1]
    assert first.meta["gold_passages"] == [1, 4]
    assert [first.passages[i].split(":")[0] for i in (1, 4)] == ["Scott Derrickson", "Ed Wood"]


def test_hotpotqa_start_and_limit_keep_dataset_order(hotpot):
    window = load_hotpotqa(start=5, limit=3)
    assert [ex.id for ex in window] == [ex.id for ex in hotpot[5:8]]
    assert [ex.meta["index"] for ex in window] == [5, 6, 7]


def test_hotpotqa_fixed_split_covers_the_same_text(hotpot):
    fixed = load_hotpotqa("fixed", limit=5, chunk_tokens=64)
    for by_passage, by_window in zip(hotpot[:5], fixed, strict=True):
        assert by_window.id == by_passage.id
        assert by_window.dataset == "hotpotqa-fixed64"
        assert " ".join(by_window.passages).split() == " ".join(by_passage.passages).split()
        assert [len(p.split()) for p in by_window.passages[:-1]] == [64] * (len(by_window.passages) - 1)
        assert 0 < len(by_window.passages[-1].split()) <= 64


def test_hotpotqa_fixed_split_uses_the_given_tokenizer(hotpot):
    fixed = load_hotpotqa("fixed", limit=1, chunk_tokens=100, tokenize=list, detokenize="".join)
    assert "".join(fixed[0].passages) == "\n".join(hotpot[0].passages)
    assert {len(p) for p in fixed[0].passages[:-1]} == {100}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "fixed"}, "chunk_tokens"),
        ({"split": "passage", "chunk_tokens": 64}, "only apply to split='fixed'"),
        ({"split": "passage", "tokenize": list, "detokenize": "".join}, "only apply to split='fixed'"),
        ({"split": "fixed", "chunk_tokens": 0}, "positive window size"),
        ({"split": "sentence"}, "unknown HotpotQA split"),
        ({"split": "fixed", "chunk_tokens": 64, "tokenize": list}, "both tokenize and detokenize"),
        ({"start": -1}, "start and limit"),
    ],
)
def test_hotpotqa_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_hotpotqa(**{"limit": 1, **kwargs})


def test_fixed_windows_last_window_is_the_remainder():
    assert fixed_windows("a b c d e", 2) == ["a b", "c d", "e"]
    with pytest.raises(ValueError, match="positive"):
        fixed_windows("a b", 0)


def test_squad_answerable_only_with_gold_paragraph():
    examples = load_squad(n_passages=10, n_articles=2)
    raw = json.loads(data_file("squad.json").read_text())["data"]
    impossible = {qa["id"] for a in raw for p in a["paragraphs"] for qa in p["qas"] if qa["is_impossible"]}
    assert len(examples) == 5928  # 11,873 dev questions minus 5,945 unanswerable
    assert not impossible & {ex.id for ex in examples}
    for ex in examples[:300]:
        assert len(ex.passages) == len(set(ex.passages)) == 10
        gold = ex.passages[ex.meta["gold_passage"]]
        assert (
            gold
            == f"{raw[ex.meta['article_index']]['title'].replace('_', ' ')}: "
            + (raw[ex.meta["article_index"]]["paragraphs"][ex.meta["paragraph_index"]]["context"])
        )
        assert any(answer in gold for answer in ex.answers)
    assert len({ex.meta["gold_passage"] for ex in examples[:300]}) > 5  # the gold position varies


def test_squad_is_deterministic_and_sliceable():
    first = load_squad(start=100, limit=5)
    again = load_squad(start=100, limit=5)
    assert first == again
    assert [ex.id for ex in first] == [ex.id for ex in load_squad(limit=105)[100:]]
    assert all(ex.dataset == "squad" for ex in first)


def test_a_start_past_the_end_is_refused_naming_the_size():
    # SQuAD, not HotpotQA: HotpotQA's questions from 5000 on are kept for independent checks, even unread.
    with pytest.raises(ValueError, match=r"start=1000000 is past the last of the \d+ questions; pass a start below"):
        load_squad(start=10**6, limit=1)


def test_squad_rejects_too_many_passages():
    with pytest.raises(ValueError, match="n_passages must be in"):
        load_squad(n_passages=500, n_articles=1, limit=1)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_niah_needle_at_the_requested_depth(depth):
    (ex,) = load_niah([3000], [depth], passage_tokens=200)
    holders = [i for i, p in enumerate(ex.passages) if NIAH_NEEDLE in p]
    assert holders == [ex.meta["needle_passage"]]
    text = " ".join(ex.passages)
    assert text.count(NIAH_NEEDLE) == 1
    assert text.index(NIAH_NEEDLE) / len(text) == pytest.approx(depth, abs=0.03)
    assert ex.meta["needle_depth"] == pytest.approx(depth, abs=0.03)
    assert len(text.split()) == 3000 + len(NIAH_NEEDLE.split())  # haystack tokens plus the needle
    assert len(ex.passages) == 15
    assert (ex.meta["context_tokens"], ex.meta["depth"]) == (3000, depth)


def test_niah_grid_and_edges():
    examples = load_niah([400, 1000], [0, 1], passage_tokens=100)
    assert [ex.id for ex in examples] == ["niah-400-0", "niah-400-1", "niah-1000-0", "niah-1000-1"]
    assert examples[0].passages[0].startswith(NIAH_NEEDLE)
    assert examples[1].passages[-1].endswith(NIAH_NEEDLE)
    assert all(ex.answers == ["eat a sandwich and sit in Dolores Park on a sunny day"] for ex in examples)


def test_niah_held_out_haystack_is_the_other_half_of_the_essays():
    (dev,) = load_niah([2000], [0.5], passage_tokens=100)
    (held,) = load_niah([2000], [0.5], passage_tokens=100, haystack="second")
    assert held.id == "niah-second-2000-0.5" and held.meta["haystack"] == "second"
    dev_words = set(" ".join(dev.passages).split()) - set(NIAH_NEEDLE.split())
    assert not {p for p in held.passages if NIAH_NEEDLE not in p} & set(dev.passages)
    assert len(dev_words) > 100  # the halves share vocabulary, not text
    assert len(" ".join(held.passages).split()) == 2000 + len(NIAH_NEEDLE.split())


def test_niah_rejects_an_unknown_haystack():
    with pytest.raises(ValueError, match="haystack must be one of first, second"):
        load_niah([500], [0.5], haystack="third")


@pytest.mark.parametrize(
    ("lengths", "depths", "match"),
    [([500], [1.5], r"\[0, 1\]"), ([500, 500], [0.5], "must not repeat"), ([10**9], [0.5], "essays' length")],
)
def test_niah_rejects_bad_grids(lengths, depths, match):
    with pytest.raises(ValueError, match=match):
        load_niah(lengths, depths)
