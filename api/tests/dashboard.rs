//! The dashboard in a real browser: headless Chromium driven over
//! WebDriver (chromedriver) against a real `drover serve`. Needs Debian's
//! `chromium` and `chromium-driver` (`.ci/run` installs them); without them
//! the test fails, it does not skip. `DROVER_CHROMEDRIVER` and
//! `DROVER_CHROMIUM` point at other binaries.
//!
//! Screenshots at phone and desktop size go to
//! `target/tmp/dashboard-screenshots/` (the path is printed).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

mod common;
use common::{get, post, put, serve, Server, TOKEN};

const PHONE: (u32, u32) = (390, 844);
const DESKTOP: (u32, u32) = (1280, 900);

struct Driver {
    child: Child,
    url: String,
    profiles: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(var: &str, default: &str) -> PathBuf {
    let path = std::env::var(var).unwrap_or_else(|_| default.to_string());
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "{} is missing: install Debian's chromium and chromium-driver (.ci/run does), or set {var}",
        path.display()
    );
    path
}

/// chromedriver on a free loopback port, ready for sessions.
async fn driver() -> Driver {
    let binary = which("DROVER_CHROMEDRIVER", "/usr/bin/chromedriver");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(binary)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while reqwest::get(format!("{url}/status")).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Driver { child, url, profiles: tempfile::tempdir().unwrap() }
}

/// A new browser: its own profile, so its own cookies.
async fn browser(d: &Driver, (w, h): (u32, u32)) -> Client {
    let profile = tempfile::tempdir_in(d.profiles.path()).unwrap().keep();
    let chromium = which("DROVER_CHROMIUM", "/usr/bin/chromium");
    // WebDriver speaks plain HTTP on loopback: no TLS.
    let caps = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", format!("--window-size={w},{h}"),
                format!("--user-data-dir={}", profile.display())]
        }
    });
    let caps = caps.as_object().unwrap().clone().into_iter().collect();
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&d.url)
        .await
        .expect("a Chromium session");
    c.set_window_size(w, h).await.unwrap();
    c
}

/// Polls `check` until it says yes.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).text().await.unwrap()
}

/// The element's text, if it is there now: the run's page reloads itself
/// when the run ends, so an element found may be gone a moment later.
async fn read(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn exists(c: &Client, css: &str) -> bool {
    !c.find_all(Locator::Css(css)).await.unwrap().is_empty()
}

fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = shots().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
}

async fn sign_in(c: &Client, server: &Server, token: &str) {
    c.goto(&format!("{}/ui/", server.url)).await.unwrap();
    assert!(
        c.current_url().await.unwrap().path().starts_with("/ui/sign-in"),
        "signed out, the dashboard asks to sign in"
    );
    c.find(Locator::Css("#token")).await.unwrap().send_keys(token).await.unwrap();
    c.find(Locator::Css("form button[type=submit]")).await.unwrap().click().await.unwrap();
    until("the overview", || async { c.current_url().await.unwrap().path() == "/ui/" }).await;
}

/// A local image and a two-machine cluster of it in `prod`, up.
async fn cluster_up(server: &Server) {
    post(server, "/v1/environments", json!({"name": "prod", "spec": {}})).await;
    post(
        server,
        "/v1/images",
        json!({"name": "web", "spec": {"build_command": "echo hello > index.html",
            "start_command": "exec python3 -m http.server $PORT --bind 127.0.0.1"}}),
    )
    .await;
    let build = post(server, "/v1/images/web/transitions", json!({"action": "build"})).await;
    wait_run(server, build["id"].as_str().unwrap()).await;
    post(server, "/v1/clusters", json!({"name": "c1", "spec": {"environment": "prod", "image": "web", "count": 2}}))
        .await;
    let create = post(server, "/v1/clusters/c1/transitions", json!({"action": "create", "reason": "first"})).await;
    assert_eq!(wait_run(server, create["id"].as_str().unwrap()).await["status"], "succeeded");
}

async fn wait_run(server: &Server, id: &str) -> Value {
    loop {
        let t = get(server, &format!("/v1/transitions/{id}?wait=30s")).await;
        if !matches!(t["status"].as_str(), Some("queued" | "running")) {
            return t;
        }
    }
}

/// A user with only the built-in viewer role, and a token of theirs.
async fn viewer(server: &Server) -> String {
    post(server, "/v1/users", json!({"name": "vera", "spec": {"roles": ["viewer"]}})).await;
    let t = post(server, "/v1/users/vera/tokens", json!({"name": "phone"})).await;
    t["secret"].as_str().unwrap().to_string()
}

