//! The knobs of a chaos run: the `chaos` binary's flags, and the command line that replays
//! a run.

use std::path::PathBuf;
use std::time::Duration;

use super::proxy::{ProxyFaults, ResetKind};

fn parse_duration(text: &str) -> Result<Duration, String> {
    saga_engine::duration::parse_duration(text)
}

fn parse_probability(text: &str) -> Result<f64, String> {
    let p: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("`{text}` is not a probability between 0 and 1"))
    }
}

/// A duration as the flags take it: `3m`, `30s`, `800ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms > 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

/// Everything a run does, from its seed. The defaults are the on-demand run (three minutes of
/// faults); the CI test sets a bounded one.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Seed of everything drawn at random: the fault schedule, the proxies' and the
    /// participants' draws, the clients' backoffs [default: from the clock].
    #[arg(long)]
    pub seed: Option<u64>,

    // ---- load
    /// How long faults are injected; the sagas are started over this time, then
    /// everything is healed.
    #[arg(long, default_value = "3m", value_parser = parse_duration, help_heading = "Load")]
    pub duration: Duration,
    /// Sagas to start (order-placement with mixed inputs: success, store failure, rider
    /// failure), each with its own idempotency key, retried until acknowledged.
    #[arg(long, default_value_t = 3000, help_heading = "Load")]
    pub sagas: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16, help_heading = "Load")]
    pub concurrency: usize,

    // ---- processes
    /// `kill -9` of the orchestrator at random moments (restarted on the same data).
    #[arg(long, default_value_t = 20, help_heading = "Process faults")]
    pub orchestrator_kills: usize,
    /// SIGSTOP/SIGCONT pauses of the orchestrator.
    #[arg(long, default_value_t = 10, help_heading = "Process faults")]
    pub orchestrator_pauses: usize,
    /// Longest pause (each is drawn from 100ms up to this).
    #[arg(long, default_value = "600ms", value_parser = parse_duration, help_heading = "Process faults")]
    pub pause_max: Duration,
    /// `kill -9` of a participant (restarted on the same port and data).
    #[arg(long, default_value_t = 5, help_heading = "Process faults")]
    pub participant_kills: usize,
    /// Longest time a killed participant stays down (drawn from 100ms up to this).
    #[arg(long, default_value = "1s", value_parser = parse_duration, help_heading = "Process faults")]
    pub participant_downtime_max: Duration,

    // ---- participant faults (the participants' PUT /faults)
    /// A payment outage (every payment call UNAVAILABLE) this long, to open the payment
    /// circuit breaker; 0s for none.
    #[arg(long, default_value = "30s", value_parser = parse_duration, help_heading = "Participant faults")]
    pub payment_outage: Duration,
    /// When the outage starts [default: a sixth into the run].
    #[arg(long, value_parser = parse_duration, help_heading = "Participant faults")]
    pub outage_at: Option<Duration>,
    /// Windows of random participant faults (a random participant each).
    #[arg(long, default_value_t = 6, help_heading = "Participant faults")]
    pub fault_windows: usize,
    /// Length of each window.
    #[arg(long, default_value = "10s", value_parser = parse_duration, help_heading = "Participant faults")]
    pub fault_window: Duration,
    /// In a window: transient UNAVAILABLE before applying anything.
    #[arg(long, default_value_t = 0.2, value_parser = parse_probability, help_heading = "Participant faults")]
    pub unavailable: f64,
    /// In a window: a latency spike of --slow-time.
    #[arg(long, default_value_t = 0.1, value_parser = parse_probability, help_heading = "Participant faults")]
    pub slow: f64,
    #[arg(long, default_value = "800ms", value_parser = parse_duration, help_heading = "Participant faults")]
    pub slow_time: Duration,
    /// In a window: a hang of --hang-time (past the orchestrator's 2s deadline).
    #[arg(long, default_value_t = 0.02, value_parser = parse_probability, help_heading = "Participant faults")]
    pub hang: f64,
    #[arg(long, default_value = "5s", value_parser = parse_duration, help_heading = "Participant faults")]
    pub hang_time: Duration,
    /// In a window: the effect is applied, the reply lost (UNAVAILABLE).
    #[arg(long, default_value_t = 0.05, value_parser = parse_probability, help_heading = "Participant faults")]
    pub lose_reply: f64,

    // ---- proxy faults (every participant, all run long)
    /// Added latency (up to --latency-max), before the request or after the answer.
    #[arg(long, default_value_t = 0.05, value_parser = parse_probability, help_heading = "Proxy faults")]
    pub latency: f64,
    #[arg(long, default_value = "800ms", value_parser = parse_duration, help_heading = "Proxy faults")]
    pub latency_max: Duration,
    /// Reset after forwarding: the participant applied the call, the client's stream is
    /// reset.
    #[arg(long, default_value_t = 0.02, value_parser = parse_probability, help_heading = "Proxy faults")]
    pub reset: f64,
    /// How the stream is reset.
    #[arg(long, value_enum, default_value_t = ResetKind::Mixed, help_heading = "Proxy faults")]
    pub reset_kind: ResetKind,
    /// Blackhole: the request is held unanswered until the heal or until the client gives
    /// up.
    #[arg(long, default_value_t = 0.01, value_parser = parse_probability, help_heading = "Proxy faults")]
    pub blackhole: f64,
    /// Refused connection: an accepted connection is closed at once.
    #[arg(long, default_value_t = 0.05, value_parser = parse_probability, help_heading = "Proxy faults")]
    pub refuse: f64,
    /// Duplicate delivery: the request is sent twice (the second up to
    /// --duplicate-delay-max later); one answer goes back.
    #[arg(long, default_value_t = 0.02, value_parser = parse_probability, help_heading = "Proxy faults")]
    pub duplicate: f64,
    #[arg(long, default_value = "300ms", value_parser = parse_duration, help_heading = "Proxy faults")]
    pub duplicate_delay_max: Duration,
    /// Partitions: a proxy cuts its connections and refuses new ones for a while.
    #[arg(long, default_value_t = 2, help_heading = "Proxy faults")]
    pub partitions: usize,
    /// Longest partition (drawn from 300ms up to this).
    #[arg(long, default_value = "1500ms", value_parser = parse_duration, help_heading = "Proxy faults")]
    pub partition_max: Duration,

    // ---- checks
    /// Every saga must be terminal this long after the heal.
    #[arg(long, default_value = "30s", value_parser = parse_duration, help_heading = "Checks")]
    pub terminal_within: Duration,
    /// How long to wait after the heal for the stragglers before checking anyway.
    #[arg(long, default_value = "2m", value_parser = parse_duration, help_heading = "Checks")]
    pub settle_timeout: Duration,

    // ---- environment
    /// FAILPOINTS for the orchestrator (e.g. `runtime::skip_compensation=1*return`, a
    /// deliberately broken build, to see the checker find it).
    #[arg(long, help_heading = "Environment")]
    pub failpoints: Option<String>,
    /// The orchestrator binary [default: crashable-orchestrator next to this program].
    #[arg(long, value_name = "PATH", help_heading = "Environment")]
    pub orchestrator_bin: Option<PathBuf>,
    /// The participant binary [default: chaos-participant next to this program].
    #[arg(long, value_name = "PATH", help_heading = "Environment")]
    pub participant_bin: Option<PathBuf>,
    /// The saga definitions [default: the repository's sagas/].
    #[arg(long, value_name = "DIR", help_heading = "Environment")]
    pub sagas_dir: Option<PathBuf>,
    /// Keep data and logs in DIR (created) [default: a temporary directory, kept only when
    /// the run fails].
    #[arg(long, value_name = "DIR", help_heading = "Environment")]
    pub keep: Option<PathBuf>,
    /// RUST_LOG of the orchestrator and participant processes.
    #[arg(long, default_value = "warn", help_heading = "Environment")]
    pub child_log: String,
    /// Print each fault as it is injected, and progress.
    #[arg(long, short, help_heading = "Environment")]
    pub verbose: bool,
}

