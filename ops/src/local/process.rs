//! Processes: start in their own group, tell alive from gone, stop a group,
//! health-check a port, and keep the tail of an output.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use drover_domain::drift::{Difference, Report};
use drover_domain::ports::{ProviderError, RunContext};

use super::image::io;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The kernel's start time of a process (clock ticks since boot), which
/// together with the pid names one process, even after pid reuse.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let (state, ticks) = stat(pid)?;
    (state != "Z").then_some(ticks) // a zombie has exited, not yet reaped
}

/// The start time of a process even when it has exited and is not yet reaped.
fn start_ticks_of_any(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, ticks)| ticks)
}

/// A process's state letter and start time, from `/proc/{pid}/stat`.
fn stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.first()?.to_string(), fields.get(19)?.parse().ok()?))
}

pub fn alive(pid: u32, ticks: u64) -> bool {
    start_ticks(pid) == Some(ticks)
}

/// Stops a process group: SIGTERM, then SIGKILL after `grace`.
pub async fn stop_group(pid: u32, ticks: u64, grace: Duration) {
    if !alive(pid, ticks) {
        return;
    }
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if !alive(pid, ticks) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    while alive(pid, ticks) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills a process group when dropped, unless disarmed: a build abandoned
/// by a timeout or a lost lease must not go on running.
pub struct GroupGuard(pub Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// A port for an instance to listen on: free now, and below the kernel's
/// ephemeral range, so that no outgoing connection (a health check's, a
/// client's) can take it between this check and the instance's own bind
/// (a port the kernel hands out for `bind(0)` is in that range, and it did
/// happen). Ports are handed out in turn within this process, from an offset
/// that differs between processes, so two instances started at once never
/// get the same one.
pub fn free_port() -> std::io::Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = ephemeral_start().clamp(LOW + 1_000, 65_536);
    let span = high - LOW;
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span.min(2_000) {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (LOW + (offset + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The first port of the kernel's ephemeral range (32768 by default).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

/// Checks the instance on `port`: a GET of `http_path` answered 2xx/3xx,
/// or without a path, a TCP connection taken.
pub async fn probe(port: u16, http_path: Option<&str>) -> Checked {
    probe_at("127.0.0.1", port, http_path).await
}

/// [`probe`] of `host:port` (an aws machine's private address).
pub async fn probe_at(host: &str, port: u16, http_path: Option<&str>) -> Checked {
    let attempt = async {
        let mut s = TcpStream::connect((host, port)).await.map_err(|e| format!("connect: {e}"))?;
        let Some(path) = http_path else { return Ok(()) };
        let req = format!("GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: drover-health\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            match s.read(&mut buf[n..]).await.map_err(|e| format!("read: {e}"))? {
                0 => break,
                m => n += m,
            }
        }
        let head = String::from_utf8_lossy(&buf[..n]);
        let code: u16 =
            head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(format!("not HTTP: {head:?}"))?;
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("GET {path} answered {code}"))
        }
    };
    match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
        Ok(Ok(())) => Checked::Healthy,
        Ok(Err(e)) => Checked::Failing(e),
        Err(_) => Checked::NoAnswer,
    }
}

/// How long a health check waits for an answer.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What a health check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    Healthy,
    /// It answered, or refused, and that was not healthy: why.
    Failing(String),
    /// No answer within [`CHECK_TIMEOUT`]: neither healthy nor known not to be.
    NoAnswer,
}

/// [`probe`]'s finding as a reason it is not healthy, if it is not.
pub async fn check(port: u16, http_path: Option<&str>) -> Option<String> {
    check_at("127.0.0.1", port, http_path).await
}

/// [`check`] of `host:port` (an aws machine's private address).
pub async fn check_at(host: &str, port: u16, http_path: Option<&str>) -> Option<String> {
    match probe_at(host, port, http_path).await {
        Checked::Healthy => None,
        Checked::Failing(why) => Some(why),
        Checked::NoAnswer => Some(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())),
    }
}

/// What the observer says of an instance whose process is not there.
pub const GONE: &str = "process is gone";

/// Why the process `pid` (started at `ticks`) is not healthy, if it is
/// not: gone, or failing its check on `port`. A check that fails because
/// the process died meanwhile (a kill -9 between the two looks) says it is
/// gone, not what the dying process answered.
pub async fn check_running(pid: u32, ticks: u64, port: u16, http_path: Option<&str>) -> Option<String> {
    if !alive(pid, ticks) {
        return Some(GONE.into());
    }
    let why = check(port, http_path).await?;
    Some(if alive(pid, ticks) { why } else { GONE.into() })
}

/// Marks what the observer saw with what a repair would fix: the
/// instances whose process is gone, if any.
pub fn mark_needs_repair(seen: &mut serde_json::Value, gone: &[String]) {
    if !gone.is_empty() {
        seen["needs_repair"] = json!(format!("process gone: {}", gone.join(", ")));
    }
}

