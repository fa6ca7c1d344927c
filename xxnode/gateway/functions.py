"""Lambda's function API (CreateFunction, GetFunction, ListFunctions, UpdateFunctionCode,
UpdateFunctionConfiguration, DeleteFunction, PublishVersion, TagResource, UntagResource,
ListTags) over the ledger, in the shapes botocore's service model gives them.

XX's one addition is the price class: the tag `xx:class`. So boto3, the AWS CLI and
Terraform set it unmodified, and a function without it runs in its tenant's default class.
MemorySize is recorded and reported, never a limit: XX asks for none."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import Mapping

from aiohttp import web

from xxnode.classes import ClassTable
from xxnode.gateway import arn
from xxnode.gateway.errors import AwsError, conflict, invalid_parameter, not_found
from xxnode.ledger.store import (
    CLASS_TAG,
    LATEST,
    Conflict,
    Function,
    Invalid,
    NotFound,
    Store,
)
from xxnode.node.env.code import MAX_UNPACKED, MAX_ZIPPED, CodeError, check_zip

ACCOUNTS_TTL = 1.0  # seconds between reads of the tenants, to map an ARN's account
ALLOW_TAG = "xx:allow:"  # hidden tags: a resource policy's statements, sid -> account

RUNTIMES = frozenset(
    {f"python3.{n}" for n in range(8, 15)} | {"provided", "provided.al2", "provided.al2023", "http"}
)
MAX_ENV_BYTES = 4096  # Lambda: the variables' total size
FN_TTL = 1.0  # seconds an invoked function's record is served from memory (below)
MAX_TAGS = 50


def code_sha256(digest: str) -> str:
    """Lambda's CodeSha256: the base64 of the zip's sha256."""
    return base64.b64encode(bytes.fromhex(digest.removeprefix("sha256:"))).decode()


class Functions:
    """One tenant-scoped handler per operation; the caller (server.py) has verified the
    signature and put the tenant in ``request["tenant"]``."""

    def __init__(self, store: Store, classes: ClassTable, region: str, code_url: str, link):
        self.store, self.classes, self.region, self.code_url = store, classes, region, code_url
        self.link = link  # digest -> a download URL good for 10 minutes
        self._recent: dict[tuple[str, str, str], tuple[float, Function]] = {}
        self._accounts: dict[str, str] = {}  # 12-digit account -> tenant
        self._accounts_read = -ACCOUNTS_TTL

    async def db(self, method, *args, **kw):
        """A store call in a worker thread, its errors as Lambda's."""
        try:
            return await asyncio.to_thread(method, *args, **kw)
        except NotFound as e:
            raise not_found(str(e)) from None
        except Conflict as e:
            raise conflict(str(e)) from None
        except Invalid as e:
            raise invalid_parameter(str(e)) from None

    async def current(self, tenant: str, name: str, qualifier: str) -> Function:
        """The record an invocation runs, read from the store at most once per FN_TTL: the
        store read and its thread hop were a tenth of the gateway's time per Invoke. This
        gateway's own changes drop it at once; another gateway's show within FN_TTL (a miss
        is never kept, so a new function is seen at once)."""
        now = time.monotonic()
        key = (tenant, name, qualifier)
        hit = self._recent.get(key)
        if hit is not None and now - hit[0] < FN_TTL:
            return hit[1]
        fn = await self.db(self.store.get_function, tenant, name, qualifier)
        if len(self._recent) > 10_000:
            self._recent.clear()
        self._recent[key] = (now, fn)
        return fn

    def _forget(self, tenant: str, name: str) -> None:
        for key in [k for k in self._recent if k[0] == tenant and k[1] == name]:
            del self._recent[key]

    # -- shapes -------------------------------------------------------------------------
    def configuration(self, fn: Function) -> dict:
        q = None if fn.version == LATEST else fn.version
        out = {
            "FunctionName": fn.name,
            "FunctionArn": arn.function_arn(fn.tenant, self.region, fn.name, q),
            "Runtime": fn.runtime,
            "Role": fn.tags.get("xx:role", _default_role(fn.tenant)),
            "Handler": fn.handler,
            "CodeSize": fn.code_size,
            "Description": fn.description,
            "Timeout": _seconds(fn.timeout),
            "MemorySize": fn.memory_mb,
            "LastModified": fn.last_modified,
            "CodeSha256": code_sha256(fn.code_digest),
            "Version": fn.version,
            "RevisionId": fn.revision_id,
            "State": "Active",
            "LastUpdateStatus": "Successful",
            "PackageType": "Zip",
            "Architectures": ["x86_64"],
            "EphemeralStorage": {"Size": 512},
        }
        if fn.environment:  # as AWS: absent, not empty, so Terraform's plan shows no drift
            out["Environment"] = {"Variables": dict(fn.environment)}
        return out

    def configuration_arn(self, tenant: str, name: str, qualifier: str) -> str:
        return arn.function_arn(tenant, self.region, name, qualifier)

    def function_name_of(self, request: web.Request, owner: str | None = None) -> tuple[str, str]:
        """(name, qualifier) from the path's FunctionName and ?Qualifier=; ``owner``: the
        tenant whose ARN it may be (Invoke across tenants), else the caller's own."""
        ref = arn.parse(request.match_info["name"], owner or request["tenant"], self.region)
        return ref.name, arn.qualified(ref, request.query.get("Qualifier"))

    async def owner_of(self, request: web.Request) -> str | None:
        """The tenant whose account the FunctionName's ARN names (the caller's own when it
        names none); None: no tenant has that account."""
        acct = arn.account_in(request.match_info["name"])
        tenant = request["tenant"]
        if acct is None or acct == arn.account_of(tenant):
            return tenant
        now = time.monotonic()
        if acct not in self._accounts and now - self._accounts_read > ACCOUNTS_TTL:
            # a new tenant is found within ACCOUNTS_TTL; made-up accounts cost one read per
            # ACCOUNTS_TTL, not one per request
            self._accounts_read = now
            for t in await self.db(self.store.list_tenants):
                self._accounts[arn.account_of(t.name)] = t.name
        return self._accounts.get(acct)

    @staticmethod
    def allows(fn: Function, account: str) -> bool:
        """Has the function's resource policy (AddPermission) granted ``account`` Invoke?"""
        return any(
            k.startswith(ALLOW_TAG) and v in (account, "*") for k, v in fn.tags.items()
        )  # fmt: skip

    # -- resource policy: AddPermission, GetPolicy, RemovePermission (Invoke only) ---------
    async def add_permission(self, request: web.Request) -> web.Response:
        name, _ = self.function_name_of(request)
        body = await _json_body(request)
        sid = _str(body, "StatementId", required=True)
        if not re.fullmatch(r"[a-zA-Z0-9_-]{1,100}", sid):
            raise invalid_parameter("StatementId: 1 to 100 of [a-zA-Z0-9-_]")
        action = _str(body, "Action", required=True)
        if action not in ("lambda:InvokeFunction", "lambda:*"):
            raise invalid_parameter("Action: XX grants lambda:InvokeFunction only")
        principal = _str(body, "Principal", required=True)
        m = re.fullmatch(r"(?:arn:aws:iam::)?(\d{12})(?::root)?|(\*)", principal)
        if m is None:
            raise invalid_parameter("Principal: an account id, its root ARN, or *")
        account = m[1] or "*"
        fn = await self.db(self.store.get_function, request["tenant"], name)
        if ALLOW_TAG + sid in fn.tags:
            raise conflict(f"The statement id ({sid}) provided already exists.")
        await self.db(self.store.tag_function, request["tenant"], name, {ALLOW_TAG + sid: account})
        self._forget(request["tenant"], name)
        return _json({"Statement": json.dumps(self._statement(fn, sid, account))}, 201)

    async def get_policy(self, request: web.Request) -> web.Response:
        name, _ = self.function_name_of(request)
        fn = await self.db(self.store.get_function, request["tenant"], name)
        stmts = [
            self._statement(fn, k[len(ALLOW_TAG):], v)
            for k, v in sorted(fn.tags.items()) if k.startswith(ALLOW_TAG)
        ]  # fmt: skip
        if not stmts:
            raise not_found("The resource you requested does not exist.")
        policy = {"Version": "2012-10-17", "Id": "default", "Statement": stmts}
        return _json({"Policy": json.dumps(policy), "RevisionId": fn.revision_id})

    async def remove_permission(self, request: web.Request) -> web.Response:
        name, _ = self.function_name_of(request)
        sid = request.match_info["sid"]
        fn = await self.db(self.store.get_function, request["tenant"], name)
        if ALLOW_TAG + sid not in fn.tags:
            raise not_found(f"Statement {sid[:100]} is not found in resource policy.")
        await self.db(self.store.untag_function, request["tenant"], name, [ALLOW_TAG + sid])
        self._forget(request["tenant"], name)
        return web.Response(status=204)

    def _statement(self, fn: Function, sid: str, account: str) -> dict:
        who = "*" if account == "*" else f"arn:aws:iam::{account}:root"
        return {
            "Sid": sid, "Effect": "Allow", "Principal": {"AWS": who},
            "Action": "lambda:InvokeFunction",
            "Resource": arn.function_arn(fn.tenant, self.region, fn.name),
        }  # fmt: skip

    # -- operations ---------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        tenant = request["tenant"]
        body = await _json_body(request)
        name = _str(body, "FunctionName", required=True)
        name = arn.parse(name, tenant, self.region).name
        runtime = _runtime(body, required=True)
        handler = _handler(body, runtime)
        tags = _tags(body.get("Tags", {}), self.classes)
        if (role := body.get("Role")) is not None:
            tags = {**tags, "xx:role": _str(body, "Role")} if role else tags
        zipped = _zip_file(body.get("Code"))
        digest = await self.put_code(zipped)
        fn = Function(
            tenant=tenant, name=name, runtime=runtime, handler=handler, code_digest=digest,
            timeout=_timeout(body), memory_mb=_memory(body), environment=_environment(body),
            tags=tags, description=_description(body),
        )  # fmt: skip
        try:
            made = await asyncio.to_thread(self.store.create_function, fn)
        except Conflict:
            raise conflict(f"Function already exist: {name}") from None
        except Invalid as e:
            raise invalid_parameter(str(e)) from None
        if body.get("Publish") is True:
            made = await self.db(self.store.publish_version, tenant, name)
        self._forget(tenant, name)
        return _json(self.configuration(made), 201)

    async def put_code(self, zipped: bytes) -> str:
        """Refused here, where the user is, by the checks a node makes before it unpacks."""
        try:
            await asyncio.to_thread(check_zip, zipped, MAX_ZIPPED, MAX_UNPACKED)
        except CodeError as e:
            raise invalid_parameter(f"Could not unzip uploaded file: {e}") from None
        return await self.db(self.store.put_code, zipped)

    async def get(self, request: web.Request) -> web.Response:
        name, q = self.function_name_of(request)
        fn = await self.db(self.store.get_function, request["tenant"], name, q)
        return _json({
            "Configuration": self.configuration(fn),
            "Code": {"RepositoryType": "S3", "Location": self.link(fn.code_digest)},
            "Tags": _visible_tags(fn.tags),
        })  # fmt: skip

    async def get_configuration(self, request: web.Request) -> web.Response:
        name, q = self.function_name_of(request)
        fn = await self.db(self.store.get_function, request["tenant"], name, q)
        return _json(self.configuration(fn))

    async def code_signing(self, request: web.Request) -> web.Response:
        """XX signs no code; Terraform's provider reads this after every create."""
        name, _ = self.function_name_of(request)
        fn = await self.db(self.store.get_function, request["tenant"], name)
        return _json({"CodeSigningConfigArn": "", "FunctionName": fn.name})

    async def list(self, request: web.Request) -> web.Response:
        try:
            max_items = int(request.query.get("MaxItems", "50"))
        except ValueError:
            raise invalid_parameter("MaxItems: an integer from 1 to 10000") from None
        if not 1 <= max_items <= 10000:
            raise invalid_parameter("MaxItems: an integer from 1 to 10000")
        fns, marker = await self.db(
            self.store.list_functions, request["tenant"], request.query.get("Marker"), max_items
        )
        out: dict = {"Functions": [self.configuration(f) for f in fns]}
        if marker:
            out["NextMarker"] = marker
        return _json(out)

    async def delete(self, request: web.Request) -> web.Response:
        name, q = self.function_name_of(request)
        if q != LATEST:
            raise invalid_parameter("Deleting one version is not supported: delete the function")
        await self.db(self.store.delete_function, request["tenant"], name)
        self._forget(request["tenant"], name)
        return web.Response(status=204)

    async def update_code(self, request: web.Request) -> web.Response:
        tenant = request["tenant"]
        name, _ = self.function_name_of(request)
        body = await _json_body(request)
        if "ZipFile" not in body:
            raise invalid_parameter(
                "ZipFile: only a directly uploaded zip is supported (no S3, no images)"
            )
        digest = await self.put_code(_b64(body["ZipFile"], "ZipFile"))
        if body.get("DryRun") is True:
            fn = await self.db(self.store.get_function, tenant, name)
            return _json(self.configuration(fn))
        fn = await self.db(
            self.store.update_function_code, tenant, name, digest,
            expect_revision=body.get("RevisionId"),
        )  # fmt: skip
        if body.get("Publish") is True:
            fn = await self.db(self.store.publish_version, tenant, name)
        self._forget(tenant, name)
        return _json(self.configuration(fn))

    async def update_configuration(self, request: web.Request) -> web.Response:
        tenant = request["tenant"]
        name, _ = self.function_name_of(request)
        body = await _json_body(request)
        current = await self.db(self.store.get_function, tenant, name)
        runtime = _runtime(body) if "Runtime" in body else None
        kw = {
            "runtime": runtime,
            "handler": _handler(body, runtime or current.runtime) if "Handler" in body else None,
            "timeout": _timeout(body) if "Timeout" in body else None,
            "memory_mb": _memory(body) if "MemorySize" in body else None,
            "environment": _environment(body) if "Environment" in body else None,
            "description": _description(body) if "Description" in body else None,
        }
        fn = await self.db(
            self.store.update_function_configuration, tenant, name,
            expect_revision=body.get("RevisionId"), **kw,
        )  # fmt: skip
        if body.get("Role"):
            await self.db(self.store.tag_function, tenant, name, {"xx:role": _str(body, "Role")})
            fn = await self.db(self.store.get_function, tenant, name)
        self._forget(tenant, name)
        return _json(self.configuration(fn))

    async def list_versions(self, request: web.Request) -> web.Response:
        name, _ = self.function_name_of(request)
        try:
            max_items = int(request.query.get("MaxItems", "50"))
        except ValueError:
            raise invalid_parameter("MaxItems: an integer from 1 to 10000") from None
        fns, marker = await self.db(
            self.store.list_versions, request["tenant"], name, request.query.get("Marker"),
            max(1, min(max_items, 10000)),
        )  # fmt: skip
        out: dict = {"Versions": [self.configuration(f) for f in fns]}
        if marker:
            out["NextMarker"] = marker
        return _json(out)

    async def publish(self, request: web.Request) -> web.Response:
        name, _ = self.function_name_of(request)
        body = await _json_body(request, empty_ok=True)
        fn = await self.db(
            self.store.publish_version, request["tenant"], name,
            description=body.get("Description"), expect_revision=body.get("RevisionId"),
        )  # fmt: skip
        self._forget(request["tenant"], name)
        return _json(self.configuration(fn), 201)

    # -- tags: by ARN ---------------------------------------------------------------------
    def _tagged(self, request: web.Request) -> str:
        ref = arn.parse(request.match_info["arn"], request["tenant"], self.region)
        if not request.match_info["arn"].startswith("arn:"):
            raise invalid_parameter("Resource: a function ARN")
        return ref.name

    async def tag(self, request: web.Request) -> web.Response:
        name = self._tagged(request)
        body = await _json_body(request)
        tags = _tags(body.get("Tags"), self.classes, required=True)
        await self.db(self.store.tag_function, request["tenant"], name, tags)
        self._forget(request["tenant"], name)
        return web.Response(status=204)

    async def untag(self, request: web.Request) -> web.Response:
        name = self._tagged(request)
        keys = request.query.getall("tagKeys", [])
        if not keys:
            raise invalid_parameter("TagKeys: at least one key")
        await self.db(self.store.untag_function, request["tenant"], name, keys)
        self._forget(request["tenant"], name)
        return web.Response(status=204)

    async def list_tags(self, request: web.Request) -> web.Response:
        name = self._tagged(request)
        fn = await self.db(self.store.get_function, request["tenant"], name)
        return _json({"Tags": _visible_tags(fn.tags)})


