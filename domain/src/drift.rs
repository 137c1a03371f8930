//! Drift: what really runs, compared with what the record says.
//!
//! A provider's `refresh` looks at the real thing and reports a
//! [`Report`]: each attribute it checked that differs from the record (a
//! [`Difference`], named by its path), and each it could not check, and
//! why. The engine turns the report of a successful refresh into the
//! resource's [`Drift`], kept beside it (not in its outputs: a refresh
//! changes neither the resource's state nor what its last transition
//! produced).
//!
//! **Invariant:** `in_sync` only when every attribute was checked. A probe
//! that could not check something (a timeout, an API that does not answer)
//! makes the drift `unknown` and says why, never `in_sync`; a difference
//! found makes it `drifted` whatever else could not be checked.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::model::Time;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    InSync,
    Drifted,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InSync => "in_sync",
            Status::Drifted => "drifted",
            Status::Unknown => "unknown",
        }
    }
}

/// One attribute whose reality differs from the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    /// What differs, as a path into the resource: `instances[1].process`,
    /// `builds[01a2…].directory`, `count`.
    pub path: String,
    pub recorded: Value,
    pub actual: Value,
    /// How the record would take this reality in, if it can: a merge
    /// patch of the spec (`{"count": 2}`), what `adopt` applies. Absent
    /// where the record cannot say it (a process gone is not a value of
    /// a spec; `repair` is the way out there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt: Option<Value>,
}

impl Difference {
    pub fn new(path: impl Into<String>, recorded: impl Into<Value>, actual: impl Into<Value>) -> Difference {
        Difference { path: path.into(), recorded: recorded.into(), actual: actual.into(), adopt: None }
    }

    /// This difference can be adopted by merging `patch` into the spec.
    pub fn adoptable(mut self, patch: Value) -> Difference {
        self.adopt = Some(patch);
        self
    }

    /// `instances[1].process: recorded "running (pid 7)", actually "gone"`.
    pub fn said(&self) -> String {
        format!("{}: recorded {}, actually {}", self.path, self.recorded, self.actual)
    }
}

/// An attribute a refresh could not check, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unchecked {
    pub path: String,
    pub why: String,
}

/// What a provider's refresh found (a successful refresh run's outputs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// How many attributes it compared (checked or not).
    pub checked: usize,
    #[serde(default)]
    pub differences: Vec<Difference>,
    #[serde(default)]
    pub unchecked: Vec<Unchecked>,
}

impl Report {
    /// Counts an attribute that matches the record.
    pub fn same(&mut self) {
        self.checked += 1;
    }

    pub fn differs(&mut self, d: Difference) {
        self.checked += 1;
        self.differences.push(d);
    }

    pub fn cannot_check(&mut self, path: impl Into<String>, why: impl Into<String>) {
        self.checked += 1;
        self.unchecked.push(Unchecked { path: path.into(), why: why.into() });
    }

    pub fn status(&self) -> Status {
        match (self.differences.is_empty(), self.unchecked.is_empty()) {
            (false, _) => Status::Drifted,
            (true, false) => Status::Unknown,
            (true, true) => Status::InSync,
        }
    }

    /// Says each difference (a warning) and each attribute not checked in
    /// the run's log; the report as a refresh's outputs.
    pub async fn told(self, ctx: &dyn crate::ports::RunContext) -> Value {
        use crate::model::{Level, NewEvent};
        for d in &self.differences {
            ctx.event(NewEvent::info("refresh", d.said()).with_level(Level::Warn)).await;
        }
        for u in &self.unchecked {
            ctx.event(NewEvent::info("refresh", format!("{}: not checked: {}", u.path, u.why))).await;
        }
        serde_json::to_value(&self).expect("a report serialises")
    }

    /// One line for the run's log and the view.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self.differences.iter().map(Difference::said).collect();
        for u in &self.unchecked {
            parts.push(format!("{}: not checked ({})", u.path, u.why));
        }
        match self.status() {
            Status::InSync => format!("in sync ({} attributes checked)", self.checked),
            s => format!("{}: {}", s.as_str(), parts.join("; ")),
        }
    }
}

/// How long after its refresh a drift may be adopted: reality is looked at
/// again by the provider when it adopts, but a finding this old is no
/// ground for a new spec version.
pub const ADOPT_WITHIN: chrono::Duration = chrono::Duration::hours(1);

