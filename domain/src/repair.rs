//! Automatic repair: when a resource that opted in (`auto_repair: true` in
//! its spec) is seen by the observer with something a `repair` would fix
//! (a local instance whose process died), the observer asks for a repair —
//! at once the first time, then after a backoff that doubles with each
//! repair that did not hold, and not at all once it has repaired so many
//! times in a row that the thing is crash-looping: then the view says so
//! and a person decides.
//!
//! The streak is read from the ledger, not kept in memory, so that a
//! restart of drover, or another replica taking over the observation,
//! neither forgets a crash loop nor starts its backoff again: it is the
//! observer's own `repair` runs of the resource, newest first, each ended
//! within [`RepairPolicy::forgive_after`] of the next (or of now) — an
//! instance that then ran longer than that was healthy and is forgiven —
//! and broken by any other run (a person's repair, deploy or scale: a new
//! start). Refreshes, which change nothing, do not break it.

use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::engine::OBSERVER_ACTOR;
use crate::model::{Run, Time};

/// The spec field a resource opts in with. The observer reads it as it is
/// written: it is never a pending change.
pub const SPEC_FIELD: &str = "auto_repair";

/// How the observer repairs resources that opted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairPolicy {
    /// The wait before the second repair of a streak; it doubles for each
    /// further one.
    pub backoff: Duration,
    /// The longest wait between two repairs of a streak.
    pub backoff_max: Duration,
    /// After this many repairs in a row, it is a crash loop: no more.
    pub crash_loop_after: u32,
    /// A repair that held this long (nothing to repair again since) ends
    /// its streak.
    pub forgive_after: Duration,
}

impl Default for RepairPolicy {
    fn default() -> Self {
        RepairPolicy {
            backoff: Duration::from_secs(15),
            backoff_max: Duration::from_secs(300),
            crash_loop_after: 5,
            forgive_after: Duration::from_secs(600),
        }
    }
}

/// What the observer does about something to repair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Decision {
    /// Ask for a repair now: the `attempt`th of its streak.
    Repair { attempt: u32 },
    /// Not yet: `attempts` repairs did not hold; the next is due at `next_at`.
    BackingOff { attempts: u32, next_at: Time, last_run: Uuid },
    /// `attempts` repairs in a row since `since` did not hold: the observer
    /// stops repairing until someone acts on the resource.
    CrashLoop { attempts: u32, since: Time, last_run: Uuid },
}

impl Decision {
    /// One sentence for the view's summary.
    pub fn said(&self) -> String {
        match self {
            Decision::Repair { attempt } => format!("auto-repair: repair {attempt} asked"),
            Decision::BackingOff { attempts, next_at, .. } => format!(
                "auto-repair backing off: {attempts} repair(s) did not hold; the next at {}",
                next_at.format("%H:%M:%S")
            ),
            Decision::CrashLoop { attempts, since, .. } => format!(
                "crash loop: it died again after each of {attempts} automatic repairs since {}; auto-repair has \
                 stopped (fix the cause, then repair, deploy or restart it by hand)",
                since.format("%Y-%m-%d %H:%M:%S UTC")
            ),
        }
    }
}

impl RepairPolicy {
    /// The wait before the repair after `attempts` that did not hold.
    pub fn wait_after(&self, attempts: u32) -> Duration {
        let factor = 1u32.checked_shl(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.backoff_max)
    }

