//! Routers on the local provider: a real HAProxy per router, in
//! master-worker mode, its files under `{data}/routers/{router id}/`.
//!
//! A configuration is written next to the live one, checked with
//! `haproxy -c`, then renamed over it (atomic) and loaded by a reload of
//! the master (`SIGUSR2`): the master starts new workers on the new
//! configuration, handing them the listening sockets (`expose-fd
//! listeners`), and the old workers finish the connections they hold, so
//! a reload drops none. Server changes also go through a reload (not the
//! runtime API): one path, whose every configuration is the file on disk.
//! The master is a daemon: it outlives drover, and a restarted drover
//! finds it again through its pid file.
//!
//! The binary is `DROVER_HAPROXY`, else `haproxy` on `PATH` (or in
//! `/usr/sbin`, where Debian puts it).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use drover_domain::kinds::router::{self, Check, Mode};
use drover_domain::model::Resource;
use drover_domain::routing::{Balancer, BalancerError, BalancerStatus, Counters, Locks, RouteTable, ServerHealth};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::process::start_ticks;

const CONFIG: &str = "haproxy.cfg";
const CANDIDATE: &str = "haproxy.cfg.new";
const PIDFILE: &str = "haproxy.pid";
const MASTER_SOCKET: &str = "master.sock";
const ADMIN_SOCKET: &str = "admin.sock";
const LOG: &str = "haproxy.log";

/// How long a reload may take to show its new worker, and a stop to end.
const RELOAD_WAIT: Duration = Duration::from_secs(10);
const STOP_WAIT: Duration = Duration::from_secs(15);

/// The HAProxy balancer of the local provider.
pub struct LocalHaproxy {
    root: PathBuf,
    /// Reloads and stops of one router go one at a time.
    locks: Locks,
}

impl LocalHaproxy {
    pub fn new(root: PathBuf) -> LocalHaproxy {
        LocalHaproxy { root, locks: Default::default() }
    }

    fn dir(&self, router: &Resource) -> PathBuf {
        self.root.join(router.id.to_string())
    }
}

/// The HAProxy binary: `DROVER_HAPROXY`, else on `PATH` or in `/usr/sbin`.
pub fn haproxy_binary() -> Result<PathBuf, BalancerError> {
    if let Some(p) = std::env::var_os("DROVER_HAPROXY").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BalancerError::fatal(
                "haproxy_missing",
                "HAProxy is not installed: install Debian's haproxy package, or set DROVER_HAPROXY to its binary",
            )
        })
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> BalancerError {
    move |e| BalancerError::Failed { code: "io".into(), message: format!("could not {what}: {e}"), retryable: true }
}

/// HAProxy's messages, without the paths of drover's files and at most
/// the last lines.
fn tidy(out: &[u8], dir: &Path) -> String {
    let text = String::from_utf8_lossy(out).replace(&format!("{}/", dir.display()), "");
    let lines: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(without_pid).collect();
    let start = lines.len().saturating_sub(8);
    lines[start..].join("\n")
}

/// `[ALERT]    (11893) : config : …` → `[ALERT] config : …`: the checking
/// process's id differs on every check, and a refusal is recorded once for
/// as long as its reason stays the same.
fn without_pid(line: &str) -> String {
    let Some(rest) = line.strip_prefix('[') else { return line.to_string() };
    let Some((level, after)) = rest.split_once(']') else { return line.to_string() };
    let after = after.trim_start();
    let pid =
        after.strip_prefix('(').and_then(|a| a.split_once(')')).filter(|(p, _)| p.chars().all(|c| c.is_ascii_digit()));
    match pid {
        Some((_, tail)) => format!("[{level}] {}", tail.trim_start().trim_start_matches(':').trim_start()),
        None => line.to_string(),
    }
}

/// The tail of HAProxy's own log (its start-up messages).
fn log_tail(dir: &Path) -> String {
    tidy(&std::fs::read(dir.join(LOG)).unwrap_or_default(), dir)
}

