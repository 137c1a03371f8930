//! The CLI's HTTP client: a token, problem+json read into one line, and
//! with `-v` each request's id and time on stderr.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::config::Target;
use super::CliError;

pub struct Client {
    http: reqwest::Client,
    pub target: Target,
    verbose: bool,
}

/// An answer: status, body (JSON, or text as a string), ETag.
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub etag: Option<String>,
}

impl Client {
    pub fn new(target: Target, verbose: bool) -> Result<Client, CliError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .user_agent(concat!("drover-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::usage(format!("cannot make an HTTP client: {e}")))?;
        Ok(Client { http, target, verbose })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.target.url.trim_end_matches('/'))
    }

    /// Sends a request; a 4xx/5xx answer is an [`CliError::Api`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<Reply, CliError> {
        let url = self.url(path);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(token) = &self.target.token {
            req = req.bearer_auth(token);
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let started = Instant::now();
        let resp = req.send().await.map_err(|e| CliError::Network {
            url: url.clone(),
            context: self.target.label.clone(),
            reason: network_reason(&e),
        })?;
        let status = resp.status();
        let request_id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        let etag = resp.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
        let is_json =
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|c| c.contains("json"));
        let text = resp.text().await.map_err(|e| CliError::Network {
            url: url.clone(),
            context: self.target.label.clone(),
            reason: network_reason(&e),
        })?;
        if self.verbose {
            eprintln!(
                "{method} {url} -> {} in {} ms (request id {})",
                status.as_u16(),
                started.elapsed().as_millis(),
                request_id.as_deref().unwrap_or("-")
            );
        }
        let body = match is_json {
            true => serde_json::from_str(&text).unwrap_or(Value::String(text)),
            false => Value::String(text),
        };
        if status.is_client_error() || status.is_server_error() {
            return Err(CliError::from_problem(status, &body));
        }
        Ok(Reply { status, body, etag })
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        Ok(self.send(Method::GET, path, None, &[]).await?.body)
    }

    /// The server's own text rendering of a resource or transition.
    pub async fn get_text(&self, path: &str) -> Result<String, CliError> {
        let r = self.send(Method::GET, path, None, &[("accept", "text/plain".to_string())]).await?;
        Ok(match r.body {
            Value::String(s) => s,
            other => other.to_string(),
        })
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        Ok(self.send(Method::POST, path, Some(body), &[]).await?.body)
    }
}

fn network_reason(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "cannot connect (is drover running there?)".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            s = format!("{s}: {inner}");
            src = inner.source();
        }
        s
    }
}
