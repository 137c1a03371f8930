//! What tests observe of local service instances from outside drover
//! (feature `test-support`): a sampler of a service's instance processes,
//! independent of the drover that runs them (which a test may kill).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::process::{alive, check};

/// What a sampler saw: the most instance processes alive at once, and the
/// fewest answering their health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub samples: usize,
    pub most_alive: usize,
    pub fewest_healthy: usize,
}

/// Samples the instances a service's state file has on record, every
/// 20 ms, until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Bounds>,
}

impl Sampler {
    /// Starts sampling the service with id `service` under the data
    /// directory `data_dir`; an instance is healthy when `GET health_path`
    /// (or, without one, a TCP connection) succeeds.
    pub fn start(data_dir: &std::path::Path, service: &str, health_path: Option<&str>) -> Sampler {
        let file: PathBuf = data_dir.join("services").join(service).join("instances.json");
        let path = health_path.map(str::to_string);
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let task = tokio::spawn(async move {
            let mut b = Bounds { samples: 0, most_alive: 0, fewest_healthy: usize::MAX };
            while !done.load(Ordering::SeqCst) {
                let state = std::fs::read(&file).ok().and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
                if let Some(state) = state {
                    let instances = state["instances"].as_array().cloned().unwrap_or_default();
                    let live: Vec<&Value> = instances
                        .iter()
                        .filter(|i| {
                            let (pid, ticks) = (i["pid"].as_u64(), i["start_ticks"].as_u64());
                            pid.zip(ticks).is_some_and(|(p, t)| alive(p as u32, t))
                        })
                        .collect();
                    let mut healthy = 0;
                    for i in &live {
                        let port = i["port"].as_u64().unwrap_or_default() as u16;
                        healthy += check(port, path.as_deref()).await.is_none() as usize;
                    }
                    b.samples += 1;
                    b.most_alive = b.most_alive.max(live.len());
                    b.fewest_healthy = b.fewest_healthy.min(healthy);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            b
        });
        Sampler { stop, task }
    }

    pub async fn finish(self) -> Bounds {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the sampler does not panic")
    }
}

/// Kills (SIGKILL, the whole group) every cluster and service instance
/// process on record under a data directory, and every router's HAProxy:
/// what a test leaves running when it fails half way, or after it killed
/// the drover that ran them.
pub fn kill_everything_under(data_dir: &std::path::Path) {
    for d in std::fs::read_dir(data_dir.join("routers")).into_iter().flatten().flatten() {
        if let Some(pid) = super::router::master(&d.path()) {
            // The master's session holds its workers: -D makes it a group leader.
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
    for kind in ["clusters", "services"] {
        for d in std::fs::read_dir(data_dir.join(kind)).into_iter().flatten().flatten() {
            let Ok(bytes) = std::fs::read(d.path().join("instances.json")) else { continue };
            let Ok(state) = serde_json::from_slice::<Value>(&bytes) else { continue };
            for i in state["instances"].as_array().into_iter().flatten() {
                if let (Some(pid), Some(ticks)) = (i["pid"].as_u64(), i["start_ticks"].as_u64()) {
                    if alive(pid as u32, ticks) {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }
}
