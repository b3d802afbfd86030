//! The shared state machine: admission ([`CircuitBreaker::try_acquire`]), recording
//! ([`Permit::record`]), transitions, and waiting for admission ([`CircuitBreaker::ready`]).
//!
//! Every clone of a [`CircuitBreaker`] shares one `Shared` behind an `Arc`. The current
//! state and a generation number live in one atomic word, so admission in closed (and
//! disabled) is a single atomic load with no lock, and so is the rejection of an open
//! breaker whose wait has not elapsed (plus a load of the wait's end). Everything else (recording outcomes, transitions, half-open
//! probes, snapshots) takes a `std::sync::Mutex` for a few instructions; it is never held
//! across an `.await`, and nothing here uses an async mutex.
//!
//! The generation changes with every transition. A permit remembers the generation it was
//! admitted in, and an outcome recorded in another generation is dropped: a call admitted
//! while closed that ends after the breaker opened cannot count as a half-open probe.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::classify::Outcome;
use crate::config::{CallClock, Config};
use crate::error::{InvalidConfig, Rejected};
use crate::layer::CircuitBreakerLayer;
use crate::window::{Totals, Window};

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go through and their outcomes are recorded.
    Closed,
    /// Calls are rejected until the wait in open elapses.
    Open,
    /// A limited number of probes go through; their outcomes close or reopen the breaker.
    HalfOpen,
    /// Every call is rejected until the mode changes ([`Mode::ForcedOpen`]).
    ForcedOpen,
    /// Every call goes through and nothing is recorded ([`Mode::Disabled`]).
    Disabled,
}

impl State {
    /// `closed`, `open`, `half_open`, `forced_open` or `disabled`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }

