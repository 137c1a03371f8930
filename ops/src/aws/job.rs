//! Jobs on the `aws` provider: the command sent to the cluster's running
//! EC2 instances through SSM Run Command (`AWS-RunShellScript`), each
//! instance's result read back with `GetCommandInvocation`.
//!
//! - **Bounds.** SSM takes at most 50 instance ids per `SendCommand`, so
//!   the targets go in chunks of up to 50, one after another; within a
//!   chunk SSM itself keeps `MaxConcurrency` and `MaxErrors` (the job's),
//!   and a chunk is sent only while the failures so far are within
//!   `max_errors` (else its targets are `skipped`). The command's
//!   `executionTimeout` is the job's `timeout_secs`: SSM stops a target past
//!   it (`timed_out`).
//! - **Twice.** Each command's comment names the run (`drover run <id>`);
//!   an attempt of the same run after drover died finds the commands the
//!   earlier one sent (`ListCommands`) and waits for them instead of
//!   sending them again.
//! - **Settings.** The non-secret settings and the spec's `env` are
//!   exported by the script. Secret settings are *not* sent: a command's
//!   parameters stay readable in SSM's history; the instances have them
//!   from Parameter Store since boot (`/etc/drover/secrets.env`, see
//!   `template.rs`), and the run says which it left out.
//! - **Cancel** sends `CancelCommand` for the commands under way.
//!
//! What moto cannot show (the tests run against it): moto runs nothing. Its
//! invocations are `Success` at once with empty output and a fixed elapsed
//! time, it has no `ListCommandInvocations` or `CancelCommand`, and it
//! ignores `MaxConcurrency`, `MaxErrors` and `executionTimeout`. The tests
//! check what drover sends (document, instances, parameters, bounds, no
//! secret), that it reads each target's result, and adoption by comment;
//! failed and timed-out targets are mapped from SSM's documented statuses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drover_domain::kinds::cluster;
use drover_domain::kinds::job::{conclude, masked, Spec, Target, OUTPUT_TAIL};
use drover_domain::kinds::service::matches;
use drover_domain::model::{Level, NewEvent};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use serde_json::{json, Value};

use super::stacks::{InstanceInfo, StackApi};
use super::{AwsError, Backoff, Clients, TAG_RESOURCE};

/// SSM's limit of instance ids per `SendCommand`.
const CHUNK: usize = 50;
const DOCUMENT: &str = "AWS-RunShellScript";

pub struct AwsJobs {
    clients: Arc<Clients>,
    stacks: Arc<dyn StackApi>,
    poll: Backoff,
}

/// One command of a run: the instances it went to.
struct Sent {
    command_id: String,
    instances: Vec<String>,
}

impl AwsJobs {
    pub fn new(clients: Arc<Clients>, stacks: Arc<dyn StackApi>, poll: Backoff) -> AwsJobs {
        AwsJobs { clients, stacks, poll }
    }

    fn comment(job: &Job) -> String {
        format!("drover run {}", job.run_id)
    }

    async fn run(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<Value, ProviderError> {
        let c = job
            .dependencies
            .iter()
            .find(|d| d.kind == cluster::KIND)
            .ok_or_else(|| ProviderError::fatal("dependency_missing", "the job's cluster was not resolved"))?;
        let cluster_spec = cluster::Spec::from_value(&c.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("cluster {}: {e:?}", c.name)))?;
        let metadata = cluster_spec.machine_metadata(&c.name);
        let instances: Vec<InstanceInfo> = self
            .stacks
            .instances(TAG_RESOURCE, &c.id.to_string())
            .await
            .map_err(AwsError::into_provider)?
            .into_iter()
            .filter(|i| i.state == "running")
            .collect();
        let mut targets: Vec<(usize, String)> = match matches(spec.constraints.as_deref(), &metadata) {
            true => instances.iter().map(|i| i.id.clone()).enumerate().collect(),
            false => Vec::new(),
        };
        if spec.target == Target::Once {
            targets.truncate(1);
        }
        if targets.is_empty() {
            return Err(ProviderError::fatal(
                "no_target",
                format!("no running instance of cluster {} matches the job ({metadata})", c.name),
            ));
        }
        let ids: Vec<&str> = targets.iter().map(|(_, id)| id.as_str()).collect();
        let msg = format!(
            "running on {} instance(s) through SSM Run Command, {} at a time, up to {} failure(s): {}",
            ids.len(),
            spec.max_concurrency,
            spec.max_errors,
            ids.join(", ")
        );
        ctx.event(NewEvent::info("plan", msg).with_data(json!({ "targets": ids }))).await;
        let (_, left_out) = job.split_settings();
        if !left_out.is_empty() {
            let names: Vec<&str> = left_out.keys().map(String::as_str).collect();
            let msg =
                format!("secret settings not sent (a command's parameters stay readable in SSM): {}", names.join(", "));
            ctx.event(NewEvent::info("settings", msg).with_level(Level::Warn)).await;
        }

        let mut earlier = self.sent_before(job).await?;
        let mut results: Vec<Value> = Vec::with_capacity(targets.len());
        let mut failures = 0usize;
        for chunk in targets.chunks(CHUNK) {
            if failures > spec.max_errors as usize {
                for (index, id) in chunk {
                    results.push(json!({ "machine": index, "machine_name": id, "instance_id": id,
                        "status": "skipped", "reason": "more than max_errors targets failed" }));
                }
                continue;
            }
            ctx.check_cancel()?;
            let chunk_ids: Vec<String> = chunk.iter().map(|(_, id)| id.clone()).collect();
            let sent = match earlier.iter().position(|s| s.instances.iter().any(|i| chunk_ids.contains(i))) {
                Some(n) => {
                    let s = earlier.remove(n);
                    let msg = format!("adopting command {} an earlier attempt sent", s.command_id);
                    ctx.event(NewEvent::info("command", msg)).await;
                    s
                }
                None => self.send(ctx, job, spec, c.name.as_str(), &chunk_ids).await?,
            };
            for r in self.wait(ctx, job, spec, &sent, chunk).await? {
                if r["status"] != "succeeded" {
                    failures += 1;
                }
                results.push(r);
            }
        }
        conclude(results, spec.max_errors)
    }

