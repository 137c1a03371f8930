//! Jobs on the local provider: a command run once on each target machine
//! of a local cluster.
//!
//! Each target runs in its own directory under its machine's
//! (`clusters/<cluster>/machines/<m>/jobs/<job>/<run>/`, the command's
//! working directory `work/` holding a copy of the image's build when the
//! job names one), as a process group recorded in a [`PROCESS`] file (so a
//! machine that stops takes it with it). A wrapper shell writes the
//! command's exit code, stdout and stderr beside it, so that the same run
//! tried again after drover died adopts a target still running (waits for
//! it) or finished (reads its result) instead of running it twice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drover_domain::kinds::cluster;
use drover_domain::kinds::image;
use drover_domain::kinds::job::{masked, Spec, Target, OUTPUT_TAIL as TAIL};
use drover_domain::kinds::service::matches;
use drover_domain::model::{Level, NewEvent, Resource};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use futures::StreamExt;
use serde_json::{json, Value};

use super::cluster::{machine_dir, machines, Machine, PROCESS};
use super::image::io;
use super::process::{alive, spawn_once, stop_group, tail};

/// The wrapper each target runs: the command, its output and exit code
/// kept beside its working directory.
const WRAPPER: &str = r#"sh -c "$DROVER_JOB_COMMAND" > ../stdout 2> ../stderr; echo $? > ../exit_code"#;

pub struct LocalJobs {
    clusters: PathBuf,
}

/// One target's end.
struct Outcome {
    result: Value,
    cancelled: bool,
}

impl LocalJobs {
    pub fn new(clusters: PathBuf) -> LocalJobs {
        LocalJobs { clusters }
    }

    async fn run(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<Value, ProviderError> {
        let c = job.dependency(cluster::KIND)?;
        let cluster_spec = cluster::Spec::from_value(&c.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("cluster {}: {e:?}", c.name)))?;
        let metadata = cluster_spec.machine_metadata(&c.name);
        // The cluster's machines and its worker groups', those whose role
        // metadata matches.
        let all = machines(&self.clusters, c.id, &c.name, &metadata)?;
        let mut targets: Vec<Machine> =
            all.iter().filter(|m| matches(spec.constraints.as_deref(), &m.metadata)).cloned().collect();
        if spec.target == Target::Once {
            targets.truncate(1);
        }
        if targets.is_empty() {
            return Err(ProviderError::fatal(
                "no_target",
                format!("no running machine of cluster {} (or its worker groups) matches the job", c.name),
            ));
        }
        let build = match job.dependencies.iter().find(|d| d.kind == image::KIND) {
            Some(i) => Some(i.outputs["path"].as_str().map(PathBuf::from).ok_or_else(|| {
                ProviderError::fatal("image_not_built", format!("image {} has no build output", i.name))
            })?),
            None => None,
        };
        let names: Vec<String> = targets.iter().map(Machine::name).collect();
        let msg = format!(
            "running on {} machine(s), {} at a time, up to {} failure(s): {}",
            targets.len(),
            spec.max_concurrency,
            spec.max_errors,
            names.join(", ")
        );
        ctx.event(NewEvent::info("plan", msg).with_data(json!({ "targets": names }))).await;

        let failures = AtomicUsize::new(0);
        // Futures run lazily: at most max_concurrency targets at a time, and
        // each looks at the failures so far before it starts.
        let mut pending = Vec::with_capacity(targets.len());
        for m in &targets {
            pending.push(self.target(ctx, job, spec, c, m, build.as_deref(), &failures));
        }
        let outcomes: Vec<Outcome> =
            futures::stream::iter(pending).buffered(spec.max_concurrency.max(1) as usize).collect().await;
        let results: Vec<Value> = outcomes.iter().map(|o| o.result.clone()).collect();
        if outcomes.iter().any(|o| o.cancelled) {
            return Err(ProviderError::Cancelled);
        }
        drover_domain::kinds::job::conclude(results, spec.max_errors)
    }

