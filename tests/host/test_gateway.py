"""The front door, as users reach it: `xxctl up` (a gateway, a shard and a real node), boto3
and the AWS CLI unmodified, SigV4 verified, tenants kept apart, the price class as the tag
`xx:class`, Invoke's three types, function URLs by curl, and AWS-shaped errors."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import zipfile

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.support.xx_up import ROLE, XXCTL, Up, zipped
from xxnode.ledger.store import open_store

APP = """
import json, os, time

def handler(event, context):
    if event.get("fail"):
        raise ValueError("asked to fail")
    if "sleep" in event:
        time.sleep(event["sleep"])
    if "mark" in event:  # an Event invocation leaves a trace the test can see
        print("MARK", event["mark"], flush=True)
    return {
        "who": event.get("who"),
        "policy": os.sched_getscheduler(0),
        "priority": os.sched_getparam(0).sched_priority,
        "greeting": os.environ.get("GREETING"),
        "function": context.function_name,
        "arn": context.invoked_function_arn,
    }
"""

WEB = """
import base64

def handler(event, context):
    # payload format 2.0, as a function URL sends it
    http = event["requestContext"]["http"]
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    return {
        "statusCode": 201,
        "headers": {"Content-Type": "text/plain", "X-Route": http["path"]},
        "cookies": ["session=abc; Path=/"],
        "body": f"{http['method']} {event['rawPath']}?{event['rawQueryString']} {body}",
    }
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    u = Up(tmp_path_factory.mktemp("up") / "state").start()
    yield u
    assert u.stop() == 0
    out = subprocess.run(["pgrep", "-f", str(u.state)], capture_output=True, text=True)
    assert out.stdout == "", "xxctl up left processes behind"


@pytest.fixture(scope="module")
def lam(up):
    return up.client()


def create(lam, name: str, files=None, **kw):
    kw.setdefault("Runtime", "python3.11")
    kw.setdefault("Handler", "app.handler")
    return lam.create_function(
        FunctionName=name, Role=ROLE, Code={"ZipFile": zipped(files or {"app.py": APP})}, **kw
    )


def invoke(lam, name: str, event: dict, **kw) -> tuple[dict, dict]:
    r = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), **kw)
    return r, json.loads(r["Payload"].read())


def test_boto3_creates_invokes_and_the_class_tag_decides_the_priority(lam):
    made = create(lam, "greeter", Tags={"xx:class": "high"},
                  Environment={"Variables": {"GREETING": "hello"}}, MemorySize=256)  # fmt: skip
    assert made["FunctionName"] == "greeter" and made["Runtime"] == "python3.11"
    assert made["FunctionArn"].startswith("arn:aws:lambda:us-east-1:")
    assert made["MemorySize"] == 256 and made["Role"] == ROLE
    r, out = invoke(lam, "greeter", {"who": "you"}, LogType="Tail")
    assert r["StatusCode"] == 200 and "FunctionError" not in r
    assert out["who"] == "you" and out["greeting"] == "hello" and out["function"] == "greeter"
    assert out["policy"] == os.SCHED_FIFO and out["priority"] == 30  # high's priority
    log = base64.b64decode(r["LogResult"]).decode()
    assert "REPORT RequestId:" in log and "Class: high" in log
    # changing the tag changes the class: the next invocation runs at low's policy
    lam.tag_resource(Resource=made["FunctionArn"], Tags={"xx:class": "low"})
    _, low = invoke(lam, "greeter", {})
    assert low["policy"] == os.SCHED_BATCH
    assert lam.list_tags(Resource=made["FunctionArn"])["Tags"] == {"xx:class": "low"}
    lam.untag_resource(Resource=made["FunctionArn"], TagKeys=["xx:class"])
    _, default = invoke(lam, "greeter", {})  # the tenant's default class: the cheapest
    assert default["policy"] == os.SCHED_BATCH
    got = lam.get_function(FunctionName="greeter")
    assert got["Configuration"]["CodeSha256"] == made["CodeSha256"] and got["Tags"] == {}
    # Code.Location downloads the zip for 10 minutes, as Lambda's presigned link does
    with urllib.request.urlopen(got["Code"]["Location"], timeout=30) as r:
        data = r.read()
    assert base64.b64encode(hashlib.sha256(data).digest()).decode() == made["CodeSha256"]
    bare = got["Code"]["Location"].split("?")[0]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bare, timeout=30)
    assert e.value.code == 403