/// Polls the master CLI's workers until `serving` says yes (true), or for
/// [`RELOAD_WAIT`] (false).
async fn until_workers(dir: &Path, every: Duration, serving: impl Fn(&[u32]) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + RELOAD_WAIT;
    loop {
        if workers(dir).await.is_ok_and(|w| serving(&w)) {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// The master's pid, when one runs for this directory.
pub(super) fn master(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join(PIDFILE)).ok()?.trim().parse().ok()?;
    start_ticks(pid)?;
    // A reused pid runs something else: the master's command line names our config.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let config = dir.join(CONFIG);
    let ours = cmdline.split(|b| *b == 0).any(|arg| Path::new(std::str::from_utf8(arg).unwrap_or("")) == config);
    ours.then_some(pid)
}

/// Sends one command to a socket of HAProxy's and reads the whole answer.
async fn ask(socket: &Path, command: &str) -> std::io::Result<String> {
    let talk = async {
        let mut s = UnixStream::connect(socket).await?;
        s.write_all(format!("{command}\n").as_bytes()).await?;
        // The master CLI answers and waits for more unless told there is none.
        s.shutdown().await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    };
    tokio::time::timeout(Duration::from_secs(5), talk)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 5s")))
}

/// The pids of the current workers, from the master CLI's `show proc`.
async fn workers(dir: &Path) -> std::io::Result<Vec<u32>> {
    let out = ask(&dir.join(MASTER_SOCKET), "show proc").await?;
    let mut current = Vec::new();
    let mut section = "";
    for line in out.lines() {
        if let Some(h) = line.strip_prefix('#') {
            section = if h.trim() == "workers" { "workers" } else { "other" };
            continue;
        }
        let mut fields = line.split_whitespace();
        if let (Some(pid), Some("worker"), "workers") = (fields.next(), fields.next(), section) {
            current.extend(pid.parse::<u32>().ok());
        }
    }
    Ok(current)
}

fn backend_id(name: &str) -> String {
    format!("b_{name}")
}

#[async_trait]
impl Balancer for LocalHaproxy {
    fn render(&self, router: &Resource, table: &RouteTable) -> String {
        let dir = self.dir(router);
        let spec = &table.spec;
        let modes = spec.backend_modes();
        let mut c = String::new();
        let _ = writeln!(c, "# HAProxy configuration of drover router {} ({}).", router.name, router.id);
        let _ = writeln!(c, "# Rendered by drover from its discovery registry: edits here are overwritten.");
        c.push_str("global\n");
        let _ = writeln!(
            c,
            "    stats socket {} mode 600 level admin expose-fd listeners",
            dir.join(ADMIN_SOCKET).display()
        );
        c.push_str("    stats timeout 30s\n");
        // Old workers left with long connections after a reload end within this.
        c.push_str("    hard-stop-after 30s\n");
        c.push_str("\ndefaults\n");
        c.push_str("    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n");
        c.push_str("    timeout http-request 10s\n    timeout queue 5s\n");
        // A server that refuses a connection (stopped between the registry's
        // change and the reload) costs a retry on another, not an error.
        c.push_str("    retries 3\n    option redispatch 1\n");
        c.push_str("    default-server inter 1s fall 2 rise 1\n");
        let host = match spec.address().contains(':') {
            true => format!("[{}]", spec.address()),
            false => spec.address().to_string(),
        };
        for f in &spec.frontends {
            let _ = writeln!(c, "\nfrontend f_{}", f.name);
            let _ = writeln!(c, "    mode {}", f.mode.as_str());
            let _ = writeln!(c, "    bind {host}:{}", f.port);
            if f.mode == Mode::Http {
                c.push_str("    option forwardfor\n");
                // During a reload, the old worker keeps an idle keep-alive
                // connection until its next request, answers it with
                // `Connection: close`: no client sends on a connection the
                // worker is closing.
                c.push_str("    option idle-close-on-response\n");
            }
            for (i, r) in f.rules.iter().enumerate() {
                let mut conds = Vec::new();
                if let Some(h) = &r.host {
                    let _ = writeln!(c, "    acl r{i}_host req.hdr(host),field(1,:) -i {}", h.to_ascii_lowercase());
                    conds.push(format!("r{i}_host"));
                }
                if let Some(p) = &r.path_prefix {
                    let base = p.trim_end_matches('/');
                    if base.is_empty() {
                        let _ = writeln!(c, "    acl r{i}_path path_beg /");
                    } else {
                        let _ = writeln!(c, "    acl r{i}_path path {base}");
                        let _ = writeln!(c, "    acl r{i}_path path_beg {base}/");
                    }
                    conds.push(format!("r{i}_path"));
                }
                let _ = writeln!(c, "    use_backend {} if {}", backend_id(&r.backend), conds.join(" "));
            }
            if let Some(b) = &f.backend {
                let _ = writeln!(c, "    default_backend {}", backend_id(b));
            }
        }
        for b in &spec.backends {
            let mode = modes.get(b.name.as_str()).copied().unwrap_or(Mode::Http);
            let _ = writeln!(c, "\nbackend {}", backend_id(&b.name));
            let _ = writeln!(c, "    mode {}", mode.as_str());
            c.push_str("    balance roundrobin\n");
            match spec.check_of(b) {
                Check::Http { path } => {
                    c.push_str("    option httpchk\n");
                    let _ = writeln!(c, "    http-check send meth GET uri {path}");
                    c.push_str("    http-check expect status 200-399\n");
                }
                Check::Tcp => {}
            }
            if mode == Mode::Http {
                c.push_str("    retry-on conn-failure empty-response response-timeout\n");
            }
            // A swap waits on the shadow's checks: they run ten times as often.
            let extra = if router::is_shadow(&b.name) { " inter 100ms" } else { "" };
            for s in table.servers.get(&b.name).into_iter().flatten() {
                let addr = match s.address.contains(':') {
                    true => format!("[{}]", s.address),
                    false => s.address.clone(),
                };
                let _ = writeln!(c, "    server {} {addr}:{} check{extra}", s.name, s.port);
            }
        }
        c
    }

    /// The configuration file HAProxy was last (re)loaded from.
    async fn serving(&self, router: &Resource) -> Result<Option<String>, BalancerError> {
        match std::fs::read_to_string(self.dir(router).join(CONFIG)) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(String::new())),
            Err(e) => Err(io("read the configuration in place")(e)),
        }
    }

    async fn apply(&self, router: &Resource, config: &str) -> Result<(), BalancerError> {
        let _one = self.locks.lock(router.id).await;
        let binary = haproxy_binary()?;
        let dir = self.dir(router);
        std::fs::create_dir_all(&dir).map_err(io("create the router's directory"))?;
        let candidate = dir.join(CANDIDATE);
        std::fs::write(&candidate, config).map_err(io("write the candidate configuration"))?;
        let checked = tokio::process::Command::new(&binary)
            .arg("-c")
            .arg("-f")
            .arg(&candidate)
            .output()
            .await
            .map_err(io("run haproxy -c"))?;
        if !checked.status.success() {
            let mut out = checked.stderr.clone();
            out.extend_from_slice(&checked.stdout);
            let text = String::from_utf8_lossy(&out);
            // HAProxy's alerts say what is wrong; its closing line only that something is.
            let alerts: Vec<&str> =
                text.lines().filter(|l| l.contains("ALERT") && !l.contains("Fatal errors found")).collect();
            let why = match alerts.is_empty() {
                true => tidy(&out, &dir),
                false => tidy(alerts.join("\n").as_bytes(), &dir),
            };
            let _ = std::fs::remove_file(&candidate);
            return Err(BalancerError::Invalid(format!("haproxy -c: {why}")));
        }
        let live = dir.join(CONFIG);
        match master(&dir) {
            Some(pid) => {
                let before = workers(&dir).await.unwrap_or_default();
                std::fs::rename(&candidate, &live).map_err(io("put the configuration in place"))?;
                kill(Pid::from_raw(pid as i32), Signal::SIGUSR2).map_err(|e| BalancerError::Failed {
                    code: "reload_failed".into(),
                    message: format!("could not signal HAProxy's master (pid {pid}): {e}"),
                    retryable: true,
                })?;
                // Loaded once a worker that was not there before serves.
                let loaded = |now: &[u32]| now.iter().any(|w| !before.contains(w));
                match until_workers(&dir, Duration::from_millis(10), loaded).await {
                    true => Ok(()),
                    false => Err(BalancerError::Failed {
                        code: "reload_failed".into(),
                        message: format!(
                            "HAProxy did not start a worker on the new configuration within {}s: {}",
                            RELOAD_WAIT.as_secs(),
                            log_tail(&dir)
                        ),
                        retryable: true,
                    }),
                }
            }
            None => {
                std::fs::rename(&candidate, &live).map_err(io("put the configuration in place"))?;
                let _ = std::fs::remove_file(dir.join(MASTER_SOCKET));
                let log = std::fs::File::create(dir.join(LOG)).map_err(io("open the HAProxy log"))?;
                let started = tokio::process::Command::new(&binary)
                    .arg("-W")
                    .arg("-D")
                    .arg("-f")
                    .arg(&live)
                    .arg("-p")
                    .arg(dir.join(PIDFILE))
                    .arg("-S")
                    .arg(format!("{},mode,600", dir.join(MASTER_SOCKET).display()))
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone().map_err(io("open the HAProxy log"))?)
                    .stderr(log)
                    .status()
                    .await
                    .map_err(io("start HAProxy"))?;
                if !started.success() {
                    return Err(BalancerError::fatal(
                        "start_failed",
                        format!("HAProxy did not start: {}", log_tail(&dir)),
                    ));
                }
                // Serving once its master answers with a worker.
                let serving = |w: &[u32]| !w.is_empty() && master(&dir).is_some();
                match until_workers(&dir, Duration::from_millis(20), serving).await {
                    true => Ok(()),
                    false => Err(BalancerError::fatal(
                        "start_failed",
                        format!(
                            "HAProxy started but did not serve within {}s: {}",
                            RELOAD_WAIT.as_secs(),
                            log_tail(&dir)
                        ),
                    )),
                }
            }
        }
    }

    async fn status(&self, router: &Resource) -> BalancerStatus {
        let dir = self.dir(router);
        if master(&dir).is_none() {
            let problem = match dir.join(LOG).exists() {
                true => {
                    Some(log_tail(&dir)).filter(|s| !s.is_empty()).or(Some("HAProxy's master is not running".into()))
                }
                false => Some("HAProxy was never started for this router".into()),
            };
            return BalancerStatus { running: false, problem, servers: Vec::new() };
        }
        let servers = match ask(&dir.join(ADMIN_SOCKET), "show stat").await {
            Ok(csv) => parse_stat(&csv),
            Err(e) => {
                return BalancerStatus {
                    running: true,
                    problem: Some(format!("its stats socket did not answer: {e}")),
                    servers: Vec::new(),
                }
            }
        };
        BalancerStatus { running: true, problem: None, servers }
    }

    async fn counters(&self, router: &Resource, backend: &str) -> Option<Counters> {
        let csv = ask(&self.dir(router).join(ADMIN_SOCKET), "show stat").await.ok()?;
        parse_counters(&csv, backend)
    }

    async fn stop(&self, router: &Resource) -> Result<(), BalancerError> {
        let _one = self.locks.lock(router.id).await;
        let dir = self.dir(router);
        let Some(pid) = master(&dir) else { return Ok(()) };
        let ticks = start_ticks(pid);
        let gone = || start_ticks(pid).is_none() || start_ticks(pid) != ticks;
        // SIGUSR1: a soft stop; the workers finish what they serve.
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGUSR1);
        let deadline = tokio::time::Instant::now() + STOP_WAIT;
        while !gone() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !gone() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !gone() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(dir.join(PIDFILE));
        Ok(())
    }

    async fn remove(&self, router: &Resource) -> Result<(), BalancerError> {
        self.stop(router).await?;
        match std::fs::remove_dir_all(self.dir(router)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove the router's directory")(e)),
        }
    }
}

