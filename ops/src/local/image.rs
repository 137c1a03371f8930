//! Images on the local provider: a directory made by the build command.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use drover_domain::kinds::image::{self, Spec};
use drover_domain::model::{Level, NewEvent};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use serde_json::{json, Value};

use super::process::{tail, GroupGuard};

/// Written last into a finished build: its presence means "adopt me".
const MARKER: &str = ".drover-build.json";

pub struct LocalImages {
    root: PathBuf,
    /// The directories of the local clusters' and services' state, to see
    /// which builds instances run from.
    running: Vec<PathBuf>,
}

impl LocalImages {
    pub fn new(root: PathBuf, running: Vec<PathBuf>) -> LocalImages {
        LocalImages { root, running }
    }

    fn dir_of(&self, job: &Job) -> PathBuf {
        self.root.join(job.resource.id.to_string())
    }

    async fn build(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<Value, ProviderError> {
        let base = self.dir_of(job);
        let dir = base.join(job.run_id.to_string());
        let log = base.join(format!("{}.log", job.run_id));
        if let Ok(done) = std::fs::read(dir.join(MARKER)) {
            if let Ok(build) = serde_json::from_slice::<Value>(&done) {
                ctx.event(NewEvent::info("build", format!("adopting the finished build in {}", dir.display()))).await;
                return Ok(self.finish(ctx, job, &base, build).await);
            }
        }
        // A directory without the marker is a build that died half-way.
        if dir.exists() {
            ctx.event(NewEvent::info("build", "removing an unfinished build of an earlier attempt")).await;
            std::fs::remove_dir_all(&dir).map_err(io("remove unfinished build"))?;
        }
        std::fs::create_dir_all(&dir).map_err(io("create build directory"))?;
        let log_file = std::fs::File::create(&log).map_err(io("create build log"))?;
        let err_file = log_file.try_clone().map_err(io("open build log"))?;
        ctx.event(
            NewEvent::info("build", format!("running the build command in {}", dir.display()))
                .with_data(json!({ "command": spec.build_command, "log": log })),
        )
        .await;
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&spec.build_command)
            .current_dir(&dir)
            .env("DROVER_IMAGE_DIR", &dir)
            .env("DROVER_RUN_ID", job.run_id.to_string())
            .env("DROVER_ATTEMPT", job.attempt.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(err_file))
            .process_group(0)
            .spawn()
            .map_err(io("start the build command"))?;
        let mut guard = GroupGuard(child.id());
        let status = loop {
            tokio::select! {
                s = child.wait() => break s.map_err(io("wait for the build command"))?,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if ctx.cancel_requested() {
                        drop(guard);
                        let _ = child.wait().await;
                        ctx.event(NewEvent::info("build", "build command stopped on cancel").with_level(Level::Warn)).await;
                        return Err(ProviderError::Cancelled);
                    }
                }
            }
        };
        guard.0 = None;
        let output_tail = tail(&log, 20);
        if !status.success() {
            let code = status.code();
            let last = output_tail.last().cloned().unwrap_or_default();
            let message = match code {
                Some(c) => format!("build command exited with status {c}: {last}"),
                None => format!("build command was killed by a signal: {last}"),
            };
            let detail = json!({ "exit_code": code, "output_tail": output_tail, "log": log });
            ctx.event(NewEvent::info("build", message.clone()).with_level(Level::Error).with_data(detail.clone()))
                .await;
            return Err(ProviderError::fatal("build_failed", message).with_detail(detail));
        }
        // The build as it stays: what it runs (the start command is the
        // build's, not the spec's of the day) and where.
        let build = json!({
            "id": job.run_id,
            "path": dir,
            "log": log,
            "start_command": spec.start_command,
            "built_at": Utc::now(),
            "run_id": job.run_id,
        });
        std::fs::write(dir.join(MARKER), build.to_string()).map_err(io("mark the build finished"))?;
        ctx.event(NewEvent::info("build", "build finished").with_data(json!({ "output_tail": output_tail }))).await;
        Ok(self.finish(ctx, job, &base, build).await)
    }

    /// Makes `build` the current one and removes the builds nothing needs:
    /// a build stays while a live instance runs from it, and so does the
    /// build that was current until now (a scale that read it a moment ago
    /// may be starting instances from it).
    async fn finish(&self, ctx: &dyn RunContext, job: &Job, base: &Path, build: Value) -> Value {
        let current = job.run_id.to_string();
        let previous = image::current_build(&job.resource.outputs).map(str::to_string);
        match super::cluster::dirs_in_use(&self.running) {
            Some(in_use) => {
                let entries = std::fs::read_dir(base).into_iter().flatten().flatten();
                for e in entries.filter(|e| e.path().is_dir()) {
                    let name = e.file_name().to_string_lossy().to_string();
                    let path = e.path();
                    if name == current
                        || Some(&name) == previous.as_ref()
                        || in_use.iter().any(|d| d.starts_with(&path))
                    {
                        continue;
                    }
                    match std::fs::remove_dir_all(&path) {
                        Ok(()) => {
                            ctx.event(NewEvent::info("build", format!("removed build {name}: nothing runs from it")))
                                .await
                        }
                        Err(e) => {
                            let msg = format!("could not remove build {name}: {e}");
                            ctx.event(NewEvent::info("build", msg).with_level(Level::Warn)).await
                        }
                    }
                    let _ = std::fs::remove_file(base.join(format!("{name}.log")));
                }
            }
            None => {
                let msg = "kept every earlier build: an instance's state does not say which build it runs";
                ctx.event(NewEvent::info("build", msg).with_level(Level::Warn)).await;
            }
        }
        image::outputs_with_build(&job.resource.outputs, build, |id| base.join(id).join(MARKER).exists())
    }
}

