//! Routers on `aws`: each router is an Application Load Balancer.
//!
//! The configuration drover renders for a router (and keeps as a version,
//! with a diff) is the load balancer's desired state as JSON: the load
//! balancer, one target group per backend *and target* with the servers to
//! register in it, and one HTTP listener per frontend with a rule per
//! host and path rule (priority = the rule's place in the spec, so the
//! first rule that matches wins, as with HAProxy). [`AwsRouters::apply`]
//! makes AWS match it, adopting what an earlier attempt made:
//!
//! 1. the load balancer, found by its name (made from the router's name
//!    and id), or made;
//! 2. the target groups (type `ip`, HTTP health checks), found by name,
//!    or made, and the servers missing from each registered;
//! 3. the listeners and their rules, changed only where they differ;
//! 4. then, and only then, the servers no longer wanted deregistered and
//!    the target groups no longer wanted deleted.
//!
//! So traffic never points at a target group before it has its servers.
//!
//! Blue/green: a target group belongs to a backend and a target (`site`
//! on cluster `blue`), so a swap's shadow backend (`site.next` on
//! `green`) is a group of its own, attached to the backend's forward
//! actions with weight 0: the load balancer health-checks it (a target
//! group no listener uses is not checked) but sends it nothing. The swap
//! itself changes the forward actions to `green`'s group, whose servers
//! have passed the checks already; `blue`'s group is then deleted.
//!
//! Request counters: an ALB reports them to CloudWatch by the minute,
//! too late for a swap's guard, so [`Balancer::counters`] says `None` and
//! the guard watches the load balancer's health checks of the new target.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_elasticloadbalancingv2 as elb;
use drover_domain::kinds::router::{self, Check, Spec, Target};
use drover_domain::model::Resource;
use drover_domain::routing::{Balancer, BalancerError, BalancerStatus, Counters, RouteTable, ServerHealth};
use elb::types::{
    Action, ActionTypeEnum, FixedResponseActionConfig, ForwardActionConfig, HostHeaderConditionConfig,
    LoadBalancerSchemeEnum, LoadBalancerTypeEnum, Matcher, PathPatternConditionConfig, ProtocolEnum, RuleCondition,
    Tag, TargetDescription, TargetGroupAttribute, TargetGroupTuple, TargetTypeEnum,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{AwsError, Backoff, Clients, TAG_RESOURCE};

/// Tags on what a router makes besides [`TAG_RESOURCE`].
const TAG_ROUTER: &str = "drover:router";
const TAG_BACKEND: &str = "drover:backend";
const TAG_TARGET: &str = "drover:target";

/// What an ALB allows (AWS's default quotas and limits).
const MAX_LISTENERS: usize = 50;
const MAX_RULES: usize = router::MAX_AWS_RULES;
const MAX_CONDITION_VALUES: usize = 5;
const MAX_PATTERN: usize = router::MAX_AWS_PATTERN;
const MAX_GROUPS: usize = 100;
const MAX_TARGETS: usize = 1000;

/// How long connections to a deregistered server may finish (AWS's
/// default is 300 s: a swap's old target would be held that long).
const DEREGISTRATION_DELAY_SECS: &str = "30";

/// The desired state of a router's load balancer: the configuration text
/// drover keeps as a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub load_balancer: LoadBalancer,
    pub target_groups: Vec<Group>,
    pub listeners: Vec<Listener>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    pub name: String,
    pub scheme: String,
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
}

/// A target group: one backend's servers from one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    /// The backend as the route table names it (`site`, or a swap's `site.next`).
    pub backend: String,
    /// `cluster web-blue`, `service app`.
    pub target: String,
    pub port: u16,
    pub check_path: String,
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Server {
    pub address: String,
    pub port: u16,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub frontend: String,
    pub port: u16,
    /// Where requests no rule matches go (empty: a 503 answer).
    pub default: Vec<Forward>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    pub forward: Vec<Forward>,
}

/// A target group a forward action sends to, by name, with its weight (0:
/// health-checked, sent nothing).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Forward {
    pub group: String,
    pub weight: i32,
}

fn hex_digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// What every target group of a router's name starts with.
fn group_prefix(router: &Resource) -> String {
    format!("d{}-", &hex_digest(&[&router.id.to_string()])[..8])
}

/// A router's load balancer's name: its own name (cut) and a digest of its
/// id (≤ 32 characters, as AWS allows).
pub fn balancer_name(router: &Resource) -> String {
    let cut: String = router.name.chars().take(20).collect();
    format!("dr-{}-{}", cut.trim_end_matches('-'), &hex_digest(&[&router.id.to_string()])[..8])
}

/// The target group of `backend` (without a shadow's suffix) on `target`.
pub fn group_name(router: &Resource, backend: &str, target: &Target) -> String {
    let base = backend.strip_suffix(&router::shadow_name("")).unwrap_or(backend);
    let kind = target.kind().to_string();
    let digest = hex_digest(&[base, &kind, target.key()]);
    format!("{}{}", group_prefix(router), &digest[..12])
}

fn target_label(t: &Target) -> String {
    format!("{} {}", t.kind(), t.key())
}

