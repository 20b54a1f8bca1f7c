//! The step-by-step state machine of a federated round, as pure functions: each step is one
//! task per participant, then an average of their tails ([`super::tails`]); the last average is
//! Model_FT.

use crate::store::{FedAggregate, RoundRecord, RoundState, TaskRecord, TaskState};

pub use super::tails::{Contribution, FedError, average, check_tail_header};

/// Where a federated round's current step stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Not a federated round, or not every task of the step is final.
    Running,
    /// Every task of the step is final and enough succeeded: average these (site, tail
    /// sha256, training cases), sorted by site.
    Average(Vec<(String, String, u32)>),
    /// Too few succeeded.
    Fail(String),
}

/// The current step's standing. `cases_of` reads a succeeded task's uploaded tail and
/// training cases (from its result); a succeeded task without one counts as failed.
pub fn step(
    round: &RoundRecord,
    tasks: &[TaskRecord],
    cases_of: impl Fn(&TaskRecord) -> Option<(String, u32)>,
) -> Step {
    let Some(fed) = &round.fed else { return Step::Running };
    if round.state != RoundState::Running {
        return Step::Running;
    }
    let now: Vec<&TaskRecord> = tasks.iter().filter(|t| t.fed_step == fed.step).collect();
    if now.is_empty() || !now.iter().all(|t| t.state.is_final()) {
        return Step::Running;
    }
    let mut done: Vec<(String, String, u32)> = now
        .iter()
        .filter(|t| t.state == TaskState::Succeeded)
        .filter_map(|t| cases_of(t).map(|(sha, n)| (t.site.clone(), sha, n)))
        .collect();
    done.sort();
    if (done.len() as u32) < round.quorum.max(1) {
        return Step::Fail(format!(
            "step {} of {}: {} of {} sites delivered a tail; the quorum is {}",
            fed.step,
            fed.rounds,
            done.len(),
            now.len(),
            round.quorum
        ));
    }
    Step::Average(done)
}

/// Records a step's average and moves on: the next step's tasks (for the participants that
/// did not refuse), or the round completed after the last step. Returns the new tasks.
pub fn advance(
    round: &mut RoundRecord,
    tasks: &[TaskRecord],
    agg: FedAggregate,
) -> Vec<TaskRecord> {
    let Some(fed) = round.fed.as_mut() else { return Vec::new() };
    fed.aggregates.push(agg);
    if fed.step >= fed.rounds {
        round.state = RoundState::Completed;
        return Vec::new();
    }
    fed.step += 1;
    // A site that refused (its policy) would refuse again.
    let refused = |site: &str| {
        tasks.iter().any(|t| t.site == site && matches!(t.state, TaskState::Refused { .. }))
    };
    let step = fed.step;
    let new: Vec<TaskRecord> = fed
        .participants
        .iter()
        .filter(|s| !refused(s))
        .map(|s| TaskRecord {
            id: format!("{}.s{step}.{s}", round.id),
            round_id: round.id.clone(),
            site: s.clone(),
            state: TaskState::Pending,
            fed_step: step,
            ..Default::default()
        })
        .collect();
    round.tasks.extend(new.iter().map(|t| t.id.clone()));
    new
}

/// The tail a federated task applies over the base: the previous step's average.
pub fn tail_for(round: &RoundRecord, task: &TaskRecord) -> Option<String> {
    let fed = round.fed.as_ref()?;
    let prev = task.fed_step.checked_sub(1).filter(|s| *s > 0)?;
    fed.aggregates.iter().find(|a| a.step == prev).map(|a| a.tail_sha256.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FedState;

    fn fed_round(rounds: u32) -> RoundRecord {
        RoundRecord {
            id: "r".into(),
            quorum: 2,
            fed: Some(FedState {
                rounds,
                step: 1,
                participants: vec!["a".into(), "b".into(), "c".into()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn task(site: &str, step: u32, state: TaskState) -> TaskRecord {
        TaskRecord {
            id: format!("r.s{step}.{site}"),
            site: site.into(),
            fed_step: step,
            state,
            ..Default::default()
        }
    }

    #[test]
    fn a_federated_round_steps_through_its_averages() {
        let mut r = fed_round(2);
        let mut tasks = vec![
            task("b", 1, TaskState::Succeeded),
            task("a", 1, TaskState::Leased { deadline_ms: 9 }),
            task("c", 1, TaskState::Refused { reason: "sharing not allowed".into() }),
        ];
        let cases =
            |t: &TaskRecord| Some((format!("tail-{}", t.site), if t.site == "a" { 2 } else { 5 }));
        assert_eq!(step(&r, &tasks, cases), Step::Running, "a is still training");
        tasks[1].state = TaskState::Succeeded;
        let Step::Average(inputs) = step(&r, &tasks, cases) else { panic!("ready") };
        assert_eq!(
            inputs,
            [("a".into(), "tail-a".into(), 2), ("b".into(), "tail-b".into(), 5)],
            "sorted by site"
        );
        let agg = |s: u32| FedAggregate {
            step: s,
            tail_sha256: format!("avg{s}"),
            sites: vec![],
            cases: vec![],
            tail_bytes: 10,
        };
        let new = advance(&mut r, &tasks, agg(1));
        let ids: Vec<&str> = new.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["r.s2.a", "r.s2.b"], "the refusing site is not asked again");
        assert_eq!(r.fed.as_ref().unwrap().step, 2);
        assert_eq!(r.tasks, ["r.s2.a", "r.s2.b"]);
        assert_eq!(tail_for(&r, &new[0]).as_deref(), Some("avg1"));
        assert_eq!(tail_for(&r, &tasks[0]), None, "step 1 starts from the base");
        tasks.extend(new);
        assert_eq!(step(&r, &tasks, cases), Step::Running, "step 2 has not run");
        tasks[3].state = TaskState::Failed { reason: "x".into() };
        tasks[4].state = TaskState::Succeeded;
        assert!(matches!(step(&r, &tasks, cases), Step::Fail(m) if m.contains("1 of 2 sites")));
        tasks[3].state = TaskState::Succeeded;
        assert!(matches!(step(&r, &tasks, cases), Step::Average(v) if v.len() == 2));
        assert!(advance(&mut r, &tasks, agg(2)).is_empty());
        assert_eq!(r.state, RoundState::Completed, "after the last step");
        assert_eq!(r.fed.unwrap().aggregates.len(), 2);
        // A succeeded task without an uploaded tail does not count.
        let r = fed_round(1);
        let tasks = vec![task("a", 1, TaskState::Succeeded), task("b", 1, TaskState::Succeeded)];
        assert!(matches!(
            step(&r, &tasks, |t| (t.site == "a").then(|| ("x".into(), 1))),
            Step::Fail(_)
        ));
    }
}
