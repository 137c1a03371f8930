//! The drover CLI: the same binary as the server, talking to one
//! installation (a *context*) over the HTTP API. It knows no kind, action
//! or parameter of its own: it reads them from the server's registry
//! (`GET /v1/kinds`), so a new kind is reachable the day it lands.
//!
//! Exit codes: 0 done; 1 an error, or a waited-for run that failed; 3 a
//! waited-for run that was cancelled; 130 stopped watching with Ctrl-C.

pub mod client;
pub mod config;
pub mod plan;
mod show;
mod wait;

use std::collections::BTreeMap;
use std::fmt;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use client::Client;
use config::{ConfigFile, Context};

/// What went wrong, said in one line.
#[derive(Debug)]
pub enum CliError {
    /// The command cannot be done as asked.
    Usage(String),
    /// The server said no: its problem+json, read.
    Api { status: u16, title: String, detail: Option<String>, fields: Vec<(String, String)> },
    /// The server could not be reached.
    Network { url: String, context: String, reason: String },
}

impl CliError {
    pub fn usage(msg: impl Into<String>) -> CliError {
        CliError::Usage(msg.into())
    }

    fn from_problem(status: reqwest::StatusCode, body: &Value) -> CliError {
        let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
        let fields = body["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| (e["field"].as_str().unwrap_or("?").to_string(), e["message"].as_str().unwrap_or("").to_string()))
            .collect();
        let title = text("title").unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
        let detail = text("detail").or_else(|| body.as_str().filter(|s| !s.trim().is_empty()).map(str::to_string));
        let mut detail = detail;
        if let Some(allowed) = body["allowed_actions"].as_array() {
            let list: Vec<&str> = allowed.iter().filter_map(Value::as_str).collect();
            let extra = format!("allowed now: {}", if list.is_empty() { "none".into() } else { list.join(", ") });
            detail = Some(detail.map_or(extra.clone(), |d| format!("{d} ({extra})")));
        }
        CliError::Api { status: status.as_u16(), title, detail, fields }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(m) => write!(f, "{m}"),
            CliError::Api { status, title, detail, fields } => {
                write!(f, "{title} ({status})")?;
                if let Some(d) = detail {
                    write!(f, ": {d}")?;
                }
                for (field, msg) in fields {
                    let said = format!("{field}: {msg}");
                    // The server's detail of a 422 says each field already.
                    if !detail.as_deref().is_some_and(|d| d.contains(&said)) {
                        write!(f, "; {said}")?;
                    }
                }
                Ok(())
            }
            CliError::Network { url, context, reason } => write!(f, "{url} (context {context}): {reason}"),
        }
    }
}

impl std::error::Error for CliError {}

/// Flags every client command takes.
#[derive(Args, Debug, Clone, Default)]
pub struct Global {
    /// The installation to talk to (default: $DROVER_CONTEXT, else
    /// $DROVER_URL, else the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Print each request's method, URL, status, time and request id on stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,
}

#[derive(Subcommand, Debug)]
pub enum ContextCommand {
    /// Add (or replace) a context.
    #[command(
        after_help = "Examples:\n  drover context add prod --url https://drover.example.com --token-file ~/.drover/prod.token --protected\n  drover context add dev --url http://127.0.0.1:7070 --token-env DROVER_DEV_TOKEN"
    )]
    Add {
        name: String,
        /// The installation's URL.
        #[arg(long)]
        url: String,
        /// A file holding the API token.
        #[arg(long, conflicts_with = "token_env")]
        token_file: Option<std::path::PathBuf>,
        /// An environment variable holding the API token.
        #[arg(long)]
        token_env: Option<String>,
        /// Every mutation needs --yes (or the context's name typed) and --reason.
        #[arg(long)]
        protected: bool,
    },
    /// Make a context the current one.
    #[command(after_help = "Example:\n  drover context use prod")]
    Use { name: String },
    /// List the contexts (the current one starred).
    #[command(after_help = "Example:\n  drover context list")]
    List,
    /// Print the current context's name.
    #[command(after_help = "Example:\n  drover context current")]
    Current,
    /// Forget a context (its token file stays).
    #[command(after_help = "Example:\n  drover context remove old-qa")]
    Remove { name: String },
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Wide,
    Json,
    Yaml,
}

