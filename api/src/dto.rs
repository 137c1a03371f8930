//! The JSON shapes of the HTTP API. Only this crate knows them: they are
//! mapped from domain records here and nowhere else.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use drover_domain::kinds::{Kind, Step};
use drover_domain::model::{Run, RunError, RunEvent, SpecVersion};
use drover_domain::service::{Overview, Problem as Diagnosis};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

/// What drover would send to CloudFormation for an action.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TemplatePreview {
    pub cluster: String,
    pub provider: String,
    /// The action previewed (`create`, `scale`, `add-instances`, `stop`, `start`).
    pub action: String,
    /// `CreateStack` or `UpdateStack`.
    pub operation: String,
    pub stack_name: String,
    /// The exact template body, as JSON.
    #[schema(value_type = Object)]
    pub template: Value,
    /// Every parameter, passed explicitly.
    pub parameters: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub termination_protection: bool,
}

impl TemplatePreview {
    /// From the provider's preview (see `drover_ops::aws::template`).
    pub fn from_value(cluster: &str, provider: &str, v: Value) -> Option<TemplatePreview> {
        let map = |v: &Value| -> Option<BTreeMap<String, String>> {
            v.as_object()?.iter().map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()
        };
        Some(TemplatePreview {
            cluster: cluster.to_string(),
            provider: provider.to_string(),
            action: v.get("action")?.as_str()?.to_string(),
            operation: v.get("operation")?.as_str()?.to_string(),
            stack_name: v.get("stack_name")?.as_str()?.to_string(),
            parameters: map(v.get("parameters")?)?,
            tags: map(v.get("tags")?)?,
            termination_protection: v.get("termination_protection")?.as_bool()?,
            template: v.get("template")?.clone(),
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// What the token is for.
    #[schema(example = "ci deploys", min_length = 1, max_length = 100)]
    pub name: String,
    /// When it stops working (RFC 3339, in the future); absent: never.
    #[serde(default)]
    #[schema(example = "2100-01-01T00:00:00Z")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// An API token, without its secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenView {
    pub id: Uuid,
    pub name: String,
    /// The first characters of the secret, to recognise it by.
    pub prefix: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<drover_domain::model::Token> for TokenView {
    fn from(t: drover_domain::model::Token) -> Self {
        TokenView {
            id: t.id,
            name: t.name,
            prefix: t.prefix,
            expires_at: t.expires_at,
            created_at: t.created_at,
            created_by: t.created_by,
            revoked_at: t.revoked_at,
            revoked_by: t.revoked_by,
            last_used_at: t.last_used_at,
        }
    }
}

/// A new token. The secret is shown here once and never again.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewTokenView {
    #[serde(flatten)]
    pub token: TokenView,
    /// Send as `Authorization: Bearer <secret>`. Shown once: a retry with
    /// the same `Idempotency-Key` gets the token the first request created
    /// (`Idempotent-Replayed: true`) with `null` here.
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<TokenView>,
}

/// The caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub user_id: Uuid,
    pub user: String,
    pub token_id: Uuid,
    pub permissions: Vec<String>,
}

/// Write a setting.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSetting {
    pub value: String,
    /// Encrypted at rest and redacted in responses unless revealed with `settings:reveal`.
    #[serde(default)]
    pub secret: bool,
    /// Why, for the record: at most 2000 characters.
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackSetting {
    /// The version whose value becomes current again (as a new version).
    #[schema(minimum = 1)]
    pub version: i64,
    /// Why, for the record: at most 2000 characters.
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub reason: Option<String>,
}

/// One version of a setting.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettingView {
    /// `global`, `environment:NAME` or `cluster:ID`.
    pub scope: String,
    pub key: String,
    pub version: i64,
    /// Absent when secret and not revealed, or deleted.
    pub value: Option<String>,
    pub secret: bool,
    /// True when the value is hidden from this response.
    pub redacted: bool,
    /// This version removed the key.
    pub deleted: bool,
    pub actor: String,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<drover_domain::settings::Setting> for SettingView {
    fn from(s: drover_domain::settings::Setting) -> Self {
        let v = s.version;
        SettingView {
            redacted: v.secret && s.value.is_none(),
            scope: v.scope,
            key: v.key,
            version: v.version,
            value: s.value,
            secret: v.secret,
            deleted: v.deleted,
            actor: v.actor,
            reason: v.reason,
            created_at: v.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SettingList {
    pub items: Vec<SettingView>,
}

/// Two versions of a setting side by side.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettingDiff {
    pub from: SettingView,
    pub to: SettingView,
    /// Whether the value differs; absent when that would reveal a secret.
    pub changed: Option<bool>,
}

/// One of a cluster's effective settings, and where it came from.
#[derive(Debug, Serialize, ToSchema)]
pub struct EffectiveSetting {
    pub key: String,
    /// The scope that won: `cluster:ID` over `environment:NAME` over `global`.
    pub scope: String,
    pub version: i64,
    pub secret: bool,
    pub value: Option<String>,
    pub redacted: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EffectiveSettings {
    pub cluster: String,
    pub items: Vec<EffectiveSetting>,
}

/// Create a resource. Each kind documents its own shape of this
/// (`CreateCluster`, …), with the kind's spec.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateResource {
    /// DNS-label name, unique among resources of the kind.
    #[schema(example = "web-qa", pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", max_length = 63)]
    pub name: String,
    /// The kind's spec.
    #[schema(value_type = Object)]
    pub spec: Value,
    /// Why: kept with spec version 1.
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub reason: Option<String>,
}

/// A JSON merge patch (RFC 7396) of the spec: present fields replace, `null` removes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchResource {
    #[schema(value_type = Object)]
    pub spec: Value,
    /// Why: kept with the spec version the change makes.
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub reason: Option<String>,
}

/// One version of a resource's spec.
#[derive(Debug, Serialize, ToSchema)]
pub struct SpecVersionView {
    /// 1 for the create, then one more per change.
    pub version: i64,
    pub actor: String,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The JSON merge patch from the version before (for version 1, the whole spec).
    #[schema(value_type = Object)]
    pub patch: Value,
    /// The spec this version produced.
    #[schema(value_type = Object)]
    pub spec: Value,
}

impl From<SpecVersion> for SpecVersionView {
    fn from(v: SpecVersion) -> Self {
        SpecVersionView {
            version: v.version,
            actor: v.actor,
            reason: v.reason,
            created_at: v.created_at,
            patch: v.patch,
            spec: v.spec,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SpecVersionPage {
    /// Newest first.
    pub items: Vec<SpecVersionView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<i64>,
}

/// How one spec version differs from another.
#[derive(Debug, Serialize, ToSchema)]
pub struct SpecDiff {
    pub from: i64,
    pub to: i64,
    /// The JSON merge patch that turns `from`'s spec into `to`'s.
    #[schema(value_type = Object)]
    pub patch: Value,
    /// One entry per top-level field that differs.
    pub changes: Vec<FieldChange>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FieldChange {
    /// `spec.image`.
    pub field: String,
    /// `null` when the field was not set.
    pub from: Option<Value>,
    /// `null` when the field was removed.
    pub to: Option<Value>,
}

/// A field whose spec differs from what runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct PendingChangeView {
    /// `spec.image`.
    pub field: String,
    /// As it runs; `null` when not set there.
    pub applied: Option<Value>,
    /// As the spec has it; `null` when removed.
    pub wanted: Option<Value>,
    /// The actions that would apply it.
    pub applied_by: Vec<String>,
}

/// Ask for a transition.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransitionRequest {
    /// One of the kind's actions (`GET /v1/kinds/{kind}`).
    #[schema(example = "scale")]
    pub action: String,
    /// Action parameters, e.g. `{"count": 3}` for `scale`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub params: Value,
    /// Why: kept with the transition for whoever reads it later.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// A typed failure.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TransitionError {
    /// Stable code, e.g. `build_failed`, `timeout`, `cancelled`, `lease_expired`.
    pub code: String,
    pub message: String,
    /// Whether trying again may help.
    pub retryable: bool,
    /// Provider detail, e.g. the tail of a failing command's output.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub detail: Option<Value>,
}

impl From<RunError> for TransitionError {
    fn from(e: RunError) -> Self {
        TransitionError { code: e.code, message: e.message, retryable: e.retryable, detail: e.detail }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResourceRef {
    pub kind: String,
    pub id: Uuid,
    pub name: String,
}

/// A transition: one requested change of one resource, and how it went.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Transition {
    pub id: Uuid,
    pub resource: ResourceRef,
    pub action: String,
    #[schema(value_type = Object)]
    pub params: Value,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    pub from_state: String,
    /// The state the resource shows while the transition runs.
    pub working_state: String,
    /// Where success leads.
    pub target_state: String,
    /// Where failure leads.
    pub failure_state: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub actor: String,
    pub reason: Option<String>,
    pub idempotency_key: Option<String>,
    /// The transition this one retries or follows.
    pub parent: Option<Uuid>,
    pub provider: String,
    pub timeout_secs: i64,
    pub created_at: DateTime<Utc>,
    /// Not before: set when waiting to retry.
    pub run_after: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// From first start to finish.
    pub duration_ms: Option<i64>,
    /// From request to first start.
    pub queued_ms: Option<i64>,
    pub worker: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<Object>)]
    pub outputs: Option<Value>,
    pub error: Option<TransitionError>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub cancel_requested_by: Option<String>,
    /// The resource's environment when the transition was asked for.
    pub environment: Option<String>,
    /// The settings versions the transition was asked with: `[{scope, key, version}]`.
    #[schema(value_type = Vec<Object>)]
    pub settings: Value,
    /// The resource's spec version the transition ran against (absent for
    /// transitions asked for before spec versions were recorded).
    pub spec_version: Option<i64>,
}

impl From<Run> for Transition {
    fn from(r: Run) -> Self {
        Transition {
            duration_ms: r.duration_ms(),
            queued_ms: r.started_at.map(|s| (s - r.created_at).num_milliseconds()),
            resource: ResourceRef { kind: r.kind.as_str().into(), id: r.resource_id, name: r.resource_name },
            id: r.id,
            action: r.action,
            params: r.params,
            status: r.status.as_str().into(),
            from_state: r.from_state,
            working_state: r.working_state,
            target_state: r.ok_state,
            failure_state: r.err_state,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            actor: r.actor,
            reason: r.reason,
            idempotency_key: r.idempotency_key,
            parent: r.parent_run,
            provider: r.provider,
            timeout_secs: r.timeout_secs,
            created_at: r.created_at,
            run_after: r.run_after,
            started_at: r.started_at,
            finished_at: r.finished_at,
            worker: r.worker,
            lease_expires_at: r.lease_expires_at,
            outputs: r.outputs,
            error: r.error.map(Into::into),
            cancel_requested_at: r.cancel_requested_at,
            cancel_requested_by: r.cancel_requested_by,
            settings: r.settings,
            environment: r.environment,
            spec_version: r.spec_version,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TransitionPage {
    pub items: Vec<Transition>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

/// One entry of a transition's event log.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Event {
    /// Position in the log; pass as `after` to read on.
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub attempt: i32,
    /// `info`, `warn` or `error`.
    pub level: String,
    pub step: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

impl From<RunEvent> for Event {
    fn from(e: RunEvent) -> Self {
        Event {
            seq: e.seq,
            at: e.at,
            attempt: e.attempt,
            level: e.level.as_str().into(),
            step: e.step,
            message: e.message,
            data: e.data,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub transition: Uuid,
    /// The transition's status when this page was read.
    pub status: String,
    pub events: Vec<Event>,
    /// Pass as `after` to read on.
    pub next_after: i64,
}

/// Why a resource is failed or stuck.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Why {
    pub summary: String,
    pub transition: Option<Uuid>,
    pub error: Option<TransitionError>,
}

impl From<Diagnosis> for Why {
    fn from(p: Diagnosis) -> Self {
        Why { summary: p.summary, transition: p.run, error: p.error.map(Into::into) }
    }
}

/// The active transition and its latest events.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActiveTransition {
    pub transition: Transition,
    /// Its newest events (up to five): what it is doing now.
    pub recent_events: Vec<Event>,
}

/// A resource with everything needed to understand it at a glance.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResourceView {
    pub id: Uuid,
    pub kind: String,
    pub name: String,
    pub state: String,
    /// The kind's spec.
    #[schema(value_type = Object)]
    pub spec: Value,
    /// Generation: bumped by every change of spec or state.
    pub version: i64,
    /// The newest spec version (`GET …/versions`); also the `ETag`, which
    /// a `PATCH` may send back as `If-Match`.
    pub spec_version: i64,
    /// The spec version that last ran whole; absent until something ran it.
    pub applied_version: Option<i64>,
    /// What the spec says and the running resource does not do yet, and
    /// which actions would apply it; empty when nothing is pending.
    pub pending_changes: Vec<PendingChangeView>,
    /// What the last successful transition produced.
    #[schema(value_type = Object)]
    pub outputs: Value,
    /// What drover last saw of the real thing (e.g. instance health).
    #[schema(value_type = Option<Object>)]
    pub observed: Option<Value>,
    /// What the last `refresh` found, compared with the record: `status`
    /// (`in_sync` only when every attribute was checked, `drifted`,
    /// `unknown`), `checked_at`, the refresh `run`, a `summary`, the
    /// `differences` (`path`, `recorded`, `actual`) and what it could not
    /// check (`unchecked`: `path`, `why`). Absent until a refresh ran.
    #[schema(value_type = Option<Object>)]
    pub drift: Option<Value>,
    pub created_by: String,
    pub updated_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Actions allowed in the current state.
    pub allowed_actions: Vec<String>,
    pub active_transition: Option<ActiveTransition>,
    /// The last five transitions, newest first.
    pub recent_transitions: Vec<Transition>,
    /// Present when the resource is failed or stuck: why.
    pub problem: Option<Why>,
    /// For an environment: the live resources in it, with their states and
    /// active transitions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<Member>>,
    /// For an environment: its settings scope (`/v1/settings/{scope}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings_scope: Option<String>,
}

/// A resource in an environment.
#[derive(Debug, Serialize, ToSchema)]
pub struct Member {
    pub kind: String,
    pub id: Uuid,
    pub name: String,
    pub state: String,
    /// Its queued or running transition, if any.
    pub active_transition: Option<MemberRun>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemberRun {
    pub id: Uuid,
    pub action: String,
    pub status: String,
}

impl ResourceView {
    pub fn from_overview(o: Overview) -> Self {
        let r = o.resource;
        let holds = r.kind.holds_resources();
        ResourceView {
            settings_scope: holds.then(|| format!("{}:{}", r.kind, r.name)),
            members: o.members.map(|m| {
                m.into_iter()
                    .map(|(r, run)| Member {
                        kind: r.kind.as_str().into(),
                        id: r.id,
                        name: r.name,
                        state: r.state,
                        active_transition: run.map(|run| MemberRun {
                            id: run.id,
                            action: run.action,
                            status: run.status.as_str().into(),
                        }),
                    })
                    .collect()
            }),
            id: r.id,
            kind: r.kind.as_str().into(),
            name: r.name,
            state: r.state,
            spec: r.spec,
            version: r.version,
            spec_version: r.spec_version,
            applied_version: r.applied_version,
            pending_changes: o
                .pending_changes
                .into_iter()
                .map(|c| PendingChangeView {
                    field: c.field,
                    applied: c.applied,
                    wanted: c.wanted,
                    applied_by: c.applied_by.into_iter().map(str::to_string).collect(),
                })
                .collect(),
            outputs: r.outputs,
            observed: r.observed,
            drift: r.drift,
            created_by: r.created_by,
            updated_by: r.updated_by,
            created_at: r.created_at,
            updated_at: r.updated_at,
            allowed_actions: o.allowed_actions,
            active_transition: o.active_run.map(|run| ActiveTransition {
                transition: run.into(),
                recent_events: o.active_events.into_iter().map(Into::into).collect(),
            }),
            recent_transitions: o.recent_runs.into_iter().map(Into::into).collect(),
            problem: o.problem.map(Into::into),
        }
    }
}

/// A resource in a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResourceSummary {
    pub id: Uuid,
    pub name: String,
    pub state: String,
    /// The kind's spec.
    #[schema(value_type = Object)]
    pub spec: Value,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResourcePage {
    pub items: Vec<ResourceSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

/// One entry of a kind's transition table.
#[derive(Debug, Serialize, ToSchema)]
pub struct TableEntry {
    pub from: String,
    pub action: String,
    /// State while the transition runs; absent for `retry`, which goes
    /// through the working state of the action that failed.
    pub working: Option<String>,
    pub on_success: Option<String>,
    pub on_failure: Option<String>,
    /// True when the action repeats the failed transition.
    pub repeats_failed_action: bool,
}

/// One action of a kind.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionView {
    pub name: String,
    pub description: String,
    /// The permission asking for it needs.
    pub permission: String,
    /// JSON Schema of its `params`; absent when it takes none.
    #[schema(value_type = Option<Object>)]
    pub params: Option<Value>,
    /// Default timeout in seconds.
    pub timeout_secs: u64,
}

/// A resource kind, as the registry declares it: names, state machine,
/// typed actions, spec schema and permissions.
#[derive(Debug, Serialize, ToSchema)]
pub struct KindView {
    pub name: String,
    /// The collection: `/v1/{plural}`.
    pub plural: String,
    pub description: String,
    pub states: Vec<String>,
    pub actions: Vec<ActionView>,
    pub initial_state: String,
    /// The state in which a resource may be deleted.
    pub final_state: String,
    pub transitions: Vec<TableEntry>,
    /// JSON Schema (2020-12) of the kind's spec.
    #[schema(value_type = Object)]
    pub spec_schema: Value,
    /// Every permission of the kind (its verbs and actions).
    pub permissions: Vec<String>,
}

impl From<Kind> for KindView {
    fn from(k: Kind) -> Self {
        KindView {
            name: k.as_str().into(),
            plural: k.plural().into(),
            description: k.description().into(),
            states: k.states().into_iter().map(String::from).collect(),
            actions: k
                .actions()
                .into_iter()
                .filter_map(|a| {
                    let d = k.action(a)?;
                    Some(ActionView {
                        name: a.into(),
                        description: d.description.into(),
                        permission: k.permission(a),
                        params: d.params.schema(),
                        timeout_secs: d.timeout_secs,
                    })
                })
                .collect(),
            initial_state: k.initial_state().into(),
            final_state: k.final_state().into(),
            spec_schema: k.spec_schema(),
            permissions: k.permissions(),
            transitions: k
                .table()
                .into_iter()
                .map(|e| match e.step {
                    Step::Go { working, ok, err } => TableEntry {
                        from: e.from.into(),
                        action: e.action.into(),
                        working: Some(working.into()),
                        on_success: Some(ok.into()),
                        on_failure: Some(err.into()),
                        repeats_failed_action: false,
                    },
                    Step::Retry => TableEntry {
                        from: e.from.into(),
                        action: e.action.into(),
                        working: None,
                        on_success: None,
                        on_failure: None,
                        repeats_failed_action: true,
                    },
                })
                .collect(),
        }
    }
}

/// A permission that belongs to no kind's actions.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScopeView {
    pub permission: String,
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KindList {
    pub items: Vec<KindView>,
    /// Permissions besides the kinds' own.
    pub scopes: Vec<ScopeView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// Statistics of one group of transitions.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsGroup {
    /// The group's values of the `group_by` dimensions.
    #[schema(value_type = Object)]
    pub key: BTreeMap<String, String>,
    /// Start of the hour or day, when bucketed.
    pub bucket: Option<DateTime<Utc>>,
    pub total: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// failed / (succeeded + failed).
    pub failure_rate: Option<f64>,
    /// Over every transition that started.
    pub avg_ms: Option<f64>,
    pub avg_success_ms: Option<f64>,
    pub avg_failure_ms: Option<f64>,
    /// Within 2% (from a log-scale histogram).
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub max_ms: Option<i64>,
}

impl From<drover_domain::stats::Group> for StatsGroup {
    fn from(g: drover_domain::stats::Group) -> Self {
        StatsGroup {
            key: g.key.into_iter().map(|(d, v)| (d.as_str().to_string(), v)).collect(),
            bucket: g.bucket,
            total: g.total,
            succeeded: g.succeeded,
            failed: g.failed,
            cancelled: g.cancelled,
            failure_rate: g.failure_rate,
            avg_ms: g.avg_ms,
            avg_success_ms: g.avg_success_ms,
            avg_failure_ms: g.avg_failure_ms,
            p50_ms: g.p50_ms,
            p95_ms: g.p95_ms,
            max_ms: g.max_ms,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TransitionStats {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub group_by: Vec<String>,
    pub bucket: Option<String>,
    pub groups: Vec<StatsGroup>,
}

/// Where one healthy service instance can be reached.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DiscoveryEntry {
    #[schema(example = "app")]
    pub service: String,
    pub service_id: Uuid,
    /// Unique for the service's life: two instances of one index run side
    /// by side during a rolling deploy.
    #[schema(example = "2-4f1c9a0b7e2d")]
    pub instance: String,
    /// The instance's stable index.
    pub index: u32,
    #[schema(example = "c1-0")]
    pub machine: String,
    #[schema(example = "127.0.0.1")]
    pub address: String,
    pub port: u16,
    /// The image build it runs.
    pub build: Option<String>,
    /// `http` when its health check speaks HTTP, else `tcp`.
    #[schema(example = "http")]
    pub scheme: String,
    /// The port on the machine's host, where it differs from `port`.
    pub host_port: Option<u16>,
    pub registered_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
    /// When it leaves unless drover renews it.
    pub expires_at: DateTime<Utc>,
}

impl From<drover_domain::discovery::Entry> for DiscoveryEntry {
    fn from(e: drover_domain::discovery::Entry) -> Self {
        let n = e.entry;
        DiscoveryEntry {
            service: n.service,
            service_id: n.service_id,
            instance: n.instance,
            index: n.index,
            machine: n.machine,
            address: n.address,
            port: n.port,
            build: n.build,
            scheme: scheme(n.scheme),
            host_port: n.host_port,
            registered_at: e.registered_at,
            renewed_at: e.renewed_at,
            expires_at: e.expires_at,
        }
    }
}

fn scheme(s: drover_domain::discovery::Scheme) -> String {
    match s {
        drover_domain::discovery::Scheme::Http => "http".into(),
        drover_domain::discovery::Scheme::Tcp => "tcp".into(),
    }
}

/// The registry (or one service's entries) at an index.
#[derive(Debug, Serialize, ToSchema)]
pub struct DiscoveryList {
    /// The index of the last change this reflects (also in `X-Drover-Index`):
    /// pass it as `index` to wait for the next one.
    pub index: i64,
    pub entries: Vec<DiscoveryEntry>,
}

/// An instance entering or leaving the registry, and why.
#[derive(Debug, Serialize, ToSchema)]
pub struct DiscoveryChange {
    pub index: i64,
    /// `enter` or `leave`.
    #[schema(example = "leave")]
    pub change: String,
    pub service: String,
    pub service_id: Uuid,
    pub instance: String,
    #[schema(example = "replaced by build 01a2…")]
    pub reason: String,
    /// Who: a transition's id, `observer` or `sweep` (a lapsed TTL).
    pub by: String,
    pub address: String,
    pub port: u16,
    pub machine: String,
    pub build: Option<String>,
    pub at: DateTime<Utc>,
}

impl From<drover_domain::discovery::Change> for DiscoveryChange {
    fn from(c: drover_domain::discovery::Change) -> Self {
        DiscoveryChange {
            index: c.index,
            change: c.change.as_str().into(),
            service: c.service,
            service_id: c.service_id,
            instance: c.instance,
            reason: c.reason,
            by: c.by,
            address: c.entry.address,
            port: c.entry.port,
            machine: c.entry.machine,
            build: c.entry.build,
            at: c.at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DiscoveryChangePage {
    pub changes: Vec<DiscoveryChange>,
    /// Pass as `after` to read on.
    pub next_after: i64,
}

/// A backend kept as it was instead of being emptied.
#[derive(Debug, Serialize, ToSchema)]
pub struct RouterHold {
    pub backend: String,
    pub reason: String,
}

/// One server of a backend, as the configuration had it.
#[derive(Debug, Serialize, ToSchema)]
pub struct RouterServer {
    #[schema(example = "0-3fa2c1")]
    pub name: String,
    #[schema(example = "127.0.0.1")]
    pub address: String,
    pub port: u16,
}

/// A configuration a router's load balancer was given.
#[derive(Debug, Serialize, ToSchema)]
pub struct RouterConfigSummary {
    /// 1, 2, … per router.
    pub version: i64,
    /// `applied` (validated and serving until the next), `invalid` (refused
    /// by the load balancer's own validation: never loaded) or `held`
    /// (a render that would have emptied a backend, kept back).
    #[schema(example = "applied")]
    pub outcome: String,
    /// What made drover render it: a transition's id, `registry` (a change
    /// in the discovery registry) or `observer` (a periodic look).
    pub by: String,
    pub at: DateTime<Utc>,
    /// Why it was refused (`invalid`).
    pub reason: Option<String>,
    pub holds: Vec<RouterHold>,
    /// Each backend's servers.
    pub servers: BTreeMap<String, Vec<RouterServer>>,
    /// A unified diff from the configuration that served before it.
    pub diff: String,
}

/// A configuration version with its full text.
#[derive(Debug, Serialize, ToSchema)]
pub struct RouterConfigVersion {
    #[serde(flatten)]
    pub summary: RouterConfigSummary,
    /// The load balancer's configuration, as rendered (HAProxy's syntax).
    pub config: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouterConfigPage {
    /// Newest first.
    pub configs: Vec<RouterConfigSummary>,
    /// Pass as `before` for older versions; absent at the oldest.
    pub next_before: Option<i64>,
}

impl From<&drover_domain::routing::RouterConfig> for RouterConfigSummary {
    fn from(c: &drover_domain::routing::RouterConfig) -> Self {
        RouterConfigSummary {
            version: c.version,
            outcome: c.outcome.as_str().to_string(),
            by: c.by.clone(),
            at: c.at,
            reason: c.reason.clone(),
            holds: c
                .holds
                .iter()
                .map(|h| RouterHold { backend: h.backend.clone(), reason: h.reason.clone() })
                .collect(),
            servers: c
                .table
                .servers
                .iter()
                .map(|(b, list)| {
                    let list = list
                        .iter()
                        .map(|s| RouterServer { name: s.name.clone(), address: s.address.clone(), port: s.port })
                        .collect();
                    (b.clone(), list)
                })
                .collect(),
            diff: c.diff.clone(),
        }
    }
}
