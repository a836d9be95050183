"""One exception hierarchy for the whole package.

Every error carries a stable machine-readable ``code`` (sent in server error replies) and a message that
says what to do. The CLI turns these into one-line messages and exit codes; the server turns them into
``{"ok": false, "error": {"code", "message"}}`` replies. Subclasses also inherit the matching built-in
exception so callers that catch ``ValueError``/``KeyError``/``FileNotFoundError`` keep working.
"""

from __future__ import annotations

from typing import Any


class QPBridgeError(Exception):
    """Base class of every error qpbridge raises on purpose."""

    code = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class BadRequestError(QPBridgeError, ValueError):
    """A request that does not follow the protocol (bad JSON, missing or mistyped fields)."""

    code = "bad_request"


class UnsupportedVersionError(BadRequestError):
    code = "unsupported_version"


class UnknownOpError(BadRequestError):
    code = "unknown_op"


class FrameCountError(BadRequestError):
    code = "frame_count"


class TileError(BadRequestError):
    """A tile whose bytes do not match its declared shape, or that cannot be decoded."""

    code = "bad_tile"


class LimitExceededError(BadRequestError):
    """A request over one of the server's size caps; checked before anything is allocated."""

    code = "limit_exceeded"


class BusyError(QPBridgeError):
    """The server (or this client's share of it) is full; ``details.retry_after_ms`` says when to retry."""

    code = "busy"


class MissingPixelSizeError(BadRequestError):
    code = "missing_mpp"


class UnknownModelError(QPBridgeError, KeyError):
    code = "unknown_model"


class UnknownJobError(QPBridgeError, KeyError):
    code = "unknown_job"


class JobStateError(QPBridgeError):
    """An op that the job's state does not allow (tiles after cancel, results of a failed job)."""

    code = "job_state"


class ModelCardError(QPBridgeError, ValueError):
    """A model card that does not validate against the schema."""

    code = "bad_model_card"


class ModelLoadError(QPBridgeError):
    code = "model_load"


class ImageReadError(QPBridgeError, OSError):
    code = "image_read"


class InternalError(QPBridgeError):
    """A bug: reported to the client with the exception's name; the server goes on serving."""

    code = "internal"


class ClientError(QPBridgeError):
    """Raised on the client side: the server is not reachable or answered with an error."""

    code = "client"


class ServerUnavailableError(ClientError, ConnectionError):
    code = "server_unavailable"


class AuthenticationError(ClientError):
    """The CURVE handshake failed: a wrong or missing server key, or a client key the server does not allow."""

    code = "auth"


class RemoteError(ClientError):
    """The server answered ``ok: false``; ``code`` is the server's error code."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.code = code


class ProjectError(QPBridgeError):
    """A QuPath project that cannot be read, or written safely."""

    code = "project"


class ProjectBusyError(ProjectError):
    """QuPath (or another qpbridge run) has the project open."""

    code = "project_busy"
