//! Images baked on EC2: a builder instance from the base AMI runs the build
//! script as user-data, `CreateImage` makes the AMI, the builder goes.
//!
//! # Guarantees
//! - The builder is launched with a `ClientToken` derived from the run id
//!   and tagged with the resource and run ids; before launching, drover
//!   looks for that run's builder by its tags and adopts it (moto ignores
//!   client tokens, and the tags are what a reclaimed lease finds anyway).
//! - The AMI's name contains the run id; before `CreateImage` drover looks
//!   for an image of that name and adopts it. A retried or reclaimed run
//!   never makes a second builder or image.
//! - Builder, image and snapshots carry `drover:resource` and `drover:run`.
//! - Every bake is its own AMI, listed in the image's `builds`; a rebake
//!   leaves the earlier AMIs alone (running stacks' launch templates name
//!   them). `destroy` deregisters every image tagged with the resource and
//!   deletes their snapshots; what is already gone counts as done.
//!
//! - With an artifact bucket (`Settings::artifact_bucket`), the builder's
//!   user-data is drover's wrapper around the build script: it runs the
//!   script, packs `/opt/drover/build` as
//!   `s3://BUCKET/drover/images/IMAGE-ID/BUILD-ID.tar.gz`, tags the builder
//!   with the outcome (`drover:build` = `ok` or `failed:CODE`) and the
//!   artifact's SHA-256, and powers it off (with `builder_shutdown`). Drover
//!   waits for that tag: a failed script fails the bake with its exit code
//!   (no image is taken of a half-built machine). The checksum goes onto
//!   the AMI's tags too, so an attempt that adopts the image finds it, and
//!   into the build's outputs as `artifact: {bucket, key, sha256}`.
//!
//! # Assumptions
//! - With `builder_shutdown` (the default), the build script (or, with an
//!   artifact bucket, drover's wrapper) powers the builder off when it is
//!   done; otherwise the image is taken as soon as the builder runs (with
//!   an artifact bucket: as soon as it says the build is packed).
//! - With an artifact bucket, the base AMI has the AWS CLI (or docker, to
//!   run `amazon/aws-cli`), and the image's `instance_profile` lets the
//!   builder put the artifact and tag itself.

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    Filter, Image, Instance, InstanceType, ResourceType, ShutdownBehavior, Tag, TagSpecification,
};
use drover_domain::kinds::image::Spec;
use drover_domain::model::{Level, NewEvent};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use serde_json::{json, Value};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::{AwsError, Clients, TAG_IMAGE, TAG_RESOURCE, TAG_ROLE, TAG_RUN};

/// The tags a bake's wrapper puts on its builder: how the build script
/// ended, and the artifact's checksum (also put on the AMI).
pub const TAG_BUILD: &str = "drover:build";
pub const TAG_ARTIFACT_SHA256: &str = "drover:artifact-sha256";

/// A shell function `awscli` for drover's scripts on a machine: the AWS
/// CLI, or its container where the machine has none (CoreOS).
pub(super) const AWS_CLI: &str = r#"awscli() {
  if command -v aws >/dev/null; then aws "$@"
  else docker run --rm --network host -v /var/lib/drover:/var/lib/drover amazon/aws-cli "$@"; fi
}
"#;

/// Where a build's artifact goes in the bucket.
pub fn artifact_key(image_id: uuid::Uuid, build: uuid::Uuid) -> String {
    format!("drover/images/{image_id}/{build}.tar.gz")
}