/// Renders a route table as the load balancer's desired state.
pub fn render(router: &Resource, table: &RouteTable) -> Desired {
    let spec = &table.spec;
    let groups: Vec<Group> = spec
        .backends
        .iter()
        .map(|b| {
            let mut servers: Vec<Server> = table
                .servers
                .get(&b.name)
                .into_iter()
                .flatten()
                .map(|s| Server { address: s.address.clone(), port: s.port, name: s.name.clone() })
                .collect();
            servers.sort();
            let port = b.port.or(servers.first().map(|s| s.port)).unwrap_or(80);
            let check_path = match spec.check_of(b) {
                Check::Http { path } => path,
                Check::Tcp => "/".to_string(),
            };
            Group {
                name: group_name(router, &b.name, &b.target),
                backend: b.name.clone(),
                target: target_label(&b.target),
                port,
                check_path,
                servers,
            }
        })
        .collect();
    let by_backend: HashMap<&str, &str> = groups.iter().map(|g| (g.backend.as_str(), g.name.as_str())).collect();
    let forward = |backend: &str| -> Vec<Forward> {
        let mut to: Vec<Forward> =
            by_backend.get(backend).map(|g| Forward { group: g.to_string(), weight: 1 }).into_iter().collect();
        if let Some(shadow) = by_backend.get(router::shadow_name(backend).as_str()) {
            to.push(Forward { group: shadow.to_string(), weight: 0 });
        }
        to
    };
    let listeners = spec
        .frontends
        .iter()
        .map(|f| Listener {
            frontend: f.name.clone(),
            port: f.port,
            default: f.backend.as_deref().map(forward).unwrap_or_default(),
            rules: f
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| Rule {
                    priority: i as i32 + 1,
                    hosts: r.host.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    paths: r.path_prefix.as_deref().map(router::alb_paths).unwrap_or_default(),
                    forward: forward(&r.backend),
                })
                .collect(),
        })
        .collect();
    Desired {
        load_balancer: LoadBalancer {
            name: balancer_name(router),
            scheme: spec.scheme.unwrap_or(router::Scheme::Internal).as_str().to_string(),
            subnets: spec.subnets.clone(),
            security_groups: spec.security_groups.clone(),
        },
        target_groups: groups,
        listeners,
    }
}

/// What AWS would refuse, said before anything is changed.
pub fn validate(d: &Desired) -> Result<(), String> {
    let lb = &d.load_balancer;
    if lb.name.len() > 32 || lb.name.starts_with("internal-") {
        return Err(format!("load balancer name {:?}: at most 32 characters, not internal-…", lb.name));
    }
    if lb.subnets.len() < 2 {
        return Err("an Application Load Balancer needs subnets in at least two availability zones".into());
    }
    if d.listeners.len() > MAX_LISTENERS {
        return Err(format!("{} listeners: an ALB has at most {MAX_LISTENERS}", d.listeners.len()));
    }
    if d.target_groups.len() > MAX_GROUPS {
        return Err(format!("{} target groups: an ALB uses at most {MAX_GROUPS}", d.target_groups.len()));
    }
    let names: BTreeSet<&str> = d.target_groups.iter().map(|g| g.name.as_str()).collect();
    let targets: usize = d.target_groups.iter().map(|g| g.servers.len()).sum();
    if targets > MAX_TARGETS {
        return Err(format!("{targets} targets: an ALB has at most {MAX_TARGETS}"));
    }
    for g in &d.target_groups {
        if g.name.len() > 32 {
            return Err(format!("target group name {:?}: at most 32 characters", g.name));
        }
        if g.check_path.len() > 1024 {
            return Err(format!("backend {}: a health check path of at most 1024 characters", g.backend));
        }
    }
    for l in &d.listeners {
        if l.rules.len() > MAX_RULES {
            return Err(format!("frontend {}: {} rules, an ALB listener holds {MAX_RULES}", l.frontend, l.rules.len()));
        }
        for r in &l.rules {
            if r.hosts.len() + r.paths.len() > MAX_CONDITION_VALUES {
                return Err(format!(
                    "frontend {} rule {}: more than {MAX_CONDITION_VALUES} values",
                    l.frontend, r.priority
                ));
            }
            if let Some(v) = r.hosts.iter().chain(&r.paths).find(|v| v.len() > MAX_PATTERN) {
                return Err(format!("frontend {} rule {}: {v:?} is longer than {MAX_PATTERN}", l.frontend, r.priority));
            }
        }
        for f in l.rules.iter().flat_map(|r| &r.forward).chain(&l.default) {
            if !names.contains(f.group.as_str()) {
                return Err(format!("frontend {} forwards to {}, a group it does not make", l.frontend, f.group));
            }
        }
    }
    Ok(())
}

/// Routers as Application Load Balancers.
pub struct AwsRouters {
    clients: Arc<Clients>,
    poll: Backoff,
    /// What each router's load balancer was last made to serve, in this
    /// process: which backend each target group serves right now.
    applied: Mutex<HashMap<uuid::Uuid, Desired>>,
}

fn failed(e: AwsError) -> BalancerError {
    BalancerError::Failed { code: format!("aws:{}", e.code), message: e.to_string(), retryable: e.retryable }
}

/// AWS's own validation refusing a configuration, like `haproxy -c` locally.
const REFUSALS: &[&str] = &[
    "ValidationError",
    "InvalidConfigurationRequest",
    "SubnetNotFound",
    "InvalidSubnet",
    "InvalidSecurityGroup",
    "InvalidScheme",
    "TooManyRules",
    "TooManyTargetGroups",
    "TooManyTargets",
    "TooManyListeners",
    "TooManyLoadBalancers",
    "TooManyActions",
    "TooManyConditionValues",
    "PriorityInUse",
    "DuplicateLoadBalancerName",
    "DuplicateTargetGroupName",
    "InvalidTarget",
];

