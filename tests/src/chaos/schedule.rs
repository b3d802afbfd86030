//! The fault schedule: every fault of a run, with its moment, drawn from the seed before
//! the run starts (so a seed names a schedule).
//!
//! Faults are grouped in tracks; a track runs its faults one after the other (a fault that
//! comes while the previous one of its track still runs waits for it), and tracks run side
//! by side. Counts are spread evenly: the run's fault time is cut into as many slots as
//! there are faults of a kind, and each fault falls at a random moment of its own slot.

use std::fmt;
use std::time::Duration;

use participants::Kind;

use super::config::{Config, format_duration};

/// One fault.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `kill -9` of the orchestrator, restarted `down` later.
    KillOrchestrator { down: Duration },
    /// SIGSTOP, SIGCONT `pause` later.
    PauseOrchestrator { pause: Duration },
    /// `kill -9` of a participant, restarted `down` later.
    KillParticipant { kind: Kind, down: Duration },
    /// Random participant faults (`PUT /faults`) for a while.
    FaultWindow { kind: Kind, length: Duration },
    /// Every payment call fails UNAVAILABLE for a while (the breaker should open).
    PaymentOutage { length: Duration },
    /// A proxy cuts its connections and refuses new ones for a while.
    Partition { kind: Kind, length: Duration },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |d: &Duration| format_duration(*d);
        match self {
            Action::KillOrchestrator { down } => {
                write!(f, "kill -9 orchestrator, restart after {}", d(down))
            }
            Action::PauseOrchestrator { pause } => {
                write!(f, "SIGSTOP orchestrator for {}", d(pause))
            }
            Action::KillParticipant { kind, down } => {
                write!(f, "kill -9 {kind}, restart after {}", d(down))
            }
            Action::FaultWindow { kind, length } => {
                write!(f, "random faults in {kind} for {}", d(length))
            }
            Action::PaymentOutage { length } => write!(f, "payment outage for {}", d(length)),
            Action::Partition { kind, length } => {
                write!(f, "partition of {kind}'s proxy for {}", d(length))
            }
        }
    }
}

/// A fault and its moment, from the start of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub at: Duration,
    pub action: Action,
}

/// Every fault of a run, by track.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub tracks: Vec<Vec<Planned>>,
}

/// `n` moments in `[from, to)`, one at random in each of `n` equal slots.
fn spread(rng: &mut fastrand::Rng, n: usize, from: Duration, to: Duration) -> Vec<Duration> {
    if n == 0 {
        return Vec::new();
    }
    let span = to.saturating_sub(from);
    let slot = span / n as u32;
    (0..n)
        .map(|i| {
            let jitter = slot.mul_f64(rng.f64());
            from + slot * i as u32 + jitter
        })
        .collect()
}

/// A duration drawn uniformly from `min..=max` (`max` if it is below `min`).
fn between(rng: &mut fastrand::Rng, min: Duration, max: Duration) -> Duration {
    if max <= min {
        return max;
    }
    let ms = rng.u64(min.as_millis() as u64..=max.as_millis() as u64);
    Duration::from_millis(ms)
}

/// Participants in a random rotation: every one of them gets faults once there are three.
fn kinds(rng: &mut fastrand::Rng, n: usize) -> Vec<Kind> {
    let offset = rng.usize(..Kind::ALL.len());
    (0..n)
        .map(|i| Kind::ALL[(offset + i) % Kind::ALL.len()])
        .collect()
}

