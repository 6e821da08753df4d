//! What the engine loop does about faults: a pure state machine, events in, actions out.
//!
//! Events are what happens to the cluster: a step failed or succeeded, membership changed (a
//! worker joined, returned or was drained: the cluster must be rebuilt), a rebuild finished
//! (its outcome), time passed while unavailable, leadership was lost. Actions are what the
//! shell around it ([`crate::server`]'s engine loop) must do: rebuild the cluster from the
//! workers reachable, fail every request in flight, answer an operator, publish the state,
//! stop. The machine owns no I/O, no clock (the caller passes `now`) and no driver, so every
//! path through recovery is unit-tested without sockets (in the spirit of raft-rs's `Ready`).
//!
//! Invariants:
//! - At most one rebuild is outstanding: after [`Action::Rebuild`] the shell reports its
//!   outcome with [`Event::Rebuilt`] before anything else.
//! - A failed step is rebuilt from at most [`MAX_RECOVERIES`] times in a row (a step that
//!   fails deterministically must not loop forever); past that the requests in flight fail.
//! - While unavailable (no cluster could be built) every request in flight has been failed,
//!   new ones are refused with the reason ([`Recovery::unavailable`]), and a rebuild is
//!   retried every [`RETRY_UNAVAILABLE`] and on every membership change.
//! - A membership change asked for before the last successful rebuild is already satisfied
//!   (that rebuild saw it): no second epoch.
//! - A drain (a membership change with an operator waiting) that cannot be rebuilt is
//!   answered with the error and leaves the cluster as it was; any other failed rebuild makes
//!   the cluster unavailable.
//! - After leadership is lost nothing else happens: requests fail and the loop stops.

use std::time::{Duration, Instant};

/// Consecutive failed steps recovered from before the requests in flight are failed.
pub const MAX_RECOVERIES: usize = 3;

/// While unavailable, how often a rebuild is retried.
pub const RETRY_UNAVAILABLE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    StepOk,
    StepFailed(String),
    /// Rebuild to take a membership change in, asked at `asked`; `operator`: someone waits
    /// for the answer (a drain), and a failure is only theirs.
    MembershipChanged {
        asked: Instant,
        operator: bool,
    },
    /// The outcome of the last [`Action::Rebuild`].
    Rebuilt(Result<(), String>),
    /// Time passed (the shell sends it while unavailable).
    Tick,
    LeadershipLost(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Build a new cluster from the workers reachable (`why` names the cause, for the log).
    Rebuild { why: &'static str },
    /// Fail every request in flight with UNAVAILABLE and this reason.
    FailAll(String),
    /// Answer the operator waiting on a membership change.
    Reply(Result<(), String>),
    /// The unavailable state changed (or may have): publish it.
    Publish,
    /// The cluster serves again after being unavailable.
    Available,
    /// End the engine loop.
    Stop,
}

/// What a rebuild in flight was for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cause {
    FailedStep,
    Membership { operator: bool },
    Retry,
}

#[derive(Debug)]
pub struct Recovery {
    failures: usize,
    unavailable: Option<String>,
    rebuilding: Option<Cause>,
    last_try: Instant,
    last_rebuilt: Instant,
    stopped: bool,
}

/// How a reason reads to clients while unavailable.
pub fn unavailable_reason(why: &str) -> String {
    format!("the cluster cannot serve: {why}")
}

impl Recovery {
    /// A cluster that serves, built at `now`.
    pub fn new(now: Instant) -> Self {
        Recovery {
            failures: 0,
            unavailable: None,
            rebuilding: None,
            last_try: now,
            last_rebuilt: now,
            stopped: false,
        }
    }

    /// Why requests are refused, while they are.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// Whether the loop should step (serving, nothing outstanding).
    pub fn may_step(&self) -> bool {
        self.unavailable.is_none() && self.rebuilding.is_none() && !self.stopped
    }

    /// When the shell should send the next [`Event::Tick`] (while unavailable).
    pub fn next_retry(&self) -> Option<Instant> {
        self.unavailable
            .as_ref()
            .map(|_| self.last_try + RETRY_UNAVAILABLE)
    }

    fn rebuild(&mut self, cause: Cause, why: &'static str) -> Vec<Action> {
        self.rebuilding = Some(cause);
        vec![Action::Rebuild { why }]
    }

    fn become_unavailable(&mut self, why: String, now: Instant) -> Vec<Action> {
        self.unavailable = Some(why.clone());
        self.last_try = now;
        vec![Action::Publish, Action::FailAll(why)]
    }

