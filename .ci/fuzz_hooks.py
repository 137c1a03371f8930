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
- A new token's `expires_at` must be in the future (422 otherwise, tested
  in the acceptance suite); the document cannot say "later than now", so
  a generated time in the past is moved to the same moment in 2100.
- An empty `If-Match` is not a valid one (the document's pattern and
  `minLength` refuse it, and the server answers 400), yet schemathesis
  4.32's coverage phase sends it in cases it counts as valid data; such a
  header is dropped from those cases (the negative cases keep it).
- A watch of the discovery registry (`index` and `wait`) is a long-poll
  that answers at its deadline when nothing changes, and the fuzzer
  changes nothing there: a valid `wait` is cut to 100ms, so that a few
  hundred such cases do not spend the run's time limit waiting (an
  invalid one is kept: it must be refused at once).
- The fuzzer must not lock itself out: revoking its own token, or
  disabling, deleting or stripping the roles of the user it acts as, turns
  every later request into a 401 or 403. Cases that would do that are
  dropped; the same operations still run against the other users and
  tokens the seed data has.
"""

import datetime
import hashlib
import json
import os
import re

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


def _in_the_future(value):
    """`value` if it is not an RFC 3339 time in the past, else that time in 2100."""
    if not isinstance(value, str):
        return value
    try:
        at = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return value
    if at.tzinfo is None or at > datetime.datetime.now(datetime.timezone.utc):
        return value
    try:
        return at.replace(year=2100).isoformat()
    except ValueError:  # 29 February
        return at.replace(year=2100, day=28).isoformat()


def _positive(case):
    mode = getattr(getattr(case.meta, "generation", None), "mode", None) if case.meta else None
    return str(getattr(mode, "value", mode)) == "positive"


@schemathesis.hook
def map_case(context, case):
    if (
        case.operation.path == "/v1/users/{id}/tokens"
        and case.method.upper() == "POST"
        and isinstance(case.body, dict)
        and "expires_at" in case.body
    ):
        case.body["expires_at"] = _in_the_future(case.body["expires_at"])
    if (
        case.operation.path in ("/v1/discovery", "/v1/discovery/{service}")
        and isinstance(case.query, dict)
        and isinstance(case.query.get("wait"), str)
        and re.fullmatch(r"[0-9]+(ms|s|m)?", case.query["wait"])
    ):
        case.query["wait"] = "100ms"
    if case.headers and case.headers.get("If-Match") == "" and _positive(case):
        del case.headers["If-Match"]
    # Last: the key digests the request as it is sent.
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


_TRACE = os.environ.get("DROVER_FUZZ_TRACE")


@schemathesis.hook
def after_call(context, case, response):
    """With DROVER_FUZZ_TRACE=FILE, one line per call: phase, generation
    mode, operation, status, the problem's type and detail, and If-Match:
    what it takes to see why schemathesis warns about an operation."""
    if not _TRACE:
        return
    meta = case.meta
    phase = getattr(getattr(meta, "phase", None), "name", "?") if meta else "?"
    mode = getattr(getattr(meta, "generation", None), "mode", "?") if meta else "?"
    kind = ""
    if response.status_code >= 400:
        try:
            body = response.json()
            kind = body.get("type", "") + " " + (body.get("detail") or "")[:120]
        except Exception:
            pass
    with open(_TRACE, "a") as f:
        f.write(f"{phase}\t{mode}\t{case.method} {case.operation.path}\t{response.status_code}\t{kind}\t{case.headers and case.headers.get('If-Match')}\n")
