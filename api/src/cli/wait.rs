//! Following a run until it ends: its events as they are written (a
//! long-poll of the event log), a spinner naming the current step and
//! the time so far on a terminal, the outcome as the exit code. Ctrl-C
//! asks whether to cancel the run or only stop watching.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::client::Client;
use super::{encode, show, CliError};

/// What Ctrl-C during `--wait` chose.
enum Interrupt {
    Cancel,
    StopWatching,
    KeepWatching,
}

async fn ask_on_interrupt() -> Interrupt {
    if !std::io::stdin().is_terminal() {
        return Interrupt::StopWatching;
    }
    tokio::task::spawn_blocking(|| {
        eprint!("\ncancel the run [c], stop watching (it runs on) [w], or keep watching [k]? ");
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_err() {
            return Interrupt::StopWatching;
        }
        match line.trim() {
            "c" | "cancel" => Interrupt::Cancel,
            "k" | "keep" | "" => Interrupt::KeepWatching,
            _ => Interrupt::StopWatching,
        }
    })
    .await
    .unwrap_or(Interrupt::StopWatching)
}

/// Follows transition `id` to its end. Exit 0 when it succeeded, 1 when it
/// failed (with the error), 3 when it was cancelled, 130 when the watcher
/// stopped watching.
pub async fn follow(client: &Client, id: &str, just_asked: bool) -> Result<ExitCode, CliError> {
    // Listening from the start: a Ctrl-C between two polls is kept for the next.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::usage(format!("cannot listen for Ctrl-C: {e}")))?;
    let run = client.get(&format!("/v1/transitions/{}", encode(id))).await?;
    let start = run["created_at"].as_str().and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok());
    let resource = format!(
        "{}/{}",
        run["resource"]["kind"].as_str().unwrap_or("?"),
        run["resource"]["name"].as_str().unwrap_or("?")
    );
    let title = format!("{} of {resource}", run["action"].as_str().unwrap_or("?"));
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").unwrap_or(ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!("{title}: {}", run["status"].as_str().unwrap_or("?")));
    // A hidden bar (no terminal) prints nothing: lines go to stdout then.
    let say = |line: String| match bar.is_hidden() {
        true => println!("{line}"),
        false => bar.println(line),
    };
    if just_asked {
        say(format!("transition {id}: {title}"));
    }
    let mut after = 0i64;
    let mut cancelled_by_me = false;
    loop {
        let path = format!("/v1/transitions/{}/events?after={after}&limit=1000&wait=20s", encode(id));
        let page = tokio::select! {
            page = client.get(&path) => page?,
            _ = interrupt.recv() => {
                bar.suspend(|| ());
                match ask_on_interrupt().await {
                    Interrupt::Cancel => {
                        client.post(&format!("/v1/transitions/{}/cancel", encode(id)), &json!({"reason": "cancelled from the CLI while watching"})).await?;
                        cancelled_by_me = true;
                        say("cancel asked: waiting for the run to stop".to_string());
                    }
                    Interrupt::StopWatching => {
                        bar.finish_and_clear();
                        eprintln!("stopped watching; the run goes on: drover events {id} --follow");
                        return Ok(ExitCode::from(130));
                    }
                    Interrupt::KeepWatching => {}
                }
                continue;
            }
        };
        let events = page["events"].as_array().cloned().unwrap_or_default();
        for e in &events {
            say(show::event(e, start));
            bar.set_message(format!("{title}: {}", e["step"].as_str().unwrap_or("")));
        }
        after = page["next_after"].as_i64().unwrap_or(after);
        let status = page["status"].as_str().unwrap_or("");
        if matches!(status, "succeeded" | "failed" | "cancelled") && events.is_empty() {
            break;
        }
    }
    bar.finish_and_clear();
    let run = client.get(&format!("/v1/transitions/{}", encode(id))).await?;
    let took = run["duration_ms"].as_i64().map(|ms| format!(" in {:.1}s", ms as f64 / 1000.0)).unwrap_or_default();
    match run["status"].as_str() {
        Some("succeeded") => {
            println!("{title} succeeded{took}");
            Ok(ExitCode::SUCCESS)
        }
        Some("cancelled") => {
            println!("{title} was cancelled{took}{}", if cancelled_by_me { " (as asked)" } else { "" });
            Ok(ExitCode::from(3))
        }
        _ => {
            let e = &run["error"];
            eprintln!(
                "{title} failed{took}: {} ({})",
                e["message"].as_str().unwrap_or("no error recorded"),
                e["code"].as_str().unwrap_or("?")
            );
            if let Some(summary) = failure_hint(&run) {
                eprintln!("{summary}");
            }
            Ok(ExitCode::from(1))
        }
    }
}

fn failure_hint(run: &Value) -> Option<String> {
    let state = run["failure_state"].as_str()?;
    let (kind, name) = (run["resource"]["kind"].as_str()?, run["resource"]["name"].as_str()?);
    Some(format!("{kind}/{name} is now {state}: see `drover describe {kind} {name}`"))
}