    /// The commands an earlier attempt of this run sent, by their comment.
    async fn sent_before(&self, job: &Job) -> Result<Vec<Sent>, ProviderError> {
        let ssm = self.clients.ssm().await;
        let comment = Self::comment(job);
        let mut found = Vec::new();
        let mut pages = ssm.list_commands().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| AwsError::from_sdk("ListCommands", &e).into_provider())?;
            for c in page.commands() {
                if c.comment() == Some(comment.as_str()) {
                    found.push(Sent {
                        command_id: c.command_id().unwrap_or_default().to_string(),
                        instances: c.instance_ids().to_vec(),
                    });
                }
            }
        }
        Ok(found)
    }

    async fn send(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        spec: &Spec,
        cluster: &str,
        instances: &[String],
    ) -> Result<Sent, ProviderError> {
        let ssm = self.clients.ssm().await;
        let out = ssm
            .send_command()
            .document_name(DOCUMENT)
            .comment(Self::comment(job))
            .set_instance_ids(Some(instances.to_vec()))
            .max_concurrency(spec.max_concurrency.to_string())
            .max_errors(spec.max_errors.to_string())
            .parameters("commands", vec![script(job, spec, cluster)])
            .parameters("executionTimeout", vec![spec.timeout_secs.to_string()])
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("SendCommand", &e).into_provider())?;
        let id = out.command().and_then(|c| c.command_id()).unwrap_or_default().to_string();
        let msg = format!("sent command {id} to {} instance(s)", instances.len());
        ctx.event(NewEvent::info("command", msg).with_data(json!({ "command_id": id, "instances": instances }))).await;
        Ok(Sent { command_id: id, instances: instances.to_vec() })
    }

    /// Waits until every target of a command has ended; their results.
    async fn wait(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        spec: &Spec,
        sent: &Sent,
        chunk: &[(usize, String)],
    ) -> Result<Vec<Value>, ProviderError> {
        let ssm = self.clients.ssm().await;
        let started = Instant::now();
        // SSM ends a target at executionTimeout; past that and a margin,
        // drover stops waiting on one that never reports.
        let limit = Duration::from_secs(spec.timeout_secs) + Duration::from_secs(120);
        let mut results: Vec<Option<Value>> = vec![None; chunk.len()];
        let mut delays = self.poll.delays();
        loop {
            for (n, (index, id)) in chunk.iter().enumerate() {
                if results[n].is_some() {
                    continue;
                }
                let got = ssm.get_command_invocation().command_id(&sent.command_id).instance_id(id).send().await;
                let inv = match got {
                    Ok(inv) => inv,
                    // Not visible yet right after the send.
                    Err(e) if AwsError::from_sdk("GetCommandInvocation", &e).is("InvocationDoesNotExist") => continue,
                    Err(e) => return Err(AwsError::from_sdk("GetCommandInvocation", &e).into_provider()),
                };
                let ssm_status = inv.status().map(|s| s.as_str().to_string()).unwrap_or_default();
                // Pending, InProgress, Delayed, Cancelling: not ended yet.
                let Some(status) = ended(&ssm_status) else { continue };
                let lines = |text: Option<&str>| tail(text, &job.secrets);
                let code = inv.response_code();
                let duration_ms = inv
                    .execution_elapsed_time()
                    .and_then(iso_duration)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_else(|| started.elapsed().as_millis() as u64);
                let result = json!({ "machine": index, "machine_name": id, "instance_id": id,
                    "command_id": sent.command_id, "status": status, "ssm_status": ssm_status,
                    "exit_code": (code >= 0).then_some(code), "duration_ms": duration_ms,
                    "stdout_tail": lines(inv.standard_output_content()),
                    "stderr_tail": lines(inv.standard_error_content()) });
                let level = if status == "succeeded" { Level::Info } else { Level::Warn };
                let msg = format!("{id}: {status} (exit code {code})");
                ctx.event(NewEvent::info("target", msg).with_level(level).with_data(result.clone())).await;
                results[n] = Some(result);
            }
            if results.iter().all(Option::is_some) {
                return Ok(results.into_iter().flatten().collect());
            }
            if ctx.cancel_requested() {
                if let Err(e) = ssm.cancel_command().command_id(&sent.command_id).send().await {
                    let e = AwsError::from_sdk("CancelCommand", &e);
                    let msg = format!("could not cancel command {}: {e}", sent.command_id);
                    ctx.event(NewEvent::info("command", msg).with_level(Level::Warn)).await;
                }
                return Err(ProviderError::Cancelled);
            }
            if started.elapsed() > limit {
                return Err(ProviderError::fatal(
                    "no_result",
                    format!("command {} reported no end for some targets within {}s", sent.command_id, limit.as_secs()),
                ));
            }
            tokio::time::sleep(delays.next().unwrap_or(self.poll.max)).await;
        }
    }
}

