"""Exceptions users can catch by name."""


class InfoFlowError(Exception):
    """Base class of every error infoflow-rag raises on purpose."""


class UnsupportedModelError(InfoFlowError):
    """The model cannot be served exactly (RoPE variant, architecture, failed correctness gate)."""


class ModelIntegrityError(InfoFlowError):
    """A model file does not match its pinned checksum."""


class StoreUnavailableError(InfoFlowError):
    """A KV store backend could not read or write (disk full or read-only, Redis down, out of memory...)."""


class IndexIntegrityError(InfoFlowError):
    """A passage index directory is missing a file, holds a corrupt one, or holds files of different indexes."""


class ReadOnlyIndexError(InfoFlowError, PermissionError):
    """The index directory, or its records file, is not writable by this process: it can only be searched."""
