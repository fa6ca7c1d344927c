"""xxnode.gateway.sigv4: requests signed by botocore (the signer of boto3 and the AWS CLI)
verify from what the wire carries; every tampering and every malformed header is refused
with AWS's error type and wording."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.utils import percent_encode, percent_encode_sequence
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from xxnode.gateway import sigv4
from xxnode.gateway.errors import SIGNATURE_MISMATCH
from xxnode.gateway.sigv4 import SigV4Error, verify

KEY = "AKIAXXTENANT0000001"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SECRETS = {KEY: SECRET}
ENDPOINT = "http://127.0.0.1:9000"
ARN = "arn:aws:lambda:us-east-1:123456789012:function:my-fn"


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_):
        yield self._body


def _wire(prepared) -> dict:
    """What a server sees of botocore's prepared request: the raw path and query, the
    headers (plus the Host the HTTP client adds) and the body."""
    parts = urlsplit(prepared.url)
    headers = CIMultiDict()
    for name, value in prepared.headers.items():
        headers.add(name, value.decode() if isinstance(value, bytes) else value)
    if "Host" not in headers:
        headers["Host"] = parts.netloc
    body = prepared.body
    if isinstance(body, str):
        body = body.encode()
    return {
        "method": prepared.method,
        "raw_path": parts.path,
        "query": parts.query,
        "headers": headers,
        "body": body,
    }


def _now(w: dict) -> datetime:
    return datetime.strptime(w["headers"]["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def check(w: dict, *, now: datetime | None = None, lookup=SECRETS.get, **kw):
    return verify(
        w["method"],
        w["raw_path"],
        w["query"],
        w["headers"],
        w["body"],
        lookup,
        _now(w) if now is None else now,
        **kw,
    )


def refused(w: dict, code: str, **kw) -> str:
    with pytest.raises(SigV4Error) as info:
        check(w, **kw)
    assert info.value.code == code
    assert info.value.status == 403
    return info.value.message


@pytest.fixture
def client():
    """A real boto3 Lambda client; each call returns the wire form of what it sent."""
    sent = []

    def send(request, **_):
        sent.append(_wire(request))
        return AWSResponse(request.url, 200, {"Content-Type": "application/json"}, _Raw(b"{}"))

    c = boto3.client(
        "lambda",
        region_name="us-east-1",
        endpoint_url=ENDPOINT,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )
    c.meta.events.register("before-send.lambda", send)

    def call(op: str, **params) -> dict:
        getattr(c, op)(**params)
        return sent.pop()

    return call


def signed(
    method,
    url,
    body=b"",
    headers=None,
    *,
    key=KEY,
    secret=SECRET,
    token=None,
    region="us-east-1",
    service="lambda",
) -> dict:
    """Sign with botocore's SigV4Auth directly, for requests no Lambda operation makes."""
    req = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
    SigV4Auth(Credentials(key, secret, token), service, region).add_auth(req)
    return _wire(req.prepare())


def _with_auth(w: dict, auth: str) -> dict:
    h = CIMultiDict(w["headers"])
    h["Authorization"] = auth
    return {**w, "headers": h}


def _replace(w: dict, **headers) -> dict:
    h = CIMultiDict(w["headers"])
    for name, value in headers.items():
        name = name.replace("_", "-")
        if value is None:
            h.popall(name, None)
        else:
            h[name] = value
    return {**w, "headers": h}


# --- what the clients send verifies


def test_list_functions_with_marker_and_max_items(client):
    w = client("list_functions", Marker="next-page/token==", MaxItems=10)
    assert w["raw_path"] == "/2015-03-31/functions" and "MaxItems=10" in w["query"]
    v = check(w, region="us-east-1")
    assert (v.access_key_id, v.region, v.service) == (KEY, "us-east-1", "lambda")
    assert v.signed_headers == ("host", "x-amz-date") and v.payload_signed


def test_invoke_with_json_body_and_invocation_headers(client):
    w = client(
        "invoke",
        FunctionName="my-fn",
        InvocationType="Event",
        LogType="Tail",
        Payload=b'{"who": "you", "n": [1, 2, 3]}',
    )
    assert w["method"] == "POST" and w["body"] == b'{"who": "you", "n": [1, 2, 3]}'
    v = check(w)
    assert {"x-amz-invocation-type", "x-amz-log-type"} <= set(v.signed_headers)