# -- request parsing: each refusal in Lambda's words, naming the field ----------------------
def _json(obj, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(obj).encode(), content_type="application/json"
    )


async def _json_body(request: web.Request, empty_ok: bool = False) -> dict:
    raw = await request.read()
    if not raw and empty_ok:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AwsError(
            "SerializationException", "the request body is not JSON", status=400
        ) from None
    if not isinstance(body, dict):
        raise AwsError(
            "SerializationException", "the request body is not a JSON object", status=400
        )
    return body


def _str(body: Mapping, key: str, required: bool = False, most: int = 2048) -> str:
    v = body.get(key)
    if v is None:
        if required:
            raise invalid_parameter(f"{key}: required")
        return ""
    if not isinstance(v, str) or len(v) > most:
        raise invalid_parameter(f"{key}: a string of at most {most} characters")
    return v


def _runtime(body: Mapping, required: bool = False) -> str:
    r = _str(body, "Runtime", required=required, most=64)
    if r not in RUNTIMES:
        raise invalid_parameter(
            f"Value {r[:64]} at 'runtime' failed to satisfy constraint: Member must satisfy "
            f"enum value set: [{', '.join(sorted(RUNTIMES))}]"
        )
    return r


def _handler(body: Mapping, runtime: str) -> str:
    h = _str(body, "Handler", most=128)
    if not h:
        if runtime.startswith("python"):
            raise invalid_parameter("Handler: required for a python runtime (module.function)")
        return "bootstrap"
    if "\x00" in h:
        raise invalid_parameter("Handler: no NUL")
    if runtime != "http" and any(c.isspace() for c in h):  # http's is a command line
        raise invalid_parameter("Handler: no spaces (module.function, or the bootstrap)")
    return h


