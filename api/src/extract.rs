//! Extractors whose rejections are problem+json naming what is wrong.

use axum::extract::path::ErrorKind;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use drover_domain::FieldError;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// `Json<T>` with problem+json rejections: 400 for malformed JSON, 415 for
/// a missing content type, 413 for an oversized body, 422 naming the field.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let mut value = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => v,
            Err(rejection) => return Err(json_problem(rejection)),
        };
        integral_floats_to_integers(&mut value);
        FieldError::read(&value, None, "body").map(ApiJson).map_err(|f| Problem::invalid(&f.field, f.message))
    }
}

/// JSON does not tell `3` from `3.0`, and neither does JSON Schema (both
/// are integers); serde does. Numbers with no fraction become integers.
fn integral_floats_to_integers(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() < 9.0e15 {
                *v = if f < 0.0 { Value::from(f as i64) } else { Value::from(f as u64) };
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(map) => map.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

fn json_problem(r: JsonRejection) -> Problem {
    match r {
        JsonRejection::JsonSyntaxError(e) => Problem::bad_request("malformed-json", e.body_text()),
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            "send the body as JSON with Content-Type: application/json".to_string(),
        ),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            format!("request bodies are limited to {} bytes", crate::app::BODY_LIMIT),
        ),
        other => Problem::bad_request("unreadable-body", other.body_text()),
    }
}

/// `Query<T>` with a 400 problem naming the parameter.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                let text = e.body_text();
                // "Failed to deserialize query string: limit: invalid digit found in string"
                let detail = text.split_once("query string: ").map(|(_, d)| d.to_string()).unwrap_or(text);
                let (field, message) = match detail.split_once(": ") {
                    Some((f, m)) if !f.contains(' ') => (f.to_string(), m.to_string()),
                    _ => ("query".to_string(), detail.clone()),
                };
                let mut p = Problem::bad_request("invalid-query", detail);
                p.errors.push(crate::problem::FieldProblem { field, message });
                Err(p)
            }
            Err(other) => Err(Problem::bad_request("invalid-query", other.body_text())),
        }
    }
}

/// `Path<T>` with a 400 problem naming the path parameter that does not
/// parse (a transition id that is not a UUID, a name that is not UTF-8).
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                let (field, message) = match e.into_kind() {
                    ErrorKind::ParseErrorAtKey { key, value, expected_type } => {
                        (key, format!("{value:?} is not a valid {}", type_name(expected_type)))
                    }
                    ErrorKind::InvalidUtf8InPathParam { key } => (key, "is not valid UTF-8".to_string()),
                    ErrorKind::DeserializeError { key, value, message } => (key, format!("{value:?}: {message}")),
                    ErrorKind::ParseError { value, expected_type } => {
                        ("path".to_string(), format!("{value:?} is not a valid {}", type_name(expected_type)))
                    }
                    other @ (ErrorKind::UnsupportedType { .. } | ErrorKind::WrongNumberOfParameters { .. }) => {
                        // The route and its extractor disagree: our bug, not the caller's.
                        tracing::error!(error = %other, "path parameters do not match the handler");
                        return Err(Problem::internal());
                    }
                    other => ("path".to_string(), other.to_string()),
                };
                let mut p = Problem::bad_request("invalid-path", format!("{field}: {message}"));
                p.errors.push(crate::problem::FieldProblem { field, message });
                Err(p)
            }
            Err(other) => {
                tracing::error!(error = %other.body_text(), "path parameters missing for a matched route");
                Err(Problem::internal())
            }
        }
    }
}

/// `uuid::Uuid` → `UUID`, for messages.
fn type_name(rust: &str) -> String {
    match rust.rsplit("::").next().unwrap_or(rust) {
        "Uuid" => "UUID".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn integral_floats_become_integers_and_nothing_else_changes() {
        let mut v = json!({"count": 3.0, "n": [2.0, -1.0, 0.5], "t": "3.0", "big": 1e20, "i": 7});
        super::integral_floats_to_integers(&mut v);
        assert_eq!(v, json!({"count": 3, "n": [2, -1, 0.5], "t": "3.0", "big": 1e20, "i": 7}));
        assert!(v["count"].is_u64() && v["n"][1].is_i64());
    }
}
