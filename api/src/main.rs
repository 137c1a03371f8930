//! The `drover` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use drover_api::app::{redact_url, Config};
use drover_domain::engine::EngineConfig;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "drover", version, about = "Drover: an operations service that records every change")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: the API and the provisioner's workers.
    Serve(Box<Serve>),
    /// Print the OpenAPI document.
    Openapi,
}

#[derive(Parser)]
struct Serve {
    /// Address to listen on.
    #[arg(long, env = "DROVER_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where drover keeps its SQLite database and local-provider files.
    #[arg(long, env = "DROVER_DATA_DIR", default_value = "./drover-data")]
    data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`. Default: SQLite in the data directory.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// How many transitions this process works on at once (as many more
    /// may wait for their ends to be written).
    #[arg(long, env = "DROVER_WORKER_CONCURRENCY", default_value_t = 64)]
    worker_concurrency: usize,
    /// Seconds a worker's claim on a run lasts without a heartbeat.
    #[arg(long, env = "DROVER_LEASE_SECS", default_value_t = 30)]
    lease_secs: u64,
    /// Serve the API only; leave runs to other replicas.
    #[arg(long, env = "DROVER_NO_WORKERS")]
    no_workers: bool,
    /// Execute (and observe) only the resources of these providers, comma
    /// separated (`local,aws,builtin`); runs of the others wait for a
    /// replica that serves them. Default: every provider.
    #[arg(long, env = "DROVER_PROVIDERS", value_delimiter = ',')]
    providers: Vec<String>,
    /// The first admin's token, used on an empty database instead of a new
    /// one (at least 32 characters).
    #[arg(long, env = "DROVER_BOOTSTRAP_TOKEN", hide_env_values = true)]
    bootstrap_token: Option<String>,
    /// 64 hex digits sealing secret settings. Default: a key file created in
    /// the data directory on first start.
    #[arg(long, env = "DROVER_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Overrides the AWS endpoint of the `aws` provider (e.g. a moto server);
    /// the SDK also honours `AWS_ENDPOINT_URL`.
    #[arg(long, env = "DROVER_AWS_ENDPOINT_URL")]
    aws_endpoint_url: Option<String>,
    /// AWS region; default: the standard chain (`AWS_REGION`, profile, …).
    #[arg(long, env = "DROVER_AWS_REGION")]
    aws_region: Option<String>,
    /// Log format.
    #[arg(long, env = "DROVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&drover_api::openapi())?);
            Ok(())
        }
        Command::Serve(s) => serve(*s).await,
    }
}

async fn serve(s: Serve) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_env("DROVER_LOG").unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    match s.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    let lease = Duration::from_secs(s.lease_secs.max(3));
    let engine = EngineConfig {
        worker_id: format!("{}-{}", hostname(), std::process::id()),
        concurrency: s.worker_concurrency.max(1),
        lease,
        heartbeat: lease / 3,
        providers: (!s.providers.is_empty()).then(|| s.providers.clone()),
        ..EngineConfig::default()
    };
    let cfg = Config {
        listen: s.listen,
        data_dir: s.data_dir.clone(),
        database_url: s.database_url.clone(),
        engine,
        workers: !s.no_workers,
        bootstrap_token: s.bootstrap_token.clone(),
        secret_key: s.secret_key.clone(),
        aws: drover_ops::aws::Settings {
            endpoint_url: s.aws_endpoint_url.clone(),
            region: s.aws_region.clone(),
            ..drover_ops::aws::Settings::from_env()
        },
    };
    let server = drover_api::start(cfg).await?;
    let store =
        s.database_url.as_deref().map(redact_url).unwrap_or_else(|| format!("sqlite in {}", s.data_dir.display()));
    tracing::info!(addr = %server.addr, backend = server.backend, store = %store, "drover serving");
    println!("drover listening on http://{} (store: {store}; docs: http://{}/docs)", server.addr, server.addr);
    if let Some(token) = &server.bootstrap_token {
        // Shown once, on the terminal only: never logged.
        println!(
            "\nThis is a new installation. Its first user is `admin`, with this API token (shown only now):\n\n    {token}\n\n\
             Use it as `Authorization: Bearer <token>`; create users and their own tokens with it.\n"
        );
    }
    let stop = server.shutdown_signal();
    tokio::spawn(async move {
        shutdown_requested().await;
        tracing::info!("shutting down: no new requests or runs; runs in flight get 10 s, then go back to the queue");
        let _ = stop.send(true);
    });
    server.wait().await?;
    Ok(())
}

async fn shutdown_requested() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "drover".into())
}
