"""The results file: append-only JSON lines, so an interrupted run loses at most the line being written.

Line 1 is the header (``"type": "header"``: model info, prompt template, generation settings, command
line). Every later start of the same run adds a ``"resume"`` line with its command line, and every
finished (question, method) pair adds a ``"result"`` line.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from infoflow_rag.closing import Closing
from infoflow_rag.engine.options import QueryOptions
from infoflow_rag.eval.methods import MethodSpec, fixed_ratio, parse_method
from infoflow_rag.files import atomic_write

# The option fields a result line carried before it carried the options whole (read back into QueryOptions).
_FLAT_OPTIONS = ("selector", "ratio", "reorder", "geometry", "compress", "keep")
# Option fields added since: the value every line written before them was answered with (not today's default).
_ADDED_OPTIONS = {"score_dtype": "float32"}


def current_command() -> str:
    """This process's command line, shell-quoted."""
    return shlex.join(sys.argv)


def readable_command(command: str) -> str:
    """``command`` as a reader can run it: ``python -m infoflow_rag.cli`` records the module's own file as argv[0],
    an absolute path into whichever checkout ran it; it reads as ``python -m infoflow_rag.cli``."""
    try:
        words = shlex.split(command)
    except ValueError:  # not shell syntax (a header written by hand): shown as it is
        return command
    if words and words[0].endswith(("infoflow_rag/cli/__main__.py", "infoflow_rag/cli.py")):
        return shlex.join(["python", "-m", "infoflow_rag.cli", *words[1:]])
    return command


@dataclass
class RunHeader:
    """What must stay fixed for results to be comparable, plus how the run was started."""

    model_info: dict[str, Any]
    prompt: str
    max_new_tokens: int
    command: str
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def mismatches(self, other: RunHeader) -> list[str]:
        """Descriptions of the comparability fields on which ``other`` differs from this header (in model_info, of
        the keys that differ: the whole dicts would bury them)."""
        # Compare as read back from JSON: a tuple returns as a list, an int dict key as a string.
        mine, theirs = _as_json(self.model_info), _as_json(other.model_info)
        differing = [
            f"model_info[{key!r}]: file has {mine.get(key, '(none)')!r}, this run has {theirs.get(key, '(none)')!r}"
            for key in sorted(mine.keys() | theirs.keys())
            if mine.get(key) != theirs.get(key)
        ]
        return differing + [
            f"{name}: file has {getattr(self, name)!r}, this run has {getattr(other, name)!r}"
            for name in ("prompt", "max_new_tokens")
            if _as_json(getattr(self, name)) != _as_json(getattr(other, name))
        ]


