"""An OpenAI-compatible HTTP server over a pipeline: ``infoflow-rag serve``."""

from .app import ServerSettings, create_app
from .run import serve

__all__ = ["ServerSettings", "create_app", "serve"]