    /// Decides from the resource's runs (newest first, as the ledger lists
    /// them; enough of them to cover a streak) what to do about something
    /// to repair seen at `now`.
    pub fn decide(&self, runs: &[Run], now: Time) -> Decision {
        let forgive = chrono::Duration::from_std(self.forgive_after).unwrap_or(chrono::Duration::MAX);
        let mut streak: Vec<&Run> = Vec::new();
        let mut next_start = now;
        for run in runs {
            if run.action == "refresh" {
                continue;
            }
            if !(run.actor == OBSERVER_ACTOR && run.action == "repair") {
                break;
            }
            let ended = run.finished_at.unwrap_or(run.created_at);
            if next_start - ended > forgive {
                break;
            }
            next_start = run.created_at;
            streak.push(run);
        }
        let attempts = streak.len() as u32;
        let Some(last) = streak.first() else { return Decision::Repair { attempt: 1 } };
        if attempts >= self.crash_loop_after {
            let since = streak.last().map(|r| r.created_at).unwrap_or(last.created_at);
            return Decision::CrashLoop { attempts, since, last_run: last.id };
        }
        let ended = last.finished_at.unwrap_or(last.created_at);
        let next_at = ended + chrono::Duration::from_std(self.wait_after(attempts)).unwrap_or(chrono::Duration::MAX);
        if now >= next_at {
            Decision::Repair { attempt: attempts + 1 }
        } else {
            Decision::BackingOff { attempts, next_at, last_run: last.id }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;

    use super::*;
    use crate::kinds::cluster;
    use crate::model::RunStatus;

    fn run(action: &str, actor: &str, ended_secs_ago: i64, now: Time) -> Run {
        let ended = now - chrono::Duration::seconds(ended_secs_ago);
        Run {
            id: Uuid::new_v4(),
            resource_id: Uuid::nil(),
            kind: cluster::KIND,
            resource_name: "c1".into(),
            action: action.into(),
            params: json!({}),
            from_state: "up".into(),
            working_state: "repairing".into(),
            ok_state: "up".into(),
            err_state: "up".into(),
            status: RunStatus::Succeeded,
            attempt: 1,
            max_attempts: 3,
            actor: actor.into(),
            reason: None,
            idempotency_key: None,
            parent_run: None,
            provider: "local".into(),
            timeout_secs: 600,
            created_at: ended - chrono::Duration::seconds(1),
            run_after: ended - chrono::Duration::seconds(1),
            started_at: Some(ended - chrono::Duration::seconds(1)),
            finished_at: Some(ended),
            worker: None,
            lease_token: None,
            lease_expires_at: None,
            heartbeat_at: None,
            outputs: None,
            error: None,
            cancel_requested_at: None,
            cancel_requested_by: None,
            settings: json!([]),
            environment: None,
            spec_version: None,
        }
    }

    fn policy() -> RepairPolicy {
        RepairPolicy {
            backoff: Duration::from_secs(10),
            backoff_max: Duration::from_secs(60),
            crash_loop_after: 4,
            forgive_after: Duration::from_secs(300),
        }
    }

    #[test]
    fn the_first_repair_is_at_once_and_the_next_back_off_doubling() {
        let now = Utc::now();
        let p = policy();
        assert_eq!(p.decide(&[], now), Decision::Repair { attempt: 1 });
        let one = [run("repair", OBSERVER_ACTOR, 5, now)];
        assert!(matches!(p.decide(&one, now), Decision::BackingOff { attempts: 1, .. }), "10 s after the first");
        let one = [run("repair", OBSERVER_ACTOR, 11, now)];
        assert_eq!(p.decide(&one, now), Decision::Repair { attempt: 2 });
        // Refreshes (whoever asked) do not break a streak; two repairs
        // that did not hold wait 20 s.
        let two = [
            run("refresh", "alice", 12, now),
            run("repair", OBSERVER_ACTOR, 15, now),
            run("repair", OBSERVER_ACTOR, 40, now),
        ];
        assert!(matches!(p.decide(&two, now), Decision::BackingOff { attempts: 2, .. }));
        assert_eq!(p.wait_after(1), Duration::from_secs(10));
        assert_eq!(p.wait_after(3), Duration::from_secs(40));
        assert_eq!(p.wait_after(30), Duration::from_secs(60), "capped");
    }

    #[test]
    fn repairs_that_do_not_hold_become_a_crash_loop_until_someone_acts() {
        let now = Utc::now();
        let p = policy();
        let mut runs: Vec<Run> = (0..4).map(|i| run("repair", OBSERVER_ACTOR, 10 + i * 30, now)).collect();
        match p.decide(&runs, now) {
            Decision::CrashLoop { attempts: 4, last_run, .. } => assert_eq!(last_run, runs[0].id),
            d => panic!("{d:?}"),
        }
        assert!(p.decide(&runs, now).said().starts_with("crash loop: it died again after each of 4"));
        // A person's repair is a new start.
        runs.insert(0, run("repair", "alice", 5, now));
        assert_eq!(p.decide(&runs, now), Decision::Repair { attempt: 1 });
    }

    #[test]
    fn a_repair_that_held_is_forgiven() {
        let now = Utc::now();
        let p = policy();
        // The last repair held for ten minutes: a new streak.
        let runs: Vec<Run> = (0..4).map(|i| run("repair", OBSERVER_ACTOR, 600 + i * 30, now)).collect();
        assert_eq!(p.decide(&runs, now), Decision::Repair { attempt: 1 });
        // Two recent ones, then one that held before them: a streak of two.
        let runs = [
            run("repair", OBSERVER_ACTOR, 30, now),
            run("repair", OBSERVER_ACTOR, 60, now),
            run("repair", OBSERVER_ACTOR, 3000, now),
        ];
        assert_eq!(p.decide(&runs, now), Decision::Repair { attempt: 3 });
    }
}
