//! Fault injection and call counting, shared between a running participant and its test.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tonic::Code;

/// The method name that matches every method except `ListLedger`.
pub const ANY_METHOD: &str = "*";

/// The read-only method that `"*"` never matches.
const LIST_LEDGER: &str = "ListLedger";

/// Faults to inject into a participant's calls, and how many calls each method received.
///
/// Shared through an `Arc` between the server and whoever drives it (usually a test).
/// Method names are the short gRPC names (`"AuthorizeCharge"`, `"ListLedger"`, ...);
/// `"*"` stands for every method except `ListLedger`.
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<State>,
}

/// Faults drawn at random for every mutating call (the chaos harness sets them through the
/// admin endpoint `PUT /faults` of a participant started with `--allow-fault-injection`).
/// Probabilities are in `0.0..=1.0`; missing fields are zero.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RandomFaults {
    /// Fail with UNAVAILABLE before applying anything.
    pub unavailable: f64,
    /// Wait `slow_ms` first (a latency spike).
    pub slow: f64,
    pub slow_ms: u64,
    /// Wait `hang_ms` first (past the caller's deadline).
    pub hang: f64,
    pub hang_ms: u64,
    /// Apply the effect, then answer UNAVAILABLE (an unknown outcome for the caller).
    pub lose_reply: f64,
    /// Seed of the draws (default: random).
    pub seed: Option<u64>,
}

