//! The breaker's configuration, modelled on Resilience4j's `CircuitBreakerConfig`.

use std::time::Duration;

/// Which recent calls the closed state judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingWindow {
    /// The last `n` recorded calls (kept in a ring of `n` bytes).
    Count(u32),
    /// The calls recorded during the last `d`, kept in one-second buckets (at least 10 and at
    /// most 3600 of them, so finer for windows under 10s): a call ages out between
    /// `d - bucket` and `d` after it was recorded.
    Time(Duration),
}

/// How the duration of each call is measured, for the slow-call rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CallClock {
    /// The kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE` on Linux): a few
    /// nanoseconds per read against about 20 for the precise clock (two reads per call),
    /// exact to the scheduler tick (1 to 4 ms). Used only when
    /// [`slow_call_duration`](Config::slow_call_duration) is at least
    /// [`COARSE_CLOCK_FROM`], where a tick is under 4 % of it; shorter thresholds are timed
    /// with [`CallClock::Runtime`]. Elsewhere than Linux it is the precise clock.
    #[default]
    Coarse,
    /// tokio's clock: exact, and it follows paused time (`tokio::time::pause`) in tests.
    Runtime,
}

/// The shortest slow-call duration timed with [`CallClock::Coarse`].
pub const COARSE_CLOCK_FROM: Duration = Duration::from_millis(100);

/// How a breaker decides. Check it with [`Config::validate`] before use:
/// [`CircuitBreaker::new`](crate::CircuitBreaker::new) does not refuse a bad config but
/// clamps each bad value to the nearest valid one.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The calls the closed state judges.
    pub window: SlidingWindow,
    /// No rate is computed (and the breaker cannot open) before this many calls are in the
    /// window. With a count window larger than the window it is capped at the window's size,
    /// as Resilience4j does.
    pub minimum_calls: u32,
    /// Percent, in `(0, 100]`: the breaker opens when this share of the window failed.
    pub failure_rate_threshold: f64,
    /// A call that takes at least this long (from `call()` to its outcome) is slow, whatever
    /// its outcome.
    pub slow_call_duration: Duration,
    /// Percent, in `(0, 100]`: the breaker opens when this share of the window was slow.
    pub slow_call_rate_threshold: f64,
    /// How long the breaker stays open after its first consecutive opening.
    pub wait_in_open: Duration,
    /// `1.0` keeps the wait fixed; above it the `n`th consecutive opening waits
    /// `wait_in_open * multiplier^(n - 1)`, capped at [`max_wait_in_open`](Self::max_wait_in_open).
    pub wait_in_open_multiplier: f64,
    /// The longest wait in open.
    pub max_wait_in_open: Duration,
    /// Probes admitted in half-open; their outcomes decide between closed and open.
    pub permitted_calls_in_half_open: u32,
    /// How call durations are measured.
    pub call_clock: CallClock,
}

impl Default for Config {
    /// Resilience4j's defaults.
    fn default() -> Self {
        Self {
            window: SlidingWindow::Count(100),
            minimum_calls: 100,
            failure_rate_threshold: 50.0,
            slow_call_duration: Duration::from_secs(60),
            slow_call_rate_threshold: 100.0,
            wait_in_open: Duration::from_secs(60),
            wait_in_open_multiplier: 1.0,
            max_wait_in_open: Duration::from_secs(60),
            permitted_calls_in_half_open: 10,
            call_clock: CallClock::Coarse,
        }
    }
}

/// Time windows have at least this many buckets (finer than a second when shorter than 10s).
const MIN_BUCKETS: u32 = 10;
/// Time windows have at most this many buckets (coarser than a second when longer than 1h).
const MAX_BUCKETS: u32 = 3600;