@pytest.mark.parametrize(
    "name,qualifier,raw",
    [
        ("my-fn", None, "my-fn"),
        ("my-fn:prod", None, "my-fn%3Aprod"),
        ("my-fn", "7", "my-fn"),
        ("123456789012:function:my-fn", None, "123456789012%3Afunction%3Amy-fn"),
        (ARN, None, ARN.replace(":", "%3A")),
        (ARN + ":$LATEST", None, ARN.replace(":", "%3A") + "%3A%24LATEST"),
        (ARN, "live", ARN.replace(":", "%3A")),
    ],
)
def test_function_names_arns_and_qualifiers_in_the_path(client, name, qualifier, raw):
    params = {"FunctionName": name, "Payload": b"{}"}
    if qualifier:
        params["Qualifier"] = qualifier
    w = client("invoke", **params)
    assert w["raw_path"] == f"/2015-03-31/functions/{raw}/invocations"
    assert w["query"] == (f"Qualifier={qualifier}" if qualifier else "")
    check(w)


def test_arn_path_as_the_gateway_receives_it():
    url = f"{ENDPOINT}/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Amy-fn/invocations"
    w = signed("POST", url, b"{}")
    assert w["raw_path"].count("%3A") == 6
    check(w)
    # the same function with ':' written bare is another path under the signature
    refused({**w, "raw_path": w["raw_path"].replace("%3A", ":")}, "InvalidSignatureException")
    refused({**w, "raw_path": w["raw_path"].replace("%3A", "%3a")}, "InvalidSignatureException")


