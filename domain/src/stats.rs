//! Transition statistics from rollups.
//!
//! Finished runs are folded into rollup rows keyed by (grain, bucket, kind,
//! action, environment, actor): per-outcome counts and duration sums, the
//! longest duration, and a sparse log-scale histogram for percentiles. Each
//! run lands in an hourly, a daily and a weekly row, and in the same three
//! rows of [`ALL_ACTORS`]. A query covers the middle of its range with the
//! coarsest rows that fit and the ragged ends with finer ones, so its cost
//! depends on the range and the number of distinct groups, not on the
//! number of runs; queries that neither group nor filter by actor read only
//! the all-actors rows.
//!
//! # Guarantees
//! - Counts, failure rate, averages and max are exact.
//! - p50 and p95 come from the histogram: within 2% of the true value.
//! - Buckets are by the hour (UTC) in which a transition was requested;
//!   `since` is rounded down and `until` up to whole hours. A range that
//!   reaches past now counts every run requested since `since`, so a run
//!   stamped a moment ahead by a replica whose clock runs fast still counts.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, DurationRound};

use crate::error::{Error, Result};
use crate::model::{RunStatus, Time};

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

/// A sparse duration histogram: `(bucket index, count)` pairs in increasing
/// index order, every count positive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hist(pub Vec<(i32, i64)>);

impl Hist {
    pub fn add(&mut self, index: i32, n: i64) {
        match self.0.binary_search_by_key(&index, |&(i, _)| i) {
            Ok(at) => self.0[at].1 += n,
            Err(at) => self.0.insert(at, (index, n)),
        }
    }

    pub fn merge(&mut self, other: &Hist) {
        if other.0.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + other.0.len());
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(&&(i, n)), Some(&&(j, m))) if i == j => {
                    out.push((i, n + m));
                    a.next();
                    b.next();
                }
                (Some(&&x), Some(&&y)) => {
                    if x.0 < y.0 {
                        out.push(x);
                        a.next();
                    } else {
                        out.push(y);
                        b.next();
                    }
                }
                (Some(&&x), None) => {
                    out.push(x);
                    a.next();
                }
                (None, Some(&&y)) => {
                    out.push(y);
                    b.next();
                }
                (None, None) => break,
            }
        }
        self.0 = out;
    }

    /// The stored form: for each pair, the gap to the previous index (the
    /// first counted from -1) and the count, as LEB128 varints. A day's
    /// histogram of a busy group is a few hundred bytes, read without
    /// parsing text.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 3);
        let mut prev = -1i64;
        for &(i, n) in &self.0 {
            put_varint(&mut out, (i64::from(i) - prev - 1) as u64);
            put_varint(&mut out, n as u64);
            prev = i64::from(i);
        }
        out
    }

    pub fn decode(mut bytes: &[u8]) -> std::result::Result<Hist, HistError> {
        let mut pairs = Vec::with_capacity(bytes.len() / 2);
        let mut prev = -1i64;
        while !bytes.is_empty() {
            let gap = take_varint(&mut bytes)?;
            let n = take_varint(&mut bytes)?;
            let gap = i64::try_from(gap).map_err(|_| HistError)?;
            let i = prev.checked_add(1).and_then(|p| p.checked_add(gap)).ok_or(HistError)?;
            let i = i32::try_from(i).map_err(|_| HistError)?;
            let n = i64::try_from(n).map_err(|_| HistError)?;
            if n <= 0 {
                return Err(HistError);
            }
            pairs.push((i, n));
            prev = i64::from(i);
        }
        Ok(Hist(pairs))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a stored duration histogram is corrupt")]
pub struct HistError;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(bytes: &mut &[u8]) -> std::result::Result<u64, HistError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first().ok_or(HistError)?;
        *bytes = rest;
        v |= u64::from(b & 0x7f).checked_shl(shift).ok_or(HistError)?;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(HistError)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grain {
    Hour,
    Day,
    /// Monday to Monday (UTC). Not offered as a bucket; it makes long ranges
    /// cheap.
    Week,
}

impl Grain {
    pub const ALL: [Grain; 3] = [Grain::Hour, Grain::Day, Grain::Week];

    pub fn as_str(self) -> &'static str {
        match self {
            Grain::Hour => "hour",
            Grain::Day => "day",
            Grain::Week => "week",
        }
    }

    pub fn parse(s: &str) -> Option<Grain> {
        Grain::ALL.into_iter().find(|g| g.as_str() == s)
    }

    pub fn truncate(self, t: Time) -> Time {
        match self {
            Grain::Hour => t.duration_trunc(Duration::hours(1)).expect("in range"),
            Grain::Day => t.duration_trunc(Duration::days(1)).expect("in range"),
            // The Unix epoch was a Thursday: weeks start three days before.
            Grain::Week => {
                (t + Duration::days(3)).duration_trunc(Duration::weeks(1)).expect("in range") - Duration::days(3)
            }
        }
    }

    /// The first bucket boundary at or after `t`.
    pub fn ceil(self, t: Time) -> Time {
        let d = self.truncate(t);
        if d < t {
            d + self.span()
        } else {
            d
        }
    }

    fn span(self) -> Duration {
        match self {
            Grain::Hour => Duration::hours(1),
            Grain::Day => Duration::days(1),
            Grain::Week => Duration::weeks(1),
        }
    }
}