fn refused_or_failed(e: AwsError) -> BalancerError {
    if REFUSALS.contains(&e.code.as_str()) {
        BalancerError::Invalid(e.to_string())
    } else {
        failed(e)
    }
}

macro_rules! call {
    ($op:literal, $fut:expr) => {
        $fut.await.map_err(|e| AwsError::from_sdk($op, &e))
    };
}

/// A listener or rule's actions, comparable whatever AWS filled in.
fn action_key(actions: &[Action], arn_of: &HashMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for a in actions {
        match a.r#type() {
            Some(ActionTypeEnum::Forward) => {
                let tuples = a.forward_config().map(|f| f.target_groups()).unwrap_or_default();
                if tuples.is_empty() {
                    if let Some(arn) = a.target_group_arn() {
                        out.push(format!("forward {} 1", arn_of.get(arn).map(String::as_str).unwrap_or(arn)));
                    }
                }
                for t in tuples {
                    let arn = t.target_group_arn().unwrap_or_default();
                    let name = arn_of.get(arn).map(String::as_str).unwrap_or(arn);
                    out.push(format!("forward {name} {}", t.weight().unwrap_or(1)));
                }
            }
            Some(ActionTypeEnum::FixedResponse) => out.push(format!(
                "fixed {}",
                a.fixed_response_config().map(|c| c.status_code().unwrap_or_default()).unwrap_or_default()
            )),
            other => out.push(format!("{other:?}")),
        }
    }
    out.sort();
    out
}

fn condition_key(conditions: &[RuleCondition]) -> Vec<String> {
    let mut out = Vec::new();
    for c in conditions {
        let field = c.field().unwrap_or_default();
        let mut values: Vec<&str> = c.values().iter().map(String::as_str).collect();
        if let Some(h) = c.host_header_config() {
            values.extend(h.values().iter().map(String::as_str));
        }
        if let Some(p) = c.path_pattern_config() {
            values.extend(p.values().iter().map(String::as_str));
        }
        values.sort();
        values.dedup();
        out.push(format!("{field} {}", values.join(" ")));
    }
    out.sort();
    out
}

impl AwsRouters {
    pub fn new(clients: Arc<Clients>, poll: Backoff) -> AwsRouters {
        AwsRouters { clients, poll, applied: Mutex::new(HashMap::new()) }
    }

    async fn elb(&self) -> elb::Client {
        self.clients.elb().await
    }