    /// Runs (or adopts) the job on one machine and reports its end.
    #[allow(clippy::too_many_arguments)]
    async fn target(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        spec: &Spec,
        c: &Resource,
        m: &Machine,
        build: Option<&Path>,
        failures: &AtomicUsize,
    ) -> Outcome {
        let name = m.name();
        let dir = machine_dir(&self.clusters, m.cluster, m.index)
            .join("jobs")
            .join(job.resource.id.to_string())
            .join(job.run_id.to_string());
        let base = json!({ "machine": m.index, "machine_name": name });
        let end = |status: &str, extra: Value| {
            let mut r = base.clone();
            r["status"] = json!(status);
            if let (Some(r), Some(extra)) = (r.as_object_mut(), extra.as_object()) {
                r.extend(extra.clone());
            }
            r
        };
        // Finished in an earlier attempt of this run: its result stands.
        if let Ok(bytes) = std::fs::read(dir.join("result.json")) {
            if let Ok(result) = serde_json::from_slice::<Value>(&bytes) {
                let failed = result["status"] != "succeeded";
                if failed {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                ctx.event(NewEvent::info("target", format!("{name}: result of an earlier attempt adopted"))).await;
                return Outcome { result, cancelled: false };
            }
        }
        if failures.load(Ordering::SeqCst) > spec.max_errors as usize {
            let result = end("skipped", json!({ "reason": "more than max_errors targets failed" }));
            ctx.event(
                NewEvent::info("target", format!("{name}: skipped, too many failures")).with_data(result.clone()),
            )
            .await;
            return Outcome { result, cancelled: false };
        }
        if ctx.cancel_requested() {
            return Outcome { result: end("cancelled", json!({})), cancelled: true };
        }
        let started = Instant::now();
        let process = match self.start_or_adopt(ctx, job, spec, c, m, &dir, build).await {
            Ok(p) => p,
            Err(e) => {
                failures.fetch_add(1, Ordering::SeqCst);
                let result = end("failed", json!({ "error": e.to_string() }));
                ctx.event(NewEvent::info("target", format!("{name}: could not start: {e}")).with_level(Level::Error))
                    .await;
                return Outcome { result, cancelled: false };
            }
        };
        let (pid, ticks) = process;
        let limit = Duration::from_secs(spec.timeout_secs);
        let mut status = "exited";
        while alive(pid, ticks) {
            if ctx.cancel_requested() {
                stop_group(pid, ticks, Duration::from_secs(5)).await;
                status = "cancelled";
                break;
            }
            if started.elapsed() >= limit {
                stop_group(pid, ticks, Duration::from_secs(5)).await;
                status = "timed_out";
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let exit_code: Option<i64> =
            std::fs::read_to_string(dir.join("exit_code")).ok().and_then(|s| s.trim().parse().ok());
        let mask =
            |lines: Vec<String>| -> Vec<String> { lines.into_iter().map(|l| masked(&l, &job.secrets)).collect() };
        let stdout = mask(tail(&dir.join("stdout"), TAIL));
        let stderr = mask(tail(&dir.join("stderr"), TAIL));
        let status = match (status, exit_code) {
            ("exited", Some(0)) => "succeeded",
            ("exited", _) => "failed",
            (other, _) => other,
        };
        let result = end(
            status,
            json!({ "exit_code": exit_code, "duration_ms": started.elapsed().as_millis() as u64,
                "stdout_tail": stdout, "stderr_tail": stderr }),
        );
        let cancelled = status == "cancelled";
        let failed = !cancelled && status != "succeeded";
        if failed {
            failures.fetch_add(1, Ordering::SeqCst);
        }
        if !cancelled {
            let _ = std::fs::write(dir.join("result.json"), result.to_string());
        }
        let level = if failed { Level::Warn } else { Level::Info };
        let code = exit_code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        let msg = format!("{name}: {status} (exit code {code}) in {:.1}s", started.elapsed().as_secs_f64());
        ctx.event(NewEvent::info("target", msg).with_level(level).with_data(result.clone())).await;
        Outcome { result, cancelled }
    }

    /// The target's process: the one an earlier attempt of this run started
    /// and that still runs, or a new one.
    #[allow(clippy::too_many_arguments)]
    async fn start_or_adopt(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        spec: &Spec,
        c: &Resource,
        m: &Machine,
        dir: &Path,
        build: Option<&Path>,
    ) -> Result<(u32, u64), ProviderError> {
        if let Ok(bytes) = std::fs::read(dir.join(PROCESS)) {
            if let Ok(p) = serde_json::from_slice::<Value>(&bytes) {
                let (pid, ticks) = (p["pid"].as_u64().unwrap_or(0) as u32, p["start_ticks"].as_u64().unwrap_or(0));
                if alive(pid, ticks) || dir.join("exit_code").exists() {
                    let msg =
                        format!("{}-{}: adopting the process an earlier attempt started (pid {pid})", c.name, m.index);
                    ctx.event(NewEvent::info("target", msg)).await;
                    return Ok((pid, ticks));
                }
            }
        }
        let _ = std::fs::remove_dir_all(dir);
        let work = dir.join("work");
        std::fs::create_dir_all(&work).map_err(io("create the job's directory"))?;
        if let Some(b) = build {
            super::service::copy_dir(b, &work).map_err(io("copy the build into the job's directory"))?;
        }
        let mut env: Vec<(String, String)> = job.settings.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend([
            ("DROVER_JOB".to_string(), job.resource.name.clone()),
            ("DROVER_RUN_ID".to_string(), job.run_id.to_string()),
            ("DROVER_MACHINE".to_string(), m.name()),
            ("DROVER_ROLE_METADATA".to_string(), m.metadata.clone()),
            ("DROVER_CLUSTER".to_string(), c.name.clone()),
            ("DROVER_JOB_COMMAND".to_string(), spec.command.clone()),
        ]);
        let (pid, ticks) = spawn_once(&work, WRAPPER, &env, &dir.join("wrapper.log"))?;
        let record = json!({ "pid": pid, "start_ticks": ticks, "job": job.resource.name, "run": job.run_id });
        std::fs::write(dir.join(PROCESS), record.to_string()).map_err(io("record the job's process"))?;
        let msg = format!("{}: started (pid {pid})", m.name());
        ctx.event(NewEvent::info("target", msg)).await;
        Ok((pid, ticks))
    }

    /// Removes what the job's runs left on every machine of every cluster.
    fn remove(&self, job: &Resource) {
        let clusters = std::fs::read_dir(&self.clusters).into_iter().flatten().flatten();
        for c in clusters {
            for m in std::fs::read_dir(c.path().join("machines")).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir_all(m.path().join("jobs").join(job.id.to_string()));
            }
        }
    }
}

#[async_trait]
impl Provider for LocalJobs {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let spec = Spec::from_value(&job.resource.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("stored spec is invalid: {e:?}")))?;
        match job.action.as_str() {
            "run" => self.run(ctx, job, &spec).await,
            "destroy" => {
                self.remove(&job.resource);
                ctx.event(NewEvent::info("destroy", "the job's files were removed from the machines")).await;
                Ok(json!({}))
            }
            other => Err(ProviderError::fatal("unsupported_action", format!("local jobs cannot {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_are_masked() {
        let secrets = vec!["hunter2".to_string(), String::new()];
        assert_eq!(super::masked("password=hunter2 again hunter2", &secrets), "password=*** again ***");
        assert_eq!(super::masked("nothing here", &secrets), "nothing here");
    }
}