/// Drover's word for how an SSM command invocation ended (`Success` →
/// `succeeded`, …); `None` while it has not.
pub(super) fn ended(ssm_status: &str) -> Option<&'static str> {
    match ssm_status {
        "Success" => Some("succeeded"),
        "Failed" | "Undeliverable" | "Terminated" => Some("failed"),
        "TimedOut" => Some("timed_out"),
        "Cancelled" => Some("cancelled"),
        _ => None,
    }
}

/// The last [`OUTPUT_TAIL`] lines of a command's output, secret values masked.
pub(super) fn tail(text: Option<&str>, secrets: &[String]) -> Vec<String> {
    let all: Vec<&str> = text.unwrap_or_default().lines().collect();
    let skip = all.len().saturating_sub(OUTPUT_TAIL);
    all[skip..].iter().map(|l| masked(l, secrets)).collect()
}

/// The shell script a target runs: the environment (non-secret settings,
/// then the spec's `env`, then drover's own), a directory of its own, and
/// the command.
fn script(job: &Job, spec: &Spec, cluster: &str) -> String {
    let mut env: Vec<(String, String)> = job.split_settings().0.into_iter().collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend([
        ("DROVER_JOB".to_string(), job.resource.name.clone()),
        ("DROVER_RUN_ID".to_string(), job.run_id.to_string()),
        ("DROVER_CLUSTER".to_string(), cluster.to_string()),
    ]);
    let mut out = String::from("set -u\n");
    for (k, v) in env {
        out.push_str(&format!("export {k}={}\n", quote(&v)));
    }
    let dir = format!("/var/lib/drover/jobs/{}/{}", job.resource.id, job.run_id);
    out.push_str(&format!("mkdir -p {dir} && cd {dir}\n"));
    out.push_str(&format!("sh -c {}\n", quote(&spec.command)));
    out
}

/// Single-quotes a value for `sh`.
pub(super) fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

/// An ISO 8601 duration as SSM writes one (`PT1.5S`, `PT5M`, `PT1H2M3S`).
pub(super) fn iso_duration(s: &str) -> Option<Duration> {
    let rest = s.strip_prefix("PT")?;
    let mut total = 0f64;
    let mut number = String::new();
    for ch in rest.chars() {
        match ch {
            '0'..='9' | '.' => number.push(ch),
            'H' | 'M' | 'S' => {
                let n: f64 = number.parse().ok()?;
                total += n * match ch {
                    'H' => 3600.0,
                    'M' => 60.0,
                    _ => 1.0,
                };
                number.clear();
            }
            _ => return None,
        }
    }
    number.is_empty().then(|| Duration::from_secs_f64(total))
}

#[async_trait]
impl Provider for AwsJobs {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let spec = Spec::from_value(&job.resource.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("stored spec is invalid: {e:?}")))?;
        match job.action.as_str() {
            "run" => self.run(ctx, job, &spec).await,
            // Nothing of a job stays on AWS but SSM's own command history.
            "destroy" => Ok(json!({})),
            other => Err(ProviderError::fatal("unsupported_action", format!("aws jobs cannot {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_ssm_writes_them() {
        assert_eq!(iso_duration("PT1.5S"), Some(Duration::from_millis(1500)));
        assert_eq!(iso_duration("PT5M"), Some(Duration::from_secs(300)));
        assert_eq!(iso_duration("PT1H2M3S"), Some(Duration::from_secs(3723)));
        assert_eq!(iso_duration("P1D"), None);
        assert_eq!(iso_duration("PT5"), None);
    }

    #[test]
    fn values_are_quoted_for_the_shell() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }
}