/// The builder's user-data with an artifact bucket: the build script,
/// then the pack, the upload and the tags that tell drover how it went.
pub fn bake_script(build_script: &str, bucket: &str, key: &str, shutdown: bool) -> String {
    // A heredoc delimiter the script cannot contain by accident.
    let mut end = String::from("DROVER_BUILD_SCRIPT");
    while build_script.contains(&end) {
        end.push('_');
    }
    let power_off = if shutdown { "poweroff" } else { ":" };
    format!(
        r#"#!/bin/bash
# drover bake: runs the image's build script, packs /opt/drover/build into
# s3://{bucket}/{key} and tags this builder with the outcome.
set -u
exec >>/var/log/drover-bake.log 2>&1
imds() {{
  t=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token)
  curl -sf -H "X-aws-ec2-metadata-token: $t" "http://169.254.169.254/latest/$1"
}}
{AWS_CLI}self=$(imds meta-data/instance-id)
export AWS_DEFAULT_REGION=$(imds meta-data/placement/region)
tag() {{ awscli ec2 create-tags --resources "$self" --tags "Key=$1,Value=$2"; }}
mkdir -p /opt/drover/build /var/lib/drover
cat > /var/lib/drover/build-script <<'{end}'
{build_script}
{end}
chmod 0700 /var/lib/drover/build-script
if head -c2 /var/lib/drover/build-script | grep -q '#!'; then
  (cd /opt/drover/build && /var/lib/drover/build-script)
else
  (cd /opt/drover/build && sh /var/lib/drover/build-script)
fi
code=$?
if [ "$code" -ne 0 ]; then tag {TAG_BUILD} "failed:$code"; {power_off}; exit "$code"; fi
tar -czf /var/lib/drover/build.tar.gz -C /opt/drover/build . || {{ tag {TAG_BUILD} failed:pack; {power_off}; exit 1; }}
sum=$(sha256sum /var/lib/drover/build.tar.gz | cut -d' ' -f1)
awscli s3 cp /var/lib/drover/build.tar.gz 's3://{bucket}/{key}' --only-show-errors || {{ tag {TAG_BUILD} failed:upload; {power_off}; exit 1; }}
rm -f /var/lib/drover/build.tar.gz /var/lib/drover/build-script
tag {TAG_ARTIFACT_SHA256} "$sum"
tag {TAG_BUILD} ok
{power_off}
"#
    )
}

pub struct AwsImages {
    clients: Arc<Clients>,
}

/// The AMI name for a run: unique per run, found again by a retry.
pub fn image_name(job: &Job) -> String {
    format!("drover-{}-{}", job.resource.name, job.run_id)
}

fn tags(job: &Job, role: &str) -> Vec<Tag> {
    [
        (TAG_RESOURCE, job.resource.id.to_string()),
        (TAG_RUN, job.run_id.to_string()),
        (TAG_IMAGE, job.resource.name.clone()),
        (TAG_ROLE, role.to_string()),
        ("Name", format!("drover-{role}-{}", job.resource.name)),
    ]
    .into_iter()
    .map(|(k, v)| Tag::builder().key(k).value(v).build())
    .collect()
}

fn filter(name: &str, values: &[&str]) -> Filter {
    let mut f = Filter::builder().name(name);
    for v in values {
        f = f.values(*v);
    }
    f.build()
}

fn instance_state(i: &Instance) -> &str {
    i.state().and_then(|s| s.name()).map(|n| n.as_str()).unwrap_or("unknown")
}

fn snapshots(image: &Image) -> Vec<String> {
    image.block_device_mappings().iter().filter_map(|b| b.ebs()?.snapshot_id().map(str::to_string)).collect()
}

impl AwsImages {
    pub fn new(clients: Arc<Clients>) -> AwsImages {
        AwsImages { clients }
    }

