"""The gateway's state — tenants, keys, functions, code, URLs, invocations — behind one
`Store` interface: SQLite (WAL) for one gateway, PostgreSQL when several share it.
`open_store(url)` picks the backend; `store.py` is the contract, `schema.py` the SQL."""

from xxnode.ledger.store import (
    CLASS_TAG,
    KEEP,
    LATEST,
    AccessKey,
    Conflict,
    Function,
    FunctionUrl,
    Invalid,
    Invocation,
    LedgerError,
    NotFound,
    Store,
    Tenant,
    lambda_time,
    open_store,
)

__all__ = [
    "CLASS_TAG",
    "KEEP",
    "LATEST",
    "AccessKey",
    "Conflict",
    "Function",
    "FunctionUrl",
    "Invalid",
    "Invocation",
    "LedgerError",
    "NotFound",
    "Store",
    "Tenant",
    "lambda_time",
    "open_store",
]