pub(super) fn io(what: &'static str) -> impl Fn(std::io::Error) -> ProviderError {
    move |e| {
        let retryable = matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock);
        ProviderError::Failed { code: "io".into(), message: format!("could not {what}: {e}"), retryable, detail: None }
    }
}

#[async_trait]
impl Provider for LocalImages {
    fn refreshes(&self) -> bool {
        true
    }

    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let spec = Spec::from_value(&job.resource.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("stored spec is invalid: {e:?}")))?;
        match job.action.as_str() {
            "build" => self.build(ctx, job, &spec).await,
            "refresh" => Ok(refresh(ctx, &job.resource).await),
            "destroy" => {
                let dir = self.dir_of(job);
                // Never from under running instances, whichever build they run.
                match super::cluster::dirs_in_use(&self.running) {
                    Some(in_use) => {
                        if let Some(d) = in_use.iter().find(|d| d.starts_with(&dir)) {
                            return Err(ProviderError::fatal(
                                "in_use",
                                format!(
                                    "instances still run from {}: stop their cluster or service first",
                                    d.display()
                                ),
                            ));
                        }
                    }
                    None => {
                        return Err(ProviderError::retryable(
                            "instances_unknown",
                            "cannot tell which builds instances run from (an unreadable instance state)",
                        ))
                    }
                }
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => ctx.event(NewEvent::info("destroy", format!("removed {}", dir.display()))).await,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        ctx.event(NewEvent::info("destroy", "nothing to remove")).await
                    }
                    Err(e) => return Err(io("remove the image")(e)),
                }
                Ok(json!({}))
            }
            other => Err(ProviderError::fatal("unsupported_action", format!("local images cannot {other}"))),
        }
    }
}

/// Compares the current build on record with the disk: its directory is
/// there, and its finished-build marker names it. Changes nothing.
async fn refresh(ctx: &dyn RunContext, r: &drover_domain::model::Resource) -> Value {
    use drover_domain::drift::{Difference, Report};
    let mut report = Report::default();
    let current = image::current_build(&r.outputs).map(str::to_string);
    match (current, r.outputs.get("path").and_then(Value::as_str)) {
        (Some(id), Some(path)) => {
            let dir = Path::new(path);
            match std::fs::read(dir.join(MARKER)) {
                Ok(bytes) => {
                    let found =
                        serde_json::from_slice::<Value>(&bytes).ok().and_then(|m| m["id"].as_str().map(str::to_string));
                    match found {
                        Some(f) if f == id => report.same(),
                        other => report.differs(Difference::new(
                            format!("builds[{id}].marker"),
                            id.clone(),
                            other.unwrap_or_else(|| "unreadable".into()),
                        )),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.is_dir() => {
                    report.differs(Difference::new(format!("builds[{id}].directory"), path, "missing"))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    report.differs(Difference::new(format!("builds[{id}].marker"), "finished", "missing"))
                }
                Err(e) => report.cannot_check(format!("builds[{id}]"), format!("{}: {e}", dir.display())),
            }
        }
        _ => report.cannot_check("build", "no build on record"),
    }
    report.told(ctx).await
}
