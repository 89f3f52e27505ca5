"""The one error of ``proxy.pgwire``, and SQLSTATE codes the proxy sends.

What it is for: ``ProtocolError`` is raised for every malformed or oversized input (``remote=True``:
the peer sent bad bytes) and for every value that cannot be encoded (``remote=False``: our own bug).
It carries the SQLSTATE the proxy should answer with, so a listener can turn it straight into an
ErrorResponse (``ProtocolError.to_error_response``) before it closes that one connection.

What it must not do: any I/O, logging, or formatting of secrets. Messages name offsets, lengths and
message types, never payload contents such as passwords.
"""

from __future__ import annotations

# SQLSTATE codes (PostgreSQL 15 docs, Appendix A "PostgreSQL Error Codes") used by the proxy.
PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_AUTHORIZATION_SPECIFICATION = "28000"
INVALID_PASSWORD = "28P01"
CONNECTION_FAILURE = "08006"
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
TOO_MANY_CONNECTIONS = "53300"
PROGRAM_LIMIT_EXCEEDED = "54000"
INTERNAL_ERROR = "XX000"


class ProtocolError(Exception):
    """Malformed, oversized or unencodable PostgreSQL protocol data.

    Attributes:
        message: one human sentence, safe to show to the peer and to audit (no payload contents).
        sqlstate: five-character SQLSTATE; ``"08P01"`` (protocol_violation) unless the cause has a
            more precise code, e.g. ``"0A000"`` for an unsupported protocol version or ``"28000"``
            for a startup packet without ``user``.
        remote: ``True`` when the peer sent bad bytes (close the connection, audit it);
            ``False`` when the caller asked ``pgwire`` to encode something impossible (a local bug).

    Once a decoder has raised it, the decoder stays broken and raises the same error again.
    """

    def __init__(self, message: str, *, sqlstate: str = PROTOCOL_VIOLATION, remote: bool = True):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.remote = remote

    def __repr__(self) -> str:
        return (f"ProtocolError({self.message!r}, sqlstate={self.sqlstate!r}, "
                f"remote={self.remote!r})")

    def to_error_response(self, severity: str = "FATAL") -> bytes:
        """Encode this error as an ErrorResponse ('E') frame for the peer.

        Args:
            severity: ``"FATAL"`` (default: the connection is about to be closed) or ``"ERROR"``.
        Returns:
            the complete message bytes (type byte, length, fields).
        Raises:
            ProtocolError: (remote=False) if ``severity`` is not an error severity.
        """
        from .backend import error_response  # local import: backend imports this module

        return error_response(severity, self.sqlstate, self.message)
