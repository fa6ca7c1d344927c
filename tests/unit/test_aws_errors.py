"""xxnode.gateway.errors: every error we send reads, through botocore's own parser and through
a real boto3 Lambda client, as the same code, message and modeled fields AWS would give."""

from __future__ import annotations

import json

import boto3
import botocore.parsers
import botocore.session
import pytest
from botocore.awsrequest import AWSResponse, HeadersDict
from botocore.config import Config
from botocore.exceptions import ClientError

from xxnode.gateway import errors as E
from xxnode.gateway.sigv4 import SigV4Error

MODEL = botocore.session.get_session().get_service_model("lambda")

# (constructor, args, type, status, modeled in Lambda's service-2.json)
CASES = [
    (
        E.not_found,
        ("Function not found: arn:aws:lambda:us-east-1:123456789012:function:f",),
        "ResourceNotFoundException",
        404,
        True,
    ),
    (E.conflict, ("Function already exist: f",), "ResourceConflictException", 409, True),
    (
        E.invalid_parameter,
        ("MemorySize: must be between 128 and 10240",),
        "InvalidParameterValueException",
        400,
        True,
    ),
    (E.too_large, (), "RequestTooLargeException", 413, True),
    (E.too_many_requests, (3,), "TooManyRequestsException", 429, True),
    (E.unrecognized_client, (), "UnrecognizedClientException", 403, False),
    (E.invalid_signature, (), "InvalidSignatureException", 403, False),
    (E.missing_token, (), "MissingAuthenticationTokenException", 403, False),
    (
        E.incomplete_signature,
        ("Authorization header requires 'Signature' parameter.",),
        "IncompleteSignatureException",
        403,
        False,
    ),
    (
        E.access_denied,
        (
            "User: arn:aws:iam::123456789012:user/x is not authorized to perform: lambda:InvokeFunction",
        ),
        "AccessDeniedException",
        403,
        False,
    ),
    (E.service_error, ("An internal error occurred.",), "ServiceException", 500, True),
    (
        E.unsupported_media_type,
        ("The content type of the request is not JSON.",),
        "UnsupportedMediaTypeException",
        415,
        True,
    ),
    (
        E.invalid_request_content,
        ("Could not parse request body into json",),
        "InvalidRequestContentException",
        400,
        True,
    ),
]
IDS = [c[2] for c in CASES]


def _parse(parts, operation="Invoke"):
    """What botocore's endpoint does with a response: the generic error parse, then the
    modeled one for that code, merged (botocore.endpoint._add_modeled_error_fields)."""
    status, headers, body = parts
    response = {"status_code": status, "headers": HeadersDict(headers), "body": body}
    parser = botocore.parsers.create_parser("rest-json")
    parsed = parser.parse(response, MODEL.operation_model(operation).output_shape)
    shape = MODEL.shape_for_error_code(parsed["Error"]["Code"])
    if shape is not None:
        parsed.update(parser.parse(response, shape))
    return parsed


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_):
        yield self._body


def _client_answering(parts):
    """A real boto3 Lambda client whose HTTP layer returns `parts`, retries off."""
    status, headers, body = parts
    client = boto3.client(
        "lambda",
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )

    def send(request, **_):
        return AWSResponse(request.url, status, headers, _Raw(body))

    client.meta.events.register("before-send.lambda", send)
    return client


@pytest.mark.parametrize("make,args,error_type,status,modeled", CASES, ids=IDS)
def test_botocore_parser_reads_code_and_message(make, args, error_type, status, modeled):
    err = make(*args)
    parts = E.to_response_parts(err, request_id="11111111-2222-3333-4444-555555555555")
    assert parts[0] == status == err.status
    assert parts[1]["x-amzn-ErrorType"] == error_type
    assert parts[1]["Content-Type"] == "application/json"
    parsed = _parse(parts)
    assert parsed["Error"] == {"Code": error_type, "Message": err.message}
    assert parsed["ResponseMetadata"]["RequestId"] == "11111111-2222-3333-4444-555555555555"
    assert parsed["ResponseMetadata"]["HTTPStatusCode"] == status
    if modeled:  # Lambda's own errors carry Type, and the model's spelling of the message key
        shape = MODEL.shape_for_error_code(error_type)
        assert shape.metadata["error"]["httpStatusCode"] == status
        key = "Message" if "Message" in shape.members else "message"
        assert parsed["Type"] == ("Service" if status >= 500 else "User")
        assert parsed[key] == err.message
        assert set(json.loads(parts[2])) <= set(shape.members)


