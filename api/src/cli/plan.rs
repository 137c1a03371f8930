//! `drover plan` and `drover apply`: resources from files, compared with
//! what the installation holds, in dependency order.
//!
//! A resource in a file is `{kind, name, spec}`, as the API has it; a file
//! (`.json`, `.yaml`/`.yml`, `.toml`) holds one, a list (in TOML:
//! `[[resources]]`), or, in YAML, several documents.
//!
//! Decisions (ARCHITECTURE.md):
//! - *What "changed" means.* A field the file gives is compared with the
//!   server's (objects field by field, lists item by item the same way); a
//!   field the file leaves out keeps its value (defaults the server filled
//!   in are not differences); `null` removes a field. An update sends
//!   exactly the fields that differ, as a JSON merge patch.
//! - *What runs.* A new resource is created and then its first action
//!   (`create`, an image's `build`) runs and is waited for, so the next
//!   resource can use it. A changed resource's spec is updated; on a
//!   resource that is running, the change stays pending until an action
//!   applies it (the plan names which): a deploy or a scale has its own
//!   gates and is the operator's to start, never a side effect of a file.
//! - *At most once.* Each update carries the spec version the plan saw
//!   (`If-Match`): a change made in between fails the apply, saying so.
//!   Creates and transitions carry an `Idempotency-Key` of the apply, so a
//!   retried request makes nothing twice. A failure stops the rest and
//!   the output says what was done.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use reqwest::Method;
use serde_json::{json, Map, Value};

use super::client::Client;
use super::{connect, encode, find_kind, kinds, wait, CliError, Global, KindInfo};

/// The order kinds are applied in: what others refer to first.
const ORDER: &[&str] =
    &["environment", "setting", "role", "user", "image", "cluster", "cluster-setting", "service", "job", "router"];

/// A resource from a file.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub kind: String,
    pub name: String,
    pub spec: Value,
    /// `file.yaml#2`: where it came from.
    pub from: String,
}

/// Reads every resource of `files`.
pub fn read_files(files: &[PathBuf]) -> Result<Vec<Wanted>, CliError> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| CliError::usage(format!("{}: {e}", f.display())))?;
        let docs = parse(f, &text)?;
        for (i, d) in docs.into_iter().enumerate() {
            let from = format!("{}#{}", f.display(), i + 1);
            let obj = d
                .as_object()
                .ok_or_else(|| CliError::usage(format!("{from}: a resource is an object {{kind, name, spec}}")))?;
            let field = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
            let (Some(kind), Some(name)) = (field("kind"), field("name")) else {
                return Err(CliError::usage(format!("{from}: a resource needs `kind` and `name` (strings)")));
            };
            if let Some(extra) = obj.keys().find(|k| !matches!(k.as_str(), "kind" | "name" | "spec")) {
                return Err(CliError::usage(format!(
                    "{from}: unknown field {extra:?} (a resource is {{kind, name, spec}})"
                )));
            }
            let spec = obj.get("spec").cloned().unwrap_or_else(|| json!({}));
            if !spec.is_object() {
                return Err(CliError::usage(format!("{from}: `spec` is an object")));
            }
            out.push(Wanted { kind, name, spec, from });
        }
    }
    Ok(out)
}

fn parse(path: &Path, text: &str) -> Result<Vec<Value>, CliError> {
    let bad = |e: String| CliError::usage(format!("{}: {e}", path.display()));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let one_or_many = |v: Value| match v {
        Value::Array(items) => items,
        Value::Null => Vec::new(),
        other => vec![other],
    };
    match ext.as_str() {
        "json" => Ok(one_or_many(serde_json::from_str(text).map_err(|e| bad(e.to_string()))?)),
        "toml" => {
            let v: Value = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
            match v.get("resources") {
                Some(list) if v.as_object().is_some_and(|o| o.len() == 1) => Ok(one_or_many(list.clone())),
                _ => Ok(vec![v]),
            }
        }
        "yaml" | "yml" => {
            let mut out = Vec::new();
            for doc in serde_norway::Deserializer::from_str(text) {
                let v: Value = serde::Deserialize::deserialize(doc).map_err(|e| bad(e.to_string()))?;
                out.extend(one_or_many(v));
            }
            Ok(out)
        }
        other => Err(bad(format!("unknown file type {other:?}: .json, .yaml, .yml or .toml"))),
    }
}