/// What a mutation takes.
#[derive(Args, Debug, Clone, Default)]
pub struct Change {
    /// Why (recorded with the transition; protected contexts and
    /// environments need one).
    #[arg(long)]
    pub reason: Option<String>,
    /// Follow the run until it ends: exit 0 when it succeeds, 1 when it
    /// fails, 3 when it is cancelled.
    #[arg(long)]
    pub wait: bool,
    /// Confirm a mutation on a protected context.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Args, Debug)]
pub struct Do {
    /// `KIND/NAME`, e.g. `cluster/web-qa`.
    pub target: String,
    /// The action, e.g. `scale`.
    pub action: String,
    /// A parameter, `key=value`, typed by the action's schema (repeatable).
    #[arg(long = "param", short = 'p', value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    #[command(flatten)]
    pub change: Change,
}

#[derive(Args, Debug)]
pub struct Runs {
    /// Only this kind's transitions.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only this resource's (a name, with --kind; or an id).
    #[arg(long)]
    pub resource: Option<String>,
    #[arg(long)]
    pub action: Option<String>,
    /// queued, running, succeeded, failed or cancelled.
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long)]
    pub environment: Option<String>,
    #[arg(long)]
    pub actor: Option<String>,
    /// Asked for at or after (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Asked for before (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// Only the runs that retry or follow this one (an initialize's children).
    #[arg(long)]
    pub parent: Option<String>,
    /// At most this many (1-500).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Runs a context subcommand.
pub fn context(cmd: ContextCommand) -> Result<ExitCode, CliError> {
    let path = config::path()?;
    let mut file = ConfigFile::load(&path)?;
    match cmd {
        ContextCommand::Add { name, url, token_file, token_env, protected } => {
            if !crate::cli::valid_context_name(&name) {
                return Err(CliError::usage(format!("{name:?}: a context's name is letters, digits, - and _")));
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(CliError::usage(format!("--url {url:?}: an http:// or https:// URL")));
            }
            let token_file = match token_file {
                Some(f) => Some(
                    std::fs::canonicalize(&f)
                        .map_err(|e| CliError::usage(format!("--token-file {}: {e}", f.display())))?,
                ),
                None => None,
            };
            file.contexts.insert(name.clone(), Context { url, token_file, token_env, protected });
            if file.current.is_none() {
                file.current = Some(name.clone());
            }
            file.save(&path)?;
            println!("context {name} saved in {}", path.display());
        }
        ContextCommand::Use { name } => {
            if !file.contexts.contains_key(&name) {
                return Err(file.unknown(&name));
            }
            file.current = Some(name.clone());
            file.save(&path)?;
            println!("using context {name}");
        }
        ContextCommand::List => {
            let rows = file
                .contexts
                .iter()
                .map(|(n, c)| {
                    let token = match (&c.token_file, &c.token_env) {
                        (Some(f), _) => format!("file {}", f.display()),
                        (None, Some(v)) => format!("${v}"),
                        (None, None) => "$DROVER_TOKEN".into(),
                    };
                    let current = if file.current.as_deref() == Some(n) { "*" } else { "" };
                    vec![
                        current.into(),
                        n.clone(),
                        c.url.clone(),
                        token,
                        if c.protected { "yes".into() } else { "".into() },
                    ]
                })
                .collect();
            print!("{}", show::table(&["", "NAME", "URL", "TOKEN", "PROTECTED"], rows));
        }
        ContextCommand::Current => match &file.current {
            Some(c) => println!("{c}"),
            None => return Err(CliError::usage("no current context: `drover context use NAME`")),
        },
        ContextCommand::Remove { name } => {
            if file.contexts.remove(&name).is_none() {
                return Err(file.unknown(&name));
            }
            if file.current.as_deref() == Some(name.as_str()) {
                file.current = None;
            }
            file.save(&path)?;
            println!("context {name} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn valid_context_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The client for `global`'s installation.
pub fn connect(global: &Global) -> Result<Client, CliError> {
    let file = ConfigFile::load(&config::path()?)?;
    let target = config::resolve(&file, global.context.as_deref())?;
    Client::new(target, global.verbose)
}

/// A kind as the server declares it.
#[derive(Debug, Clone)]
pub struct KindInfo {
    pub name: String,
    pub plural: String,
    /// Each action's params schema (`None`: it takes none).
    pub actions: BTreeMap<String, Option<Value>>,
    /// What a new resource of the kind does first: the first action from
    /// its initial state that is not a destroy or a retry (`create`, an
    /// image's `build`), if any.
    pub first_action: Option<String>,
}

/// The server's kinds.
pub async fn kinds(client: &Client) -> Result<Vec<KindInfo>, CliError> {
    let list = client.get("/v1/kinds").await?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| KindInfo {
            name: k["name"].as_str().unwrap_or_default().to_string(),
            plural: k["plural"].as_str().unwrap_or_default().to_string(),
            actions: k["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    (
                        a["name"].as_str().unwrap_or_default().to_string(),
                        a.get("params").cloned().filter(|p| !p.is_null()),
                    )
                })
                .collect(),
            first_action: k["initial_state"].as_str().and_then(|init| {
                k["transitions"]
                    .as_array()?
                    .iter()
                    .filter(|t| t["from"] == init)
                    .filter_map(|t| t["action"].as_str())
                    .find(|a| !matches!(*a, "destroy" | "delete" | "retry"))
                    .map(str::to_string)
            }),
        })
        .collect())
}

