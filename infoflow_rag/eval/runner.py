"""Run methods over evaluation examples against an engine, recording every answer as it completes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from infoflow_rag.engine.compression import make_policy
from infoflow_rag.engine.options import QueryOptions
from infoflow_rag.eval import fidelity
from infoflow_rag.eval.datasets import EvalExample
from infoflow_rag.eval.methods import MethodSpec, check_methods, engines_for
from infoflow_rag.eval.metrics import best_em, best_f1, clean_prediction
from infoflow_rag.eval.results import QuestionResult, ResultsLog, RunHeader, current_command

# Pinned here rather than taken from the engine, so results stay comparable if the engine default changes.
DEFAULT_PROMPT = (
    "Answer the question using the passages above. Reply with the answer only, a short phrase with no "
    "explanation.\nQuestion: {question}"
)


def run_eval(
    engine: Any,
    examples: Sequence[EvalExample],
    methods: Sequence[MethodSpec],
    out_path: str | Path,
    *,
    resume: bool = True,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 32,
    prefill_once: bool = True,
    progress: bool = True,
    command: str | None = None,
) -> list[QuestionResult]:
    """Answer every example with every method; return the results in (example, method) order.

    ``prompt`` is the question template passed to ``engine.answer`` as ``template`` (``{question}`` exactly
    once); the engine places it after the passages. Each question runs all its pending methods back to
    back, ``full`` (uncompressed) first so the others get a TTFT ratio. With ``prefill_once`` and an engine that has
    ``prefill(passages)``, the passages are prefilled once per question and the cached methods receive
    those caches instead of strings; that prefill time is recorded as ``prefill_time``, outside TTFT.
    Methods spelled ``+leadin`` answer over passages prefilled behind the neutral lead-in, on an engine of the same
    model with that lead-in (``engine.replace``); the others over ``engine``'s own caches; each kind of cache is
    prefilled once per question. Pairs already in ``out_path`` are skipped (see :class:`ResultsLog` for when resuming
    is refused; also refused: a question on file asked over other passages or text, by its ``example_digest``).
    ``command`` (recorded in the file) defaults to this process's command line.
    """
    if prompt.count("{question}") != 1:
        raise ValueError(f"prompt template {prompt!r} must contain '{{question}}' exactly once")
    check_methods(methods)
    ordered = sorted(methods, key=lambda m: not m.is_reference)
    engines = engines_for(engine, methods)
    header = RunHeader(
        model_info=_model_info(engines),
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        command=command if command is not None else current_command(),
    )
    use_prefill = prefill_once and callable(getattr(engine, "prefill", None))
    full = next((m for m in methods if m.is_reference), None)
    with ResultsLog(out_path, header, resume, check=_resumable(examples, methods, out_path)) as log:
        done = {r.pair_key: r for r in log.existing}
        pending = sum((ex.dataset, ex.id, m.key) not in done for ex in examples for m in methods)
        with tqdm(total=pending, desc="eval", unit="answer", disable=not progress) as bar:
            for example in examples:
                todo = [m for m in ordered if (example.dataset, example.id, m.key) not in done]
                if not todo:
                    continue
                full_result = done.get((example.dataset, example.id, full.key)) if full else None
                for result in _run_question(engines, example, todo, full_result, use_prefill, prompt, max_new_tokens):
                    log.append(result)
                    done[result.pair_key] = result
                    bar.update()
    return [done[(ex.dataset, ex.id, m.key)] for ex in examples for m in methods]


def _resumable(
    examples: Sequence[EvalExample], methods: Sequence[MethodSpec], path: str | Path
) -> Callable[[list[QuestionResult]], None]:
    """The checks a file must pass to be resumed: the same questions, and the same options under each key."""
    checks = (_asked_the_same(examples, path), _answered_the_same(examples, methods, path))

    def check(existing: list[QuestionResult]) -> None:
        for one in checks:
            one(existing)

    return check


def _answered_the_same(
    examples: Sequence[EvalExample], methods: Sequence[MethodSpec], path: str | Path
) -> Callable[[list[QuestionResult]], None]:
    """A check refusing to add results under a method key whose results on file were answered with other options
    (an option whose default changed since they ran, say): one table row would mix the two. A method with nothing
    left to run adds nothing, so a finished file still resumes (to write its report again)."""

    def check(existing: list[QuestionResult]) -> None:
        done = {r.pair_key for r in existing}
        for method in methods:
            if all((ex.dataset, ex.id, method.key) in done for ex in examples):
                continue
            for r in existing:
                if r.method == method.key and r.options != method.options:
                    on_file, now = r.options.to_dict(), method.options.to_dict()
                    differ = ", ".join(
                        f"{k}={on_file[k]!r} on file, {now[k]!r} now" for k in now if on_file[k] != now[k]
                    )
                    raise ValueError(
                        f"cannot resume {path}: its {method.key} results were answered with other options ({differ}), "
                        "perhaps a default that changed since; write this run to a new output path (spelling the "
                        "options on file in the method answers as they were)"
                    )

    return check


def _asked_the_same(examples: Sequence[EvalExample], path: str | Path) -> Callable[[list[QuestionResult]], None]:
    """A check refusing to resume a file whose results answered these questions over other passages or text."""
    digests = {(ex.dataset, ex.id): ex.digest for ex in examples}

    def check(existing: list[QuestionResult]) -> None:
        changed = sorted(
            {
                r.id
                for r in existing
                if r.example_digest is not None  # files from before digests were stored are taken on trust
                and digests.get((r.dataset, r.id), r.example_digest) != r.example_digest
            }
        )
        if changed:
            shown = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
            raise ValueError(
                f"cannot resume {path}: {len(changed)} question(s) on file ({shown}) were asked with other "
                "passages or question text than now (another --chunk-tokens or --haystack, or other data?). "
                "Write to a new output path instead."
            )

    return check


def _model_info(engines: dict[bool, Any]) -> dict[str, Any]:
    """The plain engine's model info, plus the lead-in text of the ``+leadin`` methods if any run: a resumed file
    must not mix rows prefilled behind one lead-in with rows prefilled behind another."""
    info = dict(engines[False].model_info)
    if True in engines:
        info["leadin_methods_lead_in"] = engines[True].lead_in
    return info


def _run_question(
    engines: dict[bool, Any],
    example: EvalExample,
    todo: list[MethodSpec],
    full_result: QuestionResult | None,
    use_prefill: bool,
    prompt: str,
    max_new_tokens: int,
) -> Iterator[QuestionResult]:
    """Each method's result on one question, yielded as soon as it is known.

    When ``full`` is among the methods, every method's cache is also teacher-forced along full's answer (and
    the gold answer) for the fidelity measures of :mod:`fidelity`; on a resumed question full's reference is
    rebuilt from its stored answer tokens without decoding again.
    """
    engine = engines[False]
    caches: dict[bool, list] = {}  # by lead_in: the question's passages prefilled once per kind of cache
    prefill_time: dict[bool, float] = {}
    for lead_in in sorted({m.lead_in for m in todo if m.options.selector != "full"}) if use_prefill else ():
        started = time.perf_counter()
        # Signals only when a policy reads them: recording them runs the vocabulary head on every passage token.
        signals = any(_needs_signals(m.options) for m in todo if m.lead_in == lead_in)
        caches[lead_in] = engines[lead_in].prefill(example.passages, signals=signals)
        prefill_time[lead_in] = time.perf_counter() - started
    gold = engine.answer_token_ids(example.answers[0]) if example.answers else []
    ref = _stored_reference(engine, example, full_result, prompt, max_new_tokens)
    for method in todo:
        runs_on = engines[method.lead_in]
        cached = method.lead_in in caches and method.options.selector != "full"
        passages = caches[method.lead_in] if cached else example.passages
        prep = runs_on.prepare(
            example.question, passages, method.options, template=prompt, max_new_tokens=max_new_tokens
        )
        output = runs_on.decode(prep, max_new_tokens=max_new_tokens)
        if method.is_reference:
            ref = fidelity.reference(output.answer_ids, engine.teacher_force(prep, output.answer_ids))
        scores = _fidelity(runs_on, prep, ref, gold)
        result = _result(
            example, method, output, full_result, prefill_time.get(method.lead_in) if cached else None, scores
        )
        if method.is_reference:
            full_result = result
        yield result


def _stored_reference(
    engine: Any, example: EvalExample, full_result: QuestionResult | None, prompt: str, max_new_tokens: int
) -> fidelity.Reference | None:
    """Full prefill's reference from a result on file: the prompt prefilled again, its answer teacher-forced."""
    if full_result is None or full_result.answer_ids is None:
        return None  # no full run, or a file from before the fidelity measures
    full = QueryOptions(selector="full")
    prep = engine.prepare(example.question, example.passages, full, template=prompt, max_new_tokens=max_new_tokens)
    return fidelity.reference(full_result.answer_ids, engine.teacher_force(prep, full_result.answer_ids))


