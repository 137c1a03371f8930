//! The CLI against a real `drover serve` (SQLite, the local provider),
//! each command run as a user would: the binary, its stdout, stderr and
//! exit code, with its own config directory.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::{json, Value};

mod common;
use common::{get, post, serve, TOKEN};

/// A user of the CLI: a config directory of their own.
struct User {
    config: tempfile::TempDir,
    env: Vec<(String, String)>,
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl User {
    fn new() -> User {
        User { config: tempfile::tempdir().unwrap(), env: Vec::new() }
    }

    fn config_file(&self) -> PathBuf {
        self.config.path().join("drover").join("config.toml")
    }

    /// `drover ARGS` with this user's config and environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_drover"));
        cmd.args(args)
            .env("XDG_CONFIG_HOME", self.config.path())
            .env_remove("DROVER_CONTEXT")
            .env_remove("DROVER_URL")
            .env_remove("DROVER_TOKEN")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Started, its stdout and stderr piped; reads stdout until a line
    /// containing `until`.
    fn start_until(&self, args: &[&str], stdin: Stdio, until: &str) -> Child {
        let mut child = self.command(args).stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let mut seen = String::new();
        while !seen.contains(until) {
            assert!(lines.read_line(&mut seen).unwrap() > 0, "waiting for {until:?}: {seen}");
        }
        child
    }

    fn drover(&self, args: &[&str]) -> Ran {
        let Output { status, stdout, stderr } = self.command(args).output().expect("run drover");
        let ran = Ran {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        };
        eprintln!("$ drover {}\n{}{}[exit {}]", args.join(" "), ran.stdout, ran.stderr, ran.code);
        ran
    }

    /// Runs and expects exit 0.
    fn ok(&self, args: &[&str]) -> String {
        let r = self.drover(args);
        assert_eq!(r.code, 0, "drover {args:?} failed: {}{}", r.stdout, r.stderr);
        r.stdout
    }
}

fn token_file(dir: &Path) -> PathBuf {
    let f = dir.join("token");
    std::fs::write(&f, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    f
}

/// Replaces what changes from run to run: ids and times.
fn normalize(text: &str) -> String {
    let mut out = String::new();
    for word in text.split_inclusive(|c: char| c.is_whitespace()) {
        let w = word.trim_end();
        let tail = &word[w.len()..];
        let is_id = w.len() == 36 && w.chars().filter(|c| *c == '-').count() == 4;
        let is_time =
            w.len() >= 8 && w.chars().filter(|c| *c == ':').count() == 2 && w.starts_with(|c: char| c.is_ascii_digit());
        let is_date = w.len() == 10 && w.chars().filter(|c| *c == '-').count() == 2 && w.starts_with("20");
        match () {
            _ if is_id => out.push_str("<id>"),
            _ if is_time => out.push_str("<time>"),
            _ if is_date => out.push_str("<date>"),
            _ => out.push_str(w),
        }
        out.push_str(tail);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_acts_and_waits_through_a_context() {
    let server = serve();
    let user = User::new();
    let token = token_file(user.config.path());
    let token = token.to_str().unwrap();

    // Contexts: the file is the user's only, and names no token.
    let out = user.ok(&["context", "add", "local", "--url", &server.url, "--token-file", token]);
    assert!(out.starts_with("context local saved in "), "{out}");
    let mode = std::fs::metadata(user.config_file()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!std::fs::read_to_string(user.config_file()).unwrap().contains(TOKEN), "the token stays in its file");
    user.ok(&["context", "add", "prod", "--url", &server.url, "--token-file", token, "--protected"]);
    assert_eq!(user.ok(&["context", "current"]), "local\n", "the first context added is current");
    let list = user.ok(&["context", "list"]);
    let want = format!(
        "   NAME   URL{pad}TOKEN{tpad}PROTECTED\n*  local  {url}  file {token}\n   prod   {url}  file {token}  yes\n",
        url = server.url,
        pad = " ".repeat(server.url.len() - 1),
        tpad = " ".repeat(token.len() + 5 - 3),
    );
    assert_eq!(list, want);

    // Something to look at.
    post(
        &server,
        "/v1/images",
        json!({"name": "web", "spec": {"build_command": "echo hi > index.html",
        "start_command": "exec python3 -m http.server $PORT --bind 127.0.0.1"}}),
    )
    .await;
    post(&server, "/v1/clusters", json!({"name": "c1", "spec": {"image": "web", "count": 1}})).await;

    // do --wait: the events stream, exit 0 on success.
    let out = user.ok(&["do", "image/web", "build", "--wait", "--reason", "first build"]);
    assert!(out.starts_with("transition ") && out.contains(": build of image/web\n"), "{out}");
    assert!(out.contains("\nbuild of image/web succeeded in "), "{out}");
    let out = user.ok(&["do", "cluster/c1", "create", "--wait"]);
    assert!(out.contains("create of cluster/c1") && out.contains("succeeded"), "{out}");
    assert!(out.lines().any(|l| l.contains("started instance 0")), "the events are printed: {out}");

    // get and describe.
    let out = user.ok(&["get", "clusters"]);
    assert_eq!(normalize(&out), "NAME  STATE  UPDATED\nc1    up     <date> <time>\n");
    let one: Value = serde_json::from_str(&user.ok(&["get", "cluster", "c1", "-o", "json"])).unwrap();
    assert_eq!((one["name"].as_str(), one["state"].as_str()), (Some("c1"), Some("up")));
    let yaml = user.ok(&["get", "clusters", "c1", "-o", "yaml"]);
    assert!(yaml.lines().any(|l| l == "state: up"), "{yaml}");
    let wide = user.ok(&["get", "images", "-o", "wide"]);
    assert!(wide.starts_with("NAME  STATE  UPDATED") && wide.contains("PROVIDER") && wide.contains("local"), "{wide}");
    let out = user.ok(&["describe", "cluster", "c1"]);
    assert!(out.starts_with("cluster c1  (") && out.contains("state      up"), "{out}");
    // KIND/NAME, as `do` and the short forms take it, works here too.
    assert_eq!(user.ok(&["describe", "cluster/c1"]), out);
    let again: Value = serde_json::from_str(&user.ok(&["get", "cluster/c1", "-o", "json"])).unwrap();
    assert_eq!(again["name"], "c1");

    // Unknown names suggest; bad params are refused before anything is sent.
    let r = user.drover(&["get", "clustr"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("error: no kind named \"clustr\": did you mean cluster?"), "{}", r.stderr);
    let before = get(&server, "/v1/transitions?limit=500").await["items"].as_array().unwrap().len();
    for (args, says) in [
        (vec!["do", "cluster/c1", "scale", "-p", "count=three"], "--param count: \"three\" is not a whole number"),
        (
            vec!["do", "cluster/c1", "scale", "-p", "count=100"],
            "cluster scale: params.count: 100 is greater than the maximum of 64",
        ),
        (vec!["do", "cluster/c1", "scael"], "cluster has no action \"scael\": did you mean scale?"),
        (vec!["do", "cluster/c1", "scale", "-p", "n=1"], "cluster scale has no parameter \"n\""),
        (vec!["scale", "c1", "2"], "\"c1\": expected KIND/NAME"),
    ] {
        let r = user.drover(&args);
        assert_eq!(r.code, 1, "{args:?}");
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    // The server's refusals read as one line naming the field.
    let r = user.drover(&["do", "cluster/c1", "create"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("error: ") && r.stderr.contains("allowed now:") && r.stderr.lines().count() == 1,
        "{}",
        r.stderr
    );
    let after = get(&server, "/v1/transitions?limit=500").await["items"].as_array().unwrap().len();
    assert_eq!(before, after, "nothing was asked");

    // The short form, and the protected context's gates.
    let r = user.drover(&["--context", "prod", "scale", "cluster/c1", "2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("context prod is protected: scale of cluster/c1 needs --reason"), "{}", r.stderr);
    let r = user.drover(&["--context", "prod", "scale", "cluster/c1", "2", "--reason", "traffic"]);
    assert!(r.code == 1 && r.stderr.contains("needs --yes"), "{}", r.stderr);
    assert_eq!(get(&server, "/v1/clusters/c1").await["spec"]["count"], 1, "a refused mutation sends nothing");
    let out = user.ok(&["--context", "prod", "scale", "cluster/c1", "2", "--reason", "traffic", "--yes", "--wait"]);
    assert!(out.contains("scale of cluster/c1") && out.contains("succeeded"), "{out}");
    assert_eq!(get(&server, "/v1/clusters/c1").await["spec"]["count"], 2);

    // A job's run, by its short form.
    post(
        &server,
        "/v1/jobs",
        json!({"name": "hello", "spec": {"cluster": "c1", "command": "echo hello from $DROVER_MACHINE"}}),
    )
    .await;
    let out = user.ok(&["exec", "hello", "--wait"]);
    assert!(out.contains("run of job/hello") && out.contains("succeeded"), "{out}");

    // A failed run exits 1 with its error; a cancelled one 3.
    post(
        &server,
        "/v1/images",
        json!({"name": "bad", "spec": {"build_command": "echo broken >&2; exit 3", "start_command": "true"}}),
    )
    .await;
    let r = user.drover(&["do", "image/bad", "build", "--wait"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("build of image/bad") && r.stderr.contains("failed"), "{}", r.stderr);
    post(
        &server,
        "/v1/images",
        json!({"name": "slow", "spec": {"build_command": "sleep 60", "start_command": "true"}}),
    )
    .await;
    let out = user.ok(&["do", "image/slow", "build"]);
    let id = out.split_whitespace().nth(1).unwrap().trim_end_matches(':').to_string();
    assert!(out.contains(&format!("drover events {id} --follow")), "{out}");
    // Ctrl-C while following, with no terminal to ask on: stop watching
    // (130); the run goes on. Once it prints the run's events it is in its
    // loop, listening for Ctrl-C.
    let follow = user.start_until(&["events", &id, "--follow"], Stdio::null(), "running the build command");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(follow.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = follow.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains(&format!("stopped watching; the run goes on: drover events {id} --follow")), "{stderr}");
    assert_eq!(get(&server, &format!("/v1/transitions/{id}")).await["status"], "running");
    let r = user.drover(&["cancel", &id, "--wait"]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("was cancelled"), "{}", r.stdout);

    // The ledger.
    let out = user.ok(&["runs", "--kind", "clusters", "--resource", "c1"]);
    assert!(out.contains("scale") && out.contains("create"), "{out}");
    let runs: Value = serde_json::from_str(&user.ok(&["runs", "--status", "failed", "-o", "json"])).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    let out = user.ok(&["events", &id]);
    assert!(out.ends_with("status: cancelled\n"), "{out}");
    let out = user.ok(&["stats", "--group-by", "kind"]);
    assert!(out.starts_with("KIND") && out.contains("cluster"), "{out}");

    // Without a file: DROVER_URL and DROVER_TOKEN.
    let mut bare = User::new();
    bare.env = vec![("DROVER_URL".into(), server.url.clone()), ("DROVER_TOKEN".into(), TOKEN.into())];
    assert!(bare.ok(&["get", "images"]).contains("slow"));
    let none = User::new();
    let r = none.drover(&["get", "images"]);
    assert!(r.code == 1 && r.stderr.contains("no context: add one with `drover context add"), "{}", r.stderr);

    // A network error names the URL and the context.
    user.ok(&["context", "add", "gone", "--url", "http://127.0.0.1:9", "--token-file", token]);
    let r = user.drover(&["--context", "gone", "get", "clusters"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("http://127.0.0.1:9/v1/kinds (context gone): cannot connect"), "{}", r.stderr);

    // Completions.
    assert!(user.ok(&["completions", "bash"]).contains("_drover()"));
    user.ok(&["context", "remove", "gone"]);
    assert!(!user.ok(&["context", "list"]).contains("gone"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_apply_converge_and_never_overwrite_a_change_made_in_between() {
    let server = serve();
    let mut user = User::new();
    user.env = vec![("QA_DB_PASSWORD".into(), "hunter2-is-secret".into())];
    let token = token_file(user.config.path());
    user.ok(&["context", "add", "local", "--url", &server.url, "--token-file", token.to_str().unwrap()]);
    let file = user.config.path().join("qa.yaml");
    let write = |count: u32| {
        let text = format!(
            "kind: environment\nname: qa\nspec: {{}}\n---\n\
             kind: setting\nname: LOG_LEVEL\nspec: {{scope: \"environment:qa\", value: debug}}\n---\n\
             kind: setting\nname: DB_PASSWORD\nspec: {{value_env: QA_DB_PASSWORD, secret: true}}\n---\n\
             kind: cluster\nname: c1\nspec:\n  image: web\n  count: {count}\n  environment: qa\n---\n\
             kind: image\nname: web\nspec:\n  build_command: echo hi > index.html\n  start_command: exec python3 -m http.server $PORT --bind 127.0.0.1\n"
        );
        std::fs::write(&file, text).unwrap();
    };
    write(1);
    let f = file.to_str().unwrap();

    let r = user.drover(&["plan", "-f", f]);
    assert_eq!(r.code, 2, "changes to make: {}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().filter(|l| !l.starts_with("    ")).collect();
    assert_eq!(
        lines,
        [
            "+ environment qa: create",
            "+ setting environment:qa LOG_LEVEL: set",
            "+ setting global DB_PASSWORD: set",
            "+ image web: create, then build (waited for)",
            "+ cluster c1: create, then create (waited for)",
            "Plan: 5 to create, 0 to update, 0 unchanged."
        ],
        "in dependency order: {}",
        r.stdout
    );
    assert!(r.stdout.contains("    +  \"count\": 1,"), "{}", r.stdout);
    assert!(r.stdout.contains("    +value *** (secret)"), "{}", r.stdout);
    assert!(!r.stdout.contains("hunter2"), "a secret is never shown: {}", r.stdout);
    assert_eq!(get(&server, "/v1/clusters?limit=10").await["items"], json!([]), "a plan changes nothing");

    let r = user.drover(&["apply", "-f", f]);
    assert_eq!(r.code, 1, "no terminal, no --yes: {}", r.stderr);
    assert!(r.stderr.contains("not confirmed (no terminal: pass --yes): nothing was changed"), "{}", r.stderr);

    let out = user.ok(&["apply", "-f", f, "--yes", "--reason", "qa from a file"]);
    assert!(out.contains("cluster c1: created, create succeeded"), "{out}");
    assert!(out.ends_with("Applied: 5 created, 0 updated.\n"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    let level = get(&server, "/v1/settings/environment:qa/LOG_LEVEL").await;
    assert_eq!(level["value"], "debug");
    let password = get(&server, "/v1/settings/global/DB_PASSWORD?reveal=true").await;
    assert_eq!((password["value"].as_str(), password["secret"].as_bool()), (Some("hunter2-is-secret"), Some(true)));
    let c1 = get(&server, "/v1/clusters/c1").await;
    assert_eq!(c1["state"], "up");
    let versions = get(&server, "/v1/clusters/c1/versions").await;
    assert!(versions.to_string().contains("qa from a file"), "the reason is recorded: {versions}");
    let r = user.drover(&["plan", "-f", f]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(
        r.stdout.ends_with("Plan: 0 to create, 0 to update, 5 unchanged.\n"),
        "defaults the server filled are no change: {}",
        r.stdout
    );

    // An update shows its diff and what would apply it.
    write(2);
    let r = user.drover(&["plan", "-f", f]);
    assert_eq!(r.code, 2);
    assert!(r.stdout.contains("~ cluster c1: update spec v1 -> v2"), "{}", r.stdout);
    assert!(r.stdout.contains("    -  \"count\": 1,\n    +  \"count\": 2,"), "{}", r.stdout);
    assert!(
        r.stdout.contains("the change stays pending until an action applies it; allowed now: ")
            && r.stdout.contains("scale"),
        "{}",
        r.stdout
    );

    // A change made between the plan and the confirmation fails the apply.
    let mut child = user.start_until(&["apply", "-f", f], Stdio::piped(), "Plan: ");
    let r = reqwest::Client::new()
        .patch(format!("{}/v1/clusters/c1", server.url))
        .bearer_auth(TOKEN)
        .json(&json!({"spec": {"count": 3}, "reason": "someone else"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"yes\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: cluster c1: it changed since the plan (the plan saw spec v1): nothing of it was written; run plan again"),
        "{stderr}"
    );
    assert_eq!(get(&server, "/v1/clusters/c1").await["spec"]["count"], 3, "the change made in between stands");

    // Planned again, it applies; on a running cluster the change is pending.
    let out = user.ok(&["apply", "-f", f, "--yes"]);
    assert!(out.contains("cluster c1: spec v3; pending: spec.count (applied by scale or add-instances)"), "{out}");
    assert_eq!(get(&server, "/v1/clusters/c1").await["spec"]["count"], 2);
}