def _timeout(body: Mapping) -> float:
    t = body.get("Timeout", 3)
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 900:
        raise invalid_parameter("Timeout: whole seconds from 1 to 900")
    return float(t)


def _seconds(t: float) -> int | float:
    return int(t) if float(t).is_integer() else t


def _memory(body: Mapping) -> int:
    m = body.get("MemorySize", 128)
    if isinstance(m, bool) or not isinstance(m, int) or not 128 <= m <= 10240:
        raise invalid_parameter("MemorySize: MB from 128 to 10240 (recorded; XX sets no limit)")
    return m


def _environment(body: Mapping) -> dict[str, str]:
    env = body.get("Environment") or {}
    if not isinstance(env, dict):
        raise invalid_parameter("Environment: an object with Variables")
    v = env.get("Variables") or {}
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    ):
        raise invalid_parameter("Environment.Variables: a map of strings to strings")
    if len(json.dumps(v)) > MAX_ENV_BYTES:
        raise invalid_parameter(
            "Lambda was unable to configure your environment variables because the "
            f"environment variables you have provided exceeded the {MAX_ENV_BYTES} bytes limit."
        )
    for k in v:
        if (
            not k
            or not (k[0].isalpha() or k[0] == "_")
            or not all(c.isalnum() or c == "_" for c in k)
        ):
            raise invalid_parameter(f"Environment.Variables: {k[:64]!r} is not a variable name")
    return dict(v)