/// Whether `have` already has every field `want` gives.
pub fn covers(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (_, Value::Null) => have.is_null(),
        (Value::Object(h), Value::Object(w)) => {
            w.iter().all(|(k, wv)| h.get(k).map_or(wv.is_null(), |hv| covers(hv, wv)))
        }
        (Value::Array(h), Value::Array(w)) => h.len() == w.len() && h.iter().zip(w).all(|(a, b)| covers(a, b)),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => have == want,
    }
}

/// The merge patch taking `have` to what `want` says: the fields that differ.
pub fn patch(have: &Value, want: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    let (Some(h), Some(w)) = (have.as_object(), want.as_object()) else { return out };
    for (k, wv) in w {
        let hv = h.get(k).unwrap_or(&Value::Null);
        if covers(hv, wv) {
            continue;
        }
        match (hv, wv) {
            (Value::Object(_), Value::Object(_)) => {
                out.insert(k.clone(), Value::Object(patch(hv, wv)));
            }
            _ => {
                out.insert(k.clone(), wv.clone());
            }
        }
    }
    out
}

/// `patch` applied to `v` (RFC 7396).
pub fn merged(v: &Value, patch: &Value) -> Value {
    match (v, patch) {
        (Value::Object(base), Value::Object(p)) => {
            let mut out = base.clone();
            for (k, pv) in p {
                if pv.is_null() {
                    out.remove(k);
                } else {
                    let next = merged(out.get(k).unwrap_or(&Value::Null), pv);
                    out.insert(k.clone(), next);
                }
            }
            Value::Object(out)
        }
        (_, p) => p.clone(),
    }
}

/// What the plan does to one resource.
#[derive(Debug)]
enum Step {
    Create {
        first: Option<String>,
    },
    Update {
        version: i64,
        patch: Value,
        pending_by: Vec<String>,
    },
    /// A setting written (a new key, or another value): `PUT` with
    /// `If-Match` of the version seen (`v0`: none).
    Setting {
        scope: String,
        key: String,
        version: i64,
        body: Value,
        new: bool,
    },
    Unchanged,
}

struct Planned {
    want: Wanted,
    kind: KindInfo,
    step: Step,
    diff: String,
}

/// A setting of a cluster's scope comes once the cluster exists; the
/// others before what reads them.
fn rank(w: &Wanted) -> usize {
    let kind = match w.kind.as_str() {
        "setting" if w.spec["scope"].as_str().is_some_and(|s| s.starts_with("cluster:")) => "cluster-setting",
        k => k,
    };
    ORDER.iter().position(|k| *k == kind).unwrap_or(ORDER.len())
}

