"""Finding known passages in ready-made prompts: at any word boundary, longest first; the recent-passage memory
that framework adapters feed (bounded, and covering whatever a framework did to the context string)."""

from conftest import PASSAGES

from infoflow_rag.matching import PassageMatcher, RecentPassages
from infoflow_rag.pipeline import Pipeline
from infoflow_rag.store import open_store

LONG = "The Danube flows through ten countries, more than any other river."  # longer than an anchor


def found(matcher: PassageMatcher, prompt: str, *more: PassageMatcher) -> list[tuple[int, str]]:
    return [(m.key, prompt[m.start : m.end]) for m in matcher.find(prompt, *more)]


def test_matcher_finds_passages_anywhere_but_inside_a_word_longest_first():
    m = PassageMatcher([(1, "alpha beta gamma"), (2, "alpha beta gamma delta"), (3, "omega"), (4, LONG)])
    prompt = (
        "Context:\nalpha beta gamma delta\n\n  omega\nnot omega here\nalpha beta gamma"
        f"\nNotes: {LONG} (quoted inline) and omegas, xomega, alpha beta gammas: parts of other words"
    )
    assert found(m, prompt) == [
        (2, "alpha beta gamma delta"),
        (3, "omega"),
        (3, "omega"),  # mid-line
        (1, "alpha beta gamma"),
        (4, LONG),  # after "Notes: ", as an inline template writes it
    ]
    assert m.find("nothing known") == []


def test_matcher_searches_more_matchers_at_once_and_the_longest_wins():
    prompt = f"Read: {LONG}\n{PASSAGES[0]}"
    indexed = PassageMatcher([(7, PASSAGES[0]), (8, LONG[:40])])
    recent = PassageMatcher(enumerate([LONG]))
    assert found(indexed, prompt, recent) == [(0, LONG), (7, PASSAGES[0])]
    assert found(PassageMatcher(), prompt, recent) == [(0, LONG)]


def test_recent_passages_are_deduplicated_stripped_and_bounded():
    recent = RecentPassages(capacity=3)
    recent.add(["  a first passage\n", "b", "", "c"])
    recent.add(["d", "a first passage"])  # seen again: the most recent, so "b" is dropped, not it
    assert recent.texts() == ["c", "d", "a first passage"]


def test_a_context_quoted_as_a_list_repr_becomes_a_passage():
    # LlamaIndex simple_summarize formats context_str=[joined chunks]: the prompt quotes the list's repr, whose
    # escaped newlines match no passage; the uncovered stretch is recorded as it stands in the prompt.
    nodes = [f"title: fact {i}\n\n{text}" for i, text in enumerate(PASSAGES[:2])]  # as MetadataMode.LLM writes
    recent = RecentPassages()
    recent.add(nodes)
    context = str(["\n".join(nodes)])
    recent.add_context(context)
    assert recent.texts() == [*nodes, context]
    prompt = f"Context information is below.\n{context}\nQuery: why?"
    assert found(PassageMatcher(), prompt, PassageMatcher(enumerate(recent.texts()))) == [(2, context)]


def test_a_passage_cut_to_fit_the_window_is_recorded_by_its_pieces():
    # A prompt helper repacking chunks to fit the window cuts a passage at a space: its head, the stretch no known
    # passage covers, becomes a passage; separators and short glue do not.
    recent = RecentPassages()
    recent.add([PASSAGES[0], LONG])
    head = LONG[: LONG.index(" more")]
    recent.add_context(f"{PASSAGES[0]}\n\n{head}")
    assert recent.texts() == [LONG, PASSAGES[0], head]
    recent.add_context(f"{PASSAGES[0]}\n\n['x']")  # shorter than an anchor: template glue
    assert recent.texts() == [LONG, head, PASSAGES[0]]


def test_known_passages_are_prefilled_on_first_sight_and_reused_after(engine):
    pipeline = Pipeline(engine, open_store("memory"))  # nothing indexed or registered
    prompt = f"Notes: {PASSAGES[0]} {PASSAGES[2]}\nQuestion: what is the capital of Australia?"
    stats = [pipeline.answer_prompt(prompt, known=PASSAGES, max_new_tokens=2).reuse for _ in range(2)]
    assert [(s.passages_hit, s.passages_computed) for s in stats] == [(0, 2), (2, 0)]
    assert stats[0].stored_tokens == 0 < stats[0].prefilled_tokens == stats[1].stored_tokens
    plain = pipeline.answer_prompt(prompt, max_new_tokens=2).reuse  # without known: not recognised
    assert (plain.passages_hit, plain.passages_computed) == (0, 0)