def _description(body: Mapping) -> str:
    return _str(body, "Description", most=256)


def _tags(tags: object, classes: ClassTable, required: bool = False) -> dict[str, str]:
    if tags is None:
        tags = {}
    if not isinstance(tags, dict) or (required and not tags):
        raise invalid_parameter("Tags: a map of strings to strings")
    if len(tags) > MAX_TAGS:
        raise invalid_parameter(f"Tags: at most {MAX_TAGS}")
    for k, v in tags.items():
        if (
            not isinstance(k, str)
            or not isinstance(v, str)
            or not 1 <= len(k) <= 128
            or len(v) > 256
        ):
            raise invalid_parameter("Tags: keys of 1-128 characters, values of at most 256")
        if k.startswith("xx:") and k != CLASS_TAG:
            raise invalid_parameter(f"Tags: {k[:128]!r}: the xx: prefix is XX's own")
    cls = tags.get(CLASS_TAG)
    if cls is not None and classes.get(cls) is None:
        raise invalid_parameter(
            f"Tags: {CLASS_TAG}={cls[:64]!r} is not a price class (have {', '.join(classes.names())})"
        )
    return dict(tags)


def _visible_tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if k != "xx:role" and not k.startswith(ALLOW_TAG)}


def _default_role(tenant: str) -> str:
    return f"arn:aws:iam::{arn.account_of(tenant)}:role/xx-function"


def _b64(v: object, what: str) -> bytes:
    if not isinstance(v, str):
        raise invalid_parameter(f"{what}: base64 bytes")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_parameter(f"{what}: not base64") from None


def _zip_file(code: object) -> bytes:
    if not isinstance(code, dict):
        raise invalid_parameter("Code: required, with ZipFile")
    if "ZipFile" not in code:
        raise invalid_parameter("Code: only ZipFile (a directly uploaded zip) is supported")
    return _b64(code["ZipFile"], "Code.ZipFile")
