.PHONY: demo test test-fast lint

# Set up .venv and run the end-to-end demo on the embedded default model.
demo:
	scripts/setup.sh
	.venv/bin/infoflow-rag demo

# Set up .venv (with test tools) and run the fast tier, then the real-model tier.
test:
	scripts/setup.sh --dev
	.venv/bin/python -m pytest
	.venv/bin/python -m pytest -m "real_model"

test-fast:
	.venv/bin/python -m pytest -x -q

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
