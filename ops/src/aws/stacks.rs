//! The CloudFormation (and EC2 instance) calls the cluster provider makes,
//! behind a small trait.
//!
//! The real implementation, [`SdkStacks`], is the SDK. The trait exists so
//! that what moto cannot show — stacks that stay `*_IN_PROGRESS`, rollbacks,
//! `CancelUpdateStack` — can be tested with a scripted fake (see the tests
//! in `cluster.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_cloudformation::types::{Parameter, Tag};
use aws_sdk_ec2::types::Filter;

use super::{AwsError, Clients};

/// A stack as `DescribeStacks` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackInfo {
    pub id: String,
    pub status: String,
    pub reason: Option<String>,
    pub outputs: BTreeMap<String, String>,
    pub parameters: BTreeMap<String, String>,
    pub termination_protection: bool,
}

impl StackInfo {
    pub fn in_progress(&self) -> bool {
        self.status.ends_with("_IN_PROGRESS")
    }
}

/// One entry of `DescribeStackEvents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackEvent {
    pub id: String,
    pub at: String,
    pub logical_id: String,
    pub resource_type: String,
    pub status: String,
    pub reason: Option<String>,
}

/// What `CreateStack` or `UpdateStack` sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackRequest {
    pub name: String,
    pub template: String,
    pub parameters: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub token: String,
    pub termination_protection: bool,
}

/// A running instance of a cluster, as EC2 shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub private_ip: Option<String>,
    pub state: String,
    pub instance_type: Option<String>,
    /// Its tags (what a refresh compares; not in the cluster's outputs).
    #[serde(skip)]
    pub tags: BTreeMap<String, String>,
    /// When EC2 launched it (not in the cluster's outputs).
    #[serde(skip)]
    pub launched_at: Option<std::time::SystemTime>,
}

/// What an auto-scaling group reports of its instances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupHealth {
    pub desired: u32,
    pub health_check_type: Option<String>,
    pub grace_period_secs: Option<i32>,
    /// `(instance id, lifecycle state, health status)`.
    pub instances: Vec<(String, String, String)>,
    /// The launch template version the group launches, and each
    /// instance's (by id), where the endpoint says them.
    pub launch_template_version: Option<String>,
    pub instance_templates: Vec<(String, Option<String>)>,
}

impl GroupHealth {
    /// Instances `InService` and `Healthy`.
    pub fn in_service(&self) -> usize {
        self.instances.iter().filter(|(_, life, health)| life == "InService" && health == "Healthy").count()
    }
}

#[async_trait]
pub trait StackApi: Send + Sync + 'static {
    /// `None` when no stack of that name exists (or it was deleted).
    async fn describe(&self, name: &str) -> Result<Option<StackInfo>, AwsError>;
    async fn create(&self, req: &StackRequest) -> Result<String, AwsError>;
    /// `false` when CloudFormation had nothing to change.
    async fn update(&self, req: &StackRequest) -> Result<bool, AwsError>;
    async fn delete(&self, name: &str, token: &str) -> Result<(), AwsError>;
    async fn cancel_update(&self, name: &str) -> Result<(), AwsError>;
    async fn set_termination_protection(&self, name: &str, on: bool) -> Result<(), AwsError>;
    /// The newest events first (one page).
    async fn events(&self, name: &str) -> Result<Vec<StackEvent>, AwsError>;
    /// Instances carrying tag `key=value`, except terminated ones.
    async fn instances(&self, key: &str, value: &str) -> Result<Vec<InstanceInfo>, AwsError>;
    /// Makes the SSM parameters under `path` exactly `values`, each a
    /// `SecureString` named `path` + key (the others under it deleted):
    /// where a cluster's secret settings wait for its instances. The
    /// default does nothing (the scripted fake).
    async fn put_parameters(&self, _path: &str, _values: &BTreeMap<String, String>) -> Result<(), AwsError> {
        Ok(())
    }
    /// The auto-scaling group's instances and their health; `None` when
    /// there is no such group (or, the default, nothing to ask: the
    /// scripted fake).
    async fn group_health(&self, _group: &str) -> Result<Option<GroupHealth>, AwsError> {
        Ok(None)
    }
    /// Sets the auto-scaling group's desired capacity (what a repair puts
    /// back when someone resized the group by hand: the stack's parameters
    /// already say the count, so an update would not touch it). The
    /// default does nothing (the scripted fake).
    async fn set_desired_capacity(&self, _group: &str, _count: u32) -> Result<(), AwsError> {
        Ok(())
    }
    /// Tells the instance's auto-scaling group that it is unhealthy, so
    /// that the group replaces it (`SetInstanceHealth`, respecting the
    /// group's grace period): how drover's own health check of a cluster's
    /// instances reaches a group that has no load balancer to check them.
    /// The default does nothing (the scripted fake).
    async fn set_unhealthy(&self, _instance: &str) -> Result<(), AwsError> {
        Ok(())
    }
    /// CloudFormation's own drift detection of the stack: each resource it
    /// finds modified or deleted, with its property differences. An error
    /// when the detection could not run (an endpoint without it, as moto).
    /// The default: no resource drifted (the scripted fake).
    async fn detect_drift(&self, _name: &str) -> Result<Vec<ResourceDrift>, AwsError> {
        Ok(Vec::new())
    }
}

