"""``proxy.pgwire``: the PostgreSQL v3 frontend/backend protocol, sans I/O.

What it is for: bytes in, typed messages out; typed messages in, bytes out -- for the proxy's
PostgreSQL listener (``proxy/postgres``), which owns the sockets, TLS, authentication and relaying.
The PostgreSQL 15 docs' "Frontend/Backend Protocol" chapter ("Message Flow", "Message Formats",
"Error and Notice Message Fields") is the spec. Modules:
  - ``errors``: ``ProtocolError`` (sqlstate, message, remote) and SQLSTATE constants;
  - ``startup``: ``StartupDecoder`` and the startup packets (SSLRequest, GSSENCRequest,
    CancelRequest, StartupMessage), bounded to 10000 bytes;
  - ``framing``: ``MessageDecoder`` / ``Frame`` / ``encode_frame`` for typed messages, bounded per
    type (64 MiB by default), linear in the bytes fed; ``FrameBoundaries`` for a relay that streams
    messages through and must know where each one ends;
  - ``frontend``: client messages and ``decode_frontend``, the password-family decoders;
  - ``backend``: server messages and ``decode_backend``, ``error_response``, ``notice_response``.
Typical use on a client connection::

    startup = StartupDecoder(); startup.feed(data); packet = startup.next_message()
    ...                                   # after StartupMessage:
    frames = MessageDecoder.for_frontend_messages(); frames.feed(startup.take_remaining())
    while (frame := frames.next_frame()) is not None:
        message = decode_frontend(frame)  # or decode_password_message(frame) while authenticating

What it must not do: any I/O (no asyncio, sockets, files, logging, clocks), hold unbounded buffers
of its own, or let any exception but ``ProtocolError`` escape a decoder fed hostile bytes.
"""

from .backend import (
    ERROR_SEVERITIES,
    FIELD_CODES,
    NOTICE_SEVERITIES,
    TRANSACTION_FAILED,
    TRANSACTION_IDLE,
    TRANSACTION_IN_BLOCK,
    AuthenticationCleartextPassword,
    AuthenticationGSS,
    AuthenticationGSSContinue,
    AuthenticationKerberosV5,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationRequest,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    AuthenticationSSPI,
    BackendKeyData,
    BackendMessage,
    BindComplete,
    CloseComplete,
    CommandComplete,
    CopyBothResponse,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    FieldDescription,
    FunctionCallResponse,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    ParseComplete,
    PortalSuspended,
    ReadyForQuery,
    RowDescription,
    decode_backend,
    error_response,
    notice_response,
)
from .errors import (
    ADMIN_SHUTDOWN,
    CONNECTION_FAILURE,
    FEATURE_NOT_SUPPORTED,
    INTERNAL_ERROR,
    INVALID_AUTHORIZATION_SPECIFICATION,
    INVALID_PASSWORD,
    PROGRAM_LIMIT_EXCEEDED,
    PROTOCOL_VIOLATION,
    QUERY_CANCELED,
    TOO_MANY_CONNECTIONS,
    ProtocolError,
)
from .framing import (
    AUTH_MESSAGE_LIMIT,
    BACKEND_TYPE_LIMITS,
    BACKEND_TYPES,
    DEFAULT_MAX_MESSAGE_LENGTH,
    FRONTEND_TYPE_LIMITS,
    FRONTEND_TYPES,
    SMALL_MESSAGE_LIMIT,
    Frame,
    FrameBoundaries,
    Message,
    MessageDecoder,
    encode_frame,
)
from .frontend import (
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    FrontendMessage,
    FunctionCall,
    Parse,
    PasswordFamily,
    PasswordMessage,
    Query,
    SASLInitialResponse,
    SASLResponse,
    Sync,
    Terminate,
    decode_frontend,
    decode_password_message,
    decode_sasl_initial_response,
    decode_sasl_response,
)
from .startup import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET_LENGTH,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupDecoder,
    StartupMessage,
    StartupPacket,
    decode_ssl_response,
    gssenc_response,
    ssl_response,
)

__all__ = [name for name in dir() if not name.startswith("_") and name not in {
    "backend", "errors", "framing", "frontend", "startup"}]