    fn to_bits(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::Disabled => 4,
        }
    }

    fn from_bits(bits: u64) -> State {
        match bits & STATE_MASK {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::ForcedOpen,
            _ => State::Disabled,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operator can impose on a breaker ([`CircuitBreaker::set_mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The state machine decides; setting it resets the breaker to closed with an empty window.
    Normal,
    /// Reject every call.
    ForcedOpen,
    /// Admit every call and record nothing.
    Disabled,
}

/// A breaker's state and metrics at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub name: String,
    pub state: State,
    /// Percent of the calls in the window that failed; `None` until the window holds the
    /// minimum number of calls (in half-open: until every probe reported).
    pub failure_rate: Option<f64>,
    /// Percent of the calls in the window that were slow; `None` like `failure_rate`.
    pub slow_call_rate: Option<f64>,
    /// Calls in the window: the sliding window in closed (and in open, the window that
    /// opened the breaker, which still ages), the probes in half-open.
    pub calls: u32,
    pub failures: u32,
    pub slow_calls: u32,
    /// When open: the wall-clock time at which the wait ends and a probe may go.
    pub next_probe_at: Option<SystemTime>,
    /// Consecutive openings since the breaker was last closed (drives the growing wait).
    pub openings: u32,
}

/// A circuit breaker. Cloning is cheap, and every clone shares the one breaker.
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

const STATE_MASK: u64 = 0xff;
const GENERATION_SHIFT: u32 = 8;

struct Shared {
    name: String,
    /// As given, for [`CircuitBreaker::config`].
    config: Config,
    /// What the breaker runs with: `config` with invalid values clamped.
    effective: Config,
    /// `generation << 8 | state`; written only under `machine`'s lock.
    current: AtomicU64,
    /// When open: the end of the wait, in nanoseconds since `origin`; written only under
    /// `machine`'s lock, before `current`.
    open_until: AtomicU64,
    origin: Instant,
    /// Never held across an `.await`.
    machine: Mutex<Machine>,
    /// Woken on every transition and every half-open probe slot released.
    changed: Notify,
    states: watch::Sender<State>,
}

struct Machine {
    state: State,
    generation: u64,
    window: Window,
    /// Calls the window needs before it judges.
    minimum: u32,
    /// Half-open: probes admitted and not released (in flight or recorded).
    probes: u32,
    openings: u32,
    open_until: Instant,
}

/// A state change, logged once the lock is released.
struct Transition {
    from: State,
    to: State,
    totals: Totals,
    wait: Option<Duration>,
}

impl CircuitBreaker {
    /// A closed breaker. The config is not checked: invalid values are clamped to the
    /// nearest valid ones. Use [`Config::validate`] first, or [`CircuitBreaker::try_new`].
    pub fn new(name: impl Into<String>, config: Config) -> Self {
        let origin = Instant::now();
        let effective = config.normalized();
        let (states, _) = watch::channel(State::Closed);
        let machine = Machine {
            state: State::Closed,
            generation: 0,
            window: new_window(&effective, origin),
            minimum: effective.effective_minimum_calls(),
            probes: 0,
            openings: 0,
            open_until: origin,
        };
        Self {
            shared: Arc::new(Shared {
                name: name.into(),
                config,
                effective,
                current: AtomicU64::new(State::Closed.to_bits()),
                open_until: AtomicU64::new(0),
                origin,
                machine: Mutex::new(machine),
                changed: Notify::new(),
                states,
            }),
        }
    }

    /// A closed breaker, or every problem with the config.
    pub fn try_new(name: impl Into<String>, config: Config) -> Result<Self, InvalidConfig> {
        let name = name.into();
        match config.validate() {
            Ok(()) => Ok(Self::new(name, config)),
            Err(errors) => Err(InvalidConfig {
                breaker: name,
                errors,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The config as given to [`CircuitBreaker::new`].
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The current state (one atomic load). An open breaker whose wait has elapsed stays
    /// `Open` until the next call (or [`ready`](Self::ready)) moves it to `HalfOpen`.
    pub fn state(&self) -> State {
        State::from_bits(self.shared.current.load(Ordering::Acquire))
    }

    /// Every state the breaker enters, as it enters it (the latest one; a slow receiver
    /// skips intermediate states).
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.shared.states.subscribe()
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let mut machine = self.shared.lock();
        let totals = machine.window.totals(now);
        let (failure_rate, slow_call_rate) = if totals.calls >= machine.minimum {
            let (failure, slow) = totals.rates();
            (Some(failure), Some(slow))
        } else {
            (None, None)
        };
        let next_probe_at = (machine.state == State::Open)
            .then(|| SystemTime::now() + machine.open_until.saturating_duration_since(now));
        Snapshot {
            name: self.shared.name.clone(),
            state: machine.state,
            failure_rate,
            slow_call_rate,
            calls: totals.calls,
            failures: totals.failures,
            slow_calls: totals.slow,
            next_probe_at,
            openings: machine.openings,
        }
    }

    /// `Normal`: back to closed with an empty window and no past openings (a reset).
    /// `ForcedOpen`: reject everything. `Disabled`: admit everything, record nothing.
    /// Calls in flight when the mode changes are not recorded.
    pub fn set_mode(&self, mode: Mode) {
        let to = match mode {
            Mode::Normal => State::Closed,
            Mode::ForcedOpen => State::ForcedOpen,
            Mode::Disabled => State::Disabled,
        };
        let now = Instant::now();
        let mut machine = self.shared.lock();
        let transition = machine.transition(&self.shared, to, now);
        drop(machine);
        self.shared.announce(Some(transition));
    }

    /// Resolves as soon as a call would be admitted: closed, disabled, open whose wait has
    /// elapsed (it then moves to half-open, as a call would), or half-open with a free probe
    /// slot. Never resolves while forced open. Being ready reserves nothing: a call made
    /// after it may still be rejected if other callers took the probe slots first.
    pub async fn ready(&self) {
        loop {
            let changed = self.shared.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Register before looking, so a transition between the look and the wait wakes us.
            changed.as_mut().enable();
            match self.admission() {
                Admission::Now => return,
                Admission::After(deadline) => {
                    tokio::select! {
                        () = changed => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
                Admission::Blocked => changed.await,
            }
        }
    }

    /// Admits a call or says why not. Record the call's outcome on the permit; dropping the
    /// permit unrecorded means the call was cancelled.
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let shared = &self.shared;
        let current = shared.current.load(Ordering::Acquire);
        let generation = current >> GENERATION_SHIFT;
        match State::from_bits(current) {
            State::Closed => Ok(Permit::counted(shared, generation, false)),
            State::Disabled => Ok(Permit::disabled()),
            State::ForcedOpen => Err(self.rejected(State::ForcedOpen, None)),
            State::Open => {
                let now = Instant::now();
                let until = shared.open_until.load(Ordering::Acquire);
                let elapsed = shared.nanos_since_origin(now);
                if elapsed < until {
                    let retry_after = Duration::from_nanos(until - elapsed);
                    Err(self.rejected(State::Open, Some(retry_after)))
                } else {
                    self.acquire_locked(now)
                }
            }
            State::HalfOpen => self.acquire_locked(Instant::now()),
        }
    }

    /// A layer that puts this breaker in front of a service, judging outcomes with `classifier`.
    pub fn layer<C>(&self, classifier: C) -> CircuitBreakerLayer<C> {
        CircuitBreakerLayer::new(self.clone(), classifier)
    }

    fn acquire_locked(&self, now: Instant) -> Result<Permit, Rejected> {
        let shared = &self.shared;
        let mut machine = shared.lock();
        let transition = machine.open_to_half_open_if_due(shared, now);
        let result = match machine.state {
            State::Closed => Ok(Permit::counted(shared, machine.generation, false)),
            State::Disabled => Ok(Permit::disabled()),
            State::HalfOpen if machine.probes < shared.effective.permitted_in_half_open() => {
                machine.probes += 1;
                Ok(Permit::counted(shared, machine.generation, true))
            }
            State::Open => {
                let retry_after = machine.open_until.saturating_duration_since(now);
                Err(self.rejected(State::Open, Some(retry_after)))
            }
            state @ (State::HalfOpen | State::ForcedOpen) => Err(self.rejected(state, None)),
        };
        drop(machine);
        shared.announce(transition);
        result
    }

    fn admission(&self) -> Admission {
        match self.state() {
            State::Closed | State::Disabled => return Admission::Now,
            State::ForcedOpen => return Admission::Blocked,
            State::Open | State::HalfOpen => {}
        }
        let shared = &self.shared;
        let now = Instant::now();
        let mut machine = shared.lock();
        let transition = machine.open_to_half_open_if_due(shared, now);
        let admission = match machine.state {
            State::Closed | State::Disabled => Admission::Now,
            State::ForcedOpen => Admission::Blocked,
            State::Open => Admission::After(machine.open_until),
            State::HalfOpen if machine.probes < shared.effective.permitted_in_half_open() => {
                Admission::Now
            }
            State::HalfOpen => Admission::Blocked,
        };
        drop(machine);
        shared.announce(transition);
        admission
    }

    fn rejected(&self, state: State, retry_after: Option<Duration>) -> Rejected {
        Rejected {
            breaker: self.shared.name.clone(),
            state,
            retry_after,
        }
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

enum Admission {
    Now,
    After(Instant),
    Blocked,
}

fn new_window(config: &Config, origin: Instant) -> Window {
    match (config.window, config.bucket()) {
        (_, Some((bucket, buckets))) => Window::time(origin, bucket, buckets),
        (crate::SlidingWindow::Count(n), None) => Window::count(n),
        // `bucket()` is `Some` for every time window.
        (crate::SlidingWindow::Time(_), None) => Window::count(1),
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Machine> {
        // A panic while holding the lock leaves consistent counters (every update is a few
        // plain assignments), so a poisoned lock is still usable.
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn nanos_since_origin(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The start of a call, on the clock the config says.
    fn call_started(&self) -> Started {
        match self.effective.call_clock {
            CallClock::Coarse => Started::Coarse(coarse_nanos()),
            CallClock::Runtime => Started::Runtime(Instant::now()),
        }
    }

    /// Records the outcome of a call admitted in `generation`.
    fn record(&self, generation: u64, probe: bool, outcome: Outcome, started: Started) {
        let failure = match outcome {
            Outcome::Success => false,
            Outcome::Failure => true,
            Outcome::Ignored => {
                if probe {
                    self.release(generation);
                }
                return;
            }
        };
        let slow = started.elapsed() >= self.effective.slow_call_duration;
        let mut machine = self.lock();
        if machine.generation != generation {
            return;
        }
        // Only a time window needs the time to record; the others read the clock only for
        // a transition.
        let timed = machine.window.is_timed().then(Instant::now);
        let at = timed.unwrap_or(self.origin);
        machine.window.record(at, failure, slow);
        let totals = machine.window.totals(at);
        if totals.calls < machine.minimum {
            return;
        }
        let (failure_rate, slow_rate) = totals.rates();
        let exceeded = failure_rate >= self.effective.failure_rate_threshold
            || slow_rate >= self.effective.slow_call_rate_threshold;
        let to = match machine.state {
            State::Closed if exceeded => State::Open,
            State::HalfOpen if exceeded => State::Open,
            State::HalfOpen => State::Closed,
            _ => return,
        };
        let transition = machine.transition(self, to, timed.unwrap_or_else(Instant::now));
        drop(machine);
        self.announce(Some(transition));
    }

    /// Frees the probe slot of a half-open call that was cancelled or ignored.
    fn release(&self, generation: u64) {
        let mut machine = self.lock();
        if machine.generation != generation || machine.state != State::HalfOpen {
            return;
        }
        machine.probes = machine.probes.saturating_sub(1);
        drop(machine);
        self.changed.notify_waiters();
    }

    fn announce(&self, transition: Option<Transition>) {
        let Some(t) = transition else { return };
        // Rates only where they made the decision: closing or opening on recorded outcomes.
        let judged = matches!(
            (t.from, t.to),
            (State::Closed, State::Open) | (State::HalfOpen, State::Open | State::Closed)
        );
        let (failure_rate, slow_call_rate) = if judged && t.totals.calls > 0 {
            let (failure, slow) = t.totals.rates();
            (Some(failure), Some(slow))
        } else {
            (None, None)
        };
        if t.from == t.to {
            tracing::info!(breaker = %self.name, state = t.to.as_str(), "reset");
        } else {
            tracing::info!(
                breaker = %self.name,
                from = t.from.as_str(),
                to = t.to.as_str(),
                calls = judged.then_some(t.totals.calls),
                failure_rate,
                slow_call_rate,
                wait_in_open = t.wait.map(tracing::field::debug),
                "{} => {}",
                t.from,
                t.to,
            );
        }
        self.changed.notify_waiters();
    }
}

impl Machine {
    fn open_to_half_open_if_due(&mut self, shared: &Shared, now: Instant) -> Option<Transition> {
        (self.state == State::Open && now >= self.open_until)
            .then(|| self.transition(shared, State::HalfOpen, now))
    }

    /// Moves to `to` (or resets, if already there). Call with the lock held; announce the
    /// result after releasing it.
    fn transition(&mut self, shared: &Shared, to: State, now: Instant) -> Transition {
        let from = self.state;
        let totals = self.window.totals(now);
        let config = &shared.effective;
        let mut wait = None;
        match to {
            State::Closed => {
                self.window = new_window(config, shared.origin);
                self.minimum = config.effective_minimum_calls();
                self.openings = 0;
            }
            State::Open => {
                self.openings = self.openings.saturating_add(1);
                let duration = config.wait_for_opening(self.openings);
                self.open_until = now + duration;
                shared.open_until.store(
                    shared.nanos_since_origin(self.open_until),
                    Ordering::Release,
                );
                wait = Some(duration);
            }
            State::HalfOpen => {
                self.window = Window::tally();
                self.minimum = config.permitted_in_half_open();
            }
            State::ForcedOpen | State::Disabled => {}
        }
        self.probes = 0;
        self.state = to;
        self.generation = self.generation.wrapping_add(1) & (u64::MAX >> GENERATION_SHIFT);
        shared.current.store(
            self.generation << GENERATION_SHIFT | to.to_bits(),
            Ordering::Release,
        );
        shared.states.send_replace(to);
        Transition {
            from,
            to,
            totals,
            wait,
        }
    }
}

/// Admission of one call. Record its outcome with [`Permit::record`]; dropping the permit
/// without recording means the call was cancelled: nothing is recorded, and a half-open
/// probe slot is freed.
#[must_use = "record the call's outcome on the permit; dropping it counts the call as cancelled"]
pub struct Permit {
    counted: Option<Counted>,
    started: Started,
}

/// When a call started, on the breaker's [`CallClock`].
#[derive(Debug, Clone, Copy)]
enum Started {
    Coarse(u64),
    Runtime(Instant),
}

impl Started {
    fn elapsed(self) -> Duration {
        match self {
            Started::Coarse(nanos) => Duration::from_nanos(coarse_nanos().saturating_sub(nanos)),
            Started::Runtime(at) => at.elapsed(),
        }
    }
}

/// Nanoseconds on the kernel's coarse monotonic clock.
#[cfg(target_os = "linux")]
fn coarse_nanos() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    u64::try_from(now.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(now.tv_nsec).unwrap_or(0))
}

/// Nanoseconds on the precise monotonic clock, where there is no coarse one.
#[cfg(not(target_os = "linux"))]
fn coarse_nanos() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

struct Counted {
    shared: Arc<Shared>,
    generation: u64,
    probe: bool,
}

impl Permit {
    fn counted(shared: &Arc<Shared>, generation: u64, probe: bool) -> Self {
        Permit {
            started: shared.call_started(),
            counted: Some(Counted {
                shared: Arc::clone(shared),
                generation,
                probe,
            }),
        }
    }

    fn disabled() -> Self {
        Permit {
            counted: None,
            started: Started::Runtime(Instant::now()),
        }
    }

    /// Time since the permit was granted.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// When the call started, on the breaker's clock (for tests of the clock choice).
    #[cfg(test)]
    fn started_coarse(&self) -> bool {
        matches!(self.started, Started::Coarse(_))
    }

    /// Records the call's outcome; its duration (for the slow-call rule) is the time since
    /// the permit was granted.
    pub fn record(mut self, outcome: Outcome) {
        if let Some(c) = self.counted.take() {
            c.shared
                .record(c.generation, c.probe, outcome, self.started);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(c) = self.counted.take()
            && c.probe
        {
            c.shared.release(c.generation);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Permit");
        match &self.counted {
            Some(c) => d
                .field("breaker", &c.shared.name)
                .field("probe", &c.probe)
                .field("generation", &c.generation),
            None => d.field("disabled", &true),
        };
        d.field("started", &self.started).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(permitted: u32) -> CircuitBreaker {
        CircuitBreaker::new(
            "test",
            Config {
                window: crate::SlidingWindow::Count(4),
                minimum_calls: 2,
                failure_rate_threshold: 50.0,
                wait_in_open: Duration::from_secs(1),
                max_wait_in_open: Duration::from_secs(1),
                permitted_calls_in_half_open: permitted,
                ..Config::default()
            },
        )
    }

    #[test]
    fn state_and_generation_share_one_word() {
        for state in [
            State::Closed,
            State::Open,
            State::HalfOpen,
            State::ForcedOpen,
            State::Disabled,
        ] {
            let word = 41 << GENERATION_SHIFT | state.to_bits();
            assert_eq!(State::from_bits(word), state);
            assert_eq!(word >> GENERATION_SHIFT, 41);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_from_an_earlier_state_are_dropped() {
        let b = breaker(1);
        let late = b.try_acquire().unwrap();
        b.try_acquire().unwrap().record(Outcome::Failure);
        b.try_acquire().unwrap().record(Outcome::Failure);
        assert_eq!(b.state(), State::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.try_acquire().unwrap();
        assert_eq!(b.state(), State::HalfOpen);
        // The call admitted while closed ends now: it is not the probe's outcome.
        late.record(Outcome::Success);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.snapshot().calls, 0);
        probe.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_probe_does_not_count_in_the_next_half_open() {
        let b = breaker(2);
        b.try_acquire().unwrap().record(Outcome::Failure);
        b.try_acquire().unwrap().record(Outcome::Failure);
        tokio::time::advance(Duration::from_secs(1)).await;
        let slow_probe = b.try_acquire().unwrap();
        let failing = b.try_acquire().unwrap();
        failing.record(Outcome::Failure);
        assert_eq!(b.state(), State::HalfOpen, "one of two probes reported");
        b.set_mode(Mode::ForcedOpen);
        b.set_mode(Mode::Normal);
        b.try_acquire().unwrap().record(Outcome::Failure);
        b.try_acquire().unwrap().record(Outcome::Failure);
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.try_acquire().unwrap();
        // Dropping the probe of the earlier half-open state frees nothing in this one.
        drop(slow_probe);
        let second = b.try_acquire().unwrap();
        assert_eq!(
            b.try_acquire().unwrap_err().state,
            State::HalfOpen,
            "both slots of this half-open state are taken"
        );
        probe.record(Outcome::Success);
        second.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_outcomes_count_for_nothing() {
        let b = breaker(1);
        for _ in 0..10 {
            b.try_acquire().unwrap().record(Outcome::Ignored);
        }
        assert_eq!(b.snapshot().calls, 0);
        b.try_acquire().unwrap().record(Outcome::Failure);
        b.try_acquire().unwrap().record(Outcome::Failure);
        tokio::time::advance(Duration::from_secs(1)).await;
        // An ignored probe frees its slot: the next probe decides.
        b.try_acquire().unwrap().record(Outcome::Ignored);
        assert_eq!(b.state(), State::HalfOpen);
        b.try_acquire().unwrap().record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn works_outside_a_runtime() {
        let b = breaker(1);
        b.try_acquire().unwrap().record(Outcome::Failure);
        b.try_acquire().unwrap().record(Outcome::Failure);
        let rejected = b.try_acquire().unwrap_err();
        assert_eq!(rejected.state, State::Open);
        assert!(rejected.retry_after.unwrap() <= Duration::from_secs(1));
    }

    #[test]
    fn debug_shows_name_and_state() {
        let b = breaker(1);
        assert_eq!(
            format!("{b:?}"),
            r#"CircuitBreaker { name: "test", state: Closed, .. }"#
        );
        let permit = b.try_acquire().unwrap();
        assert!(format!("{permit:?}").contains("probe: false"));
    }

    #[tokio::test]
    async fn calls_are_timed_on_the_coarse_clock_unless_the_threshold_is_short() {
        let coarse = CircuitBreaker::new("coarse", Config::default());
        let permit = coarse.try_acquire().expect("closed");
        assert!(permit.started_coarse(), "60 s threshold: coarse clock");
        permit.record(Outcome::Success);
        let short = CircuitBreaker::new(
            "short",
            Config {
                slow_call_duration: crate::COARSE_CLOCK_FROM - Duration::from_millis(1),
                ..Config::default()
            },
        );
        let permit = short.try_acquire().expect("closed");
        assert!(
            !permit.started_coarse(),
            "a 99 ms threshold needs the precise clock"
        );
        permit.record(Outcome::Success);
        let runtime = CircuitBreaker::new(
            "runtime",
            Config {
                call_clock: CallClock::Runtime,
                ..Config::default()
            },
        );
        let permit = runtime.try_acquire().expect("closed");
        assert!(!permit.started_coarse(), "asked for tokio's clock");
        permit.record(Outcome::Success);
        assert_eq!(coarse.snapshot().calls, 1);
    }

    #[test]
    fn the_coarse_clock_moves_forward() {
        let start = coarse_nanos();
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while coarse_nanos() == start {
            assert!(
                std::time::Instant::now() < deadline,
                "the coarse clock is stuck"
            );
            std::hint::spin_loop();
        }
        assert!(coarse_nanos() > start);
    }
}
