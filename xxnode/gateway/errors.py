"""Errors as Lambda's REST-JSON protocol spells them, so boto3, the AWS CLI and Terraform
raise the same typed exception from us as from AWS.

botocore takes the code from the `x-amzn-ErrorType` header (before any ':'), the message
from the body's `message` or `Message`, and then parses the body again against the modeled
shape of that code (`lambda/2015-03-31/service-2.json`): that second pass is what makes
`client.exceptions.TooManyRequestsException` carry `Reason` and `retryAfterSeconds` (the
latter read from the `Retry-After` header). Lambda's model spells the message key per shape
(`Message` for ResourceNotFound and ServiceException, `message` for most others), and the
real service answers with that spelling and `"Type": "User"` (or `"Service"` for its own
faults), so we do too. The authentication errors come from AWS's front door, not Lambda's
model: their body is only `{"message": ...}`, always with status 403 on Lambda.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorShape:
    status: int
    message_key: str = "message"
    fault: str | None = "User"  # the body's "Type"; None: the front door's errors carry none


_SHAPES: dict[str, ErrorShape] = {}


def register(
    error_type: str, status: int, *, message_key: str = "message", fault: str | None = "User"
) -> ErrorShape:
    """Declare another error type (or re-declare one): what AwsError(error_type, ...) sends."""
    shape = ErrorShape(status, message_key, fault)
    _SHAPES[error_type] = shape
    return shape


def shape_of(error_type: str) -> ErrorShape | None:
    return _SHAPES.get(error_type)


# Lambda's modeled errors (status and message key from service-2.json)
register("ResourceNotFoundException", 404, message_key="Message")
register("ResourceConflictException", 409)
register("InvalidParameterValueException", 400)
register("RequestTooLargeException", 413)
register("TooManyRequestsException", 429)
register("ServiceException", 500, message_key="Message", fault="Service")
register("UnsupportedMediaTypeException", 415)
register("InvalidRequestContentException", 400)
register("RecursiveInvocationException", 400, message_key="Message")
# what Lambda's front door sends for a body over the operation's limit (not in the model,
# so boto3 raises a plain ClientError with this code, as against AWS)
register("RequestEntityTooLargeException", 413, fault=None)
# the front door's authentication and authorisation errors: 403 on Lambda
register("MissingAuthenticationTokenException", 403, fault=None)
register("IncompleteSignatureException", 403, fault=None)
register("InvalidSignatureException", 403, fault=None)
register("UnrecognizedClientException", 403, fault=None)
register("AccessDeniedException", 403, message_key="Message", fault=None)

# the model's ThrottleReason enum
THROTTLE_REASONS = frozenset(
    {
        "ConcurrentInvocationLimitExceeded",
        "FunctionInvocationRateLimitExceeded",
        "ReservedFunctionConcurrentInvocationLimitExceeded",
        "ReservedFunctionInvocationRateLimitExceeded",
        "CallerRateLimitExceeded",
        "ConcurrentSnapshotCreateLimitExceeded",
    }
)

UNRECOGNIZED_CLIENT = "The security token included in the request is invalid."
SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)
MISSING_TOKEN = "Missing Authentication Token"


class AwsError(Exception):
    """One error answer. `fields` go into the body beside the message (e.g. Reason);
    `headers` into the response (e.g. Retry-After). An unregistered type needs `status`."""

    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        status: int | None = None,
        fields: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        shape = _SHAPES.get(error_type)
        if shape is None:
            if status is None:
                raise ValueError(f"unregistered AWS error type {error_type!r} needs a status")
            shape = ErrorShape(status)
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.status = shape.status if status is None else status
        self.shape = shape
        self.fields = dict(fields or {})
        self.headers = dict(headers or {})

    @property
    def code(self) -> str:
        return self.error_type

    def __repr__(self) -> str:
        return f"AwsError({self.error_type!r}, {self.message!r}, status={self.status})"


def to_response_parts(
    err: AwsError, request_id: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for the HTTP layer; a fresh request id unless one is given."""
    body: dict[str, object] = {}
    if err.shape.fault is not None:
        body["Type"] = err.shape.fault
    body[err.shape.message_key] = err.message
    body.update(err.fields)
    headers = {
        "Content-Type": "application/json",
        "x-amzn-ErrorType": err.error_type,
        "x-amzn-RequestId": request_id or str(uuid.uuid4()),
    }
    headers.update(err.headers)
    return err.status, headers, json.dumps(body, separators=(",", ":")).encode()


# one constructor per error the gateway raises; the names are what its code reads best as


def not_found(message: str) -> AwsError:
    return AwsError("ResourceNotFoundException", message)


def conflict(message: str) -> AwsError:
    return AwsError("ResourceConflictException", message)


def invalid_parameter(message: str) -> AwsError:
    return AwsError("InvalidParameterValueException", message)


def too_large(
    message: str = "Request must be smaller than 6291456 bytes for the InvokeFunction operation",
) -> AwsError:
    return AwsError("RequestTooLargeException", message)


def too_many_requests(
    retry_after_seconds: float,
    reason: str = "CallerRateLimitExceeded",
    message: str = "Rate exceeded",
) -> AwsError:
    """429 with Retry-After in whole seconds (HTTP allows no fraction; rounded up so a
    client that obeys it does not come back early)."""
    if reason not in THROTTLE_REASONS:
        raise ValueError(f"not one of Lambda's throttle reasons: {reason!r}")
    seconds = max(0, math.ceil(retry_after_seconds))
    return AwsError(
        "TooManyRequestsException",
        message,
        fields={"Reason": reason},
        headers={"Retry-After": str(seconds)},
    )


def unrecognized_client(message: str = UNRECOGNIZED_CLIENT) -> AwsError:
    return AwsError("UnrecognizedClientException", message)


def invalid_signature(message: str = SIGNATURE_MISMATCH) -> AwsError:
    return AwsError("InvalidSignatureException", message)


def missing_token(message: str = MISSING_TOKEN) -> AwsError:
    return AwsError("MissingAuthenticationTokenException", message)


def incomplete_signature(message: str) -> AwsError:
    return AwsError("IncompleteSignatureException", message)


def access_denied(message: str) -> AwsError:
    return AwsError("AccessDeniedException", message)


def service_error(message: str) -> AwsError:
    return AwsError("ServiceException", message)


def unsupported_media_type(message: str) -> AwsError:
    return AwsError("UnsupportedMediaTypeException", message)


def recursive(message: str) -> AwsError:
    return AwsError("RecursiveInvocationException", message)


def invalid_request_content(message: str) -> AwsError:
    return AwsError("InvalidRequestContentException", message)
