//! Assembling and running the server: store, engine, router.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderName;
use axum::{middleware, Router};
use drover_domain::auth::Auth;
use drover_domain::discovery::Registry;
use drover_domain::engine::{Engine, EngineConfig, Providers};
use drover_domain::kinds::router;
use drover_domain::routing::{RouterRuns, Routing};
use drover_domain::service::Service;
use drover_domain::settings::{SecretKey, Settings};
use tokio::sync::watch;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::routes::{self, AppState};

/// Request bodies are small JSON documents.
pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; default: SQLite in the data dir.
    pub database_url: Option<String>,
    pub engine: EngineConfig,
    /// Run the engine's workers in this process.
    pub workers: bool,
    /// The first admin's token on an empty database (else one is made up).
    pub bootstrap_token: Option<String>,
    /// 64 hex digits sealing secret settings; else a key file in the data dir.
    pub secret_key: Option<String>,
    /// How the `aws` provider reaches AWS (loaded lazily, at its first run).
    pub aws: drover_ops::aws::Settings,
    /// How long a resource's view may be served from what this process read
    /// for it, while it writes nothing (zero: every view reads the store).
    pub view_max_age: Duration,
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "An API token (`drv_…`). Each operation's scopes name the permission it needs; \
             `{action}` and `{kind}` stand for the transition's action and the resource's kind."
                .into(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

#[derive(OpenApi)]
#[openapi(
    modifiers(&BearerAuth),
    info(
        title = "Drover",
        description = "Drover owns the lifecycle of operations resources. Every change of a resource's state is a \
            transition, executed in the background by a provisioner and recorded: who, why, from/to, timings, \
            outcome, error and a step log. Errors are RFC 9457 problem+json."
    ),
    // Each kind's tag is added with its operations (`openapi::add_kinds`).
    tags(
        (name = "transitions", description = "The ledger of changes"),
        (name = "kinds", description = "Resource kinds and their state machines"),
        (name = "settings", description = "Versioned settings and secrets"),
        (name = "discovery", description = "Where healthy service instances can be reached, and their changes"),
        (name = "health", description = "Liveness and readiness"),
    ),
    // The generic shapes the kinds' operations are written from.
    components(schemas(
        crate::dto::ResourceView,
        crate::dto::ResourceSummary,
        crate::dto::ResourcePage,
        crate::dto::CreateResource,
        crate::dto::SpecVersionView,
        crate::dto::SpecVersionPage,
        crate::dto::SpecDiff,
        crate::dto::Transition,
        crate::problem::Problem
    ))
)]
struct ApiDoc;

fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes::templates::router())
        .merge(routes::transitions::router())
        .merge(routes::kinds::router())
        .merge(routes::identity::router())
        .merge(routes::settings::router())
        .merge(routes::discovery::router())
        .merge(routes::routers::router())
        .merge(routes::stats::router())
        .merge(routes::health::router())
}

/// The routes and the document describing them: the kinds' from the
/// registry, the rest from utoipa, with the error responses they share
/// added to every operation.
fn parts() -> (Router<AppState>, serde_json::Value) {
    let (router, doc) = api().split_for_parts();
    let mut doc = serde_json::to_value(doc).expect("the document serialises");
    crate::openapi::add_kinds(&mut doc);
    crate::openapi::add_common_responses(&mut doc);
    (router.merge(routes::resources::router()), doc)
}

/// The OpenAPI document the server serves at `/openapi.json`.
pub fn openapi() -> serde_json::Value {
    parts().1
}

pub fn router(state: AppState) -> Router {
    let (api, doc) = parts();
    let request_id = HeaderName::from_static("x-request-id");
    api.route_layer(middleware::from_fn_with_state(state.clone(), crate::metrics::layer))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone())
        .merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", doc))
        .merge(crate::ui::router(state.clone()))
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(state.clone(), crate::idempotency::layer))
        .layer(middleware::from_fn_with_state(state, crate::auth::layer))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(crate::problem::catch_panic))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
            let (method, path) = (req.method(), req.uri().path());
            tracing::info_span!("http", %method, %path, request_id = %id, user = tracing::field::Empty)
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// Unknown paths get a problem, like every other error.
async fn no_route(uri: axum::http::Uri) -> crate::problem::Problem {
    crate::problem::Problem::new(
        axum::http::StatusCode::NOT_FOUND,
        "no-such-path",
        "No such path",
        format!("nothing is served at {}; /openapi.json lists what is", uri.path()),
    )
}

/// A method the path does not take (the `Allow` header lists those it does).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> crate::problem::Problem {
    crate::problem::Problem::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{} does not take {method}", uri.path()),
    )
}