impl Config {
    /// The proxies' faults.
    pub fn proxy_faults(&self) -> ProxyFaults {
        ProxyFaults {
            latency: self.latency,
            latency_ms: self.latency_max.as_millis() as u64,
            reset: self.reset,
            reset_kind: self.reset_kind,
            blackhole: self.blackhole,
            refuse: self.refuse,
            duplicate: self.duplicate,
            duplicate_delay_ms: self.duplicate_delay_max.as_millis() as u64,
        }
    }

    /// The random faults of a participant fault window (`PUT /faults` body, seed added
    /// when sent).
    pub fn window_faults(&self) -> serde_json::Value {
        serde_json::json!({
            "unavailable": self.unavailable,
            "slow": self.slow,
            "slow_ms": self.slow_time.as_millis() as u64,
            "hang": self.hang,
            "hang_ms": self.hang_time.as_millis() as u64,
            "lose_reply": self.lose_reply,
        })
    }

    /// The flags that make this run (with its seed): enough to replay it.
    pub fn replay_args(&self, seed: u64) -> Vec<String> {
        let d = format_duration;
        let mut args: Vec<String> = vec![
            format!("--seed {seed}"),
            format!("--duration {}", d(self.duration)),
            format!("--sagas {}", self.sagas),
            format!("--concurrency {}", self.concurrency),
            format!("--orchestrator-kills {}", self.orchestrator_kills),
            format!("--orchestrator-pauses {}", self.orchestrator_pauses),
            format!("--pause-max {}", d(self.pause_max)),
            format!("--participant-kills {}", self.participant_kills),
            format!(
                "--participant-downtime-max {}",
                d(self.participant_downtime_max)
            ),
            format!("--payment-outage {}", d(self.payment_outage)),
        ];
        if let Some(at) = self.outage_at {
            args.push(format!("--outage-at {}", d(at)));
        }
        args.extend([
            format!("--fault-windows {}", self.fault_windows),
            format!("--fault-window {}", d(self.fault_window)),
            format!("--unavailable {}", self.unavailable),
            format!("--slow {}", self.slow),
            format!("--slow-time {}", d(self.slow_time)),
            format!("--hang {}", self.hang),
            format!("--hang-time {}", d(self.hang_time)),
            format!("--lose-reply {}", self.lose_reply),
            format!("--latency {}", self.latency),
            format!("--latency-max {}", d(self.latency_max)),
            format!("--reset {}", self.reset),
            format!("--reset-kind {}", self.reset_kind.as_str()),
            format!("--blackhole {}", self.blackhole),
            format!("--refuse {}", self.refuse),
            format!("--duplicate {}", self.duplicate),
            format!("--duplicate-delay-max {}", d(self.duplicate_delay_max)),
            format!("--partitions {}", self.partitions),
            format!("--partition-max {}", d(self.partition_max)),
            format!("--terminal-within {}", d(self.terminal_within)),
            format!("--settle-timeout {}", d(self.settle_timeout)),
        ]);
        if let Some(points) = &self.failpoints {
            args.push(format!("--failpoints '{points}'"));
        }
        args
    }