/// What `adopt` takes into the record, from the resource's last drift: the
/// run's parameters, `{"spec": PATCH, "refresh": RUN, "differences":
/// [PATH…]}` (the merged patches of every difference, recorded in the
/// ledger with the run). Refused, naming why, when there is nothing to
/// adopt, the finding is too old, or a difference cannot be adopted
/// (then `repair`, or a change of the spec, is the way).
pub fn adoption(drift: Option<&Value>, now: Time) -> Result<Value, String> {
    let Some(drift) = drift else {
        return Err("nothing to adopt: no refresh has looked at it yet (refresh first)".into());
    };
    let drift: Drift = serde_json::from_value(drift.clone()).map_err(|e| format!("its drift cannot be read: {e}"))?;
    if drift.status != Status::Drifted {
        return Err(format!("nothing to adopt: the last refresh found it {}", drift.status.as_str()));
    }
    if now - drift.checked_at > ADOPT_WITHIN {
        return Err(format!("the last refresh is older than an hour ({}): refresh again first", drift.checked_at));
    }
    let refused: Vec<String> = drift.differences.iter().filter(|d| d.adopt.is_none()).map(|d| d.path.clone()).collect();
    if !refused.is_empty() {
        return Err(format!(
            "{} cannot be taken into the record (no spec field says it): repair instead",
            refused.join(", ")
        ));
    }
    let mut patch = serde_json::json!({});
    for d in &drift.differences {
        crate::merge::apply(&mut patch, d.adopt.as_ref().expect("checked above"));
    }
    let paths: Vec<&str> = drift.differences.iter().map(|d| d.path.as_str()).collect();
    Ok(serde_json::json!({ "spec": patch, "refresh": drift.run, "differences": paths }))
}

/// A resource's drift as last refreshed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    pub status: Status,
    pub checked_at: Time,
    /// The refresh run that found it.
    pub run: Uuid,
    pub summary: String,
    pub differences: Vec<Difference>,
    pub unchecked: Vec<Unchecked>,
}

impl Drift {
    pub fn of(report: Report, run: Uuid, at: Time) -> Drift {
        Drift {
            status: report.status(),
            checked_at: at,
            run,
            summary: report.summary(),
            differences: report.differences,
            unchecked: report.unchecked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_sync_only_when_everything_was_checked() {
        let mut r = Report::default();
        r.same();
        r.same();
        assert_eq!(r.status(), Status::InSync);
        assert_eq!(r.summary(), "in sync (2 attributes checked)");
        r.cannot_check("instances[0].health", "the probe timed out after 2s");
        assert_eq!(r.status(), Status::Unknown, "a probe that could not check is never in sync");
        r.differs(Difference::new("instances[1].process", "alive (pid 7)", "gone"));
        assert_eq!(r.status(), Status::Drifted, "a difference found stands whatever else was not checked");
        let s = r.summary();
        assert!(s.starts_with("drifted: instances[1].process: recorded \"alive (pid 7)\", actually \"gone\""), "{s}");
        assert!(s.contains("instances[0].health: not checked (the probe timed out after 2s)"), "{s}");
    }

    #[test]
    fn only_what_a_spec_can_say_is_adopted() {
        let now = chrono::Utc::now();
        let drift = |r: Report| serde_json::to_value(Drift::of(r, Uuid::nil(), now)).unwrap();
        assert!(adoption(None, now).unwrap_err().contains("refresh first"));
        let mut r = Report::default();
        r.same();
        assert!(adoption(Some(&drift(r.clone())), now).unwrap_err().contains("found it in_sync"));
        r.differs(Difference::new("group.desired_capacity", 1, 2).adoptable(serde_json::json!({"count": 2})));
        r.differs(Difference::new("group.instances", 1, 2).adoptable(serde_json::json!({"count": 2})));
        let p = adoption(Some(&drift(r.clone())), now).unwrap();
        assert_eq!(p["spec"], serde_json::json!({"count": 2}));
        assert_eq!(p["differences"], serde_json::json!(["group.desired_capacity", "group.instances"]));
        let old = Drift::of(r.clone(), Uuid::nil(), now - chrono::Duration::hours(2));
        assert!(adoption(Some(&serde_json::to_value(old).unwrap()), now).unwrap_err().contains("refresh again"));
        r.differs(Difference::new("instances[0].health", "answering", "GET / answered 500"));
        let e = adoption(Some(&drift(r)), now).unwrap_err();
        assert_eq!(e, "instances[0].health cannot be taken into the record (no spec field says it): repair instead");
    }

    #[test]
    fn a_report_reads_back() {
        let mut r = Report::default();
        r.differs(Difference::new("count", 3, 2));
        let back: Report = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let d = Drift::of(back, Uuid::nil(), chrono::Utc::now());
        assert_eq!(serde_json::to_value(&d).unwrap()["status"], "drifted");
    }
}