/// A refresh's look at a live process: that it runs in `dir` (reported as
/// `{at}.{dir_path}`; `None`: not on record, so not checked) and answers
/// its health check (`{at}.health`: an answer that is not healthy is a
/// difference, no answer in time is not checked). Whether it answered.
pub async fn look_at(
    report: &mut Report,
    at: &str,
    pid: u32,
    dir: Option<&Path>,
    dir_path: &str,
    port: u16,
    http_path: Option<&str>,
) -> bool {
    match (dir, std::fs::read_link(format!("/proc/{pid}/cwd"))) {
        (Some(dir), Ok(cwd)) if cwd == dir => report.same(),
        (Some(dir), Ok(cwd)) => report.differs(Difference::new(
            format!("{at}.{dir_path}"),
            dir.display().to_string(),
            cwd.display().to_string(),
        )),
        (Some(_), Err(e)) => {
            report.cannot_check(format!("{at}.{dir_path}"), format!("its directory cannot be read: {e}"))
        }
        (None, _) => report.cannot_check(format!("{at}.{dir_path}"), "it started before drover recorded builds"),
    }
    match probe(port, http_path).await {
        Checked::Healthy => {
            report.same();
            true
        }
        Checked::Failing(why) => {
            report.differs(Difference::new(format!("{at}.health"), "answering", why));
            false
        }
        Checked::NoAnswer => {
            report.cannot_check(format!("{at}.health"), format!("no answer within {}s", CHECK_TIMEOUT.as_secs()));
            false
        }
    }
}

/// The last `n` lines of a file, for error reports.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let mut lines: VecDeque<String> = VecDeque::with_capacity(n);
    for line in text.lines() {
        if lines.len() == n {
            lines.pop_front();
        }
        lines.push_back(line.chars().take(500).collect());
    }
    lines.into()
}

/// A started process to health-check.
pub struct Probe<'a> {
    /// What to call it in messages: `instance 2`.
    pub what: String,
    pub pid: u32,
    pub start_ticks: u64,
    pub port: u16,
    pub log: &'a Path,
}

/// Waits until the process answers its health check on its port (`GET
/// path`, or a TCP connection without one), failing fatally when it exits
/// first or is not healthy within `limit`, with the tail of its log.
pub async fn wait_healthy(
    ctx: &dyn RunContext,
    p: &Probe<'_>,
    path: Option<&str>,
    limit: Duration,
) -> Result<(), ProviderError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        ctx.check_cancel()?;
        if !alive(p.pid, p.start_ticks) {
            let output = tail(p.log, 20);
            let last = output.last().cloned().unwrap_or_default();
            return Err(ProviderError::fatal(
                "instance_exited",
                format!("{} (pid {}) exited before it was healthy: {last}", p.what, p.pid),
            )
            .with_detail(json!({ "output_tail": output, "log": p.log })));
        }
        let why = match check(p.port, path).await {
            None => return Ok(()),
            Some(why) => why,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(ProviderError::fatal(
                "unhealthy",
                format!("{} on port {} not healthy after {}s: {why}", p.what, p.port, limit.as_secs()),
            )
            .with_detail(json!({ "output_tail": tail(p.log, 20), "log": p.log })));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `sh -c command` in `dir` (`what` names it in errors) as the leader of a new process group,
/// with `env` added to drover's environment and its output appended to
/// `log`; returns its pid and kernel start time. The child is not waited
/// on: it outlives the run that started it (tokio reaps it if it exits
/// while drover runs).
pub fn spawn_group(
    dir: &Path,
    command: &str,
    env: &[(String, String)],
    log: &Path,
    what: &str,
) -> Result<(u32, u64), ProviderError> {
    let child = spawn(dir, command, env, log)?;
    // One that exits before its start time is read is named, with its output.
    let exited = || {
        let output = tail(log, 20);
        let last = output.last().cloned().unwrap_or_default();
        ProviderError::fatal("instance_exited", format!("{what} exited at once: {last}"))
            .with_detail(json!({ "output_tail": output, "log": log }))
    };
    let pid = child.id().ok_or_else(exited)?;
    let ticks = start_ticks(pid).ok_or_else(exited)?;
    Ok((pid, ticks))
}

/// Starts a one-shot command in its own process group. Unlike a service's
/// process, one that is over at once is no error: its pid and start time
/// are read even from the exited (not yet reaped) process, and a start time
/// of 0 (never alive) stands for one already reaped.
pub fn spawn_once(
    dir: &Path,
    command: &str,
    env: &[(String, String)],
    log: &Path,
) -> Result<(u32, u64), ProviderError> {
    let child = spawn(dir, command, env, log)?;
    let Some(pid) = child.id() else { return Ok((0, 0)) };
    Ok((pid, start_ticks_of_any(pid).unwrap_or(0)))
}

fn spawn(
    dir: &Path,
    command: &str,
    env: &[(String, String)],
    log: &Path,
) -> Result<tokio::process::Child, ProviderError> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(io("open the instance log"))?;
    let err = out.try_clone().map_err(io("open the instance log"))?;
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(out))
        .stderr(std::process::Stdio::from(err))
        .process_group(0)
        .spawn()
        .map_err(io("start an instance"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot command may be over before its start time is read (a
    /// fresh-clone CI run saw `echo ok` do so); that is its result, not an
    /// error. Many tries make the race likely; none may fail.
    #[tokio::test]
    async fn a_one_shot_command_over_at_once_is_no_error() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..200 {
            let log = dir.path().join(format!("{i}.log"));
            let (pid, ticks) = spawn_once(dir.path(), "exit 0", &[], &log).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while alive(pid, ticks) {
                assert!(std::time::Instant::now() < deadline, "try {i}: pid {pid} still runs");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}