    /// The command that replays this run.
    pub fn replay_command(&self, seed: u64) -> String {
        format!(
            "cargo run --release -p tests --bin chaos -- {}",
            self.replay_args(seed).join(" ")
        )
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
    fn the_replay_command_parses_back_to_the_same_run() {
        let cli = Cli::try_parse_from([
            "chaos",
            "--duration",
            "90s",
            "--sagas",
            "10",
            "--outage-at",
            "1500ms",
            "--reset-kind",
            "refused",
            "--latency",
            "0.5",
        ])
        .unwrap();
        let args: Vec<String> = cli
            .config
            .replay_args(42)
            .iter()
            .flat_map(|a| {
                let (flag, value) = a.split_once(' ').unwrap();
                [flag.to_owned(), value.trim_matches('\'').to_owned()]
            })
            .collect();
        let again = Cli::try_parse_from(std::iter::once("chaos".to_owned()).chain(args)).unwrap();
        assert_eq!(again.config.seed, Some(42));
        assert_eq!(
            again.config.replay_args(42),
            cli.config.replay_args(42),
            "the replay names every setting"
        );
        assert_eq!(again.config.duration, Duration::from_secs(90));
        assert_eq!(again.config.outage_at, Some(Duration::from_millis(1500)));
        assert_eq!(again.config.reset_kind, ResetKind::Refused);
    }

    #[test]
    fn probabilities_are_checked() {
        assert!(Cli::try_parse_from(["chaos", "--reset", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["chaos", "--reset", "x"]).is_err());
        assert_eq!(format_duration(Duration::from_secs(180)), "3m");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
