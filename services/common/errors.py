"""Transport-free errors. The core raises these; one interceptor maps each to a gRPC status.

The core never imports grpc: each class names its status code as a string, and
`encinfer.common.rpc` turns that into `grpc.StatusCode[...]`.
"""


class EncinferError(Exception):
    """Base class: an error with a message a person can act on."""

    code = "INTERNAL"


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