def test_a_function_error_and_invoke_types(lam, up):
    create(lam, "kinds")
    r, err = invoke(lam, "kinds", {"fail": True})
    assert r["StatusCode"] == 200 and r["FunctionError"] == "Unhandled"
    assert err["errorType"] == "ValueError" and err["errorMessage"] == "asked to fail"
    dry = lam.invoke(FunctionName="kinds", InvocationType="DryRun")
    assert dry["StatusCode"] == 204
    ev = lam.invoke(FunctionName="kinds", InvocationType="Event", Payload=b'{"mark": "ev-1"}')
    assert ev["StatusCode"] == 202
    rid = ev["ResponseMetadata"]["RequestId"]
    deadline = time.monotonic() + 60
    with open_store(up.store) as store:
        while True:  # the store says when the event has run: poll it
            inv = store.get_invocation(rid)
            if inv.status in ("succeeded", "failed"):
                break
            assert time.monotonic() < deadline, inv
            time.sleep(0.1)
    assert inv.status == "succeeded" and inv.invocation_type == "Event", inv
    assert "MARK ev-1" not in json.dumps(inv.result)  # the log stays with the node


def test_list_pages_update_and_delete(lam):
    for i in range(5):
        create(lam, f"page-{i}")
    names, marker = [], None
    while True:
        kw = {"MaxItems": 2} | ({"Marker": marker} if marker else {})
        page = lam.list_functions(**kw)
        names += [f["FunctionName"] for f in page["Functions"]]
        marker = page.get("NextMarker")
        if not marker:
            break
    assert [n for n in names if n.startswith("page-")] == [f"page-{i}" for i in range(5)]
    new = zipped({"app.py": "def handler(e, c):\n    return 'v2'\n"})
    upd = lam.update_function_code(FunctionName="page-0", ZipFile=new)
    assert (
        upd["CodeSha256"] != lam.get_function(FunctionName="page-1")["Configuration"]["CodeSha256"]
    )
    assert invoke(lam, "page-0", {})[1] == "v2"
    cfg = lam.update_function_configuration(FunctionName="page-0", Timeout=7,
                                            Environment={"Variables": {"A": "b"}})  # fmt: skip
    assert cfg["Timeout"] == 7 and cfg["Environment"]["Variables"] == {"A": "b"}
    lam.delete_function(FunctionName="page-0")
    with pytest.raises(ClientError) as e:
        lam.get_function(FunctionName="page-0")
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_errors_are_shaped_as_aws_shapes_them(lam, up):
    create(lam, "dup")

    def code_of(fn, **kw) -> tuple[str, int]:
        with pytest.raises(ClientError) as e:
            fn(**kw)
        return e.value.response["Error"]["Code"], e.value.response["ResponseMetadata"][
            "HTTPStatusCode"
        ]

    assert code_of(create, lam=lam, name="dup") == ("ResourceConflictException", 409)
    assert code_of(lam.invoke, FunctionName="nope") == ("ResourceNotFoundException", 404)
    assert code_of(create, lam=lam, name="badclass", Tags={"xx:class": "platinum"}) == (
        "InvalidParameterValueException", 400)  # fmt: skip
    assert code_of(lam.invoke, FunctionName="dup", Payload=b"x" * (7 << 20)) == (
        "RequestTooLargeException", 413)  # fmt: skip
    assert code_of(lam.invoke, FunctionName="dup", Payload=b"{not json") == (
        "InvalidRequestContentException", 400)  # fmt: skip
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.bin", b"\0" * (300 << 20))  # 300 MiB of zeros: ~300 KB zipped
    assert code_of(lam.create_function, FunctionName="bomb", Role=ROLE, Runtime="python3.11",
                   Handler="app.handler", Code={"ZipFile": bomb.getvalue()}) == (
        "InvalidParameterValueException", 400)  # fmt: skip
    akid, _ = up.keys()
    stranger = up.client(("AKIAXXXXXXXXXXXXXXXX", "x" * 40))
    assert code_of(stranger.list_functions) == ("UnrecognizedClientException", 403)
    forger = up.client((akid, "y" * 40))
    assert code_of(forger.list_functions) == ("InvalidSignatureException", 403)


