//! `GET /metrics`: Prometheus text exposition, written by hand (a handful of
//! counters and histograms do not need a framework).
//!
//! Series: transitions started, finished (by outcome) and retried per kind
//! and action; transition duration and pickup latency histograms; queue depth
//! and running gauges (read from the store at scrape time, so every replica
//! reports the shared queue); lease reclaims; HTTP requests and latency by
//! method, route template and status.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use drover_domain::kinds::Kind;
use drover_domain::model::{QueueDepth, RunStatus};

use crate::routes::AppState;

/// Seconds: from a fast API call to an hour-long bake.
const BOUNDS: [f64; 18] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BOUNDS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BOUNDS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in BOUNDS.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braced = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braced} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braced} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    started: BTreeMap<String, u64>,
    finished: BTreeMap<String, u64>,
    retried: BTreeMap<String, u64>,
    duration: BTreeMap<String, Histogram>,
    pickup: Histogram,
    reclaimed: u64,
    http: BTreeMap<String, u64>,
    http_latency: BTreeMap<String, Histogram>,
}

#[derive(Default)]
pub struct Registry(Mutex<Inner>);

/// Label values are ours (kinds, actions, route templates), but escape anyway.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl drover_domain::ports::Metrics for Registry {
    fn run_started(&self, kind: Kind, action: &str, pickup: Duration) {
        let mut m = self.0.lock().unwrap();
        *m.started.entry(format!("kind=\"{kind}\",action=\"{}\"", label(action))).or_default() += 1;
        m.pickup.observe(pickup);
    }

    fn run_finished(&self, kind: Kind, action: &str, status: RunStatus, duration: Option<Duration>) {
        let mut m = self.0.lock().unwrap();
        let labels = format!("kind=\"{kind}\",action=\"{}\",outcome=\"{}\"", label(action), status.as_str());
        *m.finished.entry(labels.clone()).or_default() += 1;
        if let Some(d) = duration {
            m.duration.entry(labels).or_default().observe(d);
        }
    }

    fn run_retried(&self, kind: Kind, action: &str) {
        *self.0.lock().unwrap().retried.entry(format!("kind=\"{kind}\",action=\"{}\"", label(action))).or_default() +=
            1;
    }

    fn leases_reclaimed(&self, n: usize) {
        self.0.lock().unwrap().reclaimed += n as u64;
    }
}

impl Registry {
    fn http(&self, method: &str, route: &str, status: u16, took: Duration) {
        let mut m = self.0.lock().unwrap();
        let route = label(route);
        *m.http.entry(format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"")).or_default() += 1;
        m.http_latency.entry(format!("method=\"{method}\",route=\"{route}\"")).or_default().observe(took);
    }

    pub fn render(&self, depth: Option<QueueDepth>) -> String {
        let m = self.0.lock().unwrap();
        let mut out = String::new();
        let counters = [
            ("drover_transitions_started_total", "Transition attempts started by this replica.", &m.started),
            ("drover_transitions_finished_total", "Transitions this replica ended, by outcome.", &m.finished),
            ("drover_transitions_retried_total", "Attempts that failed retryably and were requeued.", &m.retried),
            ("drover_http_requests_total", "HTTP requests answered.", &m.http),
        ];
        for (name, help, series) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in series {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP drover_lease_reclaims_total Runs whose lease lapsed, taken back by this replica's reaper."
        );
        let _ =
            writeln!(out, "# TYPE drover_lease_reclaims_total counter\ndrover_lease_reclaims_total {}", m.reclaimed);
        let _ = writeln!(out, "# HELP drover_transition_duration_seconds From first start to end.");
        let _ = writeln!(out, "# TYPE drover_transition_duration_seconds histogram");
        for (labels, h) in &m.duration {
            h.write(&mut out, "drover_transition_duration_seconds", labels);
        }
        let _ = writeln!(out, "# HELP drover_transition_pickup_seconds From due to claimed.");
        let _ = writeln!(out, "# TYPE drover_transition_pickup_seconds histogram");
        m.pickup.write(&mut out, "drover_transition_pickup_seconds", "");
        let _ = writeln!(out, "# HELP drover_http_request_duration_seconds HTTP latency.");
        let _ = writeln!(out, "# TYPE drover_http_request_duration_seconds histogram");
        for (labels, h) in &m.http_latency {
            h.write(&mut out, "drover_http_request_duration_seconds", labels);
        }
        if let Some(d) = depth {
            let _ = writeln!(out, "# HELP drover_queue_depth Queued transitions (shared by all replicas).");
            let _ = writeln!(out, "# TYPE drover_queue_depth gauge");
            let _ = writeln!(out, "drover_queue_depth{{state=\"due\"}} {}", d.due);
            let _ = writeln!(out, "drover_queue_depth{{state=\"waiting_retry\"}} {}", d.waiting);
            let _ = writeln!(out, "# HELP drover_transitions_running Transitions running now (all replicas).");
            let _ = writeln!(out, "# TYPE drover_transitions_running gauge\ndrover_transitions_running {}", d.running);
        }
        out
    }
}

/// Counts every request by its route template (not its path, so ids do
/// not explode the series).
pub async fn layer(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    s.metrics.http(&method, &route, response.status().as_u16(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_domain::ports::Metrics;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::default();
        r.run_started(drover_domain::kinds::cluster::KIND, "scale", Duration::from_millis(20));
        r.run_finished(drover_domain::kinds::cluster::KIND, "scale", RunStatus::Failed, Some(Duration::from_secs(3)));
        r.leases_reclaimed(2);
        let text = r.render(Some(QueueDepth { due: 4, waiting: 1, running: 2 }));
        assert!(text.contains("drover_transitions_started_total{kind=\"cluster\",action=\"scale\"} 1"));
        assert!(
            text.contains("drover_transitions_finished_total{kind=\"cluster\",action=\"scale\",outcome=\"failed\"} 1")
        );
        assert!(text.contains("drover_transition_duration_seconds_bucket{kind=\"cluster\",action=\"scale\",outcome=\"failed\",le=\"2.5\"} 0"));
        assert!(text.contains("drover_transition_duration_seconds_bucket{kind=\"cluster\",action=\"scale\",outcome=\"failed\",le=\"5\"} 1"));
        assert!(text.contains("drover_transition_pickup_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("drover_lease_reclaims_total 2"));
        assert!(text.contains("drover_queue_depth{state=\"due\"} 4"));
        assert!(text.contains("drover_transitions_running 2"));
    }
}