/// A stack resource CloudFormation's drift detection found changed.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceDrift {
    pub logical_id: String,
    /// `MODIFIED` or `DELETED`.
    pub status: String,
    /// `(property path, expected, actual)`.
    pub properties: Vec<(String, String, String)>,
}

/// [`StackApi`] on the AWS SDK.
pub struct SdkStacks {
    clients: Arc<Clients>,
}

impl SdkStacks {
    pub fn new(clients: Arc<Clients>) -> SdkStacks {
        SdkStacks { clients }
    }
}

fn does_not_exist(e: &AwsError) -> bool {
    e.is("ValidationError") && e.message.contains("does not exist")
}

fn params(p: &BTreeMap<String, String>) -> Vec<Parameter> {
    p.iter().map(|(k, v)| Parameter::builder().parameter_key(k).parameter_value(v).build()).collect()
}

fn tags(t: &BTreeMap<String, String>) -> Vec<Tag> {
    t.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()
}

#[async_trait]
impl StackApi for SdkStacks {
    async fn describe(&self, name: &str) -> Result<Option<StackInfo>, AwsError> {
        let cfn = self.clients.cloudformation().await;
        let out = match cfn.describe_stacks().stack_name(name).send().await {
            Ok(o) => o,
            Err(e) => {
                let e = AwsError::from_sdk("DescribeStacks", &e);
                return if does_not_exist(&e) { Ok(None) } else { Err(e) };
            }
        };
        let Some(s) = out.stacks().first() else {
            return Ok(None);
        };
        let status = s.stack_status().map(|s| s.as_str().to_string()).unwrap_or_default();
        if status == "DELETE_COMPLETE" {
            return Ok(None);
        }
        Ok(Some(StackInfo {
            id: s.stack_id().unwrap_or_default().to_string(),
            status,
            reason: s.stack_status_reason().map(str::to_string),
            outputs: s
                .outputs()
                .iter()
                .filter_map(|o| Some((o.output_key()?.to_string(), o.output_value()?.to_string())))
                .collect(),
            parameters: s
                .parameters()
                .iter()
                .filter_map(|p| {
                    Some((p.parameter_key()?.to_string(), p.parameter_value().unwrap_or_default().to_string()))
                })
                .collect(),
            termination_protection: s.enable_termination_protection().unwrap_or(false),
        }))
    }

