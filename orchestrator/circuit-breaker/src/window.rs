//! Sliding windows of recorded outcomes: the last `n` calls, or the calls of the last `d`
//! in fixed buckets. Both keep running totals, so reading a rate is O(1); a time window
//! clears the buckets it passed over (at most one pass over the ring).

use std::time::Duration;

use tokio::time::Instant;

/// Totals over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.calls = self.calls.saturating_add(other.calls);
        self.failures = self.failures.saturating_add(other.failures);
        self.slow = self.slow.saturating_add(other.slow);
    }

    fn sub(&mut self, other: Totals) {
        self.calls = self.calls.saturating_sub(other.calls);
        self.failures = self.failures.saturating_sub(other.failures);
        self.slow = self.slow.saturating_sub(other.slow);
    }

    fn one(failure: bool, slow: bool) -> Self {
        Self {
            calls: 1,
            failures: u32::from(failure),
            slow: u32::from(slow),
        }
    }

    /// `(failure rate, slow-call rate)` in percent.
    pub(crate) fn rates(&self) -> (f64, f64) {
        if self.calls == 0 {
            return (0.0, 0.0);
        }
        let calls = f64::from(self.calls);
        (
            f64::from(self.failures) * 100.0 / calls,
            f64::from(self.slow) * 100.0 / calls,
        )
    }
}

#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
    /// Every call since it was made, nothing forgotten (half-open probes: there are at most
    /// `permitted_calls_in_half_open` of them, so no ring is needed however large that is).
    Tally(Totals),
}

impl Window {
    pub(crate) fn count(size: u32) -> Self {
        Window::Count(CountWindow::new(size))
    }

    pub(crate) fn tally() -> Self {
        Window::Tally(Totals::default())
    }

    pub(crate) fn time(origin: Instant, bucket: Duration, buckets: u32) -> Self {
        Window::Time(TimeWindow::new(origin, bucket, buckets))
    }

    pub(crate) fn record(&mut self, now: Instant, failure: bool, slow: bool) {
        match self {
            Window::Count(w) => w.record(failure, slow),
            Window::Time(w) => w.record(now, failure, slow),
            Window::Tally(totals) => totals.add(Totals::one(failure, slow)),
        }
    }

    /// Whether recording needs the time (a time window); the others ignore it.
    pub(crate) fn is_timed(&self) -> bool {
        matches!(self, Window::Time(_))
    }

    /// The totals as of `now` (a time window first drops what aged out).
    pub(crate) fn totals(&mut self, now: Instant) -> Totals {
        match self {
            Window::Count(w) => w.totals,
            Window::Tally(totals) => *totals,
            Window::Time(w) => {
                w.advance(now);
                w.totals
            }
        }
    }
}

const FAILURE: u8 = 1;
const SLOW: u8 = 2;

/// The last `size` outcomes, in a ring.
#[derive(Debug)]
pub(crate) struct CountWindow {
    ring: Vec<u8>,
    next: usize,
    len: usize,
    totals: Totals,
}

impl CountWindow {
    fn new(size: u32) -> Self {
        let size = usize::try_from(size.max(1)).unwrap_or(usize::MAX);
        Self {
            ring: vec![0; size],
            next: 0,
            len: 0,
            totals: Totals::default(),
        }
    }

    fn record(&mut self, failure: bool, slow: bool) {
        if self.len == self.ring.len() {
            let old = self.ring[self.next];
            self.totals
                .sub(Totals::one(old & FAILURE != 0, old & SLOW != 0));
        } else {
            self.len += 1;
        }
        self.ring[self.next] = (if failure { FAILURE } else { 0 }) | (if slow { SLOW } else { 0 });
        self.totals.add(Totals::one(failure, slow));
        self.next = (self.next + 1) % self.ring.len();
    }
}

/// The outcomes of the last `bucket * buckets`, in a ring of buckets indexed by
/// `(now - origin) / bucket`.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    origin: Instant,
    bucket_nanos: u128,
    ring: Vec<Totals>,
    /// The bucket index of the newest bucket in the ring.
    head: u64,
    totals: Totals,
}

impl TimeWindow {
    fn new(origin: Instant, bucket: Duration, buckets: u32) -> Self {
        let buckets = usize::try_from(buckets.max(1)).unwrap_or(usize::MAX);
        Self {
            origin,
            bucket_nanos: bucket.as_nanos().max(1),
            ring: vec![Totals::default(); buckets],
            head: 0,
            totals: Totals::default(),
        }
    }

    fn index(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos / self.bucket_nanos).unwrap_or(u64::MAX)
    }

    fn slot(&self, index: u64) -> usize {
        // The ring's length fits in a u64 and the remainder in a usize.
        (index % self.ring.len() as u64) as usize
    }

    /// Drops the buckets that are older than the window at `now`.
    fn advance(&mut self, now: Instant) {
        let index = self.index(now);
        if index <= self.head {
            return;
        }
        if index - self.head >= self.ring.len() as u64 {
            self.ring.fill(Totals::default());
            self.totals = Totals::default();
        } else {
            for i in self.head + 1..=index {
                let slot = self.slot(i);
                let old = std::mem::take(&mut self.ring[slot]);
                self.totals.sub(old);
            }
        }
        self.head = index;
    }

    fn record(&mut self, now: Instant, failure: bool, slow: bool) {
        self.advance(now);
        let slot = self.slot(self.head);
        let one = Totals::one(failure, slow);
        self.ring[slot].add(one);
        self.totals.add(one);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_forgets_the_oldest() {
        let now = Instant::now();
        let mut w = Window::count(3);
        w.record(now, true, true);
        w.record(now, false, false);
        w.record(now, false, true);
        assert_eq!(
            w.totals(now),
            Totals {
                calls: 3,
                failures: 1,
                slow: 2
            }
        );
        w.record(now, false, false); // pushes out the failed slow call
        assert_eq!(
            w.totals(now),
            Totals {
                calls: 3,
                failures: 0,
                slow: 1
            }
        );
        let (failure, slow) = w.totals(now).rates();
        assert_eq!(failure, 0.0);
        assert!((slow - 100.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn time_window_ages_out_by_bucket() {
        let origin = Instant::now();
        let at = |ms| origin + Duration::from_millis(ms);
        // 10 buckets of 100ms: a 1s window.
        let mut w = Window::time(origin, Duration::from_millis(100), 10);
        w.record(at(0), true, false);
        w.record(at(450), false, false);
        w.record(at(950), true, true);
        assert_eq!(w.totals(at(999)).calls, 3);
        // At 1000ms bucket 0 (0..100ms) has aged out.
        assert_eq!(
            w.totals(at(1000)),
            Totals {
                calls: 2,
                failures: 1,
                slow: 1
            }
        );
        // The call at 450ms (bucket 400..500ms) ages out at 1400ms, 950ms after it.
        assert_eq!(w.totals(at(1399)).calls, 2);
        assert_eq!(w.totals(at(1400)).calls, 1);
        // A long idle period clears everything at once.
        assert_eq!(w.totals(at(60_000)), Totals::default());
        w.record(at(60_010), false, false);
        assert_eq!(w.totals(at(60_010)).calls, 1);
    }
}
