//! Condition bookkeeping with Kubernetes semantics: `lastTransitionTime` moves only when
//! `status` changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::relay_sync::{Condition, ConditionStatus};

pub const ASSIGNED: &str = "Assigned";
pub const CONNECTED: &str = "Connected";
pub const HISTORIC_SYNCED: &str = "HistoricSynced";
pub const READY: &str = "Ready";

/// Set or replace the condition `new.type_` in `conditions`. If the status is unchanged the
/// previous `lastTransitionTime` is kept. Returns true if anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let transition_time = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            let merged = Condition {
                last_transition_time: transition_time,
                ..new
            };
            if *existing == merged {
                false
            } else {
                *existing = merged;
                true
            }
        }
        None => {
            conditions.push(new);
            conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
            true
        }
    }
}

/// Convenience constructor.
pub fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    now: Time,
    observed_generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.into(),
        last_transition_time: now,
        observed_generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut cs = Vec::new();
        let first = condition(
            READY,
            ConditionStatus::False,
            "Connecting",
            "",
            at(10),
            Some(1),
        );
        assert!(set_condition(&mut cs, first));
        assert_eq!(cs[0].last_transition_time, at(10));

        // Same status, new reason: updated, but the transition time stays.
        let same = condition(
            READY,
            ConditionStatus::False,
            "Backoff",
            "x",
            at(20),
            Some(1),
        );
        assert!(set_condition(&mut cs, same));
        assert_eq!(cs[0].reason, "Backoff");
        assert_eq!(cs[0].last_transition_time, at(10));

        // Identical apart from the clock: no change reported.
        let again = condition(
            READY,
            ConditionStatus::False,
            "Backoff",
            "x",
            at(30),
            Some(1),
        );
        assert!(!set_condition(&mut cs, again));

        // Status flips: the transition time moves.
        let flip = condition(READY, ConditionStatus::True, "Live", "", at(40), Some(2));
        assert!(set_condition(&mut cs, flip));
        assert_eq!(cs[0].last_transition_time, at(40));
        assert_eq!(cs[0].observed_generation, Some(2));
        assert_eq!(cs.len(), 1);
    }

    #[test]
    fn conditions_stay_unique_and_sorted() {
        let mut cs = Vec::new();
        for t in [READY, ASSIGNED, CONNECTED, HISTORIC_SYNCED, READY] {
            set_condition(
                &mut cs,
                condition(t, ConditionStatus::Unknown, "R", "", at(1), None),
            );
        }
        let types: Vec<_> = cs.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [ASSIGNED, CONNECTED, HISTORIC_SYNCED, READY]);
    }
}