    async fn instances(&self, filters: Vec<Filter>) -> Result<Vec<Instance>, AwsError> {
        let ec2 = self.clients.ec2().await;
        let out = ec2
            .describe_instances()
            .set_filters(Some(filters))
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("DescribeInstances", &e))?;
        Ok(out.reservations().iter().flat_map(|r| r.instances().iter().cloned()).collect())
    }

    async fn images(&self, filters: Vec<Filter>) -> Result<Vec<Image>, AwsError> {
        let ec2 = self.clients.ec2().await;
        let out = ec2
            .describe_images()
            .owners("self")
            .set_filters(Some(filters))
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("DescribeImages", &e))?;
        Ok(out.images().to_vec())
    }

    async fn image(&self, id: &str) -> Result<Option<Image>, AwsError> {
        let ec2 = self.clients.ec2().await;
        match ec2.describe_images().image_ids(id).send().await {
            Ok(out) => Ok(out.images().first().cloned()),
            Err(e) => {
                let e = AwsError::from_sdk("DescribeImages", &e);
                if e.code.starts_with("InvalidAMIID") {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// This run's builder, if an earlier attempt launched it.
    async fn builder_of_run(&self, job: &Job) -> Result<Option<Instance>, AwsError> {
        let run = job.run_id.to_string();
        let found = self
            .instances(vec![
                filter(&format!("tag:{TAG_RUN}"), &[&run]),
                filter(&format!("tag:{TAG_ROLE}"), &["builder"]),
                filter("instance-state-name", &["pending", "running", "stopping", "stopped"]),
            ])
            .await?;
        Ok(found.into_iter().next())
    }

    /// Builders of this image left by other runs (a timed-out build): they
    /// only cost money.
    async fn stale_builders(&self, job: &Job) -> Result<Vec<String>, AwsError> {
        let found = self
            .instances(vec![
                filter(&format!("tag:{TAG_RESOURCE}"), &[&job.resource.id.to_string()]),
                filter(&format!("tag:{TAG_ROLE}"), &["builder"]),
                filter("instance-state-name", &["pending", "running", "stopping", "stopped"]),
            ])
            .await?;
        let run = job.run_id.to_string();
        Ok(found
            .into_iter()
            .filter(|i| !i.tags().iter().any(|t| t.key() == Some(TAG_RUN) && t.value() == Some(run.as_str())))
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect())
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), AwsError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ec2 = self.clients.ec2().await;
        match ec2.terminate_instances().set_instance_ids(Some(ids.to_vec())).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = AwsError::from_sdk("TerminateInstances", &e);
                if e.code.starts_with("InvalidInstanceID") {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn launch_builder(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<String, ProviderError> {
        if let Some(i) = self.builder_of_run(job).await? {
            let id = i.instance_id().unwrap_or_default().to_string();
            ctx.event(NewEvent::info(
                "builder",
                format!("adopting builder {id} ({}) launched by an earlier attempt", instance_state(&i)),
            ))
            .await;
            return Ok(id);
        }
        let ec2 = self.clients.ec2().await;
        let base = spec.base_ami.clone().unwrap_or_default();
        let itype = spec.instance_type.clone().unwrap_or_default();
        let script = spec.build_script.as_deref().unwrap_or("");
        let user_data = match &self.clients.settings().artifact_bucket {
            Some(bucket) => bake_script(
                script,
                bucket,
                &artifact_key(job.resource.id, job.run_id),
                spec.builder_shutdown.unwrap_or(true),
            ),
            None => script.to_string(),
        };
        let profile = spec
            .instance_profile
            .as_ref()
            .map(|p| aws_sdk_ec2::types::IamInstanceProfileSpecification::builder().name(p).build());
        let out = ec2
            .run_instances()
            .image_id(&base)
            .instance_type(InstanceType::from(itype.as_str()))
            .min_count(1)
            .max_count(1)
            .set_iam_instance_profile(profile)
            .user_data(STANDARD.encode(user_data))
            .client_token(format!("drover-{}", job.run_id))
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Stop)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags(job, "builder")))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("RunInstances", &e))?;
        let id = out
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .ok_or_else(|| ProviderError::retryable("aws_error", "RunInstances returned no instance"))?
            .to_string();
        ctx.event(
            NewEvent::info("builder", format!("launched builder {id} from {base} ({itype})"))
                .with_data(json!({"instance": id, "base_ami": base, "instance_type": itype})),
        )
        .await;
        Ok(id)
    }

    /// Waits for the builder to be done: `stopped` when the build script
    /// (or the wrapper) powers it off, else `running`. With `packed` (an
    /// artifact bucket) also until the wrapper says how the build ended: a
    /// failed build is an error; a good one gives the artifact's checksum.
    async fn wait_builder(
        &self,
        ctx: &dyn RunContext,
        id: &str,
        shutdown: bool,
        packed: bool,
    ) -> Result<Option<String>, ProviderError> {
        let mut delays = self.clients.settings().poll.delays();
        let mut last = String::new();
        loop {
            ctx.check_cancel()?;
            let found = self.instances(vec![filter("instance-id", &[id])]).await?;
            let state = found.first().map(instance_state).unwrap_or("missing").to_string();
            let tag = |k: &str| {
                found.first().and_then(|i| i.tags().iter().find(|t| t.key() == Some(k))).and_then(|t| t.value())
            };
            let outcome = tag(TAG_BUILD).filter(|_| packed).unwrap_or("").to_string();
            let seen = format!("{state} {outcome}");
            if seen != last {
                let what = match (packed, outcome.as_str()) {
                    (false, _) => String::new(),
                    (true, "") => "; the build is under way".to_string(),
                    (true, o) => format!("; the build says {o}"),
                };
                ctx.event(NewEvent::info("builder", format!("builder {id} is {state}{what}"))).await;
                last = seen;
            }
            if let Some(code) = outcome.strip_prefix("failed:") {
                return Err(ProviderError::fatal(
                    "build_failed",
                    format!(
                        "the build on builder {id} failed ({}); its log is /var/log/drover-bake.log on the builder \
                         (see its console output)",
                        match code {
                            "pack" => "packing /opt/drover/build".to_string(),
                            "upload" => "uploading the artifact to S3".to_string(),
                            c => format!("the build script exited with {c}"),
                        }
                    ),
                ));
            }
            if packed && state == "stopped" && outcome.is_empty() {
                // The wrapper tags before it powers off: a builder stopped
                // without the tag was stopped by something else (a build
                // script that still calls poweroff).
                return Err(ProviderError::fatal(
                    "build_failed",
                    format!(
                        "builder {id} stopped before the build was packed: with an artifact bucket drover's \
                         wrapper powers the builder off after packing; the build script must not"
                    ),
                ));
            }
            let done = (state == "stopped" || (state == "running" && !shutdown)) && (!packed || outcome == "ok");
            match state.as_str() {
                "terminated" | "shutting-down" | "missing" => {
                    return Err(ProviderError::fatal(
                        "builder_lost",
                        format!("builder {id} is {state} before its image was taken"),
                    ))
                }
                _ if done && !packed => return Ok(None),
                _ if done => {
                    return tag(TAG_ARTIFACT_SHA256).map(|s| Some(s.to_string())).ok_or_else(|| {
                        ProviderError::fatal("build_failed", format!("builder {id} says ok but tags no checksum"))
                    });
                }
                _ => tokio::time::sleep(delays.next().expect("endless")).await,
            }
        }
    }

    async fn create_image(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        builder: &str,
        sha256: Option<&str>,
    ) -> Result<String, ProviderError> {
        let name = image_name(job);
        if let Some(found) = self.images(vec![filter("name", &[&name])]).await?.first() {
            let id = found.image_id().unwrap_or_default().to_string();
            ctx.event(NewEvent::info("image", format!("adopting image {id} ({name}) made by an earlier attempt")))
                .await;
            return Ok(id);
        }
        let ec2 = self.clients.ec2().await;
        let out = ec2
            .create_image()
            .instance_id(builder)
            .name(&name)
            .description(format!("drover image {} (run {})", job.resource.name, job.run_id))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Image)
                    .set_tags(Some({
                        let mut t = tags(job, "image");
                        if let Some(sum) = sha256 {
                            t.push(Tag::builder().key(TAG_ARTIFACT_SHA256).value(sum).build());
                        }
                        t
                    }))
                    .build(),
            )
            .send()
            .await;
        let id = match out {
            Ok(o) => o.image_id().unwrap_or_default().to_string(),
            Err(e) => {
                let e = AwsError::from_sdk("CreateImage", &e);
                if e.is("InvalidAMIName.Duplicate") {
                    let found = self.images(vec![filter("name", &[&name])]).await?;
                    found.first().and_then(|i| i.image_id()).map(str::to_string).ok_or_else(|| e.into_provider())?
                } else {
                    return Err(e.into());
                }
            }
        };
        ctx.event(NewEvent::info("image", format!("CreateImage {name}: {id}"))).await;
        Ok(id)
    }

    async fn wait_image(&self, ctx: &dyn RunContext, id: &str) -> Result<Image, ProviderError> {
        let mut delays = self.clients.settings().poll.delays();
        loop {
            ctx.check_cancel()?;
            let img = self
                .image(id)
                .await?
                .ok_or_else(|| ProviderError::fatal("image_lost", format!("image {id} disappeared")))?;
            let state = img.state().map(|s| s.as_str().to_string()).unwrap_or_default();
            match state.as_str() {
                "available" => return Ok(img),
                "pending" => tokio::time::sleep(delays.next().expect("endless")).await,
                other => {
                    let reason = img.state_reason().and_then(|r| r.message()).unwrap_or("no reason given");
                    return Err(ProviderError::fatal("image_failed", format!("image {id} is {other}: {reason}")));
                }
            }
        }
    }

    async fn build(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<Value, ProviderError> {
        let stale = self.stale_builders(job).await?;
        if !stale.is_empty() {
            ctx.event(
                NewEvent::info("builder", format!("terminating builders left by earlier runs: {}", stale.join(", ")))
                    .with_level(Level::Warn),
            )
            .await;
            self.terminate(&stale).await?;
        }
        let name = image_name(job);
        // A finished image of this run needs no builder: adopt it first.
        let existing = self.images(vec![filter("name", &[&name])]).await?;
        let bucket = self.clients.settings().artifact_bucket.clone();
        let shutdown = spec.builder_shutdown.unwrap_or(true);
        let (image_id, mut sha256) = match existing.first() {
            Some(found) => {
                let id = found.image_id().unwrap_or_default();
                ctx.event(NewEvent::info("image", format!("adopting image {id} ({name}) made by an earlier attempt")))
                    .await;
                let sum = found.tags().iter().find(|t| t.key() == Some(TAG_ARTIFACT_SHA256)).and_then(|t| t.value());
                (id.to_string(), sum.map(str::to_string))
            }
            None => {
                let builder = self.launch_builder(ctx, job, spec).await?;
                let sum = self.wait_builder(ctx, &builder, shutdown, bucket.is_some()).await?;
                ctx.check_cancel()?;
                (self.create_image(ctx, job, &builder, sum.as_deref()).await?, sum)
            }
        };
        if bucket.is_none() {
            sha256 = None;
        }
        let image = self.wait_image(ctx, &image_id).await?;
        let snaps = snapshots(&image);
        if !snaps.is_empty() {
            let ec2 = self.clients.ec2().await;
            ec2.create_tags()
                .set_resources(Some(snaps.clone()))
                .set_tags(Some(tags(job, "snapshot")))
                .send()
                .await
                .map_err(|e| AwsError::from_sdk("CreateTags", &e))?;
        }
        let builder = self.builder_of_run(job).await?;
        if let Some(b) = builder.as_ref().and_then(|b| b.instance_id()) {
            self.terminate(&[b.to_string()]).await?;
            ctx.event(NewEvent::info("builder", format!("terminated builder {b}"))).await;
        }
        ctx.event(NewEvent::info("image", format!("image {image_id} is available"))).await;
        let mut build = json!({
            "id": job.run_id,
            "ami_id": image_id,
            "image_name": name,
            "snapshots": snaps,
            "region": self.clients.ec2().await.config().region().map(|r| r.to_string()),
            "built_at": chrono::Utc::now(),
        });
        if let (Some(bucket), Some(sum)) = (&bucket, &sha256) {
            let key = artifact_key(job.resource.id, job.run_id);
            let msg = format!("artifact s3://{bucket}/{key} (sha256 {sum})");
            ctx.event(NewEvent::info("artifact", msg)).await;
            build["artifact"] = json!({ "bucket": bucket, "key": key, "sha256": sum });
        }
        if let Some(cmd) = Some(spec.start_command.as_str()).filter(|c| !c.is_empty()) {
            build["start_command"] = json!(cmd);
        }
        // Every AMI stays until the image is destroyed: launch templates
        // of running stacks name them.
        Ok(drover_domain::kinds::image::outputs_with_build(&job.resource.outputs, build, |_| true))
    }

    /// Compares every build on record with EC2: its AMI registered and
    /// available, and each of its snapshots there. Changes nothing; an API
    /// error leaves what it was asking about unchecked.
    async fn refresh(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        use drover_domain::drift::{Difference, Report};
        let mut report = Report::default();
        let builds = job.resource.outputs["builds"].as_array().cloned().unwrap_or_default();
        if builds.is_empty() {
            report.cannot_check("builds", "no build on record");
        }
        let ec2 = self.clients.ec2().await;
        for b in &builds {
            ctx.check_cancel()?;
            let (Some(id), Some(ami)) = (b["id"].as_str(), b["ami_id"].as_str()) else { continue };
            let at = format!("builds[{id}]");
            match self.image(ami).await {
                Ok(None) => {
                    report.differs(Difference::new(format!("{at}.ami"), ami, "deregistered"));
                    continue;
                }
                Ok(Some(img)) => match img.state().map(|s| s.as_str()) {
                    Some("available") => report.same(),
                    other => report.differs(Difference::new(
                        format!("{at}.ami"),
                        format!("{ami} available"),
                        format!("{ami} {}", other.unwrap_or("in no state")),
                    )),
                },
                Err(e) => {
                    report.cannot_check(format!("{at}.ami"), e.to_string());
                    continue;
                }
            }
            for snap in b["snapshots"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                let present = match ec2.describe_snapshots().snapshot_ids(snap).send().await {
                    Ok(out) => Ok(!out.snapshots().is_empty()),
                    Err(e) => match AwsError::from_sdk("DescribeSnapshots", &e) {
                        e if e.code.starts_with("InvalidSnapshot") => Ok(false),
                        e => Err(e),
                    },
                };
                let path = format!("{at}.snapshots[{snap}]");
                match present {
                    Ok(true) => report.same(),
                    Ok(false) => report.differs(Difference::new(path, "present", "missing")),
                    Err(e) => report.cannot_check(path, e.to_string()),
                }
            }
        }
        Ok(report.told(ctx).await)
    }

    async fn destroy(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let mut ids: Vec<String> =
            job.resource.outputs.get("ami_id").and_then(Value::as_str).map(|s| vec![s.to_string()]).unwrap_or_default();
        for img in self.images(vec![filter(&format!("tag:{TAG_RESOURCE}"), &[&job.resource.id.to_string()])]).await? {
            if let Some(id) = img.image_id() {
                if !ids.iter().any(|i| i == id) {
                    ids.push(id.to_string());
                }
            }
        }
        let ec2 = self.clients.ec2().await;
        let mut deregistered = Vec::new();
        let mut deleted = Vec::new();
        for id in &ids {
            ctx.check_cancel()?;
            let Some(img) = self.image(id).await? else {
                continue;
            };
            let snaps = snapshots(&img);
            match ec2.deregister_image().image_id(id).send().await {
                Ok(_) => {}
                Err(e) => {
                    let e = AwsError::from_sdk("DeregisterImage", &e);
                    if !e.code.starts_with("InvalidAMIID") {
                        return Err(e.into());
                    }
                }
            }
            ctx.event(NewEvent::info("destroy", format!("deregistered {id}"))).await;
            deregistered.push(id.clone());
            for s in snaps {
                match ec2.delete_snapshot().snapshot_id(&s).send().await {
                    Ok(_) => {}
                    Err(e) => {
                        let e = AwsError::from_sdk("DeleteSnapshot", &e);
                        if !e.code.starts_with("InvalidSnapshot") {
                            return Err(e.into());
                        }
                    }
                }
                ctx.event(NewEvent::info("destroy", format!("deleted snapshot {s}"))).await;
                deleted.push(s);
            }
        }
        let builders = self
            .instances(vec![
                filter(&format!("tag:{TAG_RESOURCE}"), &[&job.resource.id.to_string()]),
                filter(&format!("tag:{TAG_ROLE}"), &["builder"]),
                filter("instance-state-name", &["pending", "running", "stopping", "stopped"]),
            ])
            .await?
            .into_iter()
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect::<Vec<_>>();
        self.terminate(&builders).await?;
        Ok(json!({"deregistered": deregistered, "deleted_snapshots": deleted, "terminated_builders": builders}))
    }
}