@dataclass
class QuestionResult:
    """One method's answer to one question, with its score and timings."""

    dataset: str
    id: str
    method: str  # MethodSpec.key
    name: str
    options: QueryOptions  # how the question was answered (MethodSpec.options)
    prediction: str  # after clean_prediction; what f1/em score
    raw_answer: str
    f1: float
    em: float
    ttft: float  # seconds, from the engine; excludes a shared per-question prefill
    ttft_ratio: float | None  # ttft / ttft of `full` on the same question, None if `full` was not run
    score_time: float  # seconds spent choosing tokens to recompute, included in ttft
    recompute_fraction: float
    context_tokens: int
    passage_order: list[int]
    prefill_time: float | None  # seconds of the shared passage prefill, None when not used
    meta: dict[str, Any] = field(default_factory=dict)
    # The defaults below let results files from before these fields were added still load.
    kv_tokens: int | None = None  # KV cache entries when decoding starts; None if the engine does not report it
    kv_bytes: int | None = None  # peak KV cache bytes while decoding; None if the engine does not report it
    # Fidelity to full prefill (see eval.fidelity); None when the run had no `full` reference or predates them.
    answer_ids: list[int] | None = None  # generated token ids (full's are the reference answer)
    kl_first: float | None = None
    kl_answer: float | None = None
    top1: float | None = None
    gold_nll: float | None = None
    # Per answer position (see fidelity.answer_fidelity); None in files written before they were stored.
    kl_positions: list[float] | None = None
    top1_positions: list[bool] | None = None
    p_positions: list[float] | None = None
    lead_in: bool = False  # passages prefilled behind the neutral lead-in (MethodSpec.lead_in)
    # What was asked (question and passages: EvalExample.digest); None in files written before it was stored.
    example_digest: str | None = None

    @property
    def pair_key(self) -> tuple[str, str, str]:
        return (self.dataset, self.id, self.method)

    @property
    def spec(self) -> MethodSpec:
        return MethodSpec(self.name, self.options, self.lead_in)

    def to_record(self) -> dict[str, Any]:
        """The JSON line of this result (``"type": "result"`` included)."""
        return {"type": "result", **asdict(self), "options": self.options.to_dict()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> QuestionResult:
        """A result line, as written now (``options``) or before the options type (flat option fields)."""
        fields = {k: v for k, v in record.items() if k != "type" and k not in _FLAT_OPTIONS}
        if "options" in record:
            fields["options"] = QueryOptions.from_dict({**_ADDED_OPTIONS, **record["options"]})
        else:
            fields["options"] = _options_of_old_record(record).replace(**_ADDED_OPTIONS)
        return cls(**fields)


def _options_of_old_record(record: dict[str, Any]) -> QueryOptions:
    """The options of a line written before they were carried whole. Its method key spells them all (scoring
    layers and ``+block`` included, which the flat fields lacked); a free-text name falls back to the fields."""
    try:
        spec = parse_method(record["method"])
    except ValueError:
        spec = None
    if spec is not None and spec.key == record["method"] and spec.options.selector == record["selector"]:
        return spec.options
    flat = {k: record[k] for k in _FLAT_OPTIONS if record.get(k) is not None}
    if fixed_ratio(flat.get("selector", "")):  # its fixed ratio (1 or 0) was written out; options keep a real one
        flat.pop("ratio", None)
    return QueryOptions(**flat)


@dataclass
class ResultsRun:
    """Everything a results file holds."""

    header: RunHeader
    commands: list[str]  # the header's command, then one per resume (as readable_command shows them)
    results: list[QuestionResult]


def read_results(path: str | Path) -> ResultsRun:
    """Parse a results file; a truncated last line (a run killed mid-write) is ignored."""
    records = read_json_lines(path)
    if not records or records[0].get("type") != "header":
        raise ValueError(f"{path} is not a results file: its first line is not a header record")
    header = RunHeader(**{k: v for k, v in records[0].items() if k != "type"})
    commands = [readable_command(header.command)]
    commands += [readable_command(r["command"]) for r in records if r["type"] == "resume"]
    results = [QuestionResult.from_record(r) for r in records if r["type"] == "result"]
    return ResultsRun(header, commands, results)


class ResultsLog(Closing):
    """Appends results to ``path``, creating it with ``header`` or resuming it if it exists.

    Resuming needs ``resume=True``, an identical model, prompt and ``max_new_tokens``, and the caller's ``check``
    (if any) to accept the results on file; ``existing`` then holds them.
    """

    def __init__(
        self,
        path: str | Path,
        header: RunHeader,
        resume: bool,
        check: Callable[[list[QuestionResult]], None] | None = None,
    ) -> None:
        """``check`` sees the results on file before a resume writes anything, and may refuse them (raise)."""
        self.path = Path(path)
        self.existing: list[QuestionResult] = []
        if self.path.exists():
            if not resume:
                raise FileExistsError(f"results file {self.path} exists; resume it or choose a new output path")
            run = read_results(self.path)
            if problems := run.header.mismatches(header):
                raise ValueError(
                    f"cannot resume {self.path}: it was produced under different settings "
                    f"({'; '.join(problems)}). Write to a new output path instead."
                )
            if check is not None:
                check(run.results)
            self.existing = run.results
            drop_partial_line(self.path)
            self._file: TextIO = self.path.open("a", encoding="utf-8")
            self._write({"type": "resume", "command": header.command, "started": header.started})
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The header whole or no file: a kill right after creating it must not leave a file that every
            # later run (resuming by default) refuses as "not a results file".
            atomic_write(self.path, _line({"type": "header", **asdict(header)}).encode("utf-8"))
            self._file = self.path.open("a", encoding="utf-8")

    def append(self, result: QuestionResult) -> None:
        self._write(result.to_record())

    def close(self) -> None:
        self._file.close()

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(_line(record))
        self._file.flush()  # each record must survive a kill right after it is reported done


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


@dataclass
class _Records:
    records: list[dict[str, Any]]
    complete_bytes: int  # file length up to the end of the last complete line


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a truncated last line (a writer killed mid-write) is ignored."""
    return _read_records(Path(path)).records


def drop_partial_line(path: str | Path) -> None:
    """Cut a truncated last line off ``path`` before appending: the next record would be glued onto it."""
    complete_bytes = _read_records(Path(path)).complete_bytes
    with Path(path).open("r+b") as f:
        f.truncate(complete_bytes)


def _read_records(path: Path) -> _Records:
    data = path.read_bytes()
    records, complete_bytes = [], 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        if not line.endswith(b"\n"):
            break  # the last line, cut off mid-write
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {number} is not valid JSON; the file is corrupt") from None
        complete_bytes += len(line)
    return _Records(records, complete_bytes)


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))