def _fidelity(engine: Any, prep: Any, ref: fidelity.Reference | None, gold: list[int]) -> dict[str, Any]:
    """The fidelity fields of one method's result: none without a full-prefill reference."""
    if ref is None:
        return {}
    scores = fidelity.answer_fidelity(ref, engine.teacher_force(prep, ref.answer_ids))
    if gold:
        scores["gold_nll"] = fidelity.gold_nll(engine.teacher_force(prep, gold), gold)
    return scores


def _needs_signals(options: QueryOptions) -> bool:
    return make_policy(options.compress, **options.compress_options).needs_signals


def _result(
    example: EvalExample,
    method: MethodSpec,
    output: Any,
    full_result: QuestionResult | None,
    prefill_time: float | None,
    scores: dict[str, Any],
) -> QuestionResult:
    prediction = clean_prediction(output.answer)
    ttft = float(output.timings.ttft)
    reference = ttft if method.is_reference else full_result.ttft if full_result else None
    return QuestionResult(
        dataset=example.dataset,
        id=example.id,
        method=method.key,
        name=method.name,
        options=method.options,
        prediction=prediction,
        raw_answer=output.answer,
        f1=best_f1(prediction, example.answers),
        em=best_em(prediction, example.answers),
        ttft=ttft,
        ttft_ratio=ttft / reference if reference else None,
        score_time=float(output.timings.score),
        recompute_fraction=float(output.recompute_fraction),
        context_tokens=int(output.context_tokens),
        passage_order=list(output.passage_order),
        prefill_time=prefill_time,
        meta=example.meta,
        kv_tokens=_reported_size(output, "kv_tokens"),
        kv_bytes=_reported_size(output, "kv_bytes"),
        answer_ids=list(output.answer_ids),
        lead_in=method.lead_in,
        example_digest=example.digest,
        **scores,
    )


def _reported_size(output: Any, field: str) -> int | None:
    # Engines from before KV compression do not report cache sizes.
    value = getattr(output, field, None)
    return None if value is None else int(value)