def test_create_function_with_a_5_mb_body(client):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("app.py", b"#" * (5 * 1024 * 1024))
    w = client(
        "create_function",
        FunctionName="big",
        Runtime="python3.11",
        Role="arn:aws:iam::123456789012:role/r",
        Handler="app.handler",
        Code={"ZipFile": buf.getvalue()},
    )
    assert len(w["body"]) > 5 * 1024 * 1024
    assert base64.b64encode(buf.getvalue()).decode() in w["body"].decode()
    check(w)
    tampered = bytearray(w["body"])
    tampered[len(tampered) // 2] ^= 1
    refused({**w, "body": bytes(tampered)}, "InvalidSignatureException")


@pytest.mark.parametrize("op", ["get_function", "delete_function"])
def test_empty_bodies(client, op):
    w = client(op, FunctionName="my-fn")
    assert not w["body"]
    check(w)
    check({**w, "body": None})
    check({**w, "body": b""})


def test_unicode_in_query_values(client):
    w = client("list_functions", Marker="é/ +~ሴ&=%", MaxItems=5)
    assert "%C3%A9" in w["query"] and "%E1%88%B4" in w["query"]
    check(w)


def test_repeated_query_keys():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/tags?Tag=b&Tag=a&Tag=%C3%A9&Other=1")
    check(w)
    # values may come in any order on the wire: the canonical form sorts them
    check({**w, "query": "Other=1&Tag=a&Tag=%C3%A9&Tag=b"})
    refused({**w, "query": "Tag=b&Tag=a&Other=1"}, "InvalidSignatureException")


def test_query_plus_reads_as_space():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions?Marker=a%20b")
    check({**w, "query": "Marker=a+b"})
    refused({**w, "query": "Marker=a%2Bb"}, "InvalidSignatureException")


def test_https_endpoint_with_default_port():
    w = signed("GET", "https://lambda.us-east-1.amazonaws.com/2015-03-31/functions")
    assert w["headers"]["Host"] == "lambda.us-east-1.amazonaws.com"
    check(w)


def test_go_sdk_shaped_request_signs_content_length_and_host_with_port():
    """aws-sdk-go-v2 signs host (with a non-default port) and content-length as well as its
    own headers; whatever the client listed is what is checked."""
    body = b'{"k":"v"}'
    headers = {
        "Host": "127.0.0.1:9000",
        "Content-Length": str(len(body)),
        "Amz-Sdk-Invocation-Id": "0d2cbbd8-1b6e-4bcb-9e5b-8f5bd0c3c0a1",
        "Amz-Sdk-Request": "attempt=1; max=3",
        "X-Amz-Invocation-Type": "RequestResponse",
    }
    w = signed("POST", f"{ENDPOINT}/2015-03-31/functions/my-fn%3Alive/invocations", body, headers)
    v = check(w)
    assert {"content-length", "host", "amz-sdk-request"} <= set(v.signed_headers)
    refused(_replace(w, Content_Length="10"), "InvalidSignatureException")


def test_session_token_is_signed_like_any_header():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions", token="FwoGZXIvYXdzEJr//////////token")
    v = check(w)
    assert "x-amz-security-token" in v.signed_headers
    refused(_replace(w, X_Amz_Security_Token="other"), "InvalidSignatureException")


def test_date_header_instead_of_x_amz_date():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions", headers={"Date": "placeholder"})
    assert "X-Amz-Date" not in w["headers"]
    now = parsedate_to_datetime(w["headers"]["Date"])
    check(w, now=now)
    refused(w, "InvalidSignatureException", now=now + timedelta(minutes=6))


def test_repeated_headers_join_in_order():
    req = AWSRequest(method="GET", url=f"{ENDPOINT}/2015-03-31/functions")
    req.headers.add_header("X-Amz-Meta-A", " one  two ")
    req.headers.add_header("X-Amz-Meta-A", "three")
    SigV4Auth(Credentials(KEY, SECRET), "lambda", "us-east-1").add_auth(req)
    w = _wire(req.prepare())  # prepare() keeps one value per name: take them from req
    w["headers"] = CIMultiDict([("Host", "127.0.0.1:9000"), *req.headers.items()])
    assert w["headers"].getall("X-Amz-Meta-A") == [" one  two ", "three"]
    check(w)
    w["headers"].popall("X-Amz-Meta-A")
    w["headers"].extend([("X-Amz-Meta-A", "three"), ("X-Amz-Meta-A", "one two")])
    refused(w, "InvalidSignatureException")


def test_plain_dict_headers_are_looked_up_without_case():
    w = signed("POST", f"{ENDPOINT}/2015-03-31/functions/f/invocations", b"{}")
    plain = {k.upper() if i % 2 else k.lower(): v for i, (k, v) in enumerate(w["headers"].items())}
    check({**w, "headers": plain}, now=_now(w))


def test_undecodable_bytes_are_refused_not_crashed_on():
    """aiohttp hands undecodable wire bytes over as surrogates; they are signed as bytes."""
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions?Marker=%FF")
    check({**w, "query": "Marker=\udcff"})
    refused({**w, "raw_path": w["raw_path"] + "\udcff"}, "InvalidSignatureException")
    refused(
        _replace(w, X_Amz_Date=w["headers"]["X-Amz-Date"][:-1] + "\udcff"),
        "IncompleteSignatureException",
        now=_now(w),
    )
    refused(_replace(w, Host="127.0.0.1:9000\udcff"), "InvalidSignatureException")


def test_region_none_accepts_any_region_a_given_region_only_itself():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions", region="eu-west-3")
    assert check(w).region == "eu-west-3"
    msg = refused(w, "InvalidSignatureException", region="us-east-1")
    assert msg == "Credential should be scoped to a valid region, not 'eu-west-3'."


_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    name=_TEXT,
    params=st.lists(
        st.tuples(_TEXT, st.text(st.characters(exclude_categories=("Cs",)), max_size=12)),
        max_size=5,
    ),
    header=st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=20),
    body=st.binary(max_size=64),
)
def test_any_label_query_and_header_botocore_serialises_verifies(name, params, header, body):
    """Path labels and query strings encoded as botocore's REST serialiser encodes them."""
    url = f"{ENDPOINT}/2015-03-31/functions/{percent_encode(name)}/invocations"
    if params:
        url += "?" + percent_encode_sequence(params)
    w = signed("POST", url, body, {"X-Amz-Client-Context": header})
    check(w)
    refused({**w, "body": body + b"."}, "InvalidSignatureException")


# --- tampering


def test_body_tampered(client):
    w = client("invoke", FunctionName="my-fn", Payload=b'{"amount": 10}')
    msg = refused({**w, "body": b'{"amount": 99}'}, "InvalidSignatureException")
    assert msg == SIGNATURE_MISMATCH
    refused({**w, "body": None}, "InvalidSignatureException")


def test_signed_header_changed(client):
    w = client("invoke", FunctionName="my-fn", InvocationType="Event", Payload=b"{}")
    refused(_replace(w, X_Amz_Invocation_Type="RequestResponse"), "InvalidSignatureException")
    refused(_replace(w, Host="evil.example:9000"), "InvalidSignatureException")
    # a signed header dropped on the way
    refused(_replace(w, X_Amz_Invocation_Type=None), "InvalidSignatureException")


def test_unsigned_header_added_still_verifies_but_is_not_vouched_for(client):
    w = client("invoke", FunctionName="my-fn", Payload=b"{}")
    v = check(_replace(w, X_Amz_Log_Type="Tail", X_Forwarded_For="10.0.0.1"))
    assert "x-amz-log-type" not in v.signed_headers


