//! The `aws` provider: images baked on EC2, clusters as CloudFormation
//! stacks that drover renders from the cluster spec, jobs through SSM Run
//! Command on a cluster's instances, services as systemd units started over
//! SSM Run Command from their build's S3 artifact, routers as Application
//! Load Balancers.
//!
//! # Guarantees
//! - Every step tolerates running twice. AWS idempotency tokens
//!   (`ClientToken`, `ClientRequestToken`) are derived from the run id, and
//!   before creating anything a step looks for what an earlier attempt of
//!   the same run made (the builder and the image by their run tags and
//!   name, the stack by its name) and adopts it.
//! - Failures are classified: throttling, 5xx, timeouts and dispatch
//!   failures are retryable; everything else (validation, not found, a
//!   failed stack) is fatal and carries AWS's own reason.
//! - Credentials never reach a log, an event or an error: only AWS error
//!   codes and messages do.
//!
//! # Assumptions
//! - The standard AWS configuration chain (environment, profiles, instance
//!   roles) supplies credentials and region; `Settings::endpoint_url` (or
//!   `AWS_ENDPOINT_URL`) overrides the endpoint, which is how the tests
//!   reach a moto server on loopback.
//! - The SDK configuration loads lazily, at the first call: a server without
//!   AWS credentials starts and serves `local` resources.

mod cluster;
mod image;
mod job;
pub mod router;
mod service;
mod stacks;
pub mod template;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use drover_domain::engine::Providers;
use drover_domain::kinds;
use drover_domain::ports::ProviderError;
use drover_domain::routing::Balancer;
use serde_json::json;
use tokio::sync::OnceCell;

pub use cluster::AwsClusters;
pub use image::AwsImages;
pub use job::AwsJobs;
pub use router::AwsRouters;
pub use service::AwsServices;
pub use stacks::{SdkStacks, StackApi, StackEvent, StackInfo, StackRequest};

pub const NAME: &str = "aws";

/// Tag keys drover puts on what it makes.
pub const TAG_RESOURCE: &str = "drover:resource";
pub const TAG_RUN: &str = "drover:run";
pub const TAG_CLUSTER: &str = "drover:cluster";
pub const TAG_IMAGE: &str = "drover:image";
pub const TAG_ROLE: &str = "drover:role";

/// How the provider reaches AWS. Everything left `None` comes from the
/// standard configuration chain.
#[derive(Clone, Default)]
pub struct Settings {
    /// Overrides the endpoint of every service (a moto server in tests).
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    /// SDK attempts per call; `Some(1)` turns SDK retries off (tests: moto's
    /// 500s would otherwise be retried into misleading errors). Drover's own
    /// engine retries runs that fail with a retryable error.
    pub max_attempts: Option<u32>,
    /// Fixed credentials instead of the chain: for tests against moto only.
    pub static_credentials: Option<(String, String)>,
    /// How often to look at a builder, an image or a stack while waiting.
    pub poll: Backoff,
    /// The S3 bucket a bake packs its build into (`drover/images/IMAGE-ID/
    /// BUILD-ID.tar.gz`), which services' instances unpack. `None`: builds
    /// are AMIs only, and cannot run as services.
    pub artifact_bucket: Option<String>,
}

impl fmt::Debug for Settings {
    /// Never prints the secret key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("max_attempts", &self.max_attempts)
            .field("static_credentials", &self.static_credentials.as_ref().map(|_| "***"))
            .field("poll", &self.poll)
            .field("artifact_bucket", &self.artifact_bucket)
            .finish()
    }
}

impl Settings {
    /// From drover's own environment variables (`DROVER_AWS_ENDPOINT_URL`,
    /// `DROVER_AWS_REGION`, `DROVER_AWS_MAX_ATTEMPTS`,
    /// `DROVER_AWS_ARTIFACT_BUCKET`); the SDK reads the
    /// standard ones (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_PROFILE`, …).
    pub fn from_env() -> Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Settings {
            endpoint_url: var("DROVER_AWS_ENDPOINT_URL"),
            region: var("DROVER_AWS_REGION"),
            max_attempts: var("DROVER_AWS_MAX_ATTEMPTS").and_then(|v| v.parse().ok()),
            static_credentials: None,
            poll: Backoff::default(),
            artifact_bucket: var("DROVER_AWS_ARTIFACT_BUCKET"),
        }
    }
}

