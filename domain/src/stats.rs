//! Transition statistics from rollups.
//!
//! Every terminal run is added, in its completing transaction, to an hourly
//! and a daily rollup row keyed by (bucket, kind, action, environment, actor,
//! outcome): counts, duration sum and max, and a sparse log-scale histogram.
//! A query reads whole days from the daily rows and the ragged ends of its
//! range from the hourly rows, so its cost depends on the range and the
//! number of distinct groups, not on the number of runs. Each run is also
//! added to rows whose actor is [`ALL_ACTORS`]: queries that neither group
//! nor filter by actor read only those, a fraction of the rows.
//!
//! # Guarantees
//! - Counts, failure rate, averages and max are exact.
//! - p50 and p95 come from the histogram: within 2% of the true value.
//! - Buckets are by the hour (UTC) in which a transition was requested;
//!   `since` is rounded down and `until` up to whole hours.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, DurationRound, Utc};

use crate::error::{Error, Result};
use crate::model::Time;

/// The actor of the rollup rows that sum over every actor. Real actors are
/// user names (DNS labels), so it cannot clash.
pub const ALL_ACTORS: &str = "*";

/// Histogram growth factor: bucket `i` holds durations in [γ^i, γ^(i+1)) ms.
pub const GAMMA: f64 = 1.04;

pub fn hist_index(ms: i64) -> i32 {
    ((ms.max(1) as f64).ln() / GAMMA.ln()).floor() as i32
}

/// The value a bucket stands for: the middle of its range.
fn hist_value(index: i32) -> f64 {
    GAMMA.powi(index) * (1.0 + GAMMA) / 2.0
}

/// A sparse duration histogram: `(bucket index, count)` pairs, stored as
/// the JSON object `{"<index>": count}`. Parsed straight into pairs: a
/// stats query reads thousands of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hist(pub Vec<(i32, i64)>);

impl<'de> serde::Deserialize<'de> for Hist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hist, D::Error> {
        struct Index(i32);
        impl<'de> serde::Deserialize<'de> for Index {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Index, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = Index;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a bucket index")
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Index, E> {
                        s.parse().map(Index).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Hist;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a histogram object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut m: M) -> Result<Hist, M::Error> {
                let mut pairs = Vec::with_capacity(m.size_hint().unwrap_or(16));
                while let Some((Index(i), n)) = m.next_entry::<Index, i64>()? {
                    pairs.push((i, n));
                }
                Ok(Hist(pairs))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    Hour,
    Day,
}

impl Grain {
    pub fn as_str(self) -> &'static str {
        match self {
            Grain::Hour => "hour",
            Grain::Day => "day",
        }
    }

    pub fn truncate(self, t: Time) -> Time {
        let step = match self {
            Grain::Hour => Duration::hours(1),
            Grain::Day => Duration::days(1),
        };
        t.duration_trunc(step).expect("in range")
    }
}

/// One stored rollup row.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub bucket: Time,
    pub kind: String,
    pub action: String,
    pub environment: String,
    pub actor: String,
    pub outcome: String,
    pub count: i64,
    pub timed: i64,
    pub sum_ms: i64,
    pub max_ms: i64,
    pub hist: Hist,
}

/// Rows to read: one grain over `[since, until)`, with exact-match filters.
#[derive(Debug, Clone, Default)]
pub struct RollupFilter {
    pub kind: Option<String>,
    pub action: Option<String>,
    pub environment: Option<String>,
    /// One actor; or, when `None`, every real actor's rows.
    pub actor: Option<String>,
}