def test_path_changed(client):
    w = client("invoke", FunctionName="my-fn", Payload=b"{}")
    refused(
        {**w, "raw_path": "/2015-03-31/functions/other-fn/invocations"}, "InvalidSignatureException"
    )
    refused(
        {**w, "raw_path": "/2015-03-31/functions/my-fn/invocations/"}, "InvalidSignatureException"
    )
    refused({**w, "method": "PUT"}, "InvalidSignatureException")


def test_query_changed(client):
    w = client("list_functions", Marker="abc", MaxItems=10)
    refused(
        {**w, "query": w["query"].replace("MaxItems=10", "MaxItems=11")},
        "InvalidSignatureException",
    )
    refused({**w, "query": w["query"] + "&FunctionVersion=ALL"}, "InvalidSignatureException")
    refused({**w, "query": ""}, "InvalidSignatureException")


def test_wrong_secret():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions", secret="not-the-secret")
    assert refused(w, "InvalidSignatureException") == SIGNATURE_MISMATCH


def test_unknown_key():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions", key="AKIANOBODY")
    msg = refused(w, "UnrecognizedClientException")
    assert msg == "The security token included in the request is invalid."


def test_rotated_secret_is_not_served_from_the_key_cache():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    check(w)
    check(w)
    assert sigv4._signing_key.cache_info().hits >= 1
    refused(w, "InvalidSignatureException", lookup={KEY: "rotated"}.get)


# --- the clock


def test_skew_within_5_minutes_both_ways_verifies():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    check(w, now=_now(w) + timedelta(minutes=4))
    check(w, now=_now(w) - timedelta(minutes=4))
    check(w, now=_now(w) + timedelta(minutes=5))


def test_signed_6_minutes_ago_is_expired():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    now = _now(w) + timedelta(minutes=6)
    msg = refused(w, "InvalidSignatureException", now=now)
    f = "%Y%m%dT%H%M%SZ"
    assert msg == (
        f"Signature expired: {w['headers']['X-Amz-Date']} is now earlier than "
        f"{(now - timedelta(minutes=5)).strftime(f)} ({now.strftime(f)} - 5 min.)"
    )


def test_signed_6_minutes_ahead_is_not_yet_current():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    now = _now(w) - timedelta(minutes=6)
    msg = refused(w, "InvalidSignatureException", now=now)
    f = "%Y%m%dT%H%M%SZ"
    assert msg == (
        f"Signature not yet current: {w['headers']['X-Amz-Date']} is still later than "
        f"{(now + timedelta(minutes=5)).strftime(f)} ({now.strftime(f)} + 5 min.)"
    )


def test_naive_now_is_utc():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    check(w, now=_now(w).replace(tzinfo=None))


# --- malformed or missing authentication


def test_missing_authorization():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    assert refused(_replace(w, Authorization=None), "MissingAuthenticationTokenException") == (
        "Missing Authentication Token"
    )
    refused(_replace(w, Authorization="Bearer eyJhbGciOi"), "MissingAuthenticationTokenException")


def test_missing_signature_and_other_parameters():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    auth = w["headers"]["Authorization"]
    no_sig = auth[: auth.index(", Signature=")]
    msg = refused(_with_auth(w, no_sig), "IncompleteSignatureException")
    assert msg == f"Authorization header requires 'Signature' parameter. Authorization={no_sig}"
    msg = refused(_with_auth(w, "AWS4-HMAC-SHA256 "), "IncompleteSignatureException")
    assert msg.startswith(
        "Authorization header requires 'Credential' parameter. "
        "Authorization header requires 'Signature' parameter. "
        "Authorization header requires 'SignedHeaders' parameter. "
    )


def test_pair_without_equal_sign():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    auth = w["headers"]["Authorization"].replace("Credential=", "Credential= ")
    msg = refused(_with_auth(w, auth), "IncompleteSignatureException")
    assert msg == (
        f"'{KEY}/{_now(w):%Y%m%d}/us-east-1/lambda/aws4_request' not a valid key=value pair "
        f"(missing equal-sign) in Authorization header: '{auth}'."
    )


def test_bad_credential_scope():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    auth = w["headers"]["Authorization"]
    short = auth.replace("/us-east-1/lambda/", "/us-east-1/")
    msg = refused(_with_auth(w, short), "IncompleteSignatureException")
    assert msg.startswith("Credential must have exactly 5 slash-delimited elements")
    term = auth.replace("aws4_request", "aws5_request")
    msg = refused(_with_auth(w, term), "InvalidSignatureException")
    assert (
        msg
        == "Credential should be scoped with a valid terminator: 'aws4_request', not 'aws5_request'."
    )
    day = auth.replace(f"/{_now(w):%Y%m%d}/", "/20000101/")
    msg = refused(_with_auth(w, day), "InvalidSignatureException")
    assert msg.startswith("Date in Credential scope does not match YYYYMMDD")


