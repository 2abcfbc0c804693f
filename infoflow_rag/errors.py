"""Exceptions users can catch by name."""


class InfoFlowError(Exception):
    """Base class of every error infoflow-rag raises on purpose."""


class UnsupportedModelError(InfoFlowError):
    """The model cannot be served exactly (RoPE variant, architecture, failed correctness gate)."""


class ModelIntegrityError(InfoFlowError):
    """A model file does not match its pinned checksum."""
