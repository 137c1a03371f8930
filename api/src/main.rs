//! The `drover` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use drover_api::app::{redact_url, Config};
use drover_api::cli::{self, Change, CliError, ContextCommand, Do, Global, Output, Runs};
use drover_domain::engine::EngineConfig;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Drover: an operations service that records every change",
    after_help = "The client commands talk to an installation: a context (`drover context add`), or $DROVER_URL and $DROVER_TOKEN."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: the API and the provisioner's workers.
    Serve(Box<Serve>),
    /// Print the OpenAPI document.
    Openapi,
    /// The installations this CLI talks to.
    #[command(
        subcommand,
        after_help = "Example:\n  drover context add dev --url http://127.0.0.1:7070 --token-file ~/.drover/dev.token"
    )]
    Context(ContextCommand),
    /// List a kind's resources, or show one.
    #[command(
        after_help = "Examples:\n  drover get clusters\n  drover get cluster web-qa -o yaml\n  drover get routers -o wide"
    )]
    Get {
        /// The kind, singular or plural (`cluster`, `clusters`), or `KIND/NAME`.
        kind: String,
        name: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// What a resource is doing and why it is stuck: state, active run and
    /// its current step, last transitions, pending changes.
    #[command(after_help = "Example:\n  drover describe cluster web-qa")]
    Describe {
        /// The kind, or `KIND/NAME` (as the other commands take it).
        kind: String,
        name: Option<String>,
    },
    /// Transitions, newest first, with the ledger's filters.
    #[command(
        after_help = "Examples:\n  drover runs --status failed --environment prod\n  drover runs --kind cluster --resource web-qa -o json"
    )]
    Runs(Runs),
    /// A transition's events; with --follow, until it ends.
    #[command(after_help = "Example:\n  drover events 0190d5e4-… --follow")]
    Events {
        run: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Any action of any kind, its parameters typed by the server's schema.
    #[command(
        after_help = "Examples:\n  drover do cluster/web-qa scale -p count=3 --reason \"more traffic\" --wait\n  drover do service/app deploy -p image=web --wait"
    )]
    Do(Do),
    /// Scale a resource to COUNT (its `scale` action).
    #[command(after_help = "Example:\n  drover scale cluster/web-qa 3 --wait")]
    Scale {
        /// `KIND/NAME`.
        target: String,
        count: u32,
        #[command(flatten)]
        change: Change,
    },
    /// Deploy a service (its `deploy` action): the image's current build, or --build.
    #[command(after_help = "Example:\n  drover deploy service/app --image web --wait")]
    Deploy {
        /// `KIND/NAME` (default kind: service).
        target: String,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        build: Option<String>,
        #[command(flatten)]
        change: Change,
    },
    /// Back to what ran before the last deploy (the `rollback` action).
    #[command(after_help = "Example:\n  drover rollback app --reason \"5xx after deploy\" --wait")]
    Rollback {
        /// `KIND/NAME` (default kind: service).
        target: String,
        #[command(flatten)]
        change: Change,
    },
    /// Move a router backend's traffic to another target (blue/green).
    #[command(after_help = "Example:\n  drover swap edge site --to cluster/green --reason \"release 42\" --wait")]
    Swap {
        /// The router.
        router: String,
        backend: String,
        /// `cluster/NAME` or `service/NAME`.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        change: Change,
    },
    /// Run a one-shot job on its machines (the job's `run` action).
    #[command(after_help = "Example:\n  drover exec rotate-logs --reason \"disk at 90%\" --wait")]
    Exec {
        /// The job (`NAME` or `job/NAME`).
        job: String,
        #[command(flatten)]
        change: Change,
    },
    /// Ask a running transition to stop.
    #[command(after_help = "Example:\n  drover cancel 0190d5e4-… --reason \"wrong build\" --wait")]
    Cancel {
        run: String,
        #[command(flatten)]
        change: Change,
    },
    /// How long transitions take and how often they fail.
    #[command(
        after_help = "Examples:\n  drover stats\n  drover stats --group-by environment,action --since 2026-12-01T00:00:00Z"
    )]
    Stats {
        /// Comma separated: kind, action, environment, actor, provider.
        #[arg(long, default_value = "kind,action")]
        group_by: String,
        /// RFC 3339 (default: the last 7 days).
        #[arg(long)]
        since: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Compare resources in files with the installation: create / update /
    /// unchanged, with diffs, in dependency order. Exit 0: nothing would
    /// change; 2: something would.
    #[command(
        after_help = "Examples:\n  drover plan -f prod.yaml\n  drover plan -f envs.toml -f clusters.json\n\nA resource in a file is {kind, name, spec}, as the API has it; a file holds one, a list (TOML: [[resources]]) or, in YAML, several documents. A field the file leaves out keeps its value; null removes it."
    )]
    Plan {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// Make the installation match the files: the plan, a confirmation (or
    /// --yes), then each change in order; a failure stops the rest.
    #[command(after_help = "Example:\n  drover apply -f prod.yaml --reason \"release 42\" --yes")]
    Apply {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<std::path::PathBuf>,
        /// Don't ask.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Recorded with every change (protected contexts need one).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  drover completions bash > /etc/bash_completion.d/drover")]
    Completions { shell: clap_complete::Shell },
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
    /// How often each resource of a kind is refreshed (its drift checked)
    /// without being asked: `cluster=5m,service=5m,router=5m,image=1h` (the default); `off` for
    /// a kind refreshes it only on request. Kinds not named keep their
    /// default.
    #[arg(long, env = "DROVER_REFRESH_EVERY", value_parser = refresh_every)]
    refresh_every: Option<RefreshEvery>,
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
    /// The S3 bucket aws bakes pack their build into (an artifact per
    /// build, which services' instances unpack). Without it aws builds are
    /// AMIs only and cannot run as services.
    #[arg(long, env = "DROVER_AWS_ARTIFACT_BUCKET")]
    aws_artifact_bucket: Option<String>,
    /// How long a resource's view may be served from what this replica read
    /// for it: a change made through another replica shows within this
    /// (one made through this replica, at once). `0s`: every view reads the
    /// database.
    #[arg(long, env = "DROVER_VIEW_MAX_AGE", default_value = "1s", value_parser = humantime::parse_duration)]
    view_max_age: Duration,
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
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let g = &cli.global;
    let result: Result<ExitCode, CliError> = match cli.command {
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&drover_api::openapi()).unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(s) => {
            return match serve(*s).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("Error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "drover", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Context(c) => cli::context(c),
        Command::Get { kind, name, output } => {
            // `cluster web-qa` or `cluster/web-qa`.
            let (kind, name) = match (kind.split_once('/'), name) {
                (Some((k, n)), None) if !n.is_empty() => (k.to_string(), Some(n.to_string())),
                (_, name) => (kind, name),
            };
            cli::get(g, &kind, name.as_deref(), output).await
        }
        Command::Describe { kind, name } => match name {
            Some(name) => cli::describe(g, &kind, &name).await,
            None => match cli::split_target(&kind) {
                Ok((k, n)) => cli::describe(g, k, n).await,
                Err(e) => Err(e),
            },
        },
        Command::Runs(r) => cli::runs(g, &r).await,
        Command::Events { run, follow } => cli::events(g, &run, follow).await,
        Command::Do(d) => cli::do_action(g, &d).await,
        Command::Scale { target, count, change } => {
            cli::short_form(g, &target, None, "scale", &[format!("count={count}")], &change).await
        }
        Command::Deploy { target, image, build, change } => {
            let mut p = Vec::new();
            p.extend(image.map(|i| format!("image={i}")));
            p.extend(build.map(|b| format!("build={b}")));
            cli::short_form(g, &target, Some("service"), "deploy", &p, &change).await
        }
        Command::Rollback { target, change } => {
            cli::short_form(g, &target, Some("service"), "rollback", &[], &change).await
        }
        Command::Swap { router, backend, to, change } => match cli::split_target(&to) {
            Ok((kind, name)) => {
                let to = serde_json::json!({ kind: name }).to_string();
                let p = [format!("backend={backend}"), format!("to={to}")];
                cli::short_form(g, &format!("router/{router}"), None, "swap", &p, &change).await
            }
            Err(e) => Err(e),
        },
        Command::Exec { job, change } => cli::short_form(g, &job, Some("job"), "run", &[], &change).await,
        Command::Cancel { run, change } => cli::cancel(g, &run, &change).await,
        Command::Plan { files } => cli::plan::plan(g, &files).await,
        Command::Apply { files, yes, reason } => cli::plan::apply(g, &files, yes, reason.as_deref()).await,
        Command::Stats { group_by, since, output } => cli::stats(g, &group_by, since.as_deref(), output).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
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
        refresh_every: refresh_intervals(s.refresh_every.clone().map(|r| r.0).unwrap_or_default()),
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
            artifact_bucket: s.aws_artifact_bucket.clone(),
            ..drover_ops::aws::Settings::from_env()
        },
        view_max_age: s.view_max_age,
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

/// `--refresh-every`'s value.
#[derive(Debug, Clone)]
struct RefreshEvery(Vec<(drover_domain::kinds::Kind, Duration)>);

fn refresh_every(s: &str) -> Result<RefreshEvery, String> {
    drover_domain::engine::parse_refresh_every(s).map(RefreshEvery)
}

/// The default intervals, with those given in their place.
fn refresh_intervals(
    given: Vec<(drover_domain::kinds::Kind, Duration)>,
) -> Vec<(drover_domain::kinds::Kind, Duration)> {
    let mut out: Vec<_> = drover_domain::engine::default_refresh_every()
        .into_iter()
        .filter(|(k, _)| !given.iter().any(|(g, _)| g == k))
        .collect();
    out.extend(given);
    out
}