/// Outcomes a rollup row counts, in the order of [`Totals::outcomes`].
pub const OUTCOMES: [RunStatus; 3] = [RunStatus::Succeeded, RunStatus::Failed, RunStatus::Cancelled];

fn outcome_slot(status: RunStatus) -> Option<usize> {
    OUTCOMES.iter().position(|&o| o == status)
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RollupKey {
    pub grain: Grain,
    pub bucket: Time,
    pub kind: String,
    pub action: String,
    pub environment: String,
    pub actor: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeTotals {
    pub count: i64,
    /// Runs that started, and so have a duration.
    pub timed: i64,
    pub sum_ms: i64,
}

fn add_outcomes(to: &mut [OutcomeTotals; 3], from: &[OutcomeTotals; 3]) {
    for (a, b) in to.iter_mut().zip(from) {
        a.count += b.count;
        a.timed += b.timed;
        a.sum_ms += b.sum_ms;
    }
}

/// What a rollup row adds up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Succeeded, failed, cancelled.
    pub outcomes: [OutcomeTotals; 3],
    /// The longest duration; 0 when no run was timed.
    pub max_ms: i64,
    /// Durations of every timed run, whatever its outcome.
    pub hist: Hist,
}

impl Totals {
    pub fn merge(&mut self, other: &Totals) {
        add_outcomes(&mut self.outcomes, &other.outcomes);
        self.max_ms = self.max_ms.max(other.max_ms);
        self.hist.merge(&other.hist);
    }

    fn timed(&self) -> i64 {
        self.outcomes.iter().map(|o| o.timed).sum()
    }
}

/// One stored rollup row.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub key: RollupKey,
    pub totals: Totals,
}

/// The facts about a finished run that the rollups keep.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    pub kind: String,
    pub action: String,
    pub environment: Option<String>,
    pub actor: String,
    pub status: RunStatus,
    pub created_at: Time,
    pub started_at: Option<Time>,
    pub finished_at: Time,
}