#[async_trait]
impl Provider for AwsImages {
    fn refreshes(&self) -> bool {
        true
    }

    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let spec = Spec::from_value(&job.resource.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("stored spec is invalid: {e:?}")))?;
        match job.action.as_str() {
            "build" => self.build(ctx, job, &spec).await,
            "destroy" => self.destroy(ctx, job).await,
            "refresh" => self.refresh(ctx, job).await,
            other => Err(ProviderError::fatal("unsupported_action", format!("aws images cannot {other}"))),
        }
    }

    /// A bake that ended without an image (failed, cancelled, timed out)
    /// leaves no builder running: the run's builder is terminated.
    async fn clean_up(&self, ctx: &dyn RunContext, job: &Job) -> Result<(), ProviderError> {
        if job.action != "build" {
            return Ok(());
        }
        let builder = self.builder_of_run(job).await?;
        let Some(id) = builder.as_ref().filter(|b| instance_state(b) != "terminated").and_then(|b| b.instance_id())
        else {
            return Ok(());
        };
        self.terminate(&[id.to_string()]).await?;
        ctx.event(NewEvent::info("builder", format!("terminated builder {id}: the bake ended without an image"))).await;
        Ok(())
    }
}

/// Each step against a real moto server over loopback HTTP: real SDK calls.
#[cfg(test)]
mod moto_tests {
    use super::*;
    use crate::aws::testing::*;
    use std::time::Duration;

