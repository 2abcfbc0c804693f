"""``infoflow-rag``: a thin command line over the library.

``parser`` declares the commands; ``serving`` (ingest, ask, serve, ...) and ``evaluation`` (bench, eval) run
them; ``options`` turns the query-option flags, built from :class:`~infoflow_rag.QueryOptions`, into options;
``values`` types the other flags' values, so a bad one is refused before any model loads.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from ..allocator import keep_freed_memory
from ..errors import InfoFlowError
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    keep_freed_memory()  # every command runs forwards, which reuse freed pages faster (infoflow_rag/allocator.py)
    # Not in a thread (signals are the main thread's), not over a SIGTERM the parent set to be ignored, and not
    # for `serve`, whose server stops gracefully on SIGTERM itself and then dies by it, as service managers expect.
    unwind = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        and not getattr(args, "handles_sigterm", False)
    )
    previous = signal.signal(signal.SIGTERM, _unwind) if unwind else None
    try:
        return args.func(args)
    except (InfoFlowError, ValueError, ModuleNotFoundError, OSError) as err:  # OSError: a path that is a file, ...
        print(f"infoflow-rag: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written stays consistent (ingest and eval commit as they go)
        resume = "; run the same command again to resume" if getattr(args, "resumable", False) else ""
        print(f"infoflow-rag: interrupted{resume}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
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
