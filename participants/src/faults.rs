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

#[derive(Debug, Default)]
struct State {
    /// Queued failures per method name (or `"*"`): each element fails that many calls.
    failures: HashMap<String, VecDeque<(Code, u32)>>,
    delays: HashMap<String, Duration>,
    calls: HashMap<String, u64>,
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

    /// Removes every pending failure and delay (the call counts are kept).
    pub fn clear(&self) {
        let mut state = self.lock();
        state.failures.clear();
        state.delays.clear();
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
        take_from(&mut state.failures, ANY_METHOD)
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
}