/// Orders resources: by kind, then so that what a resource names (a
/// leader cluster by `join`, services by `after`) comes before it.
fn order(mut wanted: Vec<Wanted>) -> Vec<Wanted> {
    wanted.sort_by_key(rank);
    let mut out: Vec<Wanted> = Vec::with_capacity(wanted.len());
    let mut left = wanted;
    while !left.is_empty() {
        let ready = left.iter().position(|w| {
            let needs: Vec<&str> = match w.kind.as_str() {
                "cluster" => w.spec["join"].as_str().into_iter().collect(),
                "service" => w.spec["after"].as_array().into_iter().flatten().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            needs.iter().all(|n| !left.iter().any(|o| o.kind == w.kind && o.name == *n))
        });
        // A cycle: the server will say so; keep the file's order.
        out.push(left.remove(ready.unwrap_or(0)));
    }
    out
}

fn unified(name: &str, from: &Value, to: &Value) -> String {
    let a = serde_json::to_string_pretty(from).unwrap_or_default() + "\n";
    let b = serde_json::to_string_pretty(to).unwrap_or_default() + "\n";
    similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(2)
        .header(&format!("{name} (installed)"), &format!("{name} (file)"))
        .to_string()
}

async fn plan_all(client: &Client, files: &[PathBuf]) -> Result<Vec<Planned>, CliError> {
    let wanted = order(read_files(files)?);
    if wanted.is_empty() {
        return Err(CliError::usage("the files hold no resources"));
    }
    let mut seen = BTreeMap::new();
    for w in &wanted {
        let scope = w.spec["scope"].as_str().filter(|_| w.kind == "setting").unwrap_or("").to_string();
        if let Some(first) = seen.insert((w.kind.clone(), scope, w.name.clone()), w.from.clone()) {
            return Err(CliError::usage(format!("{}: {} {} is also in {first}", w.from, w.kind, w.name)));
        }
    }
    let kinds = kinds(client).await?;
    let mut out = Vec::new();
    for w in wanted {
        if w.kind == "setting" {
            out.push(plan_setting(client, w).await?);
            continue;
        }
        let kind = find_kind(&kinds, &w.kind).map_err(|e| CliError::usage(format!("{}: {e}", w.from)))?.clone();
        let path = format!("/v1/{}/{}", kind.plural, encode(&w.name));
        let current = match client.send(Method::GET, &path, None, &[]).await {
            Ok(r) => Some(r.body),
            Err(CliError::Api { status: 404, .. }) => None,
            Err(e) => return Err(e),
        };
        let label = format!("{} {}", kind.name, w.name);
        let (step, diff) = match current {
            None => {
                let text = serde_json::to_string_pretty(&w.spec).unwrap_or_default();
                (Step::Create { first: kind.first_action.clone() }, text.lines().map(|l| format!("+{l}\n")).collect())
            }
            Some(cur) => {
                let p = patch(&cur["spec"], &w.spec);
                if p.is_empty() {
                    (Step::Unchanged, String::new())
                } else {
                    let patch = Value::Object(p);
                    let after = merged(&cur["spec"], &patch);
                    let version = cur["spec_version"].as_i64().unwrap_or(0);
                    let running = cur["applied_version"].as_i64().is_some();
                    let pending_by = match running {
                        true => {
                            let mut by: Vec<String> = cur["allowed_actions"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(Value::as_str)
                                .filter(|a| !matches!(*a, "destroy" | "stop" | "retry"))
                                .map(str::to_string)
                                .collect();
                            by.sort();
                            by
                        }
                        false => Vec::new(),
                    };
                    (Step::Update { version, patch, pending_by }, unified(&label, &cur["spec"], &after))
                }
            }
        };
        out.push(Planned { want: w, kind, step, diff });
    }
    Ok(out)
}

/// A setting in a file: `{kind: setting, name: KEY, spec: {scope, value |
/// value_env, secret}}` (`scope` `global` by default; `value_env` names an
/// environment variable of the CLI holding the value, so a secret need
/// not be in the file).
async fn plan_setting(client: &Client, w: Wanted) -> Result<Planned, CliError> {
    let bad = |m: &str| CliError::usage(format!("{}: setting {}: {m}", w.from, w.name));
    let spec = w.spec.as_object().cloned().unwrap_or_default();
    if let Some(k) = spec.keys().find(|k| !matches!(k.as_str(), "scope" | "value" | "value_env" | "secret")) {
        return Err(bad(&format!("unknown field {k:?} (scope, value or value_env, secret)")));
    }
    let scope = spec.get("scope").and_then(Value::as_str).unwrap_or("global").to_string();
    let secret = spec.get("secret").and_then(Value::as_bool).unwrap_or(false);
    let value = match (spec.get("value"), spec.get("value_env").and_then(Value::as_str)) {
        (Some(Value::String(v)), None) => v.clone(),
        (Some(v @ (Value::Number(_) | Value::Bool(_))), None) => v.to_string(),
        (None, Some(var)) => std::env::var(var).map_err(|_| bad(&format!("its value_env ${var} is not set")))?,
        _ => return Err(bad("needs a value (a string) or value_env (a variable's name), not both")),
    };
    let path = format!("/v1/settings/{}/{}", encode(&scope), encode(&w.name));
    let read = match client.send(Method::GET, &format!("{path}?reveal={secret}"), None, &[]).await {
        Err(CliError::Api { status: 403, .. }) if secret => client.send(Method::GET, &path, None, &[]).await,
        other => other,
    };
    let have = match read {
        Ok(r) => Some(r.body),
        Err(CliError::Api { status: 404, .. }) => None,
        Err(e) => return Err(e),
    };
    let live = have.as_ref().filter(|h| h["deleted"] != true);
    let version = have.as_ref().and_then(|h| h["version"].as_i64()).unwrap_or(0);
    let shown = |v: &str, secret: bool| if secret { "***".to_string() } else { format!("{v:?}") };
    let label = format!("{scope} {}", w.name);
    let (same, diff) = match live {
        None => (false, format!("+value {}{}\n", shown(&value, secret), if secret { " (secret)" } else { "" })),
        Some(h) => {
            let was_secret = h["secret"] == true;
            let old = h["value"].as_str();
            let same = was_secret == secret && old == Some(value.as_str());
            let before = match old {
                Some(v) => shown(v, was_secret),
                None => "*** (not readable without settings:reveal: written again)".to_string(),
            };
            (
                same,
                format!("-value {before}\n+value {}{}\n", shown(&value, secret), if secret { " (secret)" } else { "" }),
            )
        }
    };
    let kind =
        KindInfo { name: "setting".into(), plural: "settings".into(), actions: BTreeMap::new(), first_action: None };
    let want = Wanted { name: label, ..w };
    if same {
        return Ok(Planned { want, kind, step: Step::Unchanged, diff: String::new() });
    }
    let step = Step::Setting {
        scope,
        key: spec_key(&want),
        version,
        body: json!({"value": value, "secret": secret}),
        new: live.is_none(),
    };
    Ok(Planned { want, kind, step, diff })
}

/// A setting's key: what follows the scope in its label.
fn spec_key(w: &Wanted) -> String {
    w.name.rsplit(' ').next().unwrap_or(&w.name).to_string()
}

fn print_plan(plan: &[Planned]) -> (usize, usize, usize) {
    let (mut create, mut update, mut same) = (0, 0, 0);
    for p in plan {
        let label = format!("{} {}", p.kind.name, p.want.name);
        match &p.step {
            Step::Create { first } => {
                create += 1;
                match first {
                    Some(a) => println!("+ {label}: create, then {a} (waited for)"),
                    None => println!("+ {label}: create"),
                }
                print!("{}", indent(&p.diff));
            }
            Step::Update { version, pending_by, .. } => {
                update += 1;
                println!("~ {label}: update spec v{version} -> v{}", version + 1);
                print!("{}", indent(&p.diff));
                if !pending_by.is_empty() {
                    println!(
                        "    (it runs: the change stays pending until an action applies it; allowed now: {})",
                        pending_by.join(", ")
                    );
                }
            }
            Step::Setting { new, version, .. } => {
                match new {
                    true => {
                        create += 1;
                        println!("+ {label}: set");
                    }
                    false => {
                        update += 1;
                        println!("~ {label}: set, version {version} -> {}", version + 1);
                    }
                }
                print!("{}", indent(&p.diff));
            }
            Step::Unchanged => {
                same += 1;
                println!("= {label}: unchanged");
            }
        }
    }
    println!("Plan: {create} to create, {update} to update, {same} unchanged.");
    (create, update, same)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// `drover plan -f FILE…`: exit 0 when nothing would change, 2 when something would.
pub async fn plan(global: &Global, files: &[PathBuf]) -> Result<ExitCode, CliError> {
    let client = connect(global)?;
    let plan = plan_all(&client, files).await?;
    let (create, update, _) = print_plan(&plan);
    Ok(if create + update == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

/// `drover apply -f FILE…`.
pub async fn apply(global: &Global, files: &[PathBuf], yes: bool, reason: Option<&str>) -> Result<ExitCode, CliError> {
    let client = connect(global)?;
    let plan = plan_all(&client, files).await?;
    let (create, update, _) = print_plan(&plan);
    if create + update == 0 {
        println!("Nothing to do.");
        return Ok(ExitCode::SUCCESS);
    }
    if client.target.protected && reason.is_none_or(|r| r.trim().is_empty()) {
        return Err(CliError::usage(format!(
            "context {} is protected: apply needs --reason \"…\"",
            client.target.label
        )));
    }
    if !yes {
        let prompt = match client.target.protected {
            true => format!("context {} is protected: type its name to apply: ", client.target.label),
            false => "Apply? Type yes: ".to_string(),
        };
        eprint!("{prompt}");
        let mut line = String::new();
        let read = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line).map(|_| line)).await;
        let answer = match read {
            Ok(Ok(l)) => l.trim().to_string(),
            _ => String::new(),
        };
        let wanted = if client.target.protected { client.target.label.as_str() } else { "yes" };
        if answer != wanted {
            if !std::io::stdin().is_terminal() && answer.is_empty() {
                return Err(CliError::usage("not confirmed (no terminal: pass --yes): nothing was changed"));
            }
            return Err(CliError::usage("not confirmed: nothing was changed"));
        }
    }
    let apply_id = uuid::Uuid::new_v4();
    let mut done: Vec<String> = Vec::new();
    for p in &plan {
        let label = format!("{} {}", p.kind.name, p.want.name);
        let result = run_step(&client, p, apply_id, reason).await;
        match result {
            Ok(Some(what)) => {
                println!("{label}: {what}");
                done.push(format!("{label} ({what})"));
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("error: {label}: {e}");
                match done.is_empty() {
                    true => eprintln!("nothing was changed before it; the rest was not tried"),
                    false => eprintln!("done before it: {}; the rest was not tried", done.join("; ")),
                }
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    println!("Applied: {create} created, {update} updated.");
    Ok(ExitCode::SUCCESS)
}

async fn run_step(
    client: &Client,
    p: &Planned,
    apply_id: uuid::Uuid,
    reason: Option<&str>,
) -> Result<Option<String>, CliError> {
    let key = |what: &str| format!("drover-apply-{apply_id}-{}-{}-{what}", p.kind.name, p.want.name);
    let item = format!("/v1/{}/{}", p.kind.plural, encode(&p.want.name));
    match &p.step {
        Step::Unchanged => Ok(None),
        Step::Setting { scope, key, version, body, .. } => {
            let mut body = body.clone();
            if let Some(r) = reason {
                body["reason"] = json!(r);
            }
            let path = format!("/v1/settings/{}/{}", encode(scope), encode(key));
            match client.send(Method::PUT, &path, Some(&body), &[("if-match", format!("\"v{version}\""))]).await {
                Ok(r) => Ok(Some(format!("version {}", r.body["version"].as_i64().unwrap_or(version + 1)))),
                Err(CliError::Api { status: 412, .. }) => Err(CliError::usage(format!(
                    "it changed since the plan (the plan saw version {version}): nothing of it was written; run plan again"
                ))),
                Err(e) => Err(e),
            }
        }
        Step::Create { first } => {
            let mut body = json!({"name": p.want.name, "spec": p.want.spec});
            if let Some(r) = reason {
                body["reason"] = json!(r);
            }
            client
                .send(
                    Method::POST,
                    &format!("/v1/{}", p.kind.plural),
                    Some(&body),
                    &[("idempotency-key", key("resource"))],
                )
                .await?;
            let Some(action) = first else { return Ok(Some("created".into())) };
            let mut body = json!({"action": action});
            if let Some(r) = reason {
                body["reason"] = json!(r);
            }
            let run = client
                .send(
                    Method::POST,
                    &format!("{item}/transitions"),
                    Some(&body),
                    &[("idempotency-key", key(&format!("transition-{action}")))],
                )
                .await?
                .body;
            let id = run["id"].as_str().unwrap_or_default().to_string();
            let code = wait::follow(client, &id, true).await?;
            if code != ExitCode::SUCCESS {
                return Err(CliError::usage(format!("created, but its {action} ({id}) did not succeed")));
            }
            Ok(Some(format!("created, {action} succeeded")))
        }
        Step::Update { version, patch, .. } => {
            let mut body = json!({"spec": patch});
            if let Some(r) = reason {
                body["reason"] = json!(r);
            }
            let r = client.send(Method::PATCH, &item, Some(&body), &[("if-match", format!("\"v{version}\""))]).await;
            match r {
                Ok(r) => {
                    // What the server says is pending now, and which of the
                    // actions allowed now would apply each.
                    let allowed: Vec<&str> =
                        r.body["allowed_actions"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                    let pending: Vec<String> = r.body["pending_changes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| {
                            let by: Vec<&str> = c["applied_by"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(Value::as_str)
                                .filter(|a| allowed.contains(a))
                                .collect();
                            format!("{} (applied by {})", c["field"].as_str().unwrap_or("?"), by.join(" or "))
                        })
                        .collect();
                    Ok(Some(match pending.is_empty() {
                        true => format!("spec v{}", version + 1),
                        false => format!("spec v{}; pending: {}", version + 1, pending.join(", ")),
                    }))
                }
                Err(CliError::Api { status: 412, .. }) => Err(CliError::usage(format!(
                    "it changed since the plan (the plan saw spec v{version}): nothing of it was written; run plan again"
                ))),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_left_out_keep_their_value_null_removes() {
        let have = json!({"image": "web", "count": 2, "health_check": {"type": "http", "path": "/"},
            "frontends": [{"name": "a", "port": 1, "rules": []}]});
        assert!(covers(&have, &json!({"count": 2.0, "frontends": [{"name": "a", "port": 1}]})));
        let p = Value::Object(patch(&have, &json!({"count": 3, "health_check": {"path": "/x"}, "join": null})));
        assert_eq!(p, json!({"count": 3, "health_check": {"path": "/x"}}), "null is already absent");
        let p = Value::Object(patch(&have, &json!({"image": null})));
        assert_eq!(p, json!({"image": null}));
        assert_eq!(merged(&have, &p)["image"], Value::Null);
        assert!(merged(&have, &p).get("image").is_none());
    }

    #[test]
    fn files_hold_one_a_list_or_documents() {
        let dir = tempfile::tempdir().unwrap();
        let y = dir.path().join("a.yaml");
        std::fs::write(&y, "kind: image\nname: web\nspec: {build_command: x}\n---\n- {kind: cluster, name: c1, spec: {image: web, count: 1}}\n- {kind: cluster, name: w1, spec: {image: web, count: 1, join: c2}}\n").unwrap();
        let t = dir.path().join("b.toml");
        std::fs::write(&t, "[[resources]]\nkind = \"environment\"\nname = \"qa\"\n[resources.spec]\n\n[[resources]]\nkind = \"cluster\"\nname = \"c2\"\nspec = {image = \"web\", count = 1}\n").unwrap();
        let j = dir.path().join("c.json");
        std::fs::write(&j, r#"{"kind": "router", "name": "edge", "spec": {}}"#).unwrap();
        let all = order(read_files(&[y, t, j]).unwrap());
        let names: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["qa", "web", "c1", "c2", "w1", "edge"], "kinds in order, a leader before its worker group");
        let bad = dir.path().join("d.json");
        std::fs::write(&bad, r#"{"kind": "image", "name": "x", "spek": {}}"#).unwrap();
        let err = read_files(&[bad]).unwrap_err().to_string();
        assert!(err.contains("unknown field \"spek\""), "{err}");
    }
}
