//! The dashboard, under `/ui/`: server-rendered pages (askama templates
//! compiled into the binary) for a person at a desk or on a phone at 3 a.m.
//!
//! - **Sign-in** trades an API token for a session: the browser holds a
//!   random cookie secret (HttpOnly, SameSite=Strict, Secure when the
//!   request came over TLS through a proxy), the database only its SHA-256
//!   ([`drover_domain::auth::Auth::sign_in`]). A session acts as its token,
//!   with the same permissions, read the same way.
//! - **CSRF**: every form carries a token derived from the session secret
//!   (the sign-in form: a double-submit cookie); every POST is also refused
//!   when the browser says it came from another site (`Origin`,
//!   `Sec-Fetch-Site`).
//! - **Pages** are read from the same domain calls and DTOs as the API, so
//!   the two never disagree, and work without JavaScript; htmx (vendored)
//!   refreshes the live parts, and a few lines of our own script follow a
//!   run's events over SSE.
//!
//! Nothing under `/ui/` is part of the API: the bearer-token layer lets it
//! through ([`crate::auth::is_public`]) and [`require_session`] guards it.

mod chart;
mod ledger;
mod pages;
mod settings;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use drover_domain::auth::Principal;

use crate::cli::encode;
use crate::problem::Problem;
use crate::routes::AppState;

/// The session cookie.
const SESSION: &str = "drover_session";
/// The sign-in form's double-submit cookie.
const SIGN_IN_CSRF: &str = "drover_csrf";

/// The signed-in person, as the pages see them.
#[derive(Clone)]
pub struct Viewer {
    pub principal: Principal,
    /// The token every form of this session carries.
    pub csrf: String,
}

impl Viewer {
    pub fn can(&self, permission: &str) -> bool {
        self.principal.can(permission)
    }
}

/// The CSRF token of a session: derived from its secret, so it needs no
/// storage and is useless without the cookie it came from.
fn csrf_of(secret: &str) -> String {
    drover_domain::auth::hash_token(&format!("drover-csrf\0{secret}"))[..32].to_string()
}

pub fn router(state: AppState) -> Router {
    let signed_in = Router::new()
        .route("/ui/", get(pages::home))
        .route("/ui/runs/{id}", get(pages::run))
        .route("/ui/runs/{id}/events", get(pages::run_events))
        .route("/ui/runs/{id}/cancel", post(pages::cancel))
        .route("/ui/sign-out", post(sign_out))
        .route("/ui/history", get(ledger::history))
        .route("/ui/stats", get(ledger::stats))
        .route("/ui/settings", get(settings::settings))
        .route("/ui/settings/{scope}/{key}", get(settings::setting))
        .route("/ui/settings/{scope}/{key}/rollback", post(settings::rollback))
        .route("/ui/{plural}", get(pages::kind))
        .route("/ui/{plural}/{name}", get(pages::resource))
        .route("/ui/{plural}/{name}/versions/{version}", get(pages::version))
        .route("/ui/{plural}/{name}/actions/{action}", post(pages::act))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_session));
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/sign-in", get(sign_in_page).post(sign_in))
        .route("/ui/assets/{file}", get(asset))
        .merge(signed_in)
        .layer(middleware::from_fn(guard))
        .with_state(state)
}

/// What every dashboard response carries, and what every POST must pass:
/// no framing, no sniffing, nothing from elsewhere; no cross-site POSTs.
async fn guard(req: Request, next: Next) -> Response {
    if req.method() == Method::POST && cross_site(req.headers()) {
        return page_error(StatusCode::FORBIDDEN, "This form was sent from another site, so it was refused.");
    }
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    r
}

/// Whether the browser says a request comes from another site.
fn cross_site(h: &HeaderMap) -> bool {
    let fetch_site = h.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if fetch_site.is_some_and(|s| s == "cross-site" || s == "same-site") {
        return true;
    }
    let origin = h.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin, host) {
        (None, _) => false,
        (Some("null"), _) => true,
        (Some(o), Some(host)) => o.split_once("://").map(|(_, rest)| rest) != Some(host),
        (Some(_), None) => true,
    }
}

fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// `Secure` when the browser reached us over TLS (through a proxy that
/// says so): a plain-HTTP installation on a laptop still works.
fn set_cookie(h: &HeaderMap, name: &str, value: &str, max_age: i64, path: &str) -> HeaderValue {
    let tls = h.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{name}={value}; Path={path}; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"))
        .expect("cookie is ascii")
}

/// Pages need a session; without one (or with one that ended) a page
/// sends the browser to sign in and back, a live stream gets a 401.
async fn require_session(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let reads_only = matches!(*req.method(), Method::GET | Method::HEAD);
    let Some(secret) = cookie(req.headers(), SESSION).map(str::to_string) else {
        return to_sign_in(&req, None);
    };
    match s.auth.session(&secret, reads_only).await {
        Ok(principal) => {
            tracing::Span::current().record("user", principal.user.as_str());
            req.extensions_mut().insert(Viewer { principal, csrf: csrf_of(&secret) });
            if !reads_only {
                s.auth.forget_recent();
            }
            next.run(req).await
        }
        Err(drover_domain::Error::Unauthenticated(why)) => to_sign_in(&req, Some(why)),
        Err(e) => pages::UiError::from(e).into_response(),
    }
}

fn to_sign_in(req: &Request, why: Option<String>) -> Response {
    let live =
        req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("event-stream"));
    if live {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut to = String::from("/ui/sign-in");
    let mut query = Vec::new();
    if req.method() == Method::GET {
        let here = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/ui/");
        query.push(format!("next={}", encode(here)));
    }
    if let Some(why) = why {
        query.push(format!("why={}", encode(&why)));
    }
    if !query.is_empty() {
        to = format!("{to}?{}", query.join("&"));
    }
    let mut r = Redirect::to(&to).into_response();
    if cookie(req.headers(), SESSION).is_some() {
        // A session that no longer works: the browser forgets it.
        r.headers_mut().append(header::SET_COOKIE, set_cookie(req.headers(), SESSION, "", 0, "/ui/"));
    }
    r
}

/// Only paths of this dashboard are followed after signing in.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/ui/".to_string(),
    }
}

#[derive(serde::Deserialize)]
struct SignInQuery {
    next: Option<String>,
    why: Option<String>,
}

async fn sign_in_page(headers: HeaderMap, axum::extract::Query(q): axum::extract::Query<SignInQuery>) -> Response {
    let csrf = match cookie(&headers, SIGN_IN_CSRF) {
        Some(c) if c.len() == 32 && c.bytes().all(|b| b.is_ascii_hexdigit()) => c.to_string(),
        _ => uuid::Uuid::new_v4().simple().to_string(),
    };
    let why = q.why.filter(|w| !w.is_empty()).map(|w| match w.as_str() {
        "signed out" => "You signed out.".to_string(),
        other => format!("Please sign in again: {other}."),
    });
    let page = pages::SignIn { next: safe_next(q.next.as_deref()), csrf: csrf.clone(), error: None, note: why };
    let mut r = pages::render(&page);
    r.headers_mut().append(header::SET_COOKIE, set_cookie(&headers, SIGN_IN_CSRF, &csrf, 3600, "/ui/sign-in"));
    r
}

#[derive(serde::Deserialize)]
struct SignInForm {
    token: String,
    csrf: String,
    next: Option<String>,
}

