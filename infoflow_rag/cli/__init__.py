"""``infoflow-rag``: a thin command line over the library.

``parser`` declares the commands; ``serving`` (ingest, ask, serve, ...) and ``evaluation`` (bench, eval) run
them; ``options`` turns the query-option flags, built from :class:`~infoflow_rag.QueryOptions`, into options;
``values`` types the other flags' values, so a bad one is refused before any model loads.
"""

from __future__ import annotations

import logging
import signal
import sys

from ..allocator import keep_freed_memory
from ..errors import InfoFlowError
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    keep_freed_memory()  # every command runs forwards, which reuse freed pages faster (infoflow_rag/allocator.py)
    previous = signal.signal(signal.SIGTERM, _unwind)
    try:
        return args.func(args)
    except (InfoFlowError, ValueError, ModuleNotFoundError, FileNotFoundError) as err:
        print(f"infoflow-rag: error: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unwind(signum: int, frame: object) -> None:
    """SIGTERM (``timeout``, a CI cancel, ``kill``) unwinds like Ctrl-C, so a command's cleanup runs: a cut-short
    bench still prints the contexts it finished, files close. Python's default would end the process at once."""
    raise SystemExit(128 + signum)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a refusal says what was wrong and the fix; no traceback)."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