/// The browser's session cookie, for requests made beside it.
async fn session_cookie(c: &Client) -> String {
    let cookie = c.get_named_cookie("drover_session").await.expect("a session cookie");
    format!("drover_session={}", cookie.value())
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let server = serve();
    cluster_up(&server).await;
    let vera = viewer(&server).await;
    let d = driver().await;

    // ---- On a phone: sign in, see the cluster, scale it with a reason.
    let phone = browser(&d, PHONE).await;
    sign_in(&phone, &server, TOKEN).await;
    let width: i64 = phone.execute("return window.innerWidth", vec![]).await.unwrap().as_i64().unwrap();
    assert!(width <= 420, "a phone-sized window: {width}");
    assert_eq!(text(&phone, "#attention h1").await, "All quiet");
    let cluster = phone.find(Locator::LinkText("cluster c1")).await.expect("the cluster on the overview");
    screenshot(&phone, "phone-overview").await;
    cluster.click().await.unwrap();
    until("the cluster's page", || async { phone.current_url().await.unwrap().path() == "/ui/clusters/c1" }).await;
    assert_eq!(text(&phone, "#state").await, "up");
    // Tables are cards on a phone, and buttons are big enough to press.
    let thead: String = phone
        .execute("return getComputedStyle(document.querySelector('table.cards thead')).display", vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(thead, "none", "no table header on a phone");
    let button_height = phone
        .execute("return document.querySelector('#action-scale summary').getBoundingClientRect().height", vec![])
        .await
        .unwrap()
        .as_f64()
        .unwrap();
    assert!(button_height >= 44.0, "a button a thumb can press: {button_height}px");
    screenshot(&phone, "phone-cluster").await;
    phone.find(Locator::Css("#action-scale summary")).await.unwrap().click().await.unwrap();
    phone.find(Locator::Css("#scale-count")).await.unwrap().send_keys("3").await.unwrap();
    phone.find(Locator::Css("#scale-reason")).await.unwrap().send_keys("evening traffic").await.unwrap();
    phone.find(Locator::Css("#action-scale button[type=submit]")).await.unwrap().click().await.unwrap();
    // The confirmation says what will happen; nothing ran yet.
    until("the confirmation", || async { exists(&phone, "#confirm").await }).await;
    assert_eq!(text(&phone, "#confirm h1").await, "scale cluster c1?");
    let runs = get(&server, "/v1/transitions?kind=cluster&action=scale").await;
    assert_eq!(runs["items"].as_array().unwrap().len(), 0, "not before the confirmation");
    screenshot(&phone, "phone-confirm").await;
    phone.find(Locator::Css("#confirm-button")).await.unwrap().click().await.unwrap();
    // The run's page follows it live until it ends.
    until("the run's page", || async { phone.current_url().await.unwrap().path().starts_with("/ui/runs/") }).await;
    let run_id = phone.current_url().await.unwrap().path().trim_start_matches("/ui/runs/").to_string();
    until("the scale to succeed on the page", || async {
        read(&phone, "#status").await.as_deref() == Some("succeeded")
    })
    .await;
    let steps = text(&phone, "#events").await;
    assert!(steps.contains("3 instance(s) healthy"), "the steps are on the page: {steps}");
    screenshot(&phone, "phone-run").await;
    // Recorded as the API records any change: who, why, what.
    let t = get(&server, &format!("/v1/transitions/{run_id}")).await;
    assert_eq!((t["action"].as_str(), t["status"].as_str()), (Some("scale"), Some("succeeded")));
    assert_eq!(t["actor"], "admin");
    assert_eq!(t["reason"], "evening traffic");
    assert_eq!(t["params"], json!({"count": 3}));
    assert_eq!(get(&server, "/v1/clusters/c1").await["spec"]["count"], 3);

    // ---- A POST without the CSRF token is refused, and nothing runs.
    let cookie = session_cookie(&phone).await;
    let r = no_redirects()
        .post(format!("{}/ui/clusters/c1/actions/scale", server.url))
        .header("cookie", &cookie)
        .form(&[("param.count", "5"), ("confirm", "yes"), ("reason", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("security token"));
    let runs = get(&server, "/v1/transitions?kind=cluster&action=scale").await;
    assert_eq!(runs["items"].as_array().unwrap().len(), 1, "the forged scale did not run");

    // ---- On a desktop: cancel a run live.
    let desk = browser(&d, DESKTOP).await;
    sign_in(&desk, &server, TOKEN).await;
    post(
        &server,
        "/v1/images",
        json!({"name": "slow", "spec": {"build_command": "sleep 120", "start_command": "exec sleep 1000"}}),
    )
    .await;
    let build = post(&server, "/v1/images/slow/transitions", json!({"action": "build", "reason": "try"})).await;
    let id = build["id"].as_str().unwrap().to_string();
    desk.goto(&format!("{}/ui/runs/{id}", server.url)).await.unwrap();
    until("the build to run", || async {
        desk.refresh().await.unwrap();
        read(&desk, "#status").await.as_deref() == Some("running")
    })
    .await;
    screenshot(&desk, "desktop-run").await;
    desk.find(Locator::Css("#cancel-reason")).await.unwrap().send_keys("wrong script").await.unwrap();
    desk.find(Locator::Css("#cancel-button")).await.unwrap().click().await.unwrap();
    until("the cancel to show", || async { read(&desk, "#status").await.as_deref() == Some("cancelled") }).await;
    let t = get(&server, &format!("/v1/transitions/{id}")).await;
    assert_eq!(t["status"], "cancelled");
    assert_eq!(t["cancel_requested_by"], "admin");

    // ---- Something broke: the overview says so, why, and links the run.
    post(
        &server,
        "/v1/images",
        json!({"name": "broken", "spec": {"build_command": "echo no compiler >&2; exit 3",
        "start_command": "exec sleep 1000"}}),
    )
    .await;
    let build = post(&server, "/v1/images/broken/transitions", json!({"action": "build"})).await;
    assert_eq!(wait_run(&server, build["id"].as_str().unwrap()).await["status"], "failed");
    desk.goto(&format!("{}/ui/", server.url)).await.unwrap();
    // The build cancelled above left its image failed too.
    assert_eq!(text(&desk, "#attention h1").await, "2 need a look");
    let wrong = text(&desk, "#attention").await;
    assert!(wrong.contains("image broken") && wrong.contains("build failed"), "{wrong}");
    assert!(wrong.contains("image slow") && wrong.contains("cancel"), "{wrong}");
    let failed = text(&desk, "#failures").await;
    assert!(failed.contains("image broken") && failed.contains("build"), "{failed}");
    screenshot(&desk, "desktop-overview-failed").await;
    phone.goto(&format!("{}/ui/", server.url)).await.unwrap();
    screenshot(&phone, "phone-overview-failed").await;

    // ---- History: the ledger's filters; the cancelled build is found.
    desk.goto(&format!("{}/ui/history", server.url)).await.unwrap();
    desk.find(Locator::Css("#filter-box summary")).await.unwrap().click().await.unwrap();
    desk.find(Locator::Css("#f-status")).await.unwrap().select_by_value("cancelled").await.unwrap();
    desk.find(Locator::Css("#filters button[type=submit]")).await.unwrap().click().await.unwrap();
    until("the filtered history", || async {
        desk.current_url().await.unwrap().query().is_some_and(|q| q.contains("status=cancelled"))
    })
    .await;
    let found = text(&desk, "#history").await;
    assert!(found.contains("image slow") && found.contains("cancelled"), "{found}");
    assert!(!found.contains("cluster c1"), "only cancelled runs: {found}");
    screenshot(&desk, "desktop-history").await;

    // ---- Stats: durations and failure rate drawn on the server.
    desk.goto(&format!("{}/ui/stats?days=1&action=", server.url)).await.unwrap();
    assert!(exists(&desk, "#durations svg path.series").await, "a duration line");
    assert!(exists(&desk, "#failures svg rect.bar").await, "failure-rate bars");
    screenshot(&desk, "desktop-stats").await;
    phone.goto(&format!("{}/ui/stats?days=1&action=", server.url)).await.unwrap();
    screenshot(&phone, "phone-stats").await;

    // ---- Settings: secrets masked; a rollback is a new version, recorded.
    for (key, body) in [
        ("DB_URL", json!({"value": "postgres://db-1/app"})),
        ("DB_URL", json!({"value": "postgres://db-2/app", "reason": "new database"})),
        ("DB_PASSWORD", json!({"value": "hunter2-in-the-page", "secret": true})),
    ] {
        put(&server, &format!("/v1/settings/global/{key}"), body).await;
    }
    desk.goto(&format!("{}/ui/settings", server.url)).await.unwrap();
    assert!(!desk.source().await.unwrap().contains("hunter2-in-the-page"), "a secret never reaches the page");
    let global = text(&desk, "#scope-global").await;
    assert!(global.contains("••••••") && global.contains("postgres://db-2/app"), "{global}");
    desk.goto(&format!("{}/ui/settings/global/DB_URL", server.url)).await.unwrap();
    assert!(text(&desk, "#diff").await.contains("postgres://db-1/app"));
    desk.find(Locator::Css("#v1 input[name=reason]")).await.unwrap().send_keys("db-2 is not ready").await.unwrap();
    desk.find(Locator::Css("#v1 button")).await.unwrap().click().await.unwrap();
    until("version 3", || async { exists(&desk, "#v3").await }).await;
    screenshot(&desk, "desktop-setting").await;
    let now = get(&server, "/v1/settings/global/DB_URL").await;
    assert_eq!((now["version"].as_i64(), now["value"].as_str()), (Some(3), Some("postgres://db-1/app")));
    assert_eq!((now["actor"].as_str(), now["reason"].as_str()), (Some("admin"), Some("db-2 is not ready")));

    desk.goto(&format!("{}/ui/", server.url)).await.unwrap();
    screenshot(&desk, "desktop-overview").await;
    // The cluster's drift, as its last refresh found it.
    let refresh = post(&server, "/v1/clusters/c1/transitions", json!({"action": "refresh"})).await;
    assert_eq!(wait_run(&server, refresh["id"].as_str().unwrap()).await["status"], "succeeded");
    desk.goto(&format!("{}/ui/clusters/c1", server.url)).await.unwrap();
    let summary = text(&desk, "#summary").await;
    assert!(summary.contains("in sync"), "{summary}");
    screenshot(&desk, "desktop-cluster").await;
    // An instance killed behind drover's back: once a refresh finds it,
    // the overview says so.
    let pid = get(&server, "/v1/clusters/c1").await["outputs"]["instances"][0]["pid"].as_i64().unwrap();
    assert!(std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status().unwrap().success());
    let refresh = post(&server, "/v1/clusters/c1/transitions", json!({"action": "refresh"})).await;
    assert_eq!(wait_run(&server, refresh["id"].as_str().unwrap()).await["status"], "succeeded");
    desk.goto(&format!("{}/ui/", server.url)).await.unwrap();
    assert_eq!(text(&desk, "#attention h1").await, "3 need a look");
    let wrong = text(&desk, "#attention").await;
    assert!(wrong.contains("cluster c1") && wrong.contains("instances[0].process"), "{wrong}");

    // ---- A viewer sees no action buttons, and the POST is refused anyway.
    let v = browser(&d, PHONE).await;
    sign_in(&v, &server, &vera).await;
    v.goto(&format!("{}/ui/clusters/c1", server.url)).await.unwrap();
    assert_eq!(text(&v, "#state").await, "up");
    assert!(!exists(&v, "#actions").await, "a viewer has no actions");
    assert!(!exists(&v, "details.action").await);
    v.goto(&format!("{}/ui/runs/{run_id}", server.url)).await.unwrap();
    assert!(!exists(&v, "#cancel").await);
    v.goto(&format!("{}/ui/settings/global/DB_URL", server.url)).await.unwrap();
    assert!(exists(&v, "#versions").await && !exists(&v, "form.rollback").await, "a viewer cannot roll back");
    let csrf = v.find(Locator::Css("nav input[name=csrf]")).await.unwrap().attr("value").await.unwrap().unwrap();
    let cookie = session_cookie(&v).await;
    let r = no_redirects()
        .post(format!("{}/ui/clusters/c1/actions/scale", server.url))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str()), ("param.count", "1"), ("confirm", "yes")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "the viewer's own token, but not their permission");
    assert!(r.text().await.unwrap().contains("cluster:scale"));
    assert_eq!(get(&server, "/v1/transitions?kind=cluster&action=scale").await["items"].as_array().unwrap().len(), 1);

    // ---- Signing out ends the session: the cookie no longer works.
    v.find(Locator::Css("nav button")).await.unwrap().click().await.unwrap();
    until("the sign-in page", || async { v.current_url().await.unwrap().path() == "/ui/sign-in" }).await;
    let r = no_redirects().get(format!("{}/ui/", server.url)).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["location"].to_str().unwrap().starts_with("/ui/sign-in"));

    for c in [phone, desk, v] {
        c.close().await.unwrap();
    }
}