def test_tenants_see_invoke_and_change_only_their_own(lam, up):
    mine = create(lam, "private")
    other = up.client(up.tenant("rival"))
    assert [f["FunctionName"] for f in other.list_functions()["Functions"]] == []
    for call in (
        lambda: other.get_function(FunctionName="private"),
        lambda: other.invoke(FunctionName="private"),
        lambda: other.delete_function(FunctionName="private"),
        lambda: other.tag_resource(Resource=mine["FunctionArn"], Tags={"xx:class": "high"}),
        lambda: other.add_permission(FunctionName=mine["FunctionArn"], StatementId="s",
                                     Action="lambda:InvokeFunction", Principal="*"),
    ):  # fmt: skip
        with pytest.raises(ClientError) as e:
            call()
        assert e.value.response["Error"]["Code"] == "ResourceNotFoundException", call
    # Invoke by another account's ARN: denied alike whether the function is there or not,
    # until its owner grants the caller's account (AddPermission, Lambda's resource policy)
    rival_acct = other.get_function(FunctionName=create(other, "probe")["FunctionName"])[
        "Configuration"]["FunctionArn"].split(":")[4]  # fmt: skip
    for ref in (mine["FunctionArn"], mine["FunctionArn"] + "-not-there"):
        with pytest.raises(ClientError) as e:
            other.invoke(FunctionName=ref)
        assert e.value.response["Error"]["Code"] == "AccessDeniedException"
    lam.add_permission(FunctionName="private", StatementId="rival", Principal=rival_acct,
                       Action="lambda:InvokeFunction")  # fmt: skip
    assert "rival" in lam.get_policy(FunctionName="private")["Policy"]
    assert lam.list_tags(Resource=mine["FunctionArn"])["Tags"] == {}  # the policy is not a tag
    _, out = invoke(other, mine["FunctionArn"], {"who": "rival"})
    assert out["who"] == "rival" and out["function"] == "private"
    lam.remove_permission(FunctionName="private", StatementId="rival")
    with pytest.raises(ClientError) as e:
        other.invoke(FunctionName=mine["FunctionArn"])
    assert e.value.response["Error"]["Code"] == "AccessDeniedException"
    # the same name is another function in another tenant
    theirs = create(other, "private")
    assert theirs["FunctionArn"] != mine["FunctionArn"]
    assert (
        lam.get_function(FunctionName="private")["Configuration"]["FunctionArn"]
        == mine["FunctionArn"]
    )


