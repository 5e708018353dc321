"""`lionkd serve`: any `Backend` behind an OpenAI-compatible HTTP API.

`schemas` (request bodies, OpenAI's error), `batcher` (micro-batching per model), `replies` (reply
bodies and server-sent events), `app` (`create_app` and its routes) and `run` (`ServerThread`,
`serve`).
"""

from .app import create_app
from .run import ServerThread, build_models, serve

__all__ = ["ServerThread", "build_models", "create_app", "serve"]