/// The kind `word` names, singular or plural; or an error suggesting the
/// closest.
pub fn find_kind<'a>(kinds: &'a [KindInfo], word: &str) -> Result<&'a KindInfo, CliError> {
    let w = word.to_ascii_lowercase();
    if let Some(k) = kinds.iter().find(|k| k.name == w || k.plural == w) {
        return Ok(k);
    }
    let names: Vec<&str> = kinds.iter().map(|k| k.name.as_str()).collect();
    let hint = did_you_mean(kinds.iter().flat_map(|k| [k.name.as_str(), k.plural.as_str()]), &w);
    Err(CliError::usage(format!("no kind named {word:?}: {hint}(kinds: {})", names.join(", "))))
}

/// `did you mean X? ` for the candidate closest to `word`, when it is close
/// (at most 3 edits); else nothing.
fn did_you_mean<'a>(candidates: impl IntoIterator<Item = &'a str>, word: &str) -> String {
    match candidates.into_iter().min_by_key(|c| distance(c, word)) {
        Some(c) if distance(c, word) <= 3 => format!("did you mean {c}? "),
        _ => String::new(),
    }
}

/// Levenshtein distance, for suggestions.
pub fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Splits `KIND/NAME`.
pub fn split_target(target: &str) -> Result<(&str, &str), CliError> {
    match target.split_once('/') {
        Some((k, n)) if !k.is_empty() && !n.is_empty() => Ok((k, n)),
        _ => Err(CliError::usage(format!("{target:?}: expected KIND/NAME, e.g. cluster/web-qa"))),
    }
}