async fn sign_in(State(s): State<AppState>, headers: HeaderMap, axum::Form(f): axum::Form<SignInForm>) -> Response {
    let next = safe_next(f.next.as_deref());
    if cookie(&headers, SIGN_IN_CSRF) != Some(f.csrf.as_str()) {
        return page_error(
            StatusCode::FORBIDDEN,
            "The sign-in form expired or was not sent from this page. Reload it and try again.",
        );
    }
    let again = |status: StatusCode, error: String| {
        let page = pages::SignIn { next: next.clone(), csrf: f.csrf.clone(), error: Some(error), note: None };
        let mut r = pages::render(&page);
        *r.status_mut() = status;
        r
    };
    match s.auth.sign_in(f.token.trim()).await {
        Ok((secret, principal, session)) => {
            tracing::info!(user = %principal.user, "signed in to the dashboard");
            let max_age = (session.expires_at - session.created_at).num_seconds();
            let mut r = Redirect::to(&next).into_response();
            r.headers_mut().append(header::SET_COOKIE, set_cookie(&headers, SESSION, &secret, max_age, "/ui/"));
            r.headers_mut().append(header::SET_COOKIE, set_cookie(&headers, SIGN_IN_CSRF, "", 0, "/ui/sign-in"));
            r
        }
        Err(drover_domain::Error::Unauthenticated(why)) => {
            again(StatusCode::UNAUTHORIZED, format!("That token does not sign in: {why}."))
        }
        Err(e) => pages::UiError::from(e).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn sign_out(
    State(s): State<AppState>,
    headers: HeaderMap,
    axum::Extension(viewer): axum::Extension<Viewer>,
    axum::Form(f): axum::Form<CsrfForm>,
) -> Result<Response, pages::UiError> {
    pages::check_csrf(&viewer, &f.csrf)?;
    if let Some(secret) = cookie(&headers, SESSION) {
        s.auth.sign_out(secret).await?;
    }
    tracing::info!(user = %viewer.principal.user, "signed out of the dashboard");
    let mut r = Redirect::to("/ui/sign-in?why=signed%20out").into_response();
    r.headers_mut().append(header::SET_COOKIE, set_cookie(&headers, SESSION, "", 0, "/ui/"));
    Ok(r)
}

/// A page that only says what went wrong.
pub(crate) fn page_error(status: StatusCode, message: &str) -> Response {
    pages::UiError { status, message: message.to_string() }.into_response()
}

/// The stylesheet, our script and htmx, compiled into the binary.
const ASSETS: [(&str, &str, &str); 3] = [
    ("drover.css", "text/css; charset=utf-8", include_str!("../../assets/drover.css")),
    ("drover.js", "text/javascript; charset=utf-8", include_str!("../../assets/drover.js")),
    ("htmx.min.js", "text/javascript; charset=utf-8", include_str!("../../assets/vendor/htmx-2.0.11.min.js")),
];

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, mime, body)) => {
            ([(header::CONTENT_TYPE, *mime), (header::CACHE_CONTROL, "public, max-age=3600")], Html(*body))
                .into_response()
        }
        None => Problem::new(StatusCode::NOT_FOUND, "no-such-path", "No such asset", format!("no asset {file}"))
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_site_posts_are_told_apart() {
        let mut h = HeaderMap::new();
        assert!(!cross_site(&h), "a browser that says nothing (curl) is not refused here");
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(!cross_site(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(cross_site(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(cross_site(&h));
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(!cross_site(&h));
    }

    #[test]
    fn only_dashboard_paths_are_followed() {
        assert_eq!(safe_next(Some("/ui/clusters/web")), "/ui/clusters/web");
        assert_eq!(safe_next(Some("https://evil.example/")), "/ui/");
        assert_eq!(safe_next(Some("//evil.example/ui/")), "/ui/");
        assert_eq!(safe_next(Some("/v1/users")), "/ui/");
        assert_eq!(safe_next(None), "/ui/");
    }

    #[test]
    fn cookies_are_read_by_name() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; drover_session=drs_x; b=2"));
        assert_eq!(cookie(&h, SESSION), Some("drs_x"));
        assert_eq!(cookie(&h, "c"), None);
        let c = set_cookie(&h, SESSION, "v", 60, "/ui/");
        assert_eq!(c.to_str().unwrap(), "drover_session=v; Path=/ui/; HttpOnly; SameSite=Strict; Max-Age=60");
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(set_cookie(&h, SESSION, "v", 60, "/ui/").to_str().unwrap().ends_with("; Secure"));
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        assert_eq!(csrf_of("drs_a"), csrf_of("drs_a"));
        assert_ne!(csrf_of("drs_a"), csrf_of("drs_b"));
        assert_eq!(csrf_of("drs_a").len(), 32);
    }
}