/// The servers in a `show stat` CSV (proxies `b_*`, without their
/// FRONTEND and BACKEND rows).
fn parse_stat(csv: &str) -> Vec<ServerHealth> {
    let mut lines = csv.lines();
    let Some(header) = lines.next().and_then(|h| h.strip_prefix("# ")) else { return Vec::new() };
    let cols: Vec<&str> = header.split(',').collect();
    let at = |name: &str| cols.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(status), Some(check)) =
        (at("pxname"), at("svname"), at("status"), at("check_status"))
    else {
        return Vec::new();
    };
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let backend = f.get(px)?.strip_prefix("b_")?;
            let server = *f.get(sv)?;
            if server == "FRONTEND" || server == "BACKEND" {
                return None;
            }
            Some(ServerHealth {
                backend: backend.to_string(),
                server: server.to_string(),
                status: f.get(status)?.to_string(),
                check: f.get(check)?.trim_start_matches('*').to_string(),
            })
        })
        .collect()
}

/// A backend's counters from its BACKEND row in a `show stat` CSV: HTTP
/// requests and the 5xx answers and broken responses among them; for TCP,
/// sessions and the failed connections and responses.
fn parse_counters(csv: &str, backend: &str) -> Option<Counters> {
    let mut lines = csv.lines();
    let header = lines.next()?.strip_prefix("# ")?;
    let cols: Vec<&str> = header.split(',').collect();
    let px = backend_id(backend);
    let row: Vec<&str> = lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&px.as_str()) && f.get(1) == Some(&"BACKEND"))?;
    let n = |name: &str| -> Option<u64> {
        let i = cols.iter().position(|c| *c == name)?;
        row.get(i).and_then(|v| v.parse().ok())
    };
    Some(match n("req_tot") {
        Some(requests) => Counters { requests, failed: n("hrsp_5xx").unwrap_or(0) + n("eresp").unwrap_or(0) },
        None => Counters { requests: n("stot")?, failed: n("econ").unwrap_or(0) + n("eresp").unwrap_or(0) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reads_the_same_on_every_check() {
        let dir = Path::new("/var/lib/drover/routers/edge");
        let one = b"[NOTICE]   (11893) : haproxy version is 2.6.12\n[ALERT]    (11893) : config : [/var/lib/drover/routers/edge/haproxy.cfg.new:4] : 'server x/a' : could not resolve address 'h.invalid'.\n";
        let two = b"[NOTICE]   (11895) : haproxy version is 2.6.12\n[ALERT]    (11895) : config : [/var/lib/drover/routers/edge/haproxy.cfg.new:4] : 'server x/a' : could not resolve address 'h.invalid'.\n";
        assert_eq!(tidy(one, dir), tidy(two, dir));
        assert_eq!(
            tidy(one, dir).lines().last().unwrap(),
            "[ALERT] config : [haproxy.cfg.new:4] : 'server x/a' : could not resolve address 'h.invalid'."
        );
        assert_eq!(without_pid("   | a continuation"), "   | a continuation");
        assert_eq!(without_pid("[x] (abc) : y"), "[x] (abc) : y");
    }

    #[test]
    fn stats_name_each_servers_health() {
        let csv = "# pxname,svname,qcur,status,check_status\nf_web,FRONTEND,,OPEN,\nb_site,0-ab,0,UP,L7OK\n\
                   b_site,1-cd,0,DOWN,*L4CON\nb_site,BACKEND,0,UP,\n";
        let got = parse_stat(csv);
        assert_eq!(got.len(), 2);
        assert_eq!((got[1].server.as_str(), got[1].status.as_str(), got[1].check.as_str()), ("1-cd", "DOWN", "L4CON"));
    }

    #[test]
    fn counters_come_from_the_backend_row() {
        let csv = "# pxname,svname,stot,econ,eresp,hrsp_5xx,req_tot\nb_site,0-ab,9,0,0,1,\n\
                   b_site,BACKEND,10,1,2,3,40\nb_db,BACKEND,7,1,1,,\n";
        assert_eq!(parse_counters(csv, "site"), Some(Counters { requests: 40, failed: 5 }));
        assert_eq!(parse_counters(csv, "db"), Some(Counters { requests: 7, failed: 2 }));
        assert_eq!(parse_counters(csv, "nope"), None);
    }
}