/// `key=value` pairs typed by the action's params schema, then checked
/// against it: a wrong parameter is refused before anything is sent.
pub fn typed_params(kind: &KindInfo, action: &str, pairs: &[String]) -> Result<Value, CliError> {
    let Some(schema) = kind.actions.get(action) else {
        let known: Vec<&str> = kind.actions.keys().map(String::as_str).collect();
        return Err(CliError::usage(format!(
            "{} has no action {action:?}: {}(actions: {})",
            kind.name,
            did_you_mean(known.iter().copied(), action),
            known.join(", ")
        )));
    };
    let mut params = Map::new();
    for pair in pairs {
        let Some((key, raw)) = pair.split_once('=') else {
            return Err(CliError::usage(format!("--param {pair:?}: expected KEY=VALUE")));
        };
        let Some(schema) = schema else {
            return Err(CliError::usage(format!("{} {action} takes no parameters", kind.name)));
        };
        let props = &schema["properties"];
        let Some(prop) = props.get(key) else {
            let known: Vec<&str> =
                props.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
            return Err(CliError::usage(format!(
                "{} {action} has no parameter {key:?} (parameters: {})",
                kind.name,
                known.join(", ")
            )));
        };
        params.insert(
            key.to_string(),
            coerce(prop, raw).map_err(|why| CliError::usage(format!("--param {key}: {why}")))?,
        );
    }
    let params = Value::Object(params);
    if let Some(schema) = schema {
        let validator = jsonschema::validator_for(schema)
            .map_err(|e| CliError::usage(format!("the server's schema of {} {action} is unusable: {e}", kind.name)))?;
        let errors: Vec<String> = validator
            .iter_errors(&params)
            .map(|e| {
                let at = e.instance_path().to_string();
                let field =
                    if at.is_empty() { "params".to_string() } else { format!("params{}", at.replace('/', ".")) };
                format!("{field}: {e}")
            })
            .collect();
        if !errors.is_empty() {
            return Err(CliError::usage(format!("{} {action}: {}", kind.name, errors.join("; "))));
        }
    }
    Ok(params)
}

/// A parameter's text as the JSON type its schema says.
pub(crate) fn coerce(prop: &Value, raw: &str) -> Result<Value, String> {
    let types: Vec<&str> = match &prop["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let has = |t: &str| types.contains(&t);
    if has("integer") {
        if let Ok(n) = raw.parse::<i64>() {
            return Ok(json!(n));
        }
        if !has("string") {
            return Err(format!("{raw:?} is not a whole number"));
        }
    }
    if has("number") {
        if let Ok(n) = raw.parse::<f64>() {
            return Ok(json!(n));
        }
        if !has("string") {
            return Err(format!("{raw:?} is not a number"));
        }
    }
    if has("boolean") {
        match raw {
            "true" => return Ok(json!(true)),
            "false" => return Ok(json!(false)),
            _ if !has("string") => return Err(format!("{raw:?} is not true or false")),
            _ => {}
        }
    }
    if has("string") {
        return Ok(json!(raw));
    }
    // Objects, arrays, or no type said: JSON, else the text as a string.
    Ok(serde_json::from_str(raw).unwrap_or_else(|_| json!(raw)))
}

/// A mutation on a protected context needs a reason and a confirmation.
pub fn confirm(client: &Client, change: &Change, what: &str) -> Result<(), CliError> {
    if !client.target.protected {
        return Ok(());
    }
    let name = &client.target.label;
    if change.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return Err(CliError::usage(format!("context {name} is protected: {what} needs --reason \"…\"")));
    }
    if change.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError::usage(format!(
            "context {name} is protected: {what} needs --yes (no terminal to confirm on)"
        )));
    }
    eprint!("context {name} is protected. {what}: type the context's name to confirm: ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| CliError::usage(format!("cannot read the confirmation: {e}")))?;
    if line.trim() != name {
        return Err(CliError::usage("not confirmed: nothing was sent"));
    }
    Ok(())
}