impl RollupFilter {
    /// The rows a query needs: the all-actors rows unless it is about actors.
    pub fn for_query(&self, group_by: &[Dim]) -> RollupFilter {
        let mut f = self.clone();
        if f.actor.is_none() && !group_by.contains(&Dim::Actor) {
            f.actor = Some(ALL_ACTORS.to_string());
        }
        f
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dim {
    Kind,
    Action,
    Environment,
    Actor,
}

impl Dim {
    pub fn parse(s: &str) -> Option<Dim> {
        match s {
            "kind" => Some(Dim::Kind),
            "action" => Some(Dim::Action),
            "environment" => Some(Dim::Environment),
            "actor" => Some(Dim::Actor),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dim::Kind => "kind",
            Dim::Action => "action",
            Dim::Environment => "environment",
            Dim::Actor => "actor",
        }
    }

    fn of(self, r: &Rollup) -> &str {
        match self {
            Dim::Kind => &r.kind,
            Dim::Action => &r.action,
            Dim::Environment => &r.environment,
            Dim::Actor => &r.actor,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StatsQuery {
    pub since: Time,
    pub until: Time,
    pub group_by: Vec<Dim>,
    pub bucket: Option<Grain>,
    pub filter: RollupFilter,
}

/// The statistics of one group.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The group's values of the `group_by` dimensions, in their order.
    pub key: Vec<(Dim, String)>,
    pub bucket: Option<Time>,
    pub total: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// failed / (succeeded + failed); cancelled runs are neither.
    pub failure_rate: Option<f64>,
    pub avg_ms: Option<f64>,
    pub avg_success_ms: Option<f64>,
    pub avg_failure_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub max_ms: Option<i64>,
}

#[derive(Default)]
struct Acc {
    total: i64,
    by_outcome: BTreeMap<String, (i64, i64, i64)>, // count, timed, sum_ms
    timed: i64,
    sum_ms: i64,
    max_ms: Option<i64>,
    hist: BTreeMap<i32, i64>,
}

impl Acc {
    fn add(&mut self, r: &Rollup) {
        self.total += r.count;
        let o = self.by_outcome.entry(r.outcome.clone()).or_default();
        o.0 += r.count;
        o.1 += r.timed;
        o.2 += r.sum_ms;
        self.timed += r.timed;
        self.sum_ms += r.sum_ms;
        if r.timed > 0 {
            self.max_ms = Some(self.max_ms.map_or(r.max_ms, |m| m.max(r.max_ms)));
        }
        for &(i, n) in &r.hist.0 {
            *self.hist.entry(i).or_default() += n;
        }
    }

    fn quantile(&self, q: f64) -> Option<f64> {
        let n: i64 = self.hist.values().sum();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as i64).max(1);
        let mut seen = 0;
        for (&i, &c) in &self.hist {
            seen += c;
            if seen >= rank {
                let v = hist_value(i);
                return Some(self.max_ms.map_or(v, |m| v.min(m as f64)));
            }
        }
        None
    }

    fn finish(self, key: Vec<(Dim, String)>, bucket: Option<Time>) -> Group {
        let get = |o: &str| self.by_outcome.get(o).copied().unwrap_or_default();
        let (ok, fail, cancel) = (get("succeeded"), get("failed"), get("cancelled"));
        let avg = |count: i64, sum: i64| (count > 0).then(|| sum as f64 / count as f64);
        Group {
            key,
            bucket,
            total: self.total,
            succeeded: ok.0,
            failed: fail.0,
            cancelled: cancel.0,
            failure_rate: (ok.0 + fail.0 > 0).then(|| fail.0 as f64 / (ok.0 + fail.0) as f64),
            avg_ms: avg(self.timed, self.sum_ms),
            avg_success_ms: avg(ok.1, ok.2),
            avg_failure_ms: avg(fail.1, fail.2),
            p50_ms: self.quantile(0.5),
            p95_ms: self.quantile(0.95),
            max_ms: self.max_ms,
        }
    }
}

/// Aggregates rollup rows into groups, sorted by bucket then key.
pub fn aggregate(rows: &[Rollup], group_by: &[Dim], bucket: Option<Grain>) -> Vec<Group> {
    let mut groups: BTreeMap<(Option<Time>, Vec<String>), Acc> = BTreeMap::new();
    for r in rows {
        let key: Vec<String> = group_by.iter().map(|d| d.of(r).to_string()).collect();
        groups.entry((bucket.map(|g| g.truncate(r.bucket)), key)).or_default().add(r);
    }
    groups.into_iter().map(|((b, key), acc)| acc.finish(group_by.iter().copied().zip(key).collect(), b)).collect()
}

/// Which rollup rows answer a query: `(grain, since, until)` pieces that
/// together cover the range exactly, whole days from the daily rows.
pub fn plan(since: Time, until: Time, bucket: Option<Grain>) -> Vec<(Grain, Time, Time)> {
    let since = Grain::Hour.truncate(since);
    let until = {
        let t = Grain::Hour.truncate(until);
        if t < until {
            t + Duration::hours(1)
        } else {
            t
        }
    };
    if since >= until {
        return Vec::new();
    }
    if bucket == Some(Grain::Hour) {
        return vec![(Grain::Hour, since, until)];
    }
    let first_day = {
        let d = Grain::Day.truncate(since);
        if d < since {
            d + Duration::days(1)
        } else {
            d
        }
    };
    let last_day = Grain::Day.truncate(until);
    if first_day >= last_day {
        return vec![(Grain::Hour, since, until)];
    }
    let mut out = Vec::new();
    if since < first_day {
        out.push((Grain::Hour, since, first_day));
    }
    out.push((Grain::Day, first_day, last_day));
    if last_day < until {
        out.push((Grain::Hour, last_day, until));
    }
    out
}

pub fn validate(q: &StatsQuery) -> Result<()> {
    if q.since >= q.until {
        return Err(Error::invalid("since", "must be before until"));
    }
    if q.until - q.since > Duration::days(3660) {
        return Err(Error::invalid("since", "the range is at most ten years"));
    }
    if q.bucket == Some(Grain::Hour) && q.until - q.since > Duration::days(93) {
        return Err(Error::invalid("bucket", "hourly buckets cover at most 93 days; use day"));
    }
    Ok(())
}

/// Where a finished run goes in the rollups.
pub fn rollup_buckets(created_at: DateTime<Utc>) -> [(Grain, Time); 2] {
    [(Grain::Hour, Grain::Hour.truncate(created_at)), (Grain::Day, Grain::Day.truncate(created_at))]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: &str) -> Time {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn row(bucket: &str, kind: &str, outcome: &str, durations: &[i64], unstarted: i64) -> Rollup {
        let mut hist: BTreeMap<i32, i64> = BTreeMap::new();
        for &d in durations {
            *hist.entry(hist_index(d)).or_default() += 1;
        }
        Rollup {
            bucket: t(bucket),
            kind: kind.into(),
            action: "create".into(),
            environment: "".into(),
            actor: "a".into(),
            outcome: outcome.into(),
            count: durations.len() as i64 + unstarted,
            timed: durations.len() as i64,
            sum_ms: durations.iter().sum(),
            max_ms: durations.iter().copied().max().unwrap_or(0),
            hist: Hist(hist.into_iter().collect()),
        }
    }

    #[test]
    fn hand_computed_groups() {
        let rows = [
            row("2026-01-01T10:00:00Z", "cluster", "succeeded", &[100, 200, 300], 0),
            row("2026-01-01T11:00:00Z", "cluster", "failed", &[1000], 1),
            row("2026-01-01T11:00:00Z", "cluster", "cancelled", &[], 2),
            row("2026-01-01T11:00:00Z", "image", "succeeded", &[50], 0),
        ];
        let g = aggregate(&rows, &[Dim::Kind], None);
        assert_eq!(g.len(), 2);
        let c = &g[0];
        assert_eq!(c.key, vec![(Dim::Kind, "cluster".to_string())]);
        assert_eq!((c.total, c.succeeded, c.failed, c.cancelled), (7, 3, 2, 2));
        assert_eq!(c.failure_rate, Some(2.0 / 5.0));
        assert_eq!(c.avg_ms, Some(1600.0 / 4.0));
        assert_eq!(c.avg_success_ms, Some(200.0));
        assert_eq!(c.avg_failure_ms, Some(1000.0));
        assert_eq!(c.max_ms, Some(1000));
        // Timed: 100, 200, 300, 1000 → p50 is the 2nd (200), p95 the 4th (1000).
        let within = |got: Option<f64>, want: f64| (got.unwrap() - want).abs() / want <= 0.02;
        assert!(within(c.p50_ms, 200.0), "{:?}", c.p50_ms);
        assert!(within(c.p95_ms, 1000.0), "{:?}", c.p95_ms);
        // By hour bucket, no dimension.
        let h = aggregate(&rows, &[], Some(Grain::Hour));
        assert_eq!(
            h.iter().map(|g| (g.bucket.unwrap(), g.total)).collect::<Vec<_>>(),
            [(t("2026-01-01T10:00:00Z"), 3), (t("2026-01-01T11:00:00Z"), 5)]
        );
        let d = aggregate(&rows, &[], Some(Grain::Day));
        assert_eq!((d.len(), d[0].total, d[0].bucket), (1, 8, Some(t("2026-01-01T00:00:00Z"))));
    }

    #[test]
    fn histograms_parse_from_their_stored_form() {
        let h: Hist = serde_json::from_value(json!({"12": 3, "140": 1})).unwrap();
        assert_eq!(h, Hist(vec![(12, 3), (140, 1)]));
        assert!(serde_json::from_value::<Hist>(json!({"x": 1})).is_err());
    }

    #[test]
    fn histogram_error_is_within_two_percent() {
        for ms in [1, 2, 7, 99, 100, 101, 1234, 59_999, 3_600_000] {
            let v = hist_value(hist_index(ms));
            assert!((v - ms as f64).abs() / ms as f64 <= 0.02 + 1e-9, "{ms} -> {v}");
        }
    }

    #[test]
    fn plans_cover_the_range_exactly() {
        let p = plan(t("2026-01-01T10:30:00Z"), t("2026-01-04T05:10:00Z"), None);
        assert_eq!(
            p,
            vec![
                (Grain::Hour, t("2026-01-01T10:00:00Z"), t("2026-01-02T00:00:00Z")),
                (Grain::Day, t("2026-01-02T00:00:00Z"), t("2026-01-04T00:00:00Z")),
                (Grain::Hour, t("2026-01-04T00:00:00Z"), t("2026-01-04T06:00:00Z")),
            ]
        );
        assert_eq!(
            plan(t("2026-01-01T10:00:00Z"), t("2026-01-01T12:00:00Z"), None),
            vec![(Grain::Hour, t("2026-01-01T10:00:00Z"), t("2026-01-01T12:00:00Z"))]
        );
        assert_eq!(
            plan(t("2026-01-01T00:00:00Z"), t("2026-01-03T00:00:00Z"), Some(Grain::Day)),
            vec![(Grain::Day, t("2026-01-01T00:00:00Z"), t("2026-01-03T00:00:00Z"))]
        );
        assert_eq!(plan(t("2026-01-01T00:00:00Z"), t("2026-01-03T00:00:00Z"), Some(Grain::Hour)).len(), 1);
    }
}