/// What a batch of finished runs adds to each rollup row it touches. Runs
/// that did not finish are ignored.
pub fn fold(runs: &[FinishedRun]) -> BTreeMap<RollupKey, Totals> {
    let mut out: BTreeMap<RollupKey, Totals> = BTreeMap::new();
    for run in runs {
        let Some(slot) = outcome_slot(run.status) else { continue };
        let ms = run.started_at.map(|s| (run.finished_at - s).num_milliseconds().max(0));
        for grain in Grain::ALL {
            for actor in [run.actor.as_str(), ALL_ACTORS] {
                let key = RollupKey {
                    grain,
                    bucket: grain.truncate(run.created_at),
                    kind: run.kind.clone(),
                    action: run.action.clone(),
                    environment: run.environment.clone().unwrap_or_default(),
                    actor: actor.to_string(),
                };
                let t = out.entry(key).or_default();
                let o = &mut t.outcomes[slot];
                o.count += 1;
                if let Some(ms) = ms {
                    o.timed += 1;
                    o.sum_ms += ms;
                    t.max_ms = t.max_ms.max(ms);
                    t.hist.add(hist_index(ms), 1);
                }
            }
        }
    }
    out
}

/// Runs are folded into the rollups in batches of this many.
pub const FOLD_BATCH: u32 = 1000;

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

    fn of(self, k: &RollupKey) -> &str {
        match self {
            Dim::Kind => &k.kind,
            Dim::Action => &k.action,
            Dim::Environment => &k.environment,
            Dim::Actor => &k.actor,
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

/// One group being summed. The histogram is dense (index → count): adding a
/// row's pairs is then a few array writes, not map lookups.
#[derive(Default)]
struct Acc {
    outcomes: [OutcomeTotals; 3],
    max_ms: Option<i64>,
    hist: Vec<i64>,
}

impl Acc {
    fn add(&mut self, t: &Totals) {
        add_outcomes(&mut self.outcomes, &t.outcomes);
        if t.timed() > 0 {
            self.max_ms = Some(self.max_ms.map_or(t.max_ms, |m| m.max(t.max_ms)));
        }
        if let Some(&(last, _)) = t.hist.0.last() {
            let need = usize::try_from(last).unwrap_or(0) + 1;
            if self.hist.len() < need {
                self.hist.resize(need, 0);
            }
            for &(i, n) in &t.hist.0 {
                if let Ok(i) = usize::try_from(i) {
                    self.hist[i] += n;
                }
            }
        }
    }

    fn quantile(&self, q: f64) -> Option<f64> {
        let n: i64 = self.hist.iter().sum();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as i64).max(1);
        let mut seen = 0;
        for (i, &c) in self.hist.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let v = hist_value(i as i32);
                return Some(self.max_ms.map_or(v, |m| v.min(m as f64)));
            }
        }
        None
    }

    fn finish(self, key: Vec<(Dim, String)>, bucket: Option<Time>) -> Group {
        let [ok, fail, cancel] = self.outcomes;
        let avg = |count: i64, sum: i64| (count > 0).then(|| sum as f64 / count as f64);
        let (timed, sum_ms) = self.outcomes.iter().fold((0, 0), |(n, s), o| (n + o.timed, s + o.sum_ms));
        Group {
            key,
            bucket,
            total: ok.count + fail.count + cancel.count,
            succeeded: ok.count,
            failed: fail.count,
            cancelled: cancel.count,
            failure_rate: (ok.count + fail.count > 0).then(|| fail.count as f64 / (ok.count + fail.count) as f64),
            avg_ms: avg(timed, sum_ms),
            avg_success_ms: avg(ok.timed, ok.sum_ms),
            avg_failure_ms: avg(fail.timed, fail.sum_ms),
            p50_ms: self.quantile(0.5),
            p95_ms: self.quantile(0.95),
            max_ms: self.max_ms,
        }
    }
}

/// Aggregates rollup rows into groups, sorted by bucket then key.
pub fn aggregate(rows: &[Rollup], group_by: &[Dim], bucket: Option<Grain>) -> Vec<Group> {
    let mut groups: BTreeMap<(Option<Time>, Vec<&str>), Acc> = BTreeMap::new();
    for r in rows {
        let key: Vec<&str> = group_by.iter().map(|d| d.of(&r.key)).collect();
        groups.entry((bucket.map(|g| g.truncate(r.key.bucket)), key)).or_default().add(&r.totals);
    }
    groups
        .into_iter()
        .map(|((b, key), acc)| {
            acc.finish(group_by.iter().copied().zip(key.into_iter().map(str::to_string)).collect(), b)
        })
        .collect()
}