def test_the_aws_cli_lists_creates_and_invokes(up, tmp_path):
    r = up.aws("list-functions")
    assert r.returncode == 0, r.stderr
    assert "Functions" in json.loads(r.stdout)
    z = tmp_path / "fn.zip"
    z.write_bytes(zipped({"app.py": APP}))
    r = up.aws("create-function", "--function-name", "cli-fn", "--runtime", "python3.11",
               "--role", ROLE, "--handler", "app.handler", "--zip-file", f"fileb://{z}",
               "--tags", "xx:class=medium")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out.json"
    r = up.aws("invoke", "--function-name", "cli-fn",
               "--payload", '{"who": "cli"}', str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["StatusCode"] == 200
    assert json.loads(out.read_text())["who"] == "cli"
    r = up.aws("get-function", "--function-name", "nope")
    assert r.returncode != 0 and "ResourceNotFoundException" in r.stderr


def test_a_function_url_turns_a_request_into_an_event_and_back(lam, up):
    create(lam, "web", {"app.py": WEB}, Tags={"xx:class": "high"})
    cfg = lam.create_function_url_config(FunctionName="web", AuthType="NONE")
    url = cfg["FunctionUrl"]
    assert url.startswith(up.endpoint) and cfg["AuthType"] == "NONE"
    r = subprocess.run(
        ["curl", "-sS", "-i", "-X", "POST", "--data", "hello", f"{url}items/7?x=1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    head, _, body = r.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 201"), r.stdout
    assert "X-Route: /items/7" in head and "Set-Cookie: session=abc; Path=/" in head
    assert body == "POST /items/7?x=1 hello"
    # AWS_IAM: an unsigned request is refused
    lam.update_function_url_config(FunctionName="web", AuthType="AWS_IAM")
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.stdout == "403"


def test_xxctl_fn_create_is_the_short_way_with_a_class(lam, up, tmp_path):
    code = tmp_path / "short"
    code.mkdir()
    (code / "app.py").write_text(textwrap.dedent(APP))
    env = {**os.environ, "AWS_SHARED_CREDENTIALS_FILE": str(up.credentials)}
    r = subprocess.run(
        [XXCTL, "fn", "create", "short", "--code", str(code), "--runtime", "python3.11",
         "--handler", "app.handler", "--class", "high", "--endpoint-url", up.endpoint, "--json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["FunctionName"] == "short"
    assert lam.get_function(FunctionName="short")["Tags"] == {"xx:class": "high"}
    _, out = invoke(lam, "short", {})
    assert out["policy"] == os.SCHED_FIFO
    r = subprocess.run(
        [XXCTL, "fn", "create", "short2", "--code", str(code), "--runtime", "python3.11",
         "--handler", "app.handler", "--class", "gold", "--endpoint-url", up.endpoint],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert r.returncode == 2 and "InvalidParameterValueException" in r.stderr


def test_published_versions_are_invoked_by_qualifier(lam):
    v1 = zipped({"app.py": "def handler(e, c):\n    return 'one'\n"})
    lam.create_function(FunctionName="versioned", Runtime="python3.11", Handler="app.handler",
                        Role=ROLE, Code={"ZipFile": v1}, Publish=True)  # fmt: skip
    lam.update_function_code(FunctionName="versioned",
                             ZipFile=zipped({"app.py": "def handler(e, c):\n    return 'two'\n"}))  # fmt: skip
    r = lam.invoke(FunctionName="versioned", Qualifier="1")
    assert json.loads(r["Payload"].read()) == "one" and r["ExecutedVersion"] == "1"
    r = lam.invoke(FunctionName="versioned")
    assert json.loads(r["Payload"].read()) == "two" and r["ExecutedVersion"] == "$LATEST"
    arn1 = lam.get_function(FunctionName="versioned", Qualifier="1")["Configuration"]["FunctionArn"]
    assert arn1.endswith(":function:versioned:1")
    assert json.loads(lam.invoke(FunctionName=arn1)["Payload"].read()) == "one"
    with pytest.raises(ClientError) as e:
        lam.invoke(FunctionName="versioned", Qualifier="7")
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"


BIG = """
def handler(event, context):
    return "x" * event["n"]
"""

FLASK = """
import os
from flask import Flask, request

app = Flask(__name__)

@app.route("/hello/<name>", methods=["GET", "POST"])
def hello(name):
    return {"hello": name, "method": request.method, "q": request.args.get("q")}, 200

if __name__ == "__main__":
    app.run(port=int(os.environ["PORT"]))
"""


def test_a_6_mib_response_comes_back_whole_and_past_it_is_a_function_error(lam):
    create(lam, "big", {"app.py": BIG}, Timeout=30)
    n = 6 * (1 << 20) - 64  # with its JSON quotes, just under Lambda's 6 MiB
    r, out = invoke(lam, "big", {"n": n})
    assert "FunctionError" not in r and out == "x" * n
    r, err = invoke(lam, "big", {"n": 7 << 20})
    assert r["FunctionError"] == "Unhandled"
    assert err["errorType"] == "Function.ResponseSizeTooLarge"


def test_an_http_function_behind_a_url_gets_the_request_itself(lam, up, tmp_path):
    create(lam, "flask", {"app.py": FLASK}, Runtime="http", Handler=f"{sys.executable} app.py",
           Tags={"xx:class": "high"})  # fmt: skip
    url = lam.create_function_url_config(FunctionName="flask", AuthType="AWS_IAM")["FunctionUrl"]
    # AWS_IAM: signed with the tenant's key (service lambda), as AWS's function URLs take it
    req = AWSRequest(method="GET", url=f"{url}hello/xx?q=1")
    SigV4Auth(Credentials(*up.keys()), "lambda", "us-east-1").add_auth(req)
    r = urllib.request.urlopen(
        urllib.request.Request(req.url, headers=dict(req.headers.items())), timeout=60
    )
    assert json.loads(r.read()) == {"hello": "xx", "method": "GET", "q": "1"}
    # another tenant's signature is not enough
    req = AWSRequest(method="GET", url=f"{url}hello/xx")
    SigV4Auth(Credentials(*up.tenant("outsider")), "lambda", "us-east-1").add_auth(req)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(
            urllib.request.Request(req.url, headers=dict(req.headers.items())), timeout=60
        )
    assert e.value.code == 403
