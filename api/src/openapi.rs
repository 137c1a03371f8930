//! The error responses every operation shares, documented once.
//!
//! Some errors do not come from a handler but from what surrounds it: the
//! extractors (a path, query or body that does not parse), the
//! authentication layer, the `Idempotency-Key` middleware and the store
//! behind them all. Rather than list them by hand on each of the ~50
//! operations (and forget some), [`CommonResponses`] adds them, after the
//! routes are merged, to every operation that can produce them, judging by
//! what the operation declares: security, path, query and header
//! parameters, a request body. A response an operation documents itself is
//! kept as it is.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};

pub struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for item in doc.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
            ];
            for op in ops.into_iter().flatten() {
                document(op);
            }
        }
    }
}

fn document(op: &mut Operation) {
    let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
    let params = op.parameters.as_deref().unwrap_or(&[]);
    let has = |place: ParameterIn| params.iter().any(|p| p.parameter_in == place);
    let header =
        |name: &str| params.iter().any(|p| p.parameter_in == ParameterIn::Header && p.name.eq_ignore_ascii_case(name));
    let (path, query, body) = (has(ParameterIn::Path), has(ParameterIn::Query), op.request_body.is_some());
    let (idempotent, if_match) = (header("Idempotency-Key"), header("If-Match"));

    let mut add = |status: &str, description: &str| {
        op.responses.responses.entry(status.to_string()).or_insert_with(|| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/problem+json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build(),
                )
                .build()
                .into()
        });
    };
    if path || query || body || if_match {
        add(
            "400",
            "A path or query parameter, header or body that cannot be read (`invalid-path`, `invalid-query`, \
             `malformed-json`, `invalid-if-match`); `errors` names it",
        );
    }
    if secured {
        add("401", "No valid bearer token (`unauthenticated`)");
        add("403", "The token's roles do not grant the permission this operation needs (`forbidden`)");
    }
    if path {
        add("404", "Not found");
    }
    if idempotent {
        add("409", "A request with this Idempotency-Key is still in progress (`idempotency-key-in-progress`)");
    }
    if if_match {
        add("412", "The resource changed since the ETag in If-Match (`precondition-failed`)");
    }
    if body {
        add("413", "The body is larger than the limit (`body-too-large`)");
        add("415", "The body is not sent as `Content-Type: application/json` (`unsupported-media-type`)");
    }
    if path || query || body || idempotent {
        add(
            "422",
            "A value that is well-formed but not acceptable (`invalid-request`, with `errors` naming the fields), \
             or an Idempotency-Key reused for another request (`idempotency-key-reused`)",
        );
    }
    if secured {
        add("503", "The database did not answer (`store-unavailable`); retry shortly");
    }
}
