"""schemathesis hooks for .ci/fuzz (loaded through SCHEMATHESIS_HOOKS).

Two things a generator cannot know from the document, and a real client
does:

- An Idempotency-Key names one request. The same key with a different
  request is refused (422 `idempotency-key-reused`, tested in the
  acceptance suite); a generator that draws keys from a small space reuses
  them across different bodies all the time, so almost every create was
  refused for that alone. Here a present key is replaced by a digest of
  the request: the same request keeps its key (and is replayed), another
  gets its own.
- The fuzzer must not lock itself out: revoking its own token, or
  disabling, deleting or stripping the roles of the user it acts as, turns
  every later request into a 401 or 403. Cases that would do that are
  dropped; the same operations still run against the other users and
  tokens the seed data has.
"""

import hashlib
import json
import os

import schemathesis

ADMIN = {os.environ.get("DROVER_FUZZ_ADMIN_ID", ""), os.environ.get("DROVER_FUZZ_ADMIN_NAME", "admin")}
TOKEN = os.environ.get("DROVER_FUZZ_TOKEN_ID", "")


def _key(case):
    seen = {
        "method": case.method,
        "path": case.formatted_path,
        "query": case.query,
        "body": case.body if isinstance(case.body, (dict, list, str, int, float, bool, type(None))) else repr(case.body),
    }
    return "fuzz-" + hashlib.sha256(json.dumps(seen, sort_keys=True, default=repr).encode()).hexdigest()


@schemathesis.hook
def map_case(context, case):
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = _key(case)
    return case


@schemathesis.hook
def filter_case(context, case):
    path = case.operation.path
    params = case.path_parameters or {}
    if path == "/v1/users/{id}/tokens/{token}" and case.method.upper() == "DELETE":
        return str(params.get("token")) != TOKEN
    if path in ("/v1/users/{id}", "/v1/users/{id}/transitions") and case.method.upper() != "GET":
        return str(params.get("id")) not in ADMIN
    return True