/// Which rollup rows answer a query: `(grain, since, until)` pieces that
/// together cover the range exactly, whole weeks from the weekly rows and
/// whole days from the daily ones unless the query is bucketed finer.
///
/// Nothing has been requested after `now`, so a range that reaches past it
/// (the usual "the last 90 days") may end at the end of the coarsest bucket
/// `now` is in: its last piece is then one weekly bucket instead of days
/// and hours.
pub fn plan(since: Time, until: Time, bucket: Option<Grain>, now: Time) -> Vec<(Grain, Time, Time)> {
    let grains: &[Grain] = match bucket {
        Some(Grain::Hour) => &[Grain::Hour],
        Some(Grain::Day) => &[Grain::Hour, Grain::Day],
        Some(Grain::Week) | None => &Grain::ALL,
    };
    let coarsest = grains[grains.len() - 1];
    let until = if until >= now { coarsest.ceil(until) } else { until };
    let (since, until) = (Grain::Hour.truncate(since), Grain::Hour.ceil(until));
    if since >= until {
        return Vec::new();
    }
    let mut out = Vec::new();
    cover(since, until, grains, &mut out);
    out
}

/// Covers `[since, until)`, aligned to `grains[0]`, with the coarsest
/// grains in the middle and finer ones at the ends.
fn cover(since: Time, until: Time, grains: &[Grain], out: &mut Vec<(Grain, Time, Time)>) {
    let Some((&fine, coarser)) = grains.split_first() else { return };
    if let Some(&next) = coarser.first() {
        let (lo, hi) = (next.ceil(since), next.truncate(until));
        if lo < hi {
            if since < lo {
                out.push((fine, since, lo));
            }
            cover(lo, hi, coarser, out);
            if hi < until {
                out.push((fine, hi, until));
            }
            return;
        }
    }
    out.push((fine, since, until));
}

