//! How the CLI prints: aligned tables (no colour, so nothing to turn off
//! for NO_COLOR or a pipe), JSON or YAML.

use serde_json::Value;

use super::{CliError, Output};
use crate::text::{s, time};

/// The server's text tables (comfy-table, no borders): the CLI's read the same.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    crate::text::table(header, rows)
}

/// JSON or YAML of any answer.
pub fn structured(v: &Value, output: Output) -> Result<(), CliError> {
    match output {
        Output::Yaml => {
            let text = serde_norway::to_string(v).map_err(|e| CliError::usage(format!("cannot write YAML: {e}")))?;
            print!("{text}");
        }
        _ => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
    Ok(())
}

/// Resources as a table (`wide`: with ids and where they run), JSON or YAML.
pub fn resources(items: &[Value], output: Output) -> Result<(), CliError> {
    match output {
        Output::Json | Output::Yaml => {
            let v = match items {
                [one] => one.clone(),
                many => Value::Array(many.to_vec()),
            };
            structured(&v, output)
        }
        Output::Table | Output::Wide => {
            let wide = output == Output::Wide;
            let mut header = vec!["NAME", "STATE", "UPDATED"];
            if wide {
                header.extend(["PROVIDER", "ENVIRONMENT", "ID"]);
            }
            let rows = items
                .iter()
                .map(|r| {
                    let mut row = vec![s(&r["name"]), s(&r["state"]), time(&r["updated_at"])];
                    if wide {
                        row.push(r["spec"]["provider"].as_str().unwrap_or("-").to_string());
                        row.push(r["spec"]["environment"].as_str().unwrap_or("-").to_string());
                        row.push(s(&r["id"]));
                    }
                    row
                })
                .collect();
            print!("{}", table(&header, rows));
            Ok(())
        }
    }
}

/// One event line: time (or seconds since `start`), level, step, message.
pub fn event(e: &Value, start: Option<chrono::DateTime<chrono::Utc>>) -> String {
    let at = e["at"].as_str().and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok());
    let when = match (at, start) {
        (Some(at), Some(start)) => format!("{:>7.1}s", (at - start).num_milliseconds().max(0) as f64 / 1000.0),
        (Some(at), None) => at.format("%H:%M:%S%.3f").to_string(),
        _ => "-".into(),
    };
    let level = match e["level"].as_str() {
        Some("info") | None => String::new(),
        Some(l) => format!("{} ", l.to_uppercase()),
    };
    format!("{when}  {:<10} {level}{}", s(&e["step"]), s(&e["message"]))
}

fn ms(v: &Value) -> String {
    match v.as_f64() {
        Some(ms) if ms >= 60_000.0 => format!("{:.1}m", ms / 60_000.0),
        Some(ms) if ms >= 1000.0 => format!("{:.1}s", ms / 1000.0),
        Some(ms) => format!("{ms:.0}ms"),
        None => "-".into(),
    }
}

/// Transition statistics, a row per group.
pub fn stats(body: &Value) -> String {
    let dims: Vec<String> =
        body["group_by"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_uppercase).collect();
    let mut header: Vec<&str> = dims.iter().map(String::as_str).collect();
    header.extend(["RUNS", "FAILED", "FAILURE", "P50", "P95", "MAX"]);
    let rows = body["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            let mut row: Vec<String> = body["group_by"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| s(&g["key"][d.as_str().unwrap_or("")]))
                .collect();
            row.push(s(&g["total"]));
            row.push(s(&g["failed"]));
            row.push(g["failure_rate"].as_f64().map(|r| format!("{:.1}%", r * 100.0)).unwrap_or("-".into()));
            row.push(ms(&g["p50_ms"]));
            row.push(ms(&g["p95_ms"]));
            row.push(ms(&g["max_ms"]));
            row
        })
        .collect();
    table(&header, rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_say_when_since_the_start() {
        let start: chrono::DateTime<chrono::Utc> = "2026-12-04T10:00:00Z".parse().unwrap();
        let e = json!({"at": "2026-12-04T10:00:02.500Z", "level": "warn", "step": "health", "message": "slow"});
        assert_eq!(event(&e, Some(start)), "    2.5s  health     WARN slow");
    }
}