impl RandomFaults {
    /// Why these settings are refused, if they are.
    pub fn check(&self) -> Result<(), String> {
        for (name, p) in [
            ("unavailable", self.unavailable),
            ("slow", self.slow),
            ("hang", self.hang),
            ("lose_reply", self.lose_reply),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name}: {p} is not a probability between 0 and 1"));
            }
        }
        for (name, ms) in [("slow_ms", self.slow_ms), ("hang_ms", self.hang_ms)] {
            if ms > 600_000 {
                return Err(format!("{name}: {ms} ms is over 10 minutes"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct State {
    /// Queued failures per method name (or `"*"`): each element fails that many calls.
    failures: HashMap<String, VecDeque<(Code, u32)>>,
    delays: HashMap<String, Duration>,
    /// Pending lost replies per method name (or `"*"`).
    lost_replies: HashMap<String, u32>,
    calls: HashMap<String, u64>,
    /// Random faults of every mutating call, with their random number generator.
    random: Option<(RandomFaults, fastrand::Rng)>,
}

impl Faults {
    /// The next `count` calls to `method` (short name like "AuthorizeCharge", or "*" for any
    /// method, ListLedger excluded) fail with `code` before doing anything (not recorded in
    /// the idempotency table, no effect).
    ///
    /// Calling it again for the same method queues the new failures after the pending ones.
    /// Failures queued for the method itself are used before those queued for `"*"`.
    pub fn fail_next(&self, method: &str, code: Code, count: u32) {
        if count == 0 {
            return;
        }
        self.lock()
            .failures
            .entry(method.to_owned())
            .or_default()
            .push_back((code, count));
    }

    /// Every call to `method` ("*" = any) first waits `delay` (for timeout tests).
    /// `Duration::ZERO` clears it. A delay set for the method itself wins over the one set
    /// for `"*"`.
    pub fn set_delay(&self, method: &str, delay: Duration) {
        let mut state = self.lock();
        if delay.is_zero() {
            state.delays.remove(method);
        } else {
            state.delays.insert(method.to_owned(), delay);
        }
    }

    /// The next `count` calls to `method` ("*" = any mutating method) are applied normally
    /// (effect, ledger entry, stored first result, flushed) but the caller gets UNAVAILABLE
    /// "reply lost after the effect was applied (injected)" instead of the reply: an unknown
    /// outcome, as when a connection resets after the request was sent.
    ///
    /// A repeat of the same idempotency key later gets the stored first result (the real
    /// reply). Calls stopped before they apply (an injected failure, a missing key) do not
    /// use up a lost reply; a replayed call does. Calling it again adds to the pending
    /// count. Lost replies of the method itself are used before those of `"*"`.
    /// `ListLedger` is not mutating and never loses its reply.
    pub fn lose_replies(&self, method: &str, count: u32) {
        if count == 0 {
            return;
        }
        let mut state = self.lock();
        let pending = state.lost_replies.entry(method.to_owned()).or_default();
        *pending = pending.saturating_add(count);
    }

    /// Removes every pending failure, delay and lost reply, and the random faults (the call
    /// counts are kept).
    pub fn clear(&self) {
        let mut state = self.lock();
        state.failures.clear();
        state.delays.clear();
        state.lost_replies.clear();
        state.random = None;
    }

    /// Draws faults at random for every mutating call from now on (see [`RandomFaults`]).
    pub fn set_random(&self, faults: RandomFaults) -> Result<(), String> {
        faults.check()?;
        let rng = match faults.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        self.lock().random = Some((faults, rng));
        Ok(())
    }

    /// The random faults in force (all zero when none).
    pub fn random(&self) -> RandomFaults {
        self.lock()
            .random
            .as_ref()
            .map(|(faults, _)| faults.clone())
            .unwrap_or_default()
    }

    /// Draws with probability `p` from the random faults' generator.
    fn draw(state: &mut State, pick: impl Fn(&RandomFaults) -> f64) -> bool {
        match &mut state.random {
            Some((faults, rng)) => {
                let p = pick(faults);
                p > 0.0 && rng.f64() < p
            }
            None => false,
        }
    }

    /// How many calls each method received (including failed/injected ones), by short
    /// method name; `"*"` gives the total over every method.
    pub fn calls(&self, method: &str) -> u64 {
        let state = self.lock();
        if method == ANY_METHOD {
            state.calls.values().sum()
        } else {
            state.calls.get(method).copied().unwrap_or(0)
        }
    }

    /// Counts a call to `method` and returns the delay it must wait first.
    pub(crate) fn begin_call(&self, method: &str) -> Duration {
        let mut state = self.lock();
        *state.calls.entry(method.to_owned()).or_default() += 1;
        if method != LIST_LEDGER {
            let hang = Faults::draw(&mut state, |f| f.hang);
            let slow = Faults::draw(&mut state, |f| f.slow);
            if let Some((faults, _)) = &state.random {
                if hang {
                    return Duration::from_millis(faults.hang_ms);
                }
                if slow {
                    return Duration::from_millis(faults.slow_ms);
                }
            }
        }
        state
            .delays
            .get(method)
            .or_else(|| {
                (method != LIST_LEDGER)
                    .then(|| state.delays.get(ANY_METHOD))
                    .flatten()
            })
            .copied()
            .unwrap_or(Duration::ZERO)
    }

    /// Consumes one injected failure for `method`, if any is pending.
    pub(crate) fn take_failure(&self, method: &str) -> Option<Code> {
        let mut state = self.lock();
        if let Some(code) = take_from(&mut state.failures, method) {
            return Some(code);
        }
        if method == LIST_LEDGER {
            return None;
        }
        if Faults::draw(&mut state, |f| f.unavailable) {
            return Some(Code::Unavailable);
        }
        take_from(&mut state.failures, ANY_METHOD)
    }

    /// Consumes one pending lost reply for the mutating `method`; `true` if its reply is lost.
    pub(crate) fn take_lost_reply(&self, method: &str) -> bool {
        if method == LIST_LEDGER {
            return false;
        }
        let mut state = self.lock();
        if Faults::draw(&mut state, |f| f.lose_reply) {
            return true;
        }
        [method, ANY_METHOD].into_iter().any(|name| {
            let Some(pending) = state.lost_replies.get_mut(name) else {
                return false;
            };
            *pending -= 1;
            if *pending == 0 {
                state.lost_replies.remove(name);
            }
            true
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one step.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn take_from(failures: &mut HashMap<String, VecDeque<(Code, u32)>>, method: &str) -> Option<Code> {
    let queue = failures.get_mut(method)?;
    let (code, remaining) = queue.front_mut()?;
    let code = *code;
    *remaining -= 1;
    if *remaining == 0 {
        queue.pop_front();
    }
    if queue.is_empty() {
        failures.remove(method);
    }
    Some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_consumed_in_order_and_star_skips_list_ledger() {
        let faults = Faults::default();
        faults.fail_next("A", Code::Unavailable, 2);
        faults.fail_next("A", Code::Internal, 1);
        faults.fail_next("*", Code::Aborted, 1);
        assert_eq!(faults.take_failure("ListLedger"), None);
        assert_eq!(faults.take_failure("A"), Some(Code::Unavailable));
        assert_eq!(faults.take_failure("A"), Some(Code::Unavailable));
        assert_eq!(faults.take_failure("A"), Some(Code::Internal));
        assert_eq!(faults.take_failure("A"), Some(Code::Aborted));
        assert_eq!(faults.take_failure("A"), None);
        assert_eq!(faults.take_failure("B"), None);
    }

    #[test]
    fn delays_and_calls() {
        let faults = Faults::default();
        faults.set_delay("*", Duration::from_secs(1));
        faults.set_delay("B", Duration::from_secs(2));
        assert_eq!(faults.begin_call("A"), Duration::from_secs(1));
        assert_eq!(faults.begin_call("B"), Duration::from_secs(2));
        assert_eq!(faults.begin_call("ListLedger"), Duration::ZERO);
        faults.set_delay("*", Duration::ZERO);
        assert_eq!(faults.begin_call("A"), Duration::ZERO);
        faults.clear();
        assert_eq!(faults.begin_call("B"), Duration::ZERO);
        assert_eq!(faults.calls("A"), 2);
        assert_eq!(faults.calls("B"), 2);
        assert_eq!(faults.calls("*"), 5);
        assert_eq!(faults.calls("C"), 0);
    }

    #[test]
    fn lost_replies_are_counted_per_method_then_star_and_cleared() {
        let faults = Faults::default();
        faults.lose_replies("A", 1);
        faults.lose_replies("*", 2);
        faults.lose_replies("B", 0);
        assert!(!faults.take_lost_reply("ListLedger"));
        assert!(faults.take_lost_reply("A"));
        assert!(faults.take_lost_reply("A"));
        assert!(faults.take_lost_reply("B"));
        assert!(!faults.take_lost_reply("A"));
        assert!(!faults.take_lost_reply("B"));
        faults.lose_replies("A", 3);
        faults.clear();
        assert!(!faults.take_lost_reply("A"));
    }
}