    async fn setup() -> (AwsImages, Arc<Clients>, Job) {
        let clients = moto_clients();
        let ami = base_ami(&clients).await;
        let job = job(
            drover_domain::kinds::image::KIND,
            &unique("img"),
            json!({"provider": "aws", "base_ami": ami, "instance_type": "t2.micro",
                   "build_script": "#!/bin/sh\necho baked > /etc/motd", "builder_shutdown": false}),
            "build",
            json!({}),
            vec![],
        );
        (AwsImages::new(clients.clone()), clients, job)
    }

    async fn images_named(clients: &Clients, name: &str) -> Vec<Image> {
        clients
            .ec2()
            .await
            .describe_images()
            .owners("self")
            .filters(filter("name", &[name]))
            .send()
            .await
            .unwrap()
            .images()
            .to_vec()
    }

    async fn builders(clients: &Clients, job: &Job) -> Vec<Instance> {
        let out = clients
            .ec2()
            .await
            .describe_instances()
            .filters(filter(&format!("tag:{TAG_RUN}"), &[&job.run_id.to_string()]))
            .send()
            .await
            .unwrap();
        out.reservations().iter().flat_map(|r| r.instances().iter().cloned()).collect()
    }

    /// A bake that ends without an image (here: it waits for a builder
    /// that never powers off, and its time runs out, which drops it as the
    /// engine does) leaves no builder running once cleaned up.
    #[tokio::test]
    async fn a_bake_that_ends_without_an_image_leaves_no_builder() {
        let (p, clients, mut job) = setup().await;
        job.resource.spec["builder_shutdown"] = json!(true);
        let ctx = RecordingCtx::new(job.run_id);
        let timed_out = tokio::time::timeout(Duration::from_secs(3), p.apply(&ctx, &job)).await;
        assert!(timed_out.is_err(), "the builder never powers off in moto");
        let running = |b: &[Instance]| b.iter().filter(|i| matches!(instance_state(i), "pending" | "running")).count();
        assert_eq!(running(&builders(&clients, &job).await), 1, "the bake launched its builder");
        p.clean_up(&ctx, &job).await.expect("clean up");
        let left = builders(&clients, &job).await;
        assert_eq!(running(&left), 0, "{left:?}");
        // Twice is harmless, and so is an attempt that launched nothing.
        p.clean_up(&ctx, &job).await.expect("clean up again");
        let (p, _, other) = setup().await;
        p.clean_up(&ctx, &other).await.expect("nothing to clean");
    }