/// How long a stopping server waits for its runs in flight to end before
/// it puts them back in the queue.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub backend: &'static str,
    pub engine: Arc<Engine>,
    /// The first admin's token, when this start created it: to show once.
    pub bootstrap_token: Option<String>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Stops taking requests and claiming runs. Runs in flight are left to
    /// their leases: the next start (or another replica) takes them over.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
        }
        let _ = self.http.await;
    }

    /// Serves until the process is told to stop; then gives runs in flight
    /// [`SHUTDOWN_GRACE`] to end and puts the rest back in the queue.
    pub async fn wait(self) -> std::io::Result<()> {
        let mut stop = self.stop.subscribe();
        let (http, stop_tx) = (self.http, self.stop);
        let served = tokio::select! {
            r = http => r.unwrap_or(Ok(())),
            _ = stop.changed() => { let _ = stop_tx; Ok(()) }
        };
        let released = self.engine.release_in_flight(SHUTDOWN_GRACE).await;
        if released > 0 {
            tracing::info!(released, "runs still in flight were queued again for another worker");
        }
        served
    }

    pub fn shutdown_signal(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// Opens the store, starts the engine and serves HTTP.
pub async fn start(cfg: Config) -> anyhow::Result<Server> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", cfg.data_dir.display()))?;
    let data_dir = cfg.data_dir.canonicalize()?;
    // Before the store: a bad flag must not leave a bootstrapped admin
    // whose token nobody saw.
    let mut providers = Providers::default();
    drover_ops::local::register(&mut providers, &data_dir);
    drover_ops::builtin::register(&mut providers);
    drover_ops::aws::register(&mut providers, cfg.aws.clone());
    if let Some(only) = &cfg.engine.providers {
        let known = providers.names();
        if let Some(unknown) = only.iter().find(|p| !known.contains(p)) {
            anyhow::bail!("no provider named {unknown:?} (providers: {})", known.join(", "));
        }
    }
    let url = cfg.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", data_dir.join("drover.db").display()));
    let stores = drover_persistence::open(&url).await.map_err(|e| anyhow::anyhow!("{}", chain(&e)))?;
    let store = stores.store.clone();
    let backend = store.backend();
    let routing = Arc::new(
        Routing::new(
            store.clone(),
            stores.discovery.clone(),
            stores.routers.clone(),
            drover_ops::local::balancers(&data_dir)
                .into_iter()
                .chain(drover_ops::aws::balancers(cfg.aws.clone()))
                .collect(),
        )
        .only(cfg.engine.providers.clone()),
    );
    for provider in routing.providers() {
        providers.register(&provider, router::KIND, Arc::new(RouterRuns { routing: routing.clone() }));
    }
    let key = match &cfg.secret_key {
        Some(hex) => SecretKey::from_hex(hex),
        None => SecretKey::load_or_create(&data_dir.join("secret.key")),
    }
    .map_err(|e| anyhow::anyhow!("{}", chain(&e)))?;
    let settings = Arc::new(Settings::new(store.clone(), stores.settings.clone(), key));
    let auth = Arc::new(Auth::new(store.clone(), stores.tokens.clone()));
    let bootstrap_token = auth
        .bootstrap(cfg.bootstrap_token.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!("bootstrap: {}", chain(&e)))?;
    let engine = Engine::new(store.clone(), providers.clone(), cfg.engine.clone());
    engine.set_settings(settings.clone());
    let metrics = Arc::new(crate::metrics::Registry::default());
    engine.set_metrics(metrics.clone());
    let service =
        Arc::new(Service::new(store, settings.clone()).with_providers(providers).with_view_max_age(cfg.view_max_age));
    engine.set_requester(service.clone());
    service.set_running(engine.running());
    engine.set_discovery(stores.discovery.clone());
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = if cfg.workers { engine.spawn(stop_rx.clone()) } else { Vec::new() };
    if cfg.workers {
        let every = cfg.engine.observe_every;
        let worker = cfg.engine.worker_id.clone();
        tasks.push(tokio::spawn(routing.clone().run(worker, every, stop_rx.clone())));
    }

    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let app = router(AppState {
        service,
        auth,
        settings,
        metrics,
        discovery: Arc::new(Registry::new(stores.discovery.clone())),
        routing,
    });
    let mut stop_http = stop_rx;
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_http.wait_for(|s| *s).await;
            })
            .await
    });
    Ok(Server { addr, backend, engine, bootstrap_token, stop, tasks, http })
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The URL without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(super::redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(super::redact_url("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
