"""``python -m infoflow_rag.cli``: the ``infoflow-rag`` command."""

import sys

from . import main

sys.exit(main())