    /// With an artifact bucket the builder runs drover's wrapper; a build
    /// script that fails (the wrapper's tag, played here: moto runs
    /// nothing) fails the bake with its exit code, and no image is taken.
    #[tokio::test]
    async fn a_failed_build_script_fails_the_bake_before_any_image() {
        let (_, _, job) = setup().await;
        let clients = Clients::new(crate::aws::Settings { artifact_bucket: Some("arts".into()), ..moto_settings() });
        let p = AwsImages::new(clients.clone());
        let ctx = RecordingCtx::new(job.run_id);
        let bake = tokio::spawn({
            let job = job.clone();
            async move {
                let ctx = RecordingCtx::new(job.run_id);
                p.apply(&ctx, &job).await
            }
        });
        let builder = loop {
            if let Some(b) = builders(&clients, &job).await.first() {
                break b.instance_id().unwrap().to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let ec2 = clients.ec2().await;
        let attr = ec2
            .describe_instance_attribute()
            .instance_id(&builder)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let sent =
            String::from_utf8(STANDARD.decode(attr.user_data().and_then(|u| u.value()).unwrap()).unwrap()).unwrap();
        let key = artifact_key(job.resource.id, job.run_id);
        assert!(sent.contains(&format!("s3 cp /var/lib/drover/build.tar.gz 's3://arts/{key}'")), "{sent}");
        assert!(
            sent.contains("<<'DROVER_BUILD_SCRIPT'\n#!/bin/sh\necho baked > /etc/motd\nDROVER_BUILD_SCRIPT\n"),
            "{sent}"
        );
        ec2.create_tags()
            .resources(&builder)
            .tags(Tag::builder().key(TAG_BUILD).value("failed:2").build())
            .send()
            .await
            .unwrap();
        let err = bake.await.unwrap().expect_err("the build failed");
        assert!(
            matches!(&err, ProviderError::Failed { code, message, .. } if code == "build_failed" && message.contains("exited with 2")),
            "{err:?}"
        );
        assert!(images_named(&clients, &image_name(&job)).await.is_empty(), "no image of a failed build");
        cleaned_up(&clients, &ctx, &job).await;

        // A builder stopped without the wrapper's tag (a build script that
        // powers it off itself) fails at once, saying so.
        let (_, _, job) = setup().await;
        let p = AwsImages::new(clients.clone());
        let bake = tokio::spawn({
            let job = job.clone();
            async move { p.apply(&RecordingCtx::new(job.run_id), &job).await }
        });
        let builder = loop {
            if let Some(b) = builders(&clients, &job).await.first() {
                break b.instance_id().unwrap().to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        clients.ec2().await.stop_instances().instance_ids(&builder).send().await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(30), bake).await.expect("no wait for a timeout").unwrap();
        let err = err.expect_err("stopped before packing");
        assert!(
            matches!(&err, ProviderError::Failed { code, message, .. } if code == "build_failed" && message.contains("must not")),
            "{err:?}"
        );
        cleaned_up(&clients, &ctx, &job).await;
    }

    async fn cleaned_up(clients: &Arc<Clients>, ctx: &RecordingCtx, job: &Job) {
        AwsImages::new(clients.clone()).clean_up(ctx, job).await.expect("clean up");
        let left = builders(clients, job).await;
        assert!(left.iter().all(|i| !matches!(instance_state(i), "pending" | "running")), "{left:?}");
    }

    #[tokio::test]
    async fn build_runs_twice_and_makes_one_builder_and_one_image() {
        let (p, clients, job) = setup().await;
        let ctx = RecordingCtx::new(job.run_id);
        let first = p.apply(&ctx, &job).await.expect("first build");
        let second = p.apply(&ctx, &job).await.expect("second build adopts");
        assert_eq!(first["ami_id"], second["ami_id"]);
        let imgs = images_named(&clients, &image_name(&job)).await;
        assert_eq!(imgs.len(), 1);
        let img = &imgs[0];
        assert_eq!(img.state().unwrap().as_str(), "available");
        let tag = |k: &str| img.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value()).map(str::to_string);
        assert_eq!(tag(TAG_RUN), Some(job.run_id.to_string()));
        assert_eq!(tag(TAG_RESOURCE), Some(job.resource.id.to_string()));
        let b = builders(&clients, &job).await;
        assert_eq!(b.len(), 1, "one builder, adopted on the second run");
        assert!(matches!(instance_state(&b[0]), "terminated" | "shutting-down"));
        // The builder got the build script as its user-data.
        let attr = clients
            .ec2()
            .await
            .describe_instance_attribute()
            .instance_id(b[0].instance_id().unwrap())
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let sent = attr.user_data().and_then(|u| u.value()).expect("user-data");
        assert_eq!(STANDARD.decode(sent).unwrap(), b"#!/bin/sh\necho baked > /etc/motd");
        // Its outputs list the build, current.
        assert_eq!(first["build"], job.run_id.to_string());
        assert_eq!(first["builds"][0]["ami_id"], first["ami_id"]);
        assert_eq!(first["builds"][0]["current"], true);
        // Snapshots are tagged too.
        let snaps = snapshots(img);
        assert!(!snaps.is_empty());
        let s = clients.ec2().await.describe_snapshots().set_snapshot_ids(Some(snaps)).send().await.unwrap();
        for snap in s.snapshots() {
            assert!(snap
                .tags()
                .iter()
                .any(|t| t.key() == Some(TAG_RUN) && t.value() == Some(&*job.run_id.to_string())));
        }
        assert!(ctx.messages().iter().any(|m| m.contains("adopting image")), "{:?}", ctx.messages());
    }

    /// A lease that lapsed after the builder was launched: the next attempt
    /// of the same run adopts that builder instead of launching another.
    #[tokio::test]
    async fn a_reclaimed_build_adopts_the_builder_of_the_lost_attempt() {
        let (p, clients, job) = setup().await;
        let ctx = RecordingCtx::new(job.run_id);
        let spec = Spec::from_value(&job.resource.spec).unwrap();
        let lost = p.launch_builder(&ctx, &job, &spec).await.unwrap();
        let out = p.apply(&ctx, &job).await.expect("build");
        let b = builders(&clients, &job).await;
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].instance_id(), Some(lost.as_str()));
        assert_eq!(images_named(&clients, &image_name(&job)).await.len(), 1);
        assert!(out["ami_id"].as_str().unwrap().starts_with("ami-"));
    }