    async fn create(&self, req: &StackRequest) -> Result<String, AwsError> {
        let cfn = self.clients.cloudformation().await;
        let out = cfn
            .create_stack()
            .stack_name(&req.name)
            .template_body(&req.template)
            .set_parameters(Some(params(&req.parameters)))
            .set_tags(Some(tags(&req.tags)))
            .client_request_token(&req.token)
            .enable_termination_protection(req.termination_protection)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("CreateStack", &e))?;
        Ok(out.stack_id().unwrap_or_default().to_string())
    }

    async fn update(&self, req: &StackRequest) -> Result<bool, AwsError> {
        let cfn = self.clients.cloudformation().await;
        match cfn
            .update_stack()
            .stack_name(&req.name)
            .template_body(&req.template)
            .set_parameters(Some(params(&req.parameters)))
            .set_tags(Some(tags(&req.tags)))
            .client_request_token(&req.token)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                let e = AwsError::from_sdk("UpdateStack", &e);
                if e.is("ValidationError") && e.message.contains("No updates are to be performed") {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn delete(&self, name: &str, token: &str) -> Result<(), AwsError> {
        let cfn = self.clients.cloudformation().await;
        cfn.delete_stack()
            .stack_name(name)
            .client_request_token(token)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("DeleteStack", &e))?;
        Ok(())
    }

    async fn cancel_update(&self, name: &str) -> Result<(), AwsError> {
        let cfn = self.clients.cloudformation().await;
        cfn.cancel_update_stack()
            .stack_name(name)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("CancelUpdateStack", &e))?;
        Ok(())
    }

    async fn set_termination_protection(&self, name: &str, on: bool) -> Result<(), AwsError> {
        let cfn = self.clients.cloudformation().await;
        cfn.update_termination_protection()
            .stack_name(name)
            .enable_termination_protection(on)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("UpdateTerminationProtection", &e))?;
        Ok(())
    }

    async fn events(&self, name: &str) -> Result<Vec<StackEvent>, AwsError> {
        let cfn = self.clients.cloudformation().await;
        let out = match cfn.describe_stack_events().stack_name(name).send().await {
            Ok(o) => o,
            Err(e) => {
                let e = AwsError::from_sdk("DescribeStackEvents", &e);
                return if does_not_exist(&e) { Ok(Vec::new()) } else { Err(e) };
            }
        };
        Ok(out
            .stack_events()
            .iter()
            .map(|e| StackEvent {
                id: e.event_id().unwrap_or_default().to_string(),
                at: e.timestamp().map(|t| t.to_string()).unwrap_or_default(),
                logical_id: e.logical_resource_id().unwrap_or_default().to_string(),
                resource_type: e.resource_type().unwrap_or_default().to_string(),
                status: e.resource_status().map(|s| s.as_str().to_string()).unwrap_or_default(),
                reason: e.resource_status_reason().map(str::to_string),
            })
            .collect())
    }

    async fn instances(&self, key: &str, value: &str) -> Result<Vec<InstanceInfo>, AwsError> {
        let ec2 = self.clients.ec2().await;
        let mut out = Vec::new();
        let mut pages = ec2
            .describe_instances()
            .filters(Filter::builder().name(format!("tag:{key}")).values(value).build())
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .values("stopping")
                    .values("stopped")
                    .values("shutting-down")
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| AwsError::from_sdk("DescribeInstances", &e))?;
            for r in page.reservations() {
                for i in r.instances() {
                    out.push(InstanceInfo {
                        id: i.instance_id().unwrap_or_default().to_string(),
                        private_ip: i.private_ip_address().map(str::to_string),
                        state: i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default(),
                        instance_type: i.instance_type().map(|t| t.as_str().to_string()),
                        tags: i
                            .tags()
                            .iter()
                            .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string())))
                            .collect(),
                        launched_at: i.launch_time().and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn detect_drift(&self, name: &str) -> Result<Vec<ResourceDrift>, AwsError> {
        use aws_sdk_cloudformation::types::{StackDriftDetectionStatus, StackResourceDriftStatus};
        let cfn = self.clients.cloudformation().await;
        let started = cfn
            .detect_stack_drift()
            .stack_name(name)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("DetectStackDrift", &e))?;
        let id = started.stack_drift_detection_id().unwrap_or_default().to_string();
        // A detection takes seconds to a minute; the refresh's timeout
        // bounds the wait.
        let mut wait = std::time::Duration::from_millis(500);
        loop {
            let status = cfn
                .describe_stack_drift_detection_status()
                .stack_drift_detection_id(&id)
                .send()
                .await
                .map_err(|e| AwsError::from_sdk("DescribeStackDriftDetectionStatus", &e))?;
            match status.detection_status() {
                Some(StackDriftDetectionStatus::DetectionComplete) => break,
                Some(StackDriftDetectionStatus::DetectionFailed) => {
                    return Err(AwsError {
                        op: "DescribeStackDriftDetectionStatus",
                        code: "DetectionFailed".into(),
                        message: status.detection_status_reason().unwrap_or("drift detection failed").to_string(),
                        retryable: false,
                    })
                }
                _ => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
        let out = cfn
            .describe_stack_resource_drifts()
            .stack_name(name)
            .stack_resource_drift_status_filters(StackResourceDriftStatus::Modified)
            .stack_resource_drift_status_filters(StackResourceDriftStatus::Deleted)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("DescribeStackResourceDrifts", &e))?;
        Ok(out
            .stack_resource_drifts()
            .iter()
            .map(|d| ResourceDrift {
                logical_id: d.logical_resource_id().unwrap_or_default().to_string(),
                status: d.stack_resource_drift_status().map(|s| s.as_str().to_string()).unwrap_or_default(),
                properties: d
                    .property_differences()
                    .iter()
                    .map(|p| {
                        (
                            p.property_path().unwrap_or_default().to_string(),
                            p.expected_value().unwrap_or_default().to_string(),
                            p.actual_value().unwrap_or_default().to_string(),
                        )
                    })
                    .collect(),
            })
            .collect())
    }

    async fn group_health(&self, group: &str) -> Result<Option<GroupHealth>, AwsError> {
        let asg = self.clients.autoscaling().await;
        let out = asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("DescribeAutoScalingGroups", &e))?;
        Ok(out.auto_scaling_groups().first().map(|g| GroupHealth {
            desired: g.desired_capacity().unwrap_or(0).max(0) as u32,
            health_check_type: g.health_check_type().map(str::to_string),
            grace_period_secs: g.health_check_grace_period(),
            launch_template_version: g.launch_template().and_then(|t| t.version()).map(str::to_string),
            instance_templates: g
                .instances()
                .iter()
                .map(|i| {
                    let version = i.launch_template().and_then(|t| t.version()).map(str::to_string);
                    (i.instance_id().unwrap_or_default().to_string(), version)
                })
                .collect(),
            instances: g
                .instances()
                .iter()
                .map(|i| {
                    (
                        i.instance_id().unwrap_or_default().to_string(),
                        i.lifecycle_state().map(|l| l.as_str().to_string()).unwrap_or_default(),
                        i.health_status().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
        }))
    }

    async fn set_desired_capacity(&self, group: &str, count: u32) -> Result<(), AwsError> {
        self.clients
            .autoscaling()
            .await
            .set_desired_capacity()
            .auto_scaling_group_name(group)
            .desired_capacity(count as i32)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("SetDesiredCapacity", &e))?;
        Ok(())
    }

    async fn set_unhealthy(&self, instance: &str) -> Result<(), AwsError> {
        self.clients
            .autoscaling()
            .await
            .set_instance_health()
            .instance_id(instance)
            .health_status("Unhealthy")
            .should_respect_grace_period(true)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("SetInstanceHealth", &e))?;
        Ok(())
    }

    async fn put_parameters(&self, path: &str, values: &BTreeMap<String, String>) -> Result<(), AwsError> {
        let ssm = self.clients.ssm().await;
        for (key, value) in values {
            ssm.put_parameter()
                .name(format!("{path}{key}"))
                .value(value)
                .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
                .overwrite(true)
                .description("a drover secret setting")
                .send()
                .await
                .map_err(|e| AwsError::from_sdk("PutParameter", &e))?;
        }
        let mut stale = Vec::new();
        let mut pages = ssm.get_parameters_by_path().path(path).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| AwsError::from_sdk("GetParametersByPath", &e))?;
            for p in page.parameters() {
                let name = p.name().unwrap_or_default();
                if !values.contains_key(name.strip_prefix(path).unwrap_or(name)) {
                    stale.push(name.to_string());
                }
            }
        }
        // At most ten names per call.
        for names in stale.chunks(10) {
            ssm.delete_parameters()
                .set_names(Some(names.to_vec()))
                .send()
                .await
                .map_err(|e| AwsError::from_sdk("DeleteParameters", &e))?;
        }
        Ok(())
    }
}