    pub fn on(&mut self, e: Event, now: Instant) -> Vec<Action> {
        if self.stopped {
            return vec![];
        }
        match e {
            Event::LeadershipLost(why) => {
                let why = unavailable_reason(&why);
                let mut a = self.become_unavailable(why, now);
                self.stopped = true;
                a.push(Action::Stop);
                a
            }
            Event::StepOk => {
                self.failures = 0;
                vec![]
            }
            Event::StepFailed(err) => {
                self.failures += 1;
                if self.failures <= MAX_RECOVERIES {
                    self.rebuild(Cause::FailedStep, "a failed step")
                } else {
                    let why = unavailable_reason(&format!(
                        "{} steps in a row failed: {err}",
                        self.failures
                    ));
                    self.become_unavailable(why, now)
                }
            }
            Event::MembershipChanged { asked, operator } => {
                if asked < self.last_rebuilt && self.unavailable.is_none() {
                    // The last rebuild already took it in.
                    return if operator {
                        vec![Action::Reply(Ok(()))]
                    } else {
                        vec![]
                    };
                }
                self.rebuild(Cause::Membership { operator }, "a membership change")
            }
            Event::Tick => match self.next_retry() {
                Some(at) if now >= at && self.rebuilding.is_none() => {
                    self.last_try = now;
                    self.rebuild(Cause::Retry, "being unavailable")
                }
                _ => vec![],
            },
            Event::Rebuilt(r) => {
                let Some(cause) = self.rebuilding.take() else {
                    return vec![];
                };
                let was_unavailable = self.unavailable.is_some();
                match (r, cause) {
                    (Ok(()), _) => {
                        self.last_rebuilt = now;
                        self.unavailable = None;
                        if cause != Cause::FailedStep {
                            self.failures = 0;
                        }
                        let mut a = vec![Action::Publish];
                        if was_unavailable {
                            a.push(Action::Available);
                        }
                        if let Cause::Membership { operator: true } = cause {
                            a.push(Action::Reply(Ok(())));
                        }
                        a
                    }
                    (Err(why), Cause::Membership { operator: true }) => {
                        self.last_try = now;
                        vec![Action::Reply(Err(why)), Action::Publish]
                    }
                    (Err(_), Cause::Retry) => {
                        self.last_try = now;
                        vec![Action::Publish]
                    }
                    (Err(why), _) => {
                        // The old cluster's epoch is over (new streams were opened to its
                        // workers): unavailable until a rebuild succeeds.
                        self.become_unavailable(unavailable_reason(&why), now)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rebuild(why: &'static str) -> Vec<Action> {
        vec![Action::Rebuild { why }]
    }

    #[test]
    fn a_failed_step_is_rebuilt_from_and_serving_goes_on() {
        let t = Instant::now();
        let mut r = Recovery::new(t);
        assert_eq!(
            r.on(Event::StepFailed("rank 1".into()), t),
            rebuild("a failed step")
        );
        assert!(
            !r.may_step(),
            "nothing steps while a rebuild is outstanding"
        );
        assert_eq!(r.on(Event::Rebuilt(Ok(())), t), vec![Action::Publish]);
        assert!(r.may_step());
        assert_eq!(r.on(Event::StepOk, t), vec![]);
    }

    #[test]
    fn a_step_failing_every_time_fails_the_requests_after_three_recoveries() {
        let t = Instant::now();
        let mut r = Recovery::new(t);
        for _ in 0..MAX_RECOVERIES {
            assert_eq!(
                r.on(Event::StepFailed("boom".into()), t),
                rebuild("a failed step")
            );
            r.on(Event::Rebuilt(Ok(())), t);
        }
        let a = r.on(Event::StepFailed("boom".into()), t);
        let why = "the cluster cannot serve: 4 steps in a row failed: boom".to_string();
        assert_eq!(a, vec![Action::Publish, Action::FailAll(why.clone())]);
        assert_eq!(r.unavailable(), Some(why.as_str()));
        // A success in between resets the count.
        let mut r = Recovery::new(t);
        for _ in 0..10 {
            assert_eq!(
                r.on(Event::StepFailed("x".into()), t),
                rebuild("a failed step")
            );
            r.on(Event::Rebuilt(Ok(())), t);
            r.on(Event::StepOk, t);
        }
        assert!(r.may_step());
    }

    #[test]
    fn unavailable_until_a_retry_or_a_join_rebuilds() {
        let t = Instant::now();
        let mut r = Recovery::new(t);
        r.on(Event::StepFailed("rank 2 gone".into()), t);
        let a = r.on(Event::Rebuilt(Err("room for 5 of 8 experts".into())), t);
        let why = "the cluster cannot serve: room for 5 of 8 experts".to_string();
        assert_eq!(a, vec![Action::Publish, Action::FailAll(why.clone())]);
        assert_eq!(r.unavailable(), Some(why.as_str()));
        assert!(!r.may_step());
        // Not yet time to retry; then a retry that fails leaves it unavailable.
        assert_eq!(r.next_retry(), Some(t + RETRY_UNAVAILABLE));
        assert_eq!(r.on(Event::Tick, t + Duration::from_millis(500)), vec![]);
        let t1 = t + RETRY_UNAVAILABLE;
        assert_eq!(r.on(Event::Tick, t1), rebuild("being unavailable"));
        assert_eq!(
            r.on(Event::Rebuilt(Err("still".into())), t1),
            vec![Action::Publish]
        );
        assert_eq!(r.next_retry(), Some(t1 + RETRY_UNAVAILABLE));
        // A join rebuilds at once, even one asked before the last (failed) try.
        assert_eq!(
            r.on(
                Event::MembershipChanged {
                    asked: t,
                    operator: false
                },
                t1
            ),
            rebuild("a membership change")
        );
        let a = r.on(Event::Rebuilt(Ok(())), t1);
        assert_eq!(a, vec![Action::Publish, Action::Available]);
        assert!(r.may_step() && r.unavailable().is_none());
    }

    #[test]
    fn a_membership_change_the_last_rebuild_saw_is_not_rebuilt_again() {
        let t0 = Instant::now();
        let mut r = Recovery::new(t0);
        let t1 = t0 + Duration::from_secs(1);
        r.on(Event::StepFailed("rank 1".into()), t1);
        r.on(Event::Rebuilt(Ok(())), t1);
        // Asked before that rebuild (the same worker's loss, noticed by membership too).
        let asked = t1 - Duration::from_millis(10);
        let a = r.on(
            Event::MembershipChanged {
                asked,
                operator: false,
            },
            t1,
        );
        assert_eq!(a, vec![]);
        let a = r.on(
            Event::MembershipChanged {
                asked,
                operator: true,
            },
            t1,
        );
        assert_eq!(a, vec![Action::Reply(Ok(()))]);
        // One asked after it is rebuilt.
        let a = r.on(
            Event::MembershipChanged {
                asked: t1 + Duration::from_millis(1),
                operator: false,
            },
            t1,
        );
        assert_eq!(a, rebuild("a membership change"));
    }

    #[test]
    fn a_drain_that_cannot_be_rebuilt_only_answers_the_operator() {
        let t = Instant::now();
        let mut r = Recovery::new(t);
        let t1 = t + Duration::from_secs(1);
        let ask = Event::MembershipChanged {
            asked: t1,
            operator: true,
        };
        assert_eq!(r.on(ask.clone(), t1), rebuild("a membership change"));
        let a = r.on(Event::Rebuilt(Err("no room".into())), t1);
        assert_eq!(
            a,
            vec![Action::Reply(Err("no room".into())), Action::Publish]
        );
        assert!(r.may_step() && r.unavailable().is_none());
        // A join that cannot be rebuilt makes the cluster unavailable.
        r.on(
            Event::MembershipChanged {
                asked: t1,
                operator: false,
            },
            t1,
        );
        let a = r.on(Event::Rebuilt(Err("no room".into())), t1);
        assert!(matches!(a[1], Action::FailAll(_)), "{a:?}");
        // A drain that succeeds is answered after the state is published.
        assert_eq!(r.on(ask, t1), rebuild("a membership change"));
        assert_eq!(
            r.on(Event::Rebuilt(Ok(())), t1),
            vec![Action::Publish, Action::Available, Action::Reply(Ok(()))]
        );
    }

    #[test]
    fn lost_leadership_fails_everything_and_stops_for_good() {
        let t = Instant::now();
        let mut r = Recovery::new(t);
        let a = r.on(Event::LeadershipLost("leadership lost".into()), t);
        let why = "the cluster cannot serve: leadership lost".to_string();
        assert_eq!(a, vec![Action::Publish, Action::FailAll(why), Action::Stop]);
        assert!(!r.may_step());
        assert_eq!(r.on(Event::StepFailed("late".into()), t), vec![]);
        assert_eq!(r.on(Event::Tick, t + Duration::from_secs(9)), vec![]);
    }

    #[test]
    fn a_rebuild_outcome_without_a_rebuild_is_ignored() {
        let t = Instant::now();
        let mut r = Recovery::new(t);
        assert_eq!(r.on(Event::Rebuilt(Ok(())), t), vec![]);
        assert_eq!(r.on(Event::Tick, t + Duration::from_secs(5)), vec![]);
    }
}