@pytest.mark.parametrize("make,args,error_type,status,modeled", CASES, ids=IDS)
def test_boto3_raises_client_error_with_that_code(make, args, error_type, status, modeled):
    err = make(*args)
    client = _client_answering(E.to_response_parts(err))
    with pytest.raises(ClientError) as info:
        client.invoke(FunctionName="f", Payload=b"{}")
    assert info.value.response["Error"] == {"Code": error_type, "Message": err.message}
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    if modeled:
        assert isinstance(info.value, getattr(client.exceptions, error_type))


def test_too_many_requests_carries_reason_and_retry_after():
    err = E.too_many_requests(
        6.2, "ReservedFunctionConcurrentInvocationLimitExceeded", "Rate Exceeded."
    )
    status, headers, body = parts = E.to_response_parts(err)
    assert status == 429 and headers["Retry-After"] == "7"  # whole seconds, rounded up
    assert json.loads(body) == {
        "Type": "User",
        "message": "Rate Exceeded.",
        "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
    }
    parsed = _parse(parts)
    assert parsed["retryAfterSeconds"] == "7"
    assert parsed["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    client = _client_answering(parts)
    with pytest.raises(client.exceptions.TooManyRequestsException) as info:
        client.invoke(FunctionName="f", Payload=b"{}")
    assert info.value.response["retryAfterSeconds"] == "7"
    assert info.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert info.value.response["Error"]["Message"] == "Rate Exceeded."


def test_throttle_reason_must_be_one_of_the_models():
    assert E.THROTTLE_REASONS == set(MODEL.shape_for("ThrottleReason").enum)
    with pytest.raises(ValueError):
        E.too_many_requests(1, "Busy")


def test_message_keys_and_statuses_match_the_model():
    for error_type in (
        "ResourceNotFoundException",
        "ResourceConflictException",
        "InvalidParameterValueException",
        "RequestTooLargeException",
        "TooManyRequestsException",
        "ServiceException",
        "UnsupportedMediaTypeException",
        "InvalidRequestContentException",
    ):
        shape = MODEL.shape_for_error_code(error_type)
        ours = E.shape_of(error_type)
        assert ours.status == shape.metadata["error"]["httpStatusCode"], error_type
        assert ours.message_key in shape.members, error_type


def test_register_adds_a_type_and_unregistered_needs_a_status(monkeypatch):
    monkeypatch.setattr(E, "_SHAPES", dict(E._SHAPES))
    with pytest.raises(ValueError):
        E.AwsError("NoSuchThingException", "x")
    E.register("EC2ThrottledException", 502, message_key="Message", fault="User")
    parts = E.to_response_parts(E.AwsError("EC2ThrottledException", "slow down"))
    assert parts[0] == 502
    parsed = _parse(parts)
    assert parsed["Error"] == {"Code": "EC2ThrottledException", "Message": "slow down"}
    assert parsed["Message"] == "slow down"
    # a one-off type with its own status needs no registration
    one_off = E.AwsError("KMSDisabledException", "key disabled", status=502)
    assert _parse(E.to_response_parts(one_off))["Error"]["Code"] == "KMSDisabledException"


def test_sigv4_errors_render_as_403_with_their_code():
    err = SigV4Error(
        "IncompleteSignatureException", "Authorization header requires 'Signature' parameter."
    )
    status, headers, body = parts = E.to_response_parts(err)
    assert status == 403 and json.loads(body) == {"message": err.message}
    assert _parse(parts)["Error"]["Code"] == "IncompleteSignatureException"


def test_a_fresh_request_id_per_answer():
    a = E.to_response_parts(E.not_found("x"))[1]["x-amzn-RequestId"]
    b = E.to_response_parts(E.not_found("x"))[1]["x-amzn-RequestId"]
    assert a != b and len(a) == 36