    /// The load balancer named `name` as AWS describes it, `None` when it
    /// does not exist.
    async fn find_balancer(&self, name: &str) -> Result<Option<elb::types::LoadBalancer>, AwsError> {
        let c = self.elb().await;
        match call!("DescribeLoadBalancers", c.describe_load_balancers().names(name).send()) {
            Ok(out) => Ok(out.load_balancers().first().cloned()),
            Err(e) if e.is("LoadBalancerNotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The arn of the router's load balancer, `None` when there is none.
    async fn balancer_arn(&self, router: &Resource) -> Result<Option<String>, BalancerError> {
        let lb = self.find_balancer(&balancer_name(router)).await.map_err(failed)?;
        Ok(lb.and_then(|lb| lb.load_balancer_arn().map(str::to_string)))
    }

    /// The router's target groups: `name → (arn, port, health check path)`.
    async fn groups(&self, router: &Resource) -> Result<BTreeMap<String, (String, Option<i32>, String)>, AwsError> {
        let c = self.elb().await;
        let prefix = group_prefix(router);
        let mut found = BTreeMap::new();
        let mut marker: Option<String> = None;
        loop {
            let out =
                call!("DescribeTargetGroups", c.describe_target_groups().page_size(400).set_marker(marker).send())?;
            for g in out.target_groups() {
                let name = g.target_group_name().unwrap_or_default();
                if name.starts_with(&prefix) {
                    found.insert(
                        name.to_string(),
                        (
                            g.target_group_arn().unwrap_or_default().to_string(),
                            g.port(),
                            g.health_check_path().unwrap_or_default().to_string(),
                        ),
                    );
                }
            }
            marker = out.next_marker().map(str::to_string);
            if marker.is_none() {
                return Ok(found);
            }
        }
    }

    /// The servers registered in a group, draining ones aside.
    async fn registered(&self, arn: &str) -> Result<Vec<elb::types::TargetHealthDescription>, AwsError> {
        let c = self.elb().await;
        let out = call!("DescribeTargetHealth", c.describe_target_health().target_group_arn(arn).send())?;
        Ok(out.target_health_descriptions().to_vec())
    }

    async fn vpc_of(&self, subnets: &[String]) -> Result<String, BalancerError> {
        let ec2 = self.clients.ec2().await;
        let out = call!("DescribeSubnets", ec2.describe_subnets().set_subnet_ids(Some(subnets.to_vec())).send())
            .map_err(|e| match e.code.as_str() {
                "InvalidSubnetID.NotFound" | "InvalidSubnetID.Malformed" => BalancerError::Invalid(e.to_string()),
                _ => failed(e),
            })?;
        let vpcs: BTreeSet<&str> = out.subnets().iter().filter_map(|s| s.vpc_id()).collect();
        match (vpcs.len(), vpcs.first()) {
            (1, Some(v)) => Ok(v.to_string()),
            _ => Err(BalancerError::Invalid(format!(
                "the subnets {} are in {} VPCs: a load balancer's subnets are in one",
                subnets.join(", "),
                vpcs.len()
            ))),
        }
    }

    fn tags(router: &Resource, extra: &[(&str, &str)]) -> Vec<Tag> {
        let mut tags = vec![
            Tag::builder().key(TAG_RESOURCE).value(router.id.to_string()).build(),
            Tag::builder().key(TAG_ROUTER).value(router.name.clone()).build(),
        ];
        tags.extend(extra.iter().map(|(k, v)| Tag::builder().key(*k).value(*v).build()));
        tags
    }

    /// Step 1: the load balancer, adopted or made. Returns its arn.
    async fn ensure_balancer(&self, router: &Resource, want: &LoadBalancer) -> Result<String, BalancerError> {
        let c = self.elb().await;
        if let Some(lb) = self.find_balancer(&want.name).await.map_err(failed)? {
            let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
            if lb.scheme().map(|s| s.as_str()) != Some(want.scheme.as_str()) {
                return Err(BalancerError::Invalid(format!(
                    "the load balancer {} is {}: a scheme cannot change (destroy the router and create it again)",
                    want.name,
                    lb.scheme().map(|s| s.as_str()).unwrap_or("?")
                )));
            }
            let have: BTreeSet<&str> = lb.availability_zones().iter().filter_map(|z| z.subnet_id()).collect();
            let wanted: BTreeSet<&str> = want.subnets.iter().map(String::as_str).collect();
            if have != wanted {
                call!(
                    "SetSubnets",
                    c.set_subnets().load_balancer_arn(&arn).set_subnets(Some(want.subnets.clone())).send()
                )
                .map_err(refused_or_failed)?;
            }
            let have: BTreeSet<&str> = lb.security_groups().iter().map(String::as_str).collect();
            let wanted: BTreeSet<&str> = want.security_groups.iter().map(String::as_str).collect();
            if !wanted.is_empty() && have != wanted {
                call!(
                    "SetSecurityGroups",
                    c.set_security_groups()
                        .load_balancer_arn(&arn)
                        .set_security_groups(Some(want.security_groups.clone()))
                        .send()
                )
                .map_err(refused_or_failed)?;
            }
            return Ok(arn);
        }
        let mut req = c
            .create_load_balancer()
            .name(&want.name)
            .r#type(LoadBalancerTypeEnum::Application)
            .scheme(LoadBalancerSchemeEnum::from(want.scheme.as_str()))
            .set_subnets(Some(want.subnets.clone()))
            .set_tags(Some(Self::tags(router, &[])));
        if !want.security_groups.is_empty() {
            req = req.set_security_groups(Some(want.security_groups.clone()));
        }
        let out = call!("CreateLoadBalancer", req.send()).map_err(refused_or_failed)?;
        let arn = out.load_balancers().first().and_then(|lb| lb.load_balancer_arn()).unwrap_or_default().to_string();
        info!(router = %router.name, load_balancer = %want.name, "load balancer created");
        Ok(arn)
    }

    /// Step 2: every target group, adopted or made, with its servers
    /// registered. Returns `name → arn` and what each has registered.
    async fn ensure_groups(
        &self,
        router: &Resource,
        want: &Desired,
        existing: &BTreeMap<String, (String, Option<i32>, String)>,
    ) -> Result<(HashMap<String, String>, HashMap<String, BTreeSet<(String, i32)>>), BalancerError> {
        let c = self.elb().await;
        let mut arns = HashMap::new();
        let mut registered = HashMap::new();
        let mut vpc: Option<String> = None;
        for g in &want.target_groups {
            let arn = match existing.get(&g.name) {
                Some((arn, _, path)) => {
                    if path != &g.check_path {
                        call!(
                            "ModifyTargetGroup",
                            c.modify_target_group().target_group_arn(arn).health_check_path(&g.check_path).send()
                        )
                        .map_err(refused_or_failed)?;
                    }
                    arn.clone()
                }
                None => {
                    if vpc.is_none() {
                        vpc = Some(self.vpc_of(&want.load_balancer.subnets).await?);
                    }
                    let base = g.backend.strip_suffix(&router::shadow_name("")).unwrap_or(&g.backend);
                    let out = call!(
                        "CreateTargetGroup",
                        c.create_target_group()
                            .name(&g.name)
                            .protocol(ProtocolEnum::Http)
                            .port(i32::from(g.port))
                            .vpc_id(vpc.clone().unwrap_or_default())
                            .target_type(TargetTypeEnum::Ip)
                            .health_check_protocol(ProtocolEnum::Http)
                            .health_check_path(&g.check_path)
                            .health_check_interval_seconds(10)
                            .health_check_timeout_seconds(5)
                            .healthy_threshold_count(2)
                            .unhealthy_threshold_count(2)
                            .matcher(Matcher::builder().http_code("200-399").build())
                            .set_tags(Some(Self::tags(router, &[(TAG_BACKEND, base), (TAG_TARGET, &g.target)])))
                            .send()
                    )
                    .map_err(refused_or_failed)?;
                    let arn =
                        out.target_groups().first().and_then(|t| t.target_group_arn()).unwrap_or_default().to_string();
                    call!(
                        "ModifyTargetGroupAttributes",
                        c.modify_target_group_attributes()
                            .target_group_arn(&arn)
                            .attributes(
                                TargetGroupAttribute::builder()
                                    .key("deregistration_delay.timeout_seconds")
                                    .value(DEREGISTRATION_DELAY_SECS)
                                    .build()
                            )
                            .send()
                    )
                    .map_err(failed)?;
                    arn
                }
            };
            let have: BTreeSet<(String, i32)> = self
                .registered(&arn)
                .await
                .map_err(failed)?
                .iter()
                .filter(|t| t.target_health().and_then(|h| h.state()).map(|s| s.as_str()) != Some("draining"))
                .filter_map(|t| {
                    let target = t.target()?;
                    Some((target.id()?.to_string(), target.port().unwrap_or(i32::from(g.port))))
                })
                .collect();
            let missing: Vec<TargetDescription> = g
                .servers
                .iter()
                .filter(|s| !have.contains(&(s.address.clone(), i32::from(s.port))))
                .map(|s| TargetDescription::builder().id(&s.address).port(i32::from(s.port)).build())
                .collect();
            if !missing.is_empty() {
                call!("RegisterTargets", c.register_targets().target_group_arn(&arn).set_targets(Some(missing)).send())
                    .map_err(refused_or_failed)?;
            }
            arns.insert(g.name.clone(), arn.clone());
            registered.insert(g.name.clone(), have);
        }
        Ok((arns, registered))
    }

    fn actions(forward: &[Forward], arns: &HashMap<String, String>) -> Vec<Action> {
        if forward.is_empty() {
            let fixed = FixedResponseActionConfig::builder()
                .status_code("503")
                .content_type("text/plain")
                .message_body("no backend for this request")
                .build();
            return vec![Action::builder().r#type(ActionTypeEnum::FixedResponse).fixed_response_config(fixed).build()];
        }
        let tuples = forward
            .iter()
            .map(|f| {
                TargetGroupTuple::builder()
                    .target_group_arn(arns.get(&f.group).cloned().unwrap_or_default())
                    .weight(f.weight)
                    .build()
            })
            .collect();
        let config = ForwardActionConfig::builder().set_target_groups(Some(tuples)).build();
        vec![Action::builder().r#type(ActionTypeEnum::Forward).forward_config(config).build()]
    }

    fn conditions(r: &Rule) -> Vec<RuleCondition> {
        let mut out = Vec::new();
        if !r.hosts.is_empty() {
            let config = HostHeaderConditionConfig::builder().set_values(Some(r.hosts.clone())).build();
            out.push(RuleCondition::builder().field("host-header").host_header_config(config).build());
        }
        if !r.paths.is_empty() {
            let config = PathPatternConditionConfig::builder().set_values(Some(r.paths.clone())).build();
            out.push(RuleCondition::builder().field("path-pattern").path_pattern_config(config).build());
        }
        out
    }

    /// Step 3: listeners and their rules, changed where they differ; the
    /// listeners of frontends no longer in the spec deleted.
    async fn ensure_listeners(
        &self,
        lb: &str,
        want: &Desired,
        arns: &HashMap<String, String>,
    ) -> Result<(), BalancerError> {
        let c = self.elb().await;
        let names: HashMap<String, String> = arns.iter().map(|(n, a)| (a.clone(), n.clone())).collect();
        let out = call!("DescribeListeners", c.describe_listeners().load_balancer_arn(lb).send()).map_err(failed)?;
        let mut have: HashMap<i32, (String, Vec<String>)> = out
            .listeners()
            .iter()
            .filter_map(|l| Some((l.port()?, (l.listener_arn()?.to_string(), action_key(l.default_actions(), &names)))))
            .collect();
        for l in &want.listeners {
            let port = i32::from(l.port);
            let default = Self::actions(&l.default, arns);
            let arn = match have.remove(&port) {
                Some((arn, key)) => {
                    // Compared as what would be sent, read the way AWS's answer is.
                    if key != action_key(&default, &names) {
                        call!(
                            "ModifyListener",
                            c.modify_listener().listener_arn(&arn).set_default_actions(Some(default)).send()
                        )
                        .map_err(refused_or_failed)?;
                    }
                    arn
                }
                None => {
                    let out = call!(
                        "CreateListener",
                        c.create_listener()
                            .load_balancer_arn(lb)
                            .port(port)
                            .protocol(ProtocolEnum::Http)
                            .set_default_actions(Some(default))
                            .send()
                    )
                    .map_err(refused_or_failed)?;
                    out.listeners().first().and_then(|l| l.listener_arn()).unwrap_or_default().to_string()
                }
            };
            self.ensure_rules(&arn, l, arns, &names).await?;
        }
        for (_, (arn, _)) in have {
            call!("DeleteListener", c.delete_listener().listener_arn(&arn).send()).map_err(failed)?;
        }
        Ok(())
    }

    async fn ensure_rules(
        &self,
        listener: &str,
        want: &Listener,
        arns: &HashMap<String, String>,
        names: &HashMap<String, String>,
    ) -> Result<(), BalancerError> {
        let c = self.elb().await;
        let out = call!("DescribeRules", c.describe_rules().listener_arn(listener).send()).map_err(failed)?;
        let mut have: HashMap<i32, (String, Vec<String>, Vec<String>)> = out
            .rules()
            .iter()
            .filter(|r| !r.is_default().unwrap_or(false))
            .filter_map(|r| {
                let priority = r.priority()?.parse().ok()?;
                Some((
                    priority,
                    (r.rule_arn()?.to_string(), condition_key(r.conditions()), action_key(r.actions(), names)),
                ))
            })
            .collect();
        for r in &want.rules {
            let conditions = Self::conditions(r);
            let actions = Self::actions(&r.forward, arns);
            match have.remove(&r.priority) {
                Some((_, cond, act)) if cond == condition_key(&conditions) && act == action_key(&actions, names) => {}
                Some((arn, _, _)) => {
                    call!(
                        "ModifyRule",
                        c.modify_rule()
                            .rule_arn(&arn)
                            .set_conditions(Some(conditions))
                            .set_actions(Some(actions))
                            .send()
                    )
                    .map_err(refused_or_failed)?;
                }
                None => {
                    call!(
                        "CreateRule",
                        c.create_rule()
                            .listener_arn(listener)
                            .priority(r.priority)
                            .set_conditions(Some(conditions))
                            .set_actions(Some(actions))
                            .send()
                    )
                    .map_err(refused_or_failed)?;
                }
            }
        }
        for (_, (arn, _, _)) in have {
            call!("DeleteRule", c.delete_rule().rule_arn(&arn).send()).map_err(failed)?;
        }
        Ok(())
    }

    /// Step 4: servers no longer wanted deregistered, groups no longer
    /// wanted deleted (nothing forwards to them any more).
    async fn prune(
        &self,
        router: &Resource,
        want: &Desired,
        arns: &HashMap<String, String>,
        registered: &HashMap<String, BTreeSet<(String, i32)>>,
        existing: &BTreeMap<String, (String, Option<i32>, String)>,
    ) -> Result<(), BalancerError> {
        let c = self.elb().await;
        for g in &want.target_groups {
            let wanted: BTreeSet<(String, i32)> =
                g.servers.iter().map(|s| (s.address.clone(), i32::from(s.port))).collect();
            let stale: Vec<TargetDescription> = registered
                .get(&g.name)
                .into_iter()
                .flatten()
                .filter(|t| !wanted.contains(t))
                .map(|(id, port)| TargetDescription::builder().id(id).port(*port).build())
                .collect();
            if !stale.is_empty() {
                let arn = &arns[&g.name];
                call!(
                    "DeregisterTargets",
                    c.deregister_targets().target_group_arn(arn).set_targets(Some(stale)).send()
                )
                .map_err(failed)?;
            }
        }
        let wanted: BTreeSet<&str> = want.target_groups.iter().map(|g| g.name.as_str()).collect();
        for (name, (arn, _, _)) in existing {
            if wanted.contains(name.as_str()) {
                continue;
            }
            match call!("DeleteTargetGroup", c.delete_target_group().target_group_arn(arn).send()) {
                Ok(_) => {}
                // Still used by something the router did not make: left,
                // and tried again at the next apply.
                Err(e) if e.is("ResourceInUse") => {
                    warn!(router = %router.name, group = %name, error = %e, "target group still in use; left")
                }
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(())
    }

    /// Which backend each of the router's target groups serves: as this
    /// process last applied it or, after a restart, as the router's
    /// applied spec says (a group of a backend on another target is that
    /// backend's swap shadow).
    fn backend_of(&self, router: &Resource) -> HashMap<String, String> {
        if let Some(d) = self.applied.lock().expect("not poisoned").get(&router.id) {
            return d.target_groups.iter().map(|g| (g.name.clone(), g.backend.clone())).collect();
        }
        let spec = router.applied_spec.as_ref().unwrap_or(&router.spec);
        let Ok(spec) = Spec::from_value(spec) else { return HashMap::new() };
        spec.backends.iter().map(|b| (group_name(router, &b.name, &b.target), b.name.clone())).collect()
    }

    async fn tag_of(&self, arns: &[String]) -> HashMap<String, String> {
        let c = self.elb().await;
        let mut out = HashMap::new();
        for chunk in arns.chunks(20) {
            let Ok(found) = call!("DescribeTags", c.describe_tags().set_resource_arns(Some(chunk.to_vec())).send())
            else {
                continue;
            };
            for d in found.tag_descriptions() {
                let backend = d.tags().iter().find(|t| t.key() == Some(TAG_BACKEND)).and_then(|t| t.value());
                if let (Some(arn), Some(b)) = (d.resource_arn(), backend) {
                    out.insert(arn.to_string(), b.to_string());
                }
            }
        }
        out
    }
}

fn server_status(state: &str) -> &'static str {
    match state {
        "healthy" => "UP",
        "unhealthy" => "DOWN",
        "initial" => "INITIAL",
        "unused" => "UNUSED",
        "unavailable" => "UNAVAILABLE",
        "draining" => "DRAIN",
        _ => "UNKNOWN",
    }
}

#[async_trait]
impl Balancer for AwsRouters {
    fn render(&self, router: &Resource, table: &RouteTable) -> String {
        let desired = render(router, table);
        let mut text = serde_json::to_string_pretty(&desired).expect("the desired state serializes");
        text.push('\n');
        text
    }

    async fn apply(&self, router: &Resource, config: &str) -> Result<(), BalancerError> {
        let want: Desired = serde_json::from_str(config)
            .map_err(|e| BalancerError::Invalid(format!("the configuration is not drover's ALB JSON: {e}")))?;
        validate(&want).map_err(BalancerError::Invalid)?;
        let lb = self.ensure_balancer(router, &want.load_balancer).await?;
        let existing = self.groups(router).await.map_err(failed)?;
        let (arns, registered) = self.ensure_groups(router, &want, &existing).await?;
        self.ensure_listeners(&lb, &want, &arns).await?;
        self.applied.lock().expect("not poisoned").insert(router.id, want.clone());
        self.prune(router, &want, &arns, &registered, &existing).await?;
        Ok(())
    }

    async fn status(&self, router: &Resource) -> BalancerStatus {
        let name = balancer_name(router);
        let down = |problem: String| BalancerStatus { running: false, problem: Some(problem), servers: Vec::new() };
        let (arn, state) = match self.find_balancer(&name).await {
            Ok(Some(lb)) => (
                lb.load_balancer_arn().unwrap_or_default().to_string(),
                lb.state().and_then(|s| s.code()).map(|c| c.as_str().to_string()).unwrap_or_default(),
            ),
            Ok(None) => return down(format!("load balancer {name} does not exist")),
            Err(e) => return down(format!("could not look at load balancer {name}: {e}")),
        };
        if !matches!(state.as_str(), "active" | "provisioning" | "active_impaired") {
            return down(format!("load balancer {name} is {state}"));
        }
        let c = self.elb().await;
        let listeners = match call!("DescribeListeners", c.describe_listeners().load_balancer_arn(&arn).send()) {
            Ok(out) => out.listeners().len(),
            Err(e) => return down(format!("could not look at its listeners: {e}")),
        };
        if listeners == 0 {
            return down(format!("load balancer {name} has no listeners"));
        }
        let groups = match self.groups(router).await {
            Ok(g) => g,
            Err(e) => return down(format!("could not look at its target groups: {e}")),
        };
        let mut backend_of = self.backend_of(router);
        let unknown: Vec<String> =
            groups.iter().filter(|(n, _)| !backend_of.contains_key(*n)).map(|(_, (arn, _, _))| arn.clone()).collect();
        if !unknown.is_empty() {
            let tags = self.tag_of(&unknown).await;
            for (n, (arn, _, _)) in &groups {
                if let Some(base) = tags.get(arn) {
                    backend_of.entry(n.clone()).or_insert_with(|| router::shadow_name(base));
                }
            }
        }
        let mut servers = Vec::new();
        for (group, (arn, _, _)) in &groups {
            let Some(backend) = backend_of.get(group) else { continue };
            let found = match self.registered(arn).await {
                Ok(f) => f,
                Err(e) => return down(format!("could not look at target group {group}: {e}")),
            };
            for t in found {
                let (Some(target), Some(health)) = (t.target(), t.target_health()) else { continue };
                let state = health.state().map(|s| s.as_str()).unwrap_or("unknown");
                if state == "draining" {
                    continue;
                }
                let status = server_status(state);
                let check = match (status, health.reason()) {
                    ("UP", _) => "OK".to_string(),
                    (_, Some(r)) => r.as_str().to_string(),
                    (_, None) => state.to_string(),
                };
                servers.push(ServerHealth {
                    backend: backend.clone(),
                    server: format!("{}:{}", target.id().unwrap_or("?"), target.port().unwrap_or(0)),
                    status: status.to_string(),
                    check,
                });
            }
        }
        let problem = (state != "active").then(|| format!("load balancer {name} is {state}"));
        BalancerStatus { running: true, problem, servers }
    }

    /// An ALB counts requests in CloudWatch, by the minute: nothing a
    /// swap's guard could act on within its window.
    async fn counters(&self, _router: &Resource, _backend: &str) -> Option<Counters> {
        None
    }

    /// Deletes the listeners: nothing is served; the load balancer, its
    /// name and address, and its target groups stay for `start`.
    async fn stop(&self, router: &Resource) -> Result<(), BalancerError> {
        let Some(arn) = self.balancer_arn(router).await? else { return Ok(()) };
        let c = self.elb().await;
        let out = call!("DescribeListeners", c.describe_listeners().load_balancer_arn(&arn).send()).map_err(failed)?;
        for l in out.listeners() {
            if let Some(arn) = l.listener_arn() {
                match call!("DeleteListener", c.delete_listener().listener_arn(arn).send()) {
                    Ok(_) => {}
                    Err(e) if e.is("ListenerNotFound") => {}
                    Err(e) => return Err(failed(e)),
                }
            }
        }
        Ok(())
    }

    /// Deletes the load balancer and every target group of the router.
    async fn remove(&self, router: &Resource) -> Result<(), BalancerError> {
        let c = self.elb().await;
        if let Some(arn) = self.balancer_arn(router).await? {
            match call!("DeleteLoadBalancer", c.delete_load_balancer().load_balancer_arn(&arn).send()) {
                Ok(_) => {}
                Err(e) if e.is("LoadBalancerNotFound") => {}
                Err(e) => return Err(failed(e)),
            }
        }
        self.applied.lock().expect("not poisoned").remove(&router.id);
        // A group stays in use for a moment after its load balancer goes.
        let mut delays = self.poll.delays();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let groups = self.groups(router).await.map_err(failed)?;
            let mut busy = Vec::new();
            for (name, (arn, _, _)) in &groups {
                match call!("DeleteTargetGroup", c.delete_target_group().target_group_arn(arn).send()) {
                    Ok(_) => {}
                    Err(e) if e.is("TargetGroupNotFound") => {}
                    Err(e) if e.is("ResourceInUse") => busy.push(name.clone()),
                    Err(e) => return Err(failed(e)),
                }
            }
            if busy.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(BalancerError::Failed {
                    code: "aws:ResourceInUse".into(),
                    message: format!("target groups {} are still in use after 120s", busy.join(", ")),
                    retryable: true,
                });
            }
            tokio::time::sleep(delays.next().unwrap_or(self.poll.max)).await;
        }
    }

    async fn endpoint(&self, router: &Resource) -> Option<String> {
        let lb = self.find_balancer(&balancer_name(router)).await.ok()??;
        lb.dns_name().filter(|d| !d.is_empty()).map(str::to_string)
    }

    fn look_every(&self) -> Duration {
        self.poll.initial
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_domain::routing;
    use serde_json::json;

    fn router(spec: serde_json::Value) -> Resource {
        super::super::testing::resource(router::KIND, "edge", spec, "up", json!({}))
    }

    fn spec() -> serde_json::Value {
        json!({"environment": "prod", "provider": "aws", "subnets": ["subnet-0123abcd", "subnet-4567cdef"],
            "frontends": [{"name": "web", "mode": "http", "port": 80, "backend": "site",
                "rules": [{"host": "API.example.com", "backend": "api"},
                    {"host": "www.example.com", "path_prefix": "/api/", "backend": "api"}]}],
            "backends": [{"name": "site", "target": {"cluster": "blue"}, "port": 8080},
                {"name": "api", "target": {"service": "api"}, "check": {"type": "http", "path": "/health"}}]})
    }

    fn table(r: &Resource) -> RouteTable {
        let spec = Spec::from_value(&r.spec).unwrap();
        let s = |n: &str, a: &str, p| routing::Server { name: n.into(), address: a.into(), port: p };
        RouteTable {
            spec,
            servers: BTreeMap::from([
                ("site".to_string(), vec![s("i-2", "10.0.0.2", 8080), s("i-1", "10.0.0.1", 8080)]),
                ("api".to_string(), vec![s("0-ab", "10.0.0.3", 9001)]),
            ]),
        }
    }

    #[test]
    fn renders_rules_in_order_with_alb_patterns() {
        let r = router(spec());
        let d = render(&r, &table(&r));
        validate(&d).unwrap();
        assert!(d.load_balancer.name.starts_with("dr-edge-") && d.load_balancer.name.len() <= 32);
        assert_eq!(d.load_balancer.scheme, "internal");
        let site = &d.target_groups[0];
        assert_eq!((site.backend.as_str(), site.port, site.check_path.as_str()), ("site", 8080, "/"));
        assert_eq!(site.servers[0].address, "10.0.0.1", "sorted");
        let api = &d.target_groups[1];
        assert_eq!((api.port, api.check_path.as_str()), (9001, "/health"));
        let l = &d.listeners[0];
        assert_eq!(l.default, [Forward { group: site.name.clone(), weight: 1 }]);
        assert_eq!(l.rules[0].priority, 1);
        assert_eq!(l.rules[0].hosts, ["api.example.com"], "hosts match without case");
        assert_eq!(l.rules[1].paths, ["/api", "/api/*"]);
        assert_eq!(l.rules[1].forward, [Forward { group: api.name.clone(), weight: 1 }]);
        // Another router's groups are its own.
        let other = router(spec());
        assert_ne!(group_name(&other, "site", &Target::Cluster("blue".into())), site.name);
    }

    #[test]
    fn a_swap_shadow_is_a_weight_zero_group_that_becomes_the_live_one() {
        let r = router(spec());
        let mut t = table(&r);
        let mut shadow = t.spec.backends[0].clone();
        shadow.name = router::shadow_name("site");
        shadow.target = Target::Cluster("green".into());
        t.spec.backends.push(shadow);
        t.servers.insert(
            router::shadow_name("site"),
            vec![routing::Server { name: "i-9".into(), address: "10.0.1.9".into(), port: 8080 }],
        );
        let d = render(&r, &t);
        let green = group_name(&r, "site.next", &Target::Cluster("green".into()));
        assert_eq!(d.listeners[0].default[1], Forward { group: green.clone(), weight: 0 });
        // After the move, site on green is the same group, now weighted.
        t.spec.backends.pop();
        t.spec.backends[0].target = Target::Cluster("green".into());
        let after = render(&r, &t);
        assert_eq!(after.listeners[0].default, [Forward { group: green, weight: 1 }]);
    }

    #[test]
    fn what_aws_would_refuse_is_refused_first() {
        let r = router(spec());
        let mut d = render(&r, &table(&r));
        d.listeners[0].rules[1].paths = vec!["/x".repeat(70)];
        assert!(validate(&d).unwrap_err().contains("longer than 128"));
        let mut d = render(&r, &table(&r));
        d.listeners[0].default[0].group = "nope".into();
        assert!(validate(&d).unwrap_err().contains("forwards to nope"));
    }
}