impl Config {
    /// Every problem with this config, each message naming its field; `Ok` if there is none.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        match self.window {
            SlidingWindow::Count(0) => {
                errors.push("window must hold at least 1 call, got Count(0)".to_owned())
            }
            SlidingWindow::Time(d) if d < Duration::from_millis(1) => {
                errors.push(format!("window must be at least 1ms long, got Time({d:?})"))
            }
            _ => {}
        }
        if self.minimum_calls == 0 {
            errors.push("minimum_calls must be at least 1, got 0".to_owned());
        }
        for (field, value) in [
            ("failure_rate_threshold", self.failure_rate_threshold),
            ("slow_call_rate_threshold", self.slow_call_rate_threshold),
        ] {
            if !(value > 0.0 && value <= 100.0) {
                errors.push(format!("{field} must be in (0, 100], got {value}"));
            }
        }
        for (field, value) in [
            ("slow_call_duration", self.slow_call_duration),
            ("wait_in_open", self.wait_in_open),
        ] {
            if value.is_zero() {
                errors.push(format!("{field} must be greater than 0, got 0s"));
            }
        }
        let multiplier = self.wait_in_open_multiplier;
        if !(multiplier.is_finite() && multiplier >= 1.0) {
            errors.push(format!(
                "wait_in_open_multiplier must be finite and at least 1, got {multiplier}"
            ));
        }
        if self.max_wait_in_open < self.wait_in_open {
            errors.push(format!(
                "max_wait_in_open must be at least wait_in_open ({:?}), got {:?}",
                self.wait_in_open, self.max_wait_in_open
            ));
        }
        if self.permitted_calls_in_half_open == 0 {
            errors.push("permitted_calls_in_half_open must be at least 1, got 0".to_owned());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The wait in open after the `openings`th consecutive opening (1 for the first).
    pub fn wait_for_opening(&self, openings: u32) -> Duration {
        let base = self.wait_in_open.max(Duration::from_millis(1));
        let max = self.max_wait_in_open.max(base);
        let multiplier = self.wait_in_open_multiplier;
        if !(multiplier.is_finite() && multiplier > 1.0) || openings <= 1 {
            return base.min(max);
        }
        let exponent = i32::try_from(openings - 1).unwrap_or(i32::MAX);
        let secs = base.as_secs_f64() * multiplier.powi(exponent);
        if !secs.is_finite() || secs >= max.as_secs_f64() {
            max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The minimum number of calls the closed state needs before it judges, after capping
    /// at a count window's size.
    pub(crate) fn effective_minimum_calls(&self) -> u32 {
        let minimum = self.minimum_calls.max(1);
        match self.window {
            SlidingWindow::Count(n) => minimum.min(n.max(1)),
            SlidingWindow::Time(_) => minimum,
        }
    }

    /// For a time window: the width of one bucket and the number of buckets. One bucket per
    /// second, but at least 10 and at most 3600 buckets.
    pub(crate) fn bucket(&self) -> Option<(Duration, u32)> {
        match self.window {
            SlidingWindow::Count(_) => None,
            SlidingWindow::Time(window) => {
                let window = window.max(Duration::from_millis(1));
                let secs = window.as_secs_f64().ceil();
                // `secs` is finite and positive; the cast saturates.
                let count = (secs as u32).clamp(MIN_BUCKETS, MAX_BUCKETS);
                Some((window / count, count))
            }
        }
    }

    /// This config with every invalid value clamped to the nearest valid one (what a
    /// breaker built from an unvalidated config runs with).
    pub(crate) fn normalized(&self) -> Config {
        let threshold = |value: f64| {
            if value.is_nan() {
                100.0
            } else {
                value.clamp(f64::MIN_POSITIVE, 100.0)
            }
        };
        let wait_in_open = self.wait_in_open.max(Duration::from_millis(1));
        let multiplier = self.wait_in_open_multiplier;
        Config {
            window: match self.window {
                SlidingWindow::Count(n) => SlidingWindow::Count(n.max(1)),
                SlidingWindow::Time(d) => SlidingWindow::Time(d.max(Duration::from_millis(1))),
            },
            minimum_calls: self.minimum_calls.max(1),
            failure_rate_threshold: threshold(self.failure_rate_threshold),
            slow_call_duration: self.slow_call_duration.max(Duration::from_nanos(1)),
            slow_call_rate_threshold: threshold(self.slow_call_rate_threshold),
            wait_in_open,
            wait_in_open_multiplier: if multiplier.is_finite() && multiplier >= 1.0 {
                multiplier
            } else {
                1.0
            },
            max_wait_in_open: self.max_wait_in_open.max(wait_in_open),
            permitted_calls_in_half_open: self.permitted_calls_in_half_open.max(1),
            call_clock: if self.slow_call_duration < COARSE_CLOCK_FROM {
                CallClock::Runtime
            } else {
                self.call_clock
            },
        }
    }

    pub(crate) fn permitted_in_half_open(&self) -> u32 {
        self.permitted_calls_in_half_open.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_resilience4j_and_valid() {
        let config = Config::default();
        assert_eq!(config.window, SlidingWindow::Count(100));
        assert_eq!(config.minimum_calls, 100);
        assert_eq!(config.failure_rate_threshold, 50.0);
        assert_eq!(config.slow_call_duration, Duration::from_secs(60));
        assert_eq!(config.slow_call_rate_threshold, 100.0);
        assert_eq!(config.wait_in_open, Duration::from_secs(60));
        assert_eq!(config.wait_in_open_multiplier, 1.0);
        assert_eq!(config.max_wait_in_open, Duration::from_secs(60));
        assert_eq!(config.permitted_calls_in_half_open, 10);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn validate_names_every_bad_field() {
        let config = Config {
            window: SlidingWindow::Count(0),
            minimum_calls: 0,
            failure_rate_threshold: 0.0,
            slow_call_duration: Duration::ZERO,
            slow_call_rate_threshold: f64::NAN,
            wait_in_open: Duration::from_secs(10),
            wait_in_open_multiplier: 0.5,
            max_wait_in_open: Duration::from_secs(1),
            permitted_calls_in_half_open: 0,
            call_clock: CallClock::Coarse,
        };
        let errors = config.validate().unwrap_err();
        assert_eq!(errors.len(), 8, "{errors:#?}");
        assert!(errors.contains(&"failure_rate_threshold must be in (0, 100], got 0".to_owned()));
        for field in [
            "window",
            "minimum_calls",
            "slow_call_duration",
            "slow_call_rate_threshold",
            "wait_in_open_multiplier",
            "max_wait_in_open",
            "permitted_calls_in_half_open",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(field)),
                "{field} missing from {errors:#?}"
            );
        }
        let over = Config {
            failure_rate_threshold: 100.5,
            window: SlidingWindow::Time(Duration::ZERO),
            wait_in_open: Duration::ZERO,
            max_wait_in_open: Duration::ZERO,
            ..Config::default()
        };
        let errors = over.validate().unwrap_err();
        assert_eq!(
            errors,
            vec![
                "window must be at least 1ms long, got Time(0ns)".to_owned(),
                "failure_rate_threshold must be in (0, 100], got 100.5".to_owned(),
                "wait_in_open must be greater than 0, got 0s".to_owned(),
            ]
        );
    }

    #[test]
    fn wait_grows_exponentially_up_to_the_cap() {
        let config = Config {
            wait_in_open: Duration::from_secs(1),
            wait_in_open_multiplier: 2.0,
            max_wait_in_open: Duration::from_secs(10),
            ..Config::default()
        };
        let waits: Vec<u64> = (1..=6)
            .map(|n| config.wait_for_opening(n).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(
            config.wait_for_opening(u32::MAX),
            Duration::from_secs(10),
            "huge exponents saturate at the cap"
        );
        let fixed = Config::default();
        assert_eq!(fixed.wait_for_opening(7), Duration::from_secs(60));
    }

    #[test]
    fn buckets_are_one_second_within_limits() {
        let config = |window| Config {
            window,
            ..Config::default()
        };
        assert_eq!(config(SlidingWindow::Count(5)).bucket(), None);
        assert_eq!(
            config(SlidingWindow::Time(Duration::from_secs(60))).bucket(),
            Some((Duration::from_secs(1), 60))
        );
        assert_eq!(
            config(SlidingWindow::Time(Duration::from_secs(2))).bucket(),
            Some((Duration::from_millis(200), 10))
        );
        assert_eq!(
            config(SlidingWindow::Time(Duration::from_secs(7200))).bucket(),
            Some((Duration::from_secs(2), 3600))
        );
    }

    #[test]
    fn normalized_clamps_to_valid_values() {
        let bad = Config {
            window: SlidingWindow::Count(0),
            minimum_calls: 0,
            failure_rate_threshold: 0.0,
            slow_call_duration: Duration::ZERO,
            slow_call_rate_threshold: f64::NAN,
            wait_in_open: Duration::ZERO,
            wait_in_open_multiplier: f64::INFINITY,
            max_wait_in_open: Duration::ZERO,
            permitted_calls_in_half_open: 0,
            call_clock: CallClock::Coarse,
        };
        assert_eq!(bad.normalized().validate(), Ok(()));
        let good = Config::default();
        assert_eq!(good.normalized(), good);
    }

    #[test]
    fn minimum_calls_is_capped_by_a_count_window() {
        let config = Config {
            window: SlidingWindow::Count(10),
            minimum_calls: 50,
            ..Config::default()
        };
        assert_eq!(config.effective_minimum_calls(), 10);
        let time = Config {
            window: SlidingWindow::Time(Duration::from_secs(10)),
            minimum_calls: 50,
            ..Config::default()
        };
        assert_eq!(time.effective_minimum_calls(), 50);
    }
}
