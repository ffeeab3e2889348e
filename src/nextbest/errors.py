"""The exception tree of nextbest. No grpc imports here; `server.py` maps these to status codes.

NextbestError
├── ConfigError          a config file or override is invalid
├── DataError            an input file cannot be used at all (missing column, empty, unreadable)
│   └── RejectShareError the share of rejected rows passed --max-reject-share
├── ModelError           a model directory is missing, incomplete or inconsistent
├── EngineError          the Spark training engine is missing (pyspark, Java) or failed
├── InvalidRequest       a request names a bad value (field named in the message)
└── NotFound             a request names something the model does not know (named in the message)
"""

__all__ = [
    "NextbestError",
    "ConfigError",
    "DataError",
    "RejectShareError",
    "ModelError",
    "EngineError",
    "InvalidRequest",
    "NotFound",
]


class NextbestError(Exception):
    """Base of every error nextbest raises on purpose; its message is one line for the user."""


class ConfigError(NextbestError):
    """The configuration is invalid; the message names the key."""


class DataError(NextbestError):
    """An input file cannot be used; the message names the file and, if it applies, the column."""


class RejectShareError(DataError):
    """Too many rows of an input file were rejected."""


class ModelError(NextbestError):
    """A model version is missing, incomplete or does not match what the caller expects."""


class EngineError(NextbestError):
    """The training engine cannot run (pyspark or Java missing) or its fit failed."""


class InvalidRequest(NextbestError):
    """A request is malformed; the message names the field."""


class NotFound(NextbestError):
    """A request names a product or content the served model does not know."""