/// `drover get KIND [NAME]`.
pub async fn get(global: &Global, kind: &str, name: Option<&str>, output: Output) -> Result<ExitCode, CliError> {
    let client = connect(global)?;
    let kinds = kinds(&client).await?;
    let k = find_kind(&kinds, kind)?;
    match name {
        Some(n) => {
            let view = client.get(&format!("/v1/{}/{}", k.plural, encode(n))).await?;
            show::resources(&[view], output)?;
        }
        None => {
            let mut items = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let page = match &cursor {
                    Some(c) => client.get(&format!("/v1/{}?limit=500&cursor={c}", k.plural)).await?,
                    None => client.get(&format!("/v1/{}?limit=500", k.plural)).await?,
                };
                items.extend(page["items"].as_array().cloned().unwrap_or_default());
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => break,
                }
            }
            show::resources(&items, output)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover describe KIND NAME`: the server's 3 a.m. view.
pub async fn describe(global: &Global, kind: &str, name: &str) -> Result<ExitCode, CliError> {
    let client = connect(global)?;
    let kinds = kinds(&client).await?;
    let k = find_kind(&kinds, kind)?;
    print!("{}", client.get_text(&format!("/v1/{}/{}", k.plural, encode(name))).await?);
    Ok(ExitCode::SUCCESS)
}

/// Asks for `action` of `k`/`name` with checked `params`; with `--wait`
/// follows it.
async fn act(
    client: &Client,
    k: &KindInfo,
    name: &str,
    action: &str,
    params: Value,
    change: &Change,
) -> Result<ExitCode, CliError> {
    confirm(client, change, &format!("{action} of {}/{name}", k.name))?;
    let mut body = json!({"action": action, "params": params});
    if let Some(r) = &change.reason {
        body["reason"] = json!(r);
    }
    let run = client.post(&format!("/v1/{}/{}/transitions", k.plural, encode(name)), &body).await?;
    let id = run["id"].as_str().unwrap_or_default().to_string();
    if !change.wait {
        println!("transition {id}: {action} of {}/{name} is {}", k.name, run["status"].as_str().unwrap_or("?"));
        println!("follow it: drover events {id} --follow");
        return Ok(ExitCode::SUCCESS);
    }
    wait::follow(client, &id, true).await
}

/// `drover do KIND/NAME ACTION …` (and the short forms).
pub async fn do_action(global: &Global, d: &Do) -> Result<ExitCode, CliError> {
    let client = connect(global)?;
    let (kind, name) = split_target(&d.target)?;
    let kinds = kinds(&client).await?;
    let k = find_kind(&kinds, kind)?;
    let params = typed_params(k, &d.action, &d.params)?;
    act(&client, k, name, &d.action, params, &d.change).await
}

/// A short form: `target` is `KIND/NAME`, or a bare name of `default_kind`.
pub async fn short_form(
    global: &Global,
    target: &str,
    default_kind: Option<&str>,
    action: &str,
    pairs: &[String],
    change: &Change,
) -> Result<ExitCode, CliError> {
    let target = match (target.contains('/'), default_kind) {
        (false, Some(k)) => format!("{k}/{target}"),
        _ => target.to_string(),
    };
    let d = Do { target, action: action.to_string(), params: pairs.to_vec(), change: change.clone() };
    do_action(global, &d).await
}

/// `drover cancel RUN`.
pub async fn cancel(global: &Global, run: &str, change: &Change) -> Result<ExitCode, CliError> {
    let client = connect(global)?;
    confirm(&client, change, &format!("cancelling transition {run}"))?;
    let body = match &change.reason {
        Some(r) => json!({"reason": r}),
        None => json!({}),
    };
    let t = client.post(&format!("/v1/transitions/{}/cancel", encode(run)), &body).await?;
    println!("cancel of transition {run} asked: it is {}", t["status"].as_str().unwrap_or("?"));
    if change.wait {
        return wait::follow(&client, run, false).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover runs`.
pub async fn runs(global: &Global, r: &Runs) -> Result<ExitCode, CliError> {
    let client = connect(global)?;
    let mut query = vec![format!("limit={}", r.limit)];
    if let Some(k) = &r.kind {
        let kinds = kinds(&client).await?;
        query.push(format!("kind={}", find_kind(&kinds, k)?.name));
    }
    for (key, v) in [
        ("resource", &r.resource),
        ("action", &r.action),
        ("status", &r.status),
        ("environment", &r.environment),
        ("actor", &r.actor),
        ("since", &r.since),
        ("until", &r.until),
        ("parent", &r.parent),
    ] {
        if let Some(v) = v {
            query.push(format!("{key}={}", encode(v)));
        }
    }
    let path = format!("/v1/transitions?{}", query.join("&"));
    match r.output {
        Output::Table | Output::Wide => print!("{}", client.get_text(&path).await?),
        out => show::structured(&client.get(&path).await?["items"], out)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `drover events RUN [--follow]`.
pub async fn events(global: &Global, run: &str, follow: bool) -> Result<ExitCode, CliError> {
    let client = connect(global)?;
    if follow {
        return wait::follow(&client, run, false).await;
    }
    let page = client.get(&format!("/v1/transitions/{}/events?limit=1000", encode(run))).await?;
    for e in page["events"].as_array().into_iter().flatten() {
        println!("{}", show::event(e, None));
    }
    println!("status: {}", page["status"].as_str().unwrap_or("?"));
    Ok(ExitCode::SUCCESS)
}

/// `drover stats`.
pub async fn stats(global: &Global, group_by: &str, since: Option<&str>, output: Output) -> Result<ExitCode, CliError> {
    let client = connect(global)?;
    let mut path = format!("/v1/stats/transitions?group_by={}", encode(group_by));
    if let Some(s) = since {
        path.push_str(&format!("&since={}", encode(s)));
    }
    let body = client.get(&path).await?;
    match output {
        Output::Table | Output::Wide => print!("{}", show::stats(&body)),
        out => show::structured(&body, out)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes what goes in a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> KindInfo {
        KindInfo {
            name: "cluster".into(),
            plural: "clusters".into(),
            first_action: Some("create".into()),
            actions: BTreeMap::from([
                ("create".to_string(), None),
                (
                    "scale".to_string(),
                    Some(json!({"type": "object", "required": ["count"], "additionalProperties": false,
                        "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 64}}})),
                ),
            ]),
        }
    }

    #[test]
    fn kinds_are_found_by_either_name_or_suggested() {
        let kinds = vec![cluster()];
        assert_eq!(find_kind(&kinds, "Clusters").unwrap().name, "cluster");
        let err = find_kind(&kinds, "clustr").unwrap_err().to_string();
        assert!(err.contains("did you mean cluster"), "{err}");
        assert_eq!(distance("kitten", "sitting"), 3);
    }

    #[test]
    fn params_are_typed_and_checked_before_sending() {
        let k = cluster();
        assert_eq!(typed_params(&k, "scale", &["count=3".into()]).unwrap(), json!({"count": 3}));
        let err = typed_params(&k, "scale", &["count=three".into()]).unwrap_err().to_string();
        assert!(err.contains("not a whole number"), "{err}");
        let err = typed_params(&k, "scale", &["count=0".into()]).unwrap_err().to_string();
        assert!(err.contains("params.count"), "{err}");
        let err = typed_params(&k, "scale", &["n=1".into()]).unwrap_err().to_string();
        assert!(err.contains("no parameter \"n\"") && err.contains("count"), "{err}");
        let err = typed_params(&k, "scale", &[]).unwrap_err().to_string();
        assert!(err.contains("count"), "a required parameter: {err}");
        let err = typed_params(&k, "scael", &[]).unwrap_err().to_string();
        assert!(err.contains("did you mean scale"), "{err}");
        assert!(typed_params(&k, "create", &["x=1".into()]).is_err(), "create takes none");
    }

    #[test]
    fn problems_read_as_one_line_naming_the_field() {
        let body = json!({"type": "/problems/invalid-request", "title": "Invalid request", "status": 422,
            "detail": "the spec is invalid", "errors": [{"field": "spec.count", "message": "at least 1"}]});
        let e = CliError::from_problem(reqwest::StatusCode::UNPROCESSABLE_ENTITY, &body);
        assert_eq!(e.to_string(), "Invalid request (422): the spec is invalid; spec.count: at least 1");
        // A detail that says the fields already is not repeated.
        let body = json!({"title": "Invalid request", "detail": "reason: needed",
            "errors": [{"field": "reason", "message": "needed"}]});
        let e = CliError::from_problem(reqwest::StatusCode::UNPROCESSABLE_ENTITY, &body);
        assert_eq!(e.to_string(), "Invalid request (422): reason: needed");
    }
}