/// Exponential backoff between looks while waiting on AWS.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(2), max: Duration::from_secs(30) }
    }
}

impl Backoff {
    /// The delays to sleep, one per look: initial, doubling, capped.
    pub fn delays(self) -> impl Iterator<Item = Duration> {
        std::iter::successors(Some(self.initial), move |d| Some((*d * 2).min(self.max)))
    }
}

/// The SDK clients, made at the first call.
pub struct Clients {
    settings: Settings,
    cell: OnceCell<Sdk>,
}

struct Sdk {
    ec2: aws_sdk_ec2::Client,
    cloudformation: aws_sdk_cloudformation::Client,
    ssm: aws_sdk_ssm::Client,
    autoscaling: aws_sdk_autoscaling::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
}

impl Clients {
    pub fn new(settings: Settings) -> Arc<Clients> {
        Arc::new(Clients { settings, cell: OnceCell::new() })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    async fn sdk(&self) -> &Sdk {
        self.cell
            .get_or_init(|| async {
                let s = &self.settings;
                // rustls on ring (see ops/Cargo.toml), the platform's roots.
                let https = aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https();
                let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(https).timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(5))
                        .operation_attempt_timeout(Duration::from_secs(60))
                        .build(),
                );
                if let Some(url) = &s.endpoint_url {
                    loader = loader.endpoint_url(url.clone());
                }
                if let Some(region) = &s.region {
                    loader = loader.region(Region::new(region.clone()));
                }
                if let Some(n) = s.max_attempts {
                    loader = loader.retry_config(RetryConfig::standard().with_max_attempts(n.max(1)));
                }
                if let Some((key, secret)) = &s.static_credentials {
                    loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                        key.clone(),
                        secret.clone(),
                        None,
                        None,
                        "drover-static",
                    ));
                }
                let cfg = loader.load().await;
                Sdk {
                    ec2: aws_sdk_ec2::Client::new(&cfg),
                    cloudformation: aws_sdk_cloudformation::Client::new(&cfg),
                    ssm: aws_sdk_ssm::Client::new(&cfg),
                    autoscaling: aws_sdk_autoscaling::Client::new(&cfg),
                    elb: aws_sdk_elasticloadbalancingv2::Client::new(&cfg),
                }
            })
            .await
    }

    pub async fn ec2(&self) -> aws_sdk_ec2::Client {
        self.sdk().await.ec2.clone()
    }

    pub async fn cloudformation(&self) -> aws_sdk_cloudformation::Client {
        self.sdk().await.cloudformation.clone()
    }

    pub async fn ssm(&self) -> aws_sdk_ssm::Client {
        self.sdk().await.ssm.clone()
    }

    pub async fn autoscaling(&self) -> aws_sdk_autoscaling::Client {
        self.sdk().await.autoscaling.clone()
    }

    pub async fn elb(&self) -> aws_sdk_elasticloadbalancingv2::Client {
        self.sdk().await.elb.clone()
    }
}

/// Registers the aws provider for images and clusters. Nothing is loaded
/// or called until the first aws run.
pub fn register(providers: &mut Providers, settings: Settings) {
    let poll = settings.poll;
    let clients = Clients::new(settings);
    providers.register(NAME, kinds::image::KIND, Arc::new(AwsImages::new(clients.clone())));
    let stacks = Arc::new(SdkStacks::new(clients.clone()));
    providers.register(NAME, kinds::cluster::KIND, Arc::new(AwsClusters::new(stacks.clone(), poll)));
    providers.register(NAME, kinds::service::KIND, Arc::new(AwsServices::new(clients.clone(), stacks.clone(), poll)));
    providers.register(NAME, kinds::job::KIND, Arc::new(AwsJobs::new(clients, stacks, poll)));
}

