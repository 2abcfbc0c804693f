"""The resumable runner and method specs, driven by a deterministic fake engine."""

import dataclasses
import json
import math
from dataclasses import dataclass, field

import pytest
from fake_engine import FakeEngineBase
from specs import spec

from infoflow_rag.eval.datasets import EvalExample
from infoflow_rag.eval.methods import parse_method
from infoflow_rag.eval.results import read_results
from infoflow_rag.eval.runner import DEFAULT_PROMPT, run_eval

MODEL_INFO = {"name": "fake-135M", "sha256": "ab" * 32, "dtype": "float32"}
# Per selector: raw reply and TTFT in seconds. Every toy question's gold answer is "blue".
REPLIES = {"full": ("Answer: blue\nBecause.", 1.0), "none": ("red", 0.1), "infoflow": ("blue sky", 0.25)}


@dataclass
class FakeTimings:
    ttft: float
    score: float


@dataclass
class FakeAnswer:
    answer: str
    timings: FakeTimings
    recompute_fraction: float
    context_tokens: int
    passage_order: list[int]
    answer_ids: list[int]


@dataclass
class FakeEngine(FakeEngineBase):
    """Answers from REPLIES; raises once ``fail_after`` answers have been given (a simulated crash)."""

    model_info: dict = field(default_factory=lambda: dict(MODEL_INFO))
    fail_after: int | None = None

    def respond(self, call):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        reply, ttft = REPLIES[call["selector"]]
        fraction = {"full": 1.0, "none": 0.0}.get(call["selector"], call.get("ratio"))
        answer_ids = list(range(len(reply.split())))
        return FakeAnswer(
            reply, FakeTimings(ttft, 0.01), fraction, 40, list(range(len(call["passages"])))[::-1], answer_ids
        )


@dataclass
class PrefillingEngine(FakeEngine):
    """A fake engine with the optional prefill-once fast path."""

    prefills: list[list[str]] = field(default_factory=list)
    signals: list[bool] = field(default_factory=list)

    def prefill(self, passages, signals=None):
        self.prefills.append(list(passages))
        self.signals.append(signals)
        return [f"KV<{p}>" for p in passages]


EXAMPLES = [EvalExample(f"q{i}", f"What colour is thing {i}?", ["blue"], ["p1", "p2"], {}, "toy") for i in range(3)]
METHODS = [parse_method(m) for m in ("none", "infoflow@0.15", "full")]  # full listed last on purpose


def run(engine, path, **kwargs):
    return run_eval(engine, EXAMPLES, METHODS, path, progress=False, command="eval --toy", **kwargs)


def test_results_scores_and_ttft_ratios(tmp_path):
    engine = FakeEngine()
    results = run(engine, tmp_path / "r.jsonl")
    assert [(r.id, r.method) for r in results] == [
        (f"q{i}", m) for i in range(3) for m in ("none", "infoflow@0.15", "full")
    ]
    by_method = {r.method: r for r in results if r.id == "q0"}
    assert {m: (r.prediction, r.f1, r.em) for m, r in by_method.items()} == {
        "none": ("red", 0.0, 0.0),
        "infoflow@0.15": ("blue sky", pytest.approx(2 / 3), 0.0),
        "full": ("blue", 1.0, 1.0),
    }
    assert {m: r.ttft_ratio for m, r in by_method.items()} == {
        "none": pytest.approx(0.1),
        "infoflow@0.15": pytest.approx(0.25),
        "full": 1.0,
    }
    assert by_method["infoflow@0.15"].recompute_fraction == 0.15
    assert by_method["full"].passage_order == [1, 0]
    # This engine reports no KV cache sizes: the results say so instead of failing.
    assert all((r.options.compress, r.kv_tokens, r.kv_bytes) == ("none", None, None) for r in results)
    # Per question: full first, then the others back to back.
    assert [c["selector"] for c in engine.calls[:3]] == ["full", "none", "infoflow"]
    assert engine.calls[1]["question"] == "What colour is thing 0?"
    assert engine.calls[1]["template"] == DEFAULT_PROMPT
    assert engine.calls[2]["ratio"] == 0.15  # none's ratio is the default: its selector fixes its own share
    on_file = read_results(tmp_path / "r.jsonl").results
    assert sorted(on_file, key=lambda r: r.pair_key) == sorted(results, key=lambda r: r.pair_key)