def test_wrong_service_in_the_scope():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions", service="s3")
    msg = refused(w, "InvalidSignatureException")
    assert msg == "Credential should be scoped to correct service: 'lambda'."


def test_host_must_be_signed():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    auth = w["headers"]["Authorization"].replace("SignedHeaders=host;", "SignedHeaders=")
    msg = refused(_with_auth(w, auth), "InvalidSignatureException")
    assert msg == "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization."


def test_unsupported_algorithm():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    auth = w["headers"]["Authorization"].replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512")
    msg = refused(_with_auth(w, auth), "IncompleteSignatureException")
    assert msg.startswith("Unsupported AWS 'algorithm': 'AWS4-HMAC-SHA512'")


def test_missing_x_amz_date():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    gone = _replace(w, X_Amz_Date=None)
    msg = refused(gone, "IncompleteSignatureException", now=_now(w))
    assert msg == (
        "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header. "
        f"Authorization={w['headers']['Authorization']}"
    )


def test_garbled_x_amz_date():
    w = signed("GET", f"{ENDPOINT}/2015-03-31/functions")
    msg = refused(
        _replace(w, X_Amz_Date="2015-08-30T12:36:00Z"), "IncompleteSignatureException", now=_now(w)
    )
    assert msg == (
        "Date must be in ISO-8601 'basic format'. Got '2015-08-30T12:36:00Z'. "
        "See http://en.wikipedia.org/wiki/ISO_8601"
    )


# --- x-amz-content-sha256


def test_content_sha256_matching_the_body():
    body = b'{"a": 1}'
    w = signed(
        "POST",
        f"{ENDPOINT}/2015-03-31/functions/f/invocations",
        body,
        {"X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest()},
    )
    assert "x-amz-content-sha256" in check(w).signed_headers


def test_content_sha256_mismatch():
    """botocore signs the header's value; the body that came is another one."""
    w = signed(
        "POST",
        f"{ENDPOINT}/2015-03-31/functions/f/invocations",
        b'{"a": 1}',
        {"X-Amz-Content-SHA256": hashlib.sha256(b'{"a": 2}').hexdigest()},
    )
    msg = refused(w, "InvalidSignatureException")
    assert msg == "The provided 'x-amz-content-sha256' header does not match what was computed."
    refused(
        _replace(w, X_Amz_Content_SHA256=hashlib.sha256(b'{"a": 1}').hexdigest()),
        "InvalidSignatureException",
    )


def test_unsigned_payload_verifies_and_says_so():
    w = signed(
        "POST",
        f"{ENDPOINT}/2015-03-31/functions/f/invocations",
        b"{}",
        {"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"},
    )
    v = check({**w, "body": b'{"anything": true}'})
    assert not v.payload_signed


def test_streaming_payload_is_refused():
    w = signed(
        "POST",
        f"{ENDPOINT}/2015-03-31/functions/f/invocations",
        b"{}",
        {"X-Amz-Content-SHA256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"},
    )
    refused(w, "InvalidSignatureException")


# --- canonical forms from the specification


@pytest.mark.parametrize(
    "raw,canonical",
    [
        ("", "/"),
        ("/", "/"),
        (
            "/2015-03-31/functions/my%3Afn/invocations",
            "/2015-03-31/functions/my%253Afn/invocations",
        ),
        ("/a b/~x", "/a%20b/~x"),
        ("//example//", "/example/"),
        ("/example1/example2/../..", "/"),
        ("/./example", "/example"),
    ],
)
def test_canonical_uri(raw, canonical):
    assert sigv4.canonical_uri(raw) == canonical


@pytest.mark.parametrize(
    "raw,canonical",
    [
        ("", ""),
        ("b=2&a=1", "a=1&b=2"),
        ("a=2&a=1&a=10", "a=1&a=10&a=2"),
        ("k", "k="),
        ("k=a=b", "k=a%3Db"),
        ("k=%7e%2a", "k=~%2A"),
        ("k=é", "k=%C3%A9"),
        ("k=a+b", "k=a%20b"),
        ("k=1&&j=2", "j=2&k=1"),
    ],
)
def test_canonical_query(raw, canonical):
    assert sigv4.canonical_query(raw) == canonical