/// The aws balancer routers run on (see [`router`]); nothing is loaded or
/// called until the first aws router's run.
pub fn balancers(settings: Settings) -> BTreeMap<String, Arc<dyn Balancer>> {
    let poll = settings.poll;
    let routers = AwsRouters::new(Clients::new(settings), poll);
    BTreeMap::from([(NAME.to_string(), Arc::new(routers) as Arc<dyn Balancer>)])
}

/// An AWS call that failed, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsError {
    /// The API operation, e.g. `CreateStack`.
    pub op: &'static str,
    /// AWS's error code (`ValidationError`, `InvalidAMIID.NotFound`, …), or
    /// `timeout`, `dispatch`, `response` for failures before AWS answered.
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}: {}", self.op, self.code, self.message)
    }
}

const RETRYABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "RequestThrottled",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestExpired",
    "IncorrectInstanceState",
];

impl AwsError {
    pub fn new(op: &'static str, code: &str, message: &str, retryable: bool) -> AwsError {
        AwsError { op, code: code.to_string(), message: message.to_string(), retryable }
    }

    /// Classifies an SDK error. Never includes request details (which could
    /// carry credentials): only AWS's code and message.
    pub fn from_sdk<E>(
        op: &'static str,
        e: &aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
    ) -> AwsError
    where
        E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        use aws_sdk_ec2::error::SdkError;
        match e {
            SdkError::TimeoutError(_) => AwsError::new(op, "timeout", "the call timed out", true),
            SdkError::DispatchFailure(d) => {
                let what = if d.is_io() {
                    "connection failed"
                } else if d.is_timeout() {
                    "connection timed out"
                } else {
                    "the request could not be sent"
                };
                AwsError::new(op, "dispatch", what, !d.is_user())
            }
            SdkError::ResponseError(_) => {
                AwsError::new(op, "response", "AWS answered with a response that could not be read", true)
            }
            SdkError::ServiceError(s) => {
                let err = s.err();
                let code = err.code().unwrap_or("Unknown");
                let message = err.message().unwrap_or("no message");
                let server_error = s.raw().status().is_server_error();
                let retryable = server_error || RETRYABLE_CODES.contains(&code);
                AwsError::new(op, code, message, retryable)
            }
            SdkError::ConstructionFailure(_) => {
                AwsError::new(op, "construction", "the request could not be built", false)
            }
            _ => AwsError::new(op, "unknown", "unknown SDK failure", true),
        }
    }

    pub fn is(&self, code: &str) -> bool {
        self.code == code
    }

    /// As a provider failure, with AWS's reason in the message.
    pub fn into_provider(self) -> ProviderError {
        let detail = json!({"operation": self.op, "aws_code": self.code, "aws_message": self.message});
        let message = self.to_string();
        let code = if self.retryable { "aws_unavailable" } else { "aws_error" };
        let e =
            if self.retryable { ProviderError::retryable(code, message) } else { ProviderError::fatal(code, message) };
        e.with_detail(detail)
    }
}

impl From<AwsError> for ProviderError {
    fn from(e: AwsError) -> Self {
        e.into_provider()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(5) };
        let d: Vec<_> = b.delays().take(5).map(|d| d.as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 5, 5]);
    }

    #[test]
    fn settings_never_print_the_secret() {
        let s =
            Settings { static_credentials: Some(("AKIDEXAMPLE".into(), "very-secret".into())), ..Default::default() };
        let printed = format!("{s:?}");
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(!printed.contains("AKIDEXAMPLE"), "{printed}");
    }

    #[test]
    fn provider_errors_keep_aws_reason_and_class() {
        let e = AwsError::new("CreateStack", "ValidationError", "Parameter X is bad", false).into_provider();
        match e {
            ProviderError::Failed { message, retryable, .. } => {
                assert!(message.contains("Parameter X is bad"));
                assert!(!retryable);
            }
            other => panic!("{other:?}"),
        }
    }
}