pub fn validate(q: &StatsQuery) -> Result<()> {
    // Buckets are computed in nanoseconds since 1970: keep far from the
    // edges of what that can hold.
    // 2200-01-01T00:00:00Z.
    let (first, last) = (DateTime::UNIX_EPOCH, DateTime::UNIX_EPOCH + Duration::seconds(7_258_118_400));
    for (field, t) in [("since", q.since), ("until", q.until)] {
        if t < first || t > last {
            return Err(Error::invalid(field, "must be between 1970 and 2200"));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn t(s: &str) -> Time {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// A run requested at `at`; `ms` after starting at once it ended with
    /// `status`, or (`None`) it was cancelled before it started.
    fn run(at: &str, kind: &str, status: RunStatus, ms: Option<i64>) -> FinishedRun {
        let created = t(at);
        FinishedRun {
            kind: kind.into(),
            action: "create".into(),
            environment: None,
            actor: "a".into(),
            status,
            created_at: created,
            started_at: ms.map(|_| created),
            finished_at: created + Duration::milliseconds(ms.unwrap_or(5)),
        }
    }

    /// The rows a query of `grain` would read from what `runs` folded into.
    fn rows(runs: &[FinishedRun], grain: Grain, actor: &str) -> Vec<Rollup> {
        fold(runs)
            .into_iter()
            .filter(|(k, _)| k.grain == grain && k.actor == actor)
            .map(|(key, totals)| Rollup { key, totals })
            .collect()
    }

    fn history() -> Vec<FinishedRun> {
        use RunStatus::*;
        vec![
            run("2026-01-01T10:00:00Z", "cluster", Succeeded, Some(100)),
            run("2026-01-01T10:10:00Z", "cluster", Succeeded, Some(200)),
            run("2026-01-01T10:20:00Z", "cluster", Succeeded, Some(300)),
            run("2026-01-01T11:00:00Z", "cluster", Failed, Some(1000)),
            run("2026-01-01T11:05:00Z", "cluster", Failed, None),
            run("2026-01-01T11:10:00Z", "cluster", Cancelled, None),
            run("2026-01-01T11:20:00Z", "cluster", Cancelled, None),
            run("2026-01-01T11:30:00Z", "image", Succeeded, Some(50)),
            // Never finished: not counted.
            run("2026-01-01T11:40:00Z", "image", Running, Some(50)),
        ]
    }

    #[test]
    fn hand_computed_groups() {
        let rows = rows(&history(), Grain::Hour, "a");
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
    fn every_grain_and_the_all_actors_rows_hold_the_same_totals() {
        let runs = history();
        let want = aggregate(&rows(&runs, Grain::Hour, "a"), &[Dim::Kind], None);
        for grain in Grain::ALL {
            for actor in ["a", ALL_ACTORS] {
                assert_eq!(aggregate(&rows(&runs, grain, actor), &[Dim::Kind], None), want, "{grain:?} {actor}");
            }
        }
        // Folding in two batches and merging equals folding at once.
        let (a, b) = runs.split_at(4);
        let mut merged = fold(a);
        for (k, v) in fold(b) {
            merged.entry(k).or_default().merge(&v);
        }
        assert_eq!(merged, fold(&runs));
    }

    #[test]
    fn histograms_round_trip_their_stored_form() {
        for h in [Hist(vec![]), Hist(vec![(0, 1)]), Hist(vec![(12, 3), (140, 1), (141, 300), (1100, i64::MAX)])] {
            assert_eq!(Hist::decode(&h.encode()).unwrap(), h);
        }
        assert_eq!(Hist(vec![(0, 1), (2, 5)]).encode(), [0, 1, 1, 5]);
        for bad in [&[0x80][..], &[1], &[0, 0], &[0xff; 11]] {
            assert!(Hist::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn histograms_merge_in_index_order() {
        let mut a = Hist(vec![(1, 1), (5, 2)]);
        a.merge(&Hist(vec![(0, 1), (5, 3), (9, 1)]));
        assert_eq!(a, Hist(vec![(0, 1), (1, 1), (5, 5), (9, 1)]));
        a.add(3, 2);
        a.add(9, 1);
        assert_eq!(a, Hist(vec![(0, 1), (1, 1), (3, 2), (5, 5), (9, 2)]));
    }

    #[test]
    fn histogram_error_is_within_two_percent() {
        for ms in [1, 2, 7, 99, 100, 101, 1234, 59_999, 3_600_000] {
            let v = hist_value(hist_index(ms));
            assert!((v - ms as f64).abs() / ms as f64 <= 0.02 + 1e-9, "{ms} -> {v}");
        }
    }

    #[test]
    fn times_out_of_range_are_refused_not_panicked_on() {
        let q = |since: &str, until: &str| StatsQuery {
            since: t(since),
            until: t(until),
            group_by: vec![],
            bucket: None,
            filter: Default::default(),
        };
        assert!(validate(&q("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z")).is_ok());
        for (since, until, field) in [
            ("1960-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "since"),
            ("2026-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "until"),
        ] {
            match validate(&q(since, until)) {
                Err(Error::Invalid(f)) => assert_eq!(f[0].field, field),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2026-01-01 was a Thursday.
        assert_eq!(Grain::Week.truncate(t("2026-01-01T10:00:00Z")), t("2025-12-29T00:00:00Z"));
        assert_eq!(Grain::Week.truncate(t("2026-01-05T00:00:00Z")), t("2026-01-05T00:00:00Z"));
        assert_eq!(Grain::Week.ceil(t("2026-01-05T00:00:01Z")), t("2026-01-12T00:00:00Z"));
        assert_eq!(Grain::Day.ceil(t("2026-01-05T00:00:00Z")), t("2026-01-05T00:00:00Z"));
    }

    #[test]
    fn plans_cover_the_range_exactly() {
        use Grain::*;
        // Ranges in the past: `now` is later.
        let now = t("2026-06-01T00:00:00Z");
        let p = plan(t("2026-01-01T10:30:00Z"), t("2026-01-04T05:10:00Z"), None, now);
        assert_eq!(
            p,
            vec![
                (Hour, t("2026-01-01T10:00:00Z"), t("2026-01-02T00:00:00Z")),
                (Day, t("2026-01-02T00:00:00Z"), t("2026-01-04T00:00:00Z")),
                (Hour, t("2026-01-04T00:00:00Z"), t("2026-01-04T06:00:00Z")),
            ]
        );
        // Thursday 1 January to Wednesday 21 January: the two whole weeks
        // from the weekly rows.
        assert_eq!(
            plan(t("2026-01-01T22:00:00Z"), t("2026-01-21T01:00:00Z"), None, now),
            vec![
                (Hour, t("2026-01-01T22:00:00Z"), t("2026-01-02T00:00:00Z")),
                (Day, t("2026-01-02T00:00:00Z"), t("2026-01-05T00:00:00Z")),
                (Week, t("2026-01-05T00:00:00Z"), t("2026-01-19T00:00:00Z")),
                (Day, t("2026-01-19T00:00:00Z"), t("2026-01-21T00:00:00Z")),
                (Hour, t("2026-01-21T00:00:00Z"), t("2026-01-21T01:00:00Z")),
            ]
        );
        // Daily buckets need daily rows: no weeks.
        assert_eq!(
            plan(t("2026-01-01T00:00:00Z"), t("2026-01-21T00:00:00Z"), Some(Day), now),
            vec![(Day, t("2026-01-01T00:00:00Z"), t("2026-01-21T00:00:00Z"))]
        );
        assert_eq!(
            plan(t("2026-01-01T10:00:00Z"), t("2026-01-01T12:00:00Z"), None, now),
            vec![(Hour, t("2026-01-01T10:00:00Z"), t("2026-01-01T12:00:00Z"))]
        );
        assert_eq!(plan(t("2026-01-01T00:00:00Z"), t("2026-01-03T00:00:00Z"), Some(Hour), now).len(), 1);
        // Any range: the pieces are contiguous and end where it ends.
        let (since, until) = (t("2025-10-03T07:00:00Z"), t("2026-01-01T07:00:00Z"));
        let p = plan(since, until, None, now);
        assert_eq!((p[0].1, p[p.len() - 1].2), (since, until));
        assert!(p.windows(2).all(|w| w[0].2 == w[1].1));
        // Up to now (a Wednesday, 1 a.m.): the current week's row, whole.
        let now = t("2026-01-21T00:30:00Z");
        assert_eq!(
            plan(t("2026-01-01T22:00:00Z"), now, None, now),
            vec![
                (Hour, t("2026-01-01T22:00:00Z"), t("2026-01-02T00:00:00Z")),
                (Day, t("2026-01-02T00:00:00Z"), t("2026-01-05T00:00:00Z")),
                (Week, t("2026-01-05T00:00:00Z"), t("2026-01-26T00:00:00Z")),
            ]
        );
        // Daily buckets up to now: today's daily row; hourly: unchanged.
        assert_eq!(
            plan(t("2026-01-19T00:00:00Z"), now, Some(Day), now),
            vec![(Day, t("2026-01-19T00:00:00Z"), t("2026-01-22T00:00:00Z"))]
        );
        assert_eq!(
            plan(t("2026-01-20T22:00:00Z"), now, Some(Hour), now),
            vec![(Hour, t("2026-01-20T22:00:00Z"), t("2026-01-21T01:00:00Z"))]
        );
    }
}