    #[tokio::test]
    async fn destroy_runs_twice_and_removes_image_and_snapshots() {
        let (p, clients, job) = setup().await;
        let ctx = RecordingCtx::new(job.run_id);
        let built = p.apply(&ctx, &job).await.unwrap();
        let ami = built["ami_id"].as_str().unwrap().to_string();
        let snaps: Vec<String> =
            built["snapshots"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
        let mut destroy = job.clone();
        destroy.action = "destroy".into();
        destroy.resource.outputs = built.clone();
        let first = p.apply(&ctx, &destroy).await.expect("destroy");
        assert_eq!(first["deregistered"], json!([ami]));
        let second = p.apply(&ctx, &destroy).await.expect("destroy again");
        assert_eq!(second["deregistered"], json!([]));
        assert!(p.image(&ami).await.unwrap().is_none_or(|i| i.state().map(|s| s.as_str()) != Some("available")));
        for s in snaps {
            let r = clients.ec2().await.describe_snapshots().snapshot_ids(&s).send().await;
            assert!(r.is_err() || r.unwrap().snapshots().is_empty(), "snapshot {s} is gone");
        }
    }

    #[tokio::test]
    async fn a_bad_base_ami_is_a_fatal_error_with_aws_reason() {
        let (p, _clients, mut job) = setup().await;
        job.resource.spec["base_ami"] = "ami-00000000deadbeef".into();
        let ctx = RecordingCtx::new(job.run_id);
        match p.apply(&ctx, &job).await {
            Err(ProviderError::Failed { message, retryable, .. }) => {
                assert!(!retryable);
                assert!(message.contains("InvalidAMIID"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
