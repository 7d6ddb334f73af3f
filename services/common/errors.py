"""Transport-free errors. The core raises these; one interceptor maps each to a gRPC status.

The core never imports grpc: each class names its status code as a string, and
`encinfer.common.rpc` turns that into `grpc.StatusCode[...]`.
"""


class EncinferError(Exception):
    """Base class: an error with a message a person can act on.

    `code` is the gRPC status code's name ("NOT_FOUND"); `message` what the person
    is told (on the client: the server's own words)."""

    code = "INTERNAL"
    # True when the client library got this error as a service's answer (client.classifier.from_service).
    from_service = False

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(EncinferError):
    code = "INVALID_ARGUMENT"


class NotFound(EncinferError):
    code = "NOT_FOUND"


class AlreadyExists(EncinferError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(EncinferError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(EncinferError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(EncinferError):
    code = "UNAVAILABLE"


class DeadlineExceeded(EncinferError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(EncinferError):
    code = "UNAUTHENTICATED"


class PermissionDenied(EncinferError):
    code = "PERMISSION_DENIED"


class DataLoss(EncinferError):
    code = "DATA_LOSS"


class Cancelled(EncinferError):
    code = "CANCELLED"


class ConfigError(Exception):
    """A service cannot start as configured (a setting that does not parse, a port in use,
    unusable TLS files, a missing model): the message names the setting and what to change.
    Library code raises it; only each service's main() turns it into one log line and exit 1."""


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                      ResourceExhausted, Unavailable, DeadlineExceeded, Unauthenticated,
                                      PermissionDenied, DataLoss, Cancelled)}


def from_status(code: str, message: str = "") -> EncinferError:
    """The error a gRPC status stands for: the one reverse mapping (status -> error).

    `code` is the status code's name ("UNAVAILABLE"); codes without a class of their
    own (UNKNOWN, INTERNAL, UNIMPLEMENTED, ...) give an EncinferError carrying that code.

        >>> from_status("NOT_FOUND", "key ab12 not found")
        NotFound('key ab12 not found')
    """
    cls = _BY_CODE.get(code)
    message = message or code
    return cls(message) if cls is not None else EncinferError(message, code=code)