impl Schedule {
    /// The schedule of `config` for `seed`. Faults fall between a short lead-in (the load
    /// gets going) and a tail that leaves the last restart time before the heal.
    pub fn plan(config: &Config, seed: u64) -> Schedule {
        let d = config.duration;
        let lead = (d / 20).min(Duration::from_secs(1));
        let tail = (d / 10).min(Duration::from_secs(3));
        let end = d.saturating_sub(tail).max(lead);
        // One generator per track: a track's faults do not move when another track's
        // settings change.
        let rng = |salt: u64| fastrand::Rng::with_seed(seed ^ salt);

        let mut r = rng(0x6f72_6368);
        let mut orchestrator: Vec<Planned> = spread(&mut r, config.orchestrator_kills, lead, end)
            .into_iter()
            .map(|at| Planned {
                at,
                action: Action::KillOrchestrator {
                    down: between(&mut r, Duration::ZERO, Duration::from_millis(300)),
                },
            })
            .collect();
        orchestrator.extend(
            spread(&mut r, config.orchestrator_pauses, lead, end)
                .into_iter()
                .map(|at| Planned {
                    at,
                    action: Action::PauseOrchestrator {
                        pause: between(&mut r, Duration::from_millis(100), config.pause_max),
                    },
                }),
        );
        orchestrator.sort_by_key(|p| p.at);

        let mut r = rng(0x7061_7274);
        let kill_kinds = kinds(&mut r, config.participant_kills);
        let participants: Vec<Planned> = spread(&mut r, config.participant_kills, lead, end)
            .into_iter()
            .zip(kill_kinds)
            .map(|(at, kind)| Planned {
                at,
                action: Action::KillParticipant {
                    kind,
                    down: between(
                        &mut r,
                        Duration::from_millis(100),
                        config.participant_downtime_max,
                    ),
                },
            })
            .collect();

        let mut r = rng(0x7769_6e64);
        let window_kinds = kinds(&mut r, config.fault_windows);
        let window_end = end.saturating_sub(config.fault_window).max(lead);
        let windows: Vec<Planned> = spread(&mut r, config.fault_windows, lead, window_end)
            .into_iter()
            .zip(window_kinds)
            .map(|(at, kind)| Planned {
                at,
                action: Action::FaultWindow {
                    kind,
                    length: config.fault_window,
                },
            })
            .collect();

        let mut r = rng(0x6e65_7473);
        let partition_kinds = kinds(&mut r, config.partitions);
        let partitions: Vec<Planned> = spread(&mut r, config.partitions, lead, end)
            .into_iter()
            .zip(partition_kinds)
            .map(|(at, kind)| Planned {
                at,
                action: Action::Partition {
                    kind,
                    length: between(&mut r, Duration::from_millis(300), config.partition_max),
                },
            })
            .collect();

        let outage = if config.payment_outage.is_zero() {
            Vec::new()
        } else {
            vec![Planned {
                at: config.outage_at.unwrap_or(d / 6),
                action: Action::PaymentOutage {
                    length: config.payment_outage,
                },
            }]
        };

        Schedule {
            tracks: [orchestrator, participants, windows, partitions, outage]
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect(),
        }
    }

    /// How many faults of each kind the schedule holds, e.g. `("kill -9 orchestrator", 20)`.
    pub fn count(&self, matches: impl Fn(&Action) -> bool) -> usize {
        self.tracks
            .iter()
            .flatten()
            .filter(|p| matches(&p.action))
            .count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn a_seed_names_one_schedule_with_every_fault_asked_for_inside_the_run() {
        let config = Cli::try_parse_from(["chaos"]).unwrap().config;
        let a = Schedule::plan(&config, 7);
        assert_eq!(a, Schedule::plan(&config, 7));
        assert_ne!(a, Schedule::plan(&config, 8));
        assert_eq!(
            a.count(|a| matches!(a, Action::KillOrchestrator { .. })),
            20
        );
        assert_eq!(a.count(|a| matches!(a, Action::KillParticipant { .. })), 5);
        assert_eq!(a.count(|a| matches!(a, Action::PaymentOutage { .. })), 1);
        for kind in Kind::ALL {
            assert!(
                a.count(|a| matches!(a, Action::KillParticipant { kind: k, .. } if *k == kind))
                    >= 1,
                "{kind} is killed at least once"
            );
        }
        for planned in a.tracks.iter().flatten() {
            assert!(planned.at < config.duration, "{planned:?}");
        }
        for track in &a.tracks {
            assert!(track.windows(2).all(|w| w[0].at <= w[1].at));
        }
    }
}