def test_scoring_layers_and_rows_reach_the_engine_as_given(tmp_path):
    engine = FakeEngine()
    methods = [parse_method(m) for m in ("infoflow@0.15", "infoflow{2-4}@0.15", "infoflow+block@0.15")]
    results = run_eval(engine, EXAMPLES[:1], methods, tmp_path / "r.jsonl", progress=False, command="eval")
    assert [r.method for r in results] == ["infoflow@0.15", "infoflow{2-4}@0.15", "infoflow+block@0.15"]
    assert engine.calls[0]["selector_options"] == {} and engine.calls[0]["score_rows"] == "question"
    assert engine.calls[1]["selector_options"] == {"layers": [2, 3, 4]}
    assert engine.calls[2]["score_rows"] == "block" and engine.calls[2]["selector_options"] == {}


def test_header_records_model_prompt_and_command(tmp_path):
    run(FakeEngine(), tmp_path / "r.jsonl", prompt="Q: {question}", max_new_tokens=8)
    header = read_results(tmp_path / "r.jsonl").header
    assert (header.model_info, header.prompt, header.max_new_tokens, header.command) == (
        MODEL_INFO,
        "Q: {question}",
        8,
        "eval --toy",
    )


def test_resume_after_a_crash_redoes_nothing(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(FakeEngine(fail_after=4), path)  # q0 complete, then q1's full, then the crash
    assert [(r.id, r.method) for r in read_results(path).results] == [
        ("q0", "full"),
        ("q0", "none"),
        ("q0", "infoflow@0.15"),
        ("q1", "full"),
    ]
    with path.open("a") as f:
        f.write('{"type": "result", "dataset": "toy", "id": "q1", "met')  # killed mid-write
    engine = FakeEngine()
    results = run(engine, path)
    assert len(engine.calls) == 9 - 4
    assert len(results) == 9
    run_file = read_results(path)
    assert len(run_file.results) == 9
    assert len({r.pair_key for r in run_file.results}) == 9
    assert run_file.commands == ["eval --toy", "eval --toy"]
    q1_none = next(r for r in results if (r.id, r.method) == ("q1", "none"))
    assert q1_none.ttft_ratio == pytest.approx(0.1)  # its full reference came from the file
    assert run(FakeEngine(fail_after=0), path) == results  # nothing left to do: the engine is never called


@pytest.mark.parametrize(
    ("change", "match"),
    [
        # the key that differs, not both whole dicts
        ({"engine": FakeEngine(model_info={**MODEL_INFO, "sha256": "cd" * 32})}, r"model_info\['sha256'\]: file has"),
        ({"engine": FakeEngine(model_info={**MODEL_INFO, "extra": 1})}, r"model_info\['extra'\]: file has '\(none\)'"),
        ({"prompt": "Q: {question}"}, "prompt"),
        ({"max_new_tokens": 64}, "max_new_tokens"),
    ],
)
def test_resume_refuses_different_settings(tmp_path, change, match):
    path = tmp_path / "r.jsonl"
    run(FakeEngine(), path)
    before = path.read_bytes()
    kwargs = dict(change)
    with pytest.raises(ValueError, match=f"cannot resume .*{match}"):
        run(kwargs.pop("engine", FakeEngine()), path, **kwargs)
    assert path.read_bytes() == before


def test_a_run_killed_as_it_creates_its_file_leaves_none_and_the_next_run_starts_afresh(tmp_path, monkeypatch):
    import infoflow_rag.files

    def killed(*args):
        raise KeyboardInterrupt  # the process dies before the header's file takes its name

    path = tmp_path / "r.jsonl"
    with monkeypatch.context() as patch:
        patch.setattr(infoflow_rag.files.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            run(FakeEngine(), path)
    assert not path.exists()  # not an empty file that every later (resuming) run would refuse
    assert len(run(FakeEngine(), path)) == 9


def test_resume_refuses_questions_asked_over_other_passages_before_writing(tmp_path):
    path = tmp_path / "r.jsonl"
    run(FakeEngine(), path)
    before = path.read_bytes()
    other = [dataclasses.replace(ex, passages=[*ex.passages, "one more"]) if ex.id == "q1" else ex for ex in EXAMPLES]
    with pytest.raises(
        ValueError, match=r"cannot resume .*r.jsonl: 1 question\(s\) on file \(q1\) were asked with other"
    ):
        run_eval(FakeEngine(), other, METHODS, path, progress=False, command="eval --toy")
    assert path.read_bytes() == before  # refused before the resume record
    assert len(run(FakeEngine(fail_after=0), path)) == 9  # the same questions resume, with nothing left to do


def _as_if_answered_in_float32(path) -> None:
    """The file's infoflow@0.15 lines rewritten as lines written while float32 scoring was the default."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        if line.get("method") == "infoflow@0.15":
            line["options"]["score_dtype"] = "float32"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_resume_refuses_to_add_results_under_a_key_whose_results_had_other_options(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(FakeEngine(fail_after=4), path)  # q0's three methods and q1's full on file
    _as_if_answered_in_float32(path)
    before = path.read_bytes()
    with pytest.raises(
        ValueError,
        match=r"cannot resume .*r.jsonl: its infoflow@0.15 results were answered with other options "
        r"\(score_dtype='float32' on file, 'bfloat16' now\)",
    ):
        run(FakeEngine(), path)
    assert path.read_bytes() == before  # refused before the resume record


def test_a_finished_file_resumes_whatever_its_options(tmp_path):
    path = tmp_path / "r.jsonl"
    run(FakeEngine(), path)
    _as_if_answered_in_float32(path)
    assert len(run(FakeEngine(fail_after=0), path)) == 9  # nothing to add: nothing mixed


def test_existing_file_without_resume_is_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    run(FakeEngine(), path)
    with pytest.raises(FileExistsError, match="exists"):
        run(FakeEngine(), path, resume=False)


def test_prefill_once_per_question_outside_ttft(tmp_path):
    engine = PrefillingEngine()
    results = run(engine, tmp_path / "r.jsonl")
    assert engine.prefills == [["p1", "p2"]] * 3
    for call in engine.calls:
        cached = call["selector"] != "full"
        assert call["passages"] == (["KV<p1>", "KV<p2>"] if cached else ["p1", "p2"])
    assert all((r.prefill_time is None) == (r.options.selector == "full") for r in results)


def test_prefill_records_signals_only_for_a_policy_that_reads_them(tmp_path):
    engine = PrefillingEngine()
    run(engine, tmp_path / "a.jsonl")
    assert engine.signals == [False] * 3
    engine = PrefillingEngine()
    methods = [*METHODS, parse_method("infoflow@0.15+infokv:0.5")]
    run_eval(engine, EXAMPLES, methods, tmp_path / "b.jsonl", progress=False, command="eval --toy")
    assert engine.signals == [True] * 3


def test_prefill_fast_path_can_be_turned_off(tmp_path):
    engine = PrefillingEngine()
    results = run(engine, tmp_path / "r.jsonl", prefill_once=False)
    assert engine.prefills == []
    assert all(call["passages"] == ["p1", "p2"] for call in engine.calls)
    assert all(r.prefill_time is None for r in results)


@pytest.mark.parametrize(
    ("methods", "prompt", "match"),
    [
        ([parse_method("none"), parse_method("none")], DEFAULT_PROMPT, "repeat"),
        ([], DEFAULT_PROMPT, "no methods"),
        (METHODS, "Answer the question.", "exactly once"),
    ],
)
def test_run_eval_rejects_bad_configuration(tmp_path, methods, prompt, match):
    with pytest.raises(ValueError, match=match):
        run_eval(FakeEngine(), EXAMPLES, methods, tmp_path / "r.jsonl", prompt=prompt, progress=False)
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("full", spec("full", "full", 1.0)),
        ("none", spec("none", "none", 0.0)),
        ("infoflow", spec("infoflow", "infoflow", 0.15)),
        ("infoflow+reorder@0.15", spec("infoflow+reorder", "infoflow", 0.15, reorder=True)),
        ("cacheblend@0.3", spec("cacheblend", "cacheblend", 0.3)),
        ("infoflow[tail/tail]@0.1", spec("infoflow[tail/tail]", "infoflow", 0.1, geometry="tail/tail")),
        (
            "infoflow+reorder[head-local/tail-prompt]@0.05",
            spec("infoflow+reorder[head-local/tail-prompt]", "infoflow", 0.05, True, "head-local/tail-prompt"),
        ),
        ("infoflow[global]@0.15", spec("infoflow", "infoflow", 0.15)),
        ("infoflow{20-23}@0.1", spec("infoflow{20-23}", "infoflow", 0.1, layers=(20, 21, 22, 23))),
        (
            "infoflow{7}+reorder[tail/tail]",
            spec("infoflow{7-7}+reorder[tail/tail]", "infoflow", 0.15, True, "tail/tail", layers=(7,)),
        ),
        ("infoflow+block@0.1", spec("infoflow+block", "infoflow", 0.1, score_rows="block")),
        ("sinkflow+leadin@0.1", spec("sinkflow+leadin", "sinkflow", 0.1, lead_in=True)),
        ("none+leadin", spec("none+leadin", "none", 0.0, lead_in=True)),
        (
            "infoflow+block+leadin@0.1+snapkv:0.5",
            spec(
                "infoflow+block+leadin+snapkv",
                "infoflow",
                0.1,
                compress="snapkv",
                keep=0.5,
                score_rows="block",
                lead_in=True,
            ),
        ),
        (
            "infoflow+reorder+block@0.1+snapkv:0.5",
            spec(
                "infoflow+reorder+block+snapkv", "infoflow", 0.1, True, compress="snapkv", keep=0.5, score_rows="block"
            ),
        ),
    ],
)
def test_parse_method(text, spec):
    assert parse_method(text) == spec
    assert parse_method(spec.key) == spec


def test_method_keys():
    assert [parse_method(m).key for m in ("full", "none", "epic", "random@0.3", "infoflow+reorder@0.15")] == [
        "full",
        "none",
        "epic@0.15",
        "random@0.3",
        "infoflow+reorder@0.15",
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("full@0.2", "takes no ratio"),
        ("magic@0.1", "unknown selector"),
        ("infoflow[diagonal]@0.1", "unknown geometry"),
        ("infoflow@abc", "not a number"),
        ("infoflow@1.5", r"ratio must be in \(0, 1\], got 1.5"),
        ("infoflow reorder", "cannot parse"),
        ("infoflow{23-20}", "must read {A-B}"),
        ("infoflow{last}", "must read {A-B}"),
        ("epic{1-2}@0.1", r"bad options for selector 'epic': layers=\[1, 2\] \(no such option\); its options are: k"),
        ("full+leadin", "full prefill reads no cached passage; drop '\\+leadin'"),
        (
            "infoflow+leadin+reorder",
            r"'\+reorder' belongs right after the selector, in the order \+reorder\+block\+leadin",
        ),
    ],
)
def test_parse_method_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_method(text)


def _kl(p_logits: list[float], q_logits: list[float]) -> float:
    p = [math.exp(x) / sum(math.exp(y) for y in p_logits) for x in p_logits]
    q = [math.exp(x) / sum(math.exp(y) for y in q_logits) for x in q_logits]
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_fidelity_measures_against_full_on_every_method(tmp_path):
    engine = FakeEngine()
    results = run(engine, tmp_path / "r.jsonl")
    by_method = {r.method: r for r in results if r.id == "q0"}
    full, none, infoflow = by_method["full"], by_method["none"], by_method["infoflow@0.15"]
    assert full.answer_ids == [0, 1, 2]  # "Answer: blue Because." in three fake tokens: the reference answer
    assert (full.kl_first, full.kl_answer, full.top1) == (0.0, 0.0, 1.0)
    # none leans to another token than full at every position; infoflow to the same one, less sharply.
    assert none.top1 == 0.0 and infoflow.top1 == 1.0
    assert none.kl_answer == pytest.approx(_kl([3, 0, 0, 0], [0, 3, 0, 0]))
    # Per position: full's own confidence in its tokens; none gives them 1 / (e^3 + 3) and never ranks them first.
    assert full.p_positions == pytest.approx([math.exp(3) / (math.exp(3) + 3)] * 4, abs=1e-4)
    assert none.p_positions == pytest.approx([1 / (math.exp(3) + 3)] * 4, abs=1e-4)
    assert none.top1_positions == [False] * 4 and none.kl_positions == pytest.approx([none.kl_answer] * 4, abs=1e-6)
    assert infoflow.kl_first == pytest.approx(_kl([3, 0, 0, 0], [2, 0, 0, 0]))
    assert full.gold_nll == pytest.approx(math.log(math.exp(3) + 3))  # gold "blue" is token 3 here
    # Each method's cache is forced along full's answer and along the gold answer; full's also once to build it.
    assert engine.forced[:3] == [("full", [0, 1, 2]), ("full", [0, 1, 2]), ("full", [3])]
    assert engine.forced[3:5] == [("none", [0, 1, 2]), ("none", [3])]
