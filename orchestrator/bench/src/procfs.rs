//! What the kernel counts for a process: CPU time (`/proc/PID/stat`) and resident memory
//! (`/proc/PID/status`). Linux only; readings of a process that has exited fail.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

/// Clock ticks per second of `/proc/PID/stat`'s times (`getconf CLK_TCK`; 100 when that
/// cannot be run, which is what Linux uses everywhere in practice).
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|ticks| *ticks > 0)
        .unwrap_or(100)
}

/// CPU time a process has used (user + system, every thread).
#[derive(Debug, Clone, Copy)]
pub struct CpuClock {
    ticks_per_second: u64,
}

impl CpuClock {
    pub fn new() -> CpuClock {
        CpuClock {
            ticks_per_second: clock_ticks_per_second(),
        }
    }

    /// utime + stime of `pid` so far.
    pub fn cpu(&self, pid: u32) -> anyhow::Result<Duration> {
        let path = format!("/proc/{pid}/stat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        let ticks = stat_cpu_ticks(&text).with_context(|| format!("cannot parse {path}"))?;
        Ok(Duration::from_secs_f64(
            ticks as f64 / self.ticks_per_second as f64,
        ))
    }
}

impl Default for CpuClock {
    fn default() -> Self {
        CpuClock::new()
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may itself hold spaces and parentheses: fields are counted from
/// the last `)`.
pub fn stat_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let Some(close) = stat.rfind(')') else {
        bail!("no `)` after the command name");
    };
    // After ") " come field 3 (state), 4, 5, ...: utime is field 14, the 12th of those.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("no field {n}"))?
            .parse()
            .with_context(|| format!("field {n} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// A `kB` field of `/proc/PID/status`, e.g. `VmRSS` (resident now) or `VmHWM` (peak
/// resident), in KiB.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = Path::new("/proc").join(pid.to_string()).join("status");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    status_field_kib(&text, field).with_context(|| format!("no {field} in {}", path.display()))
}

/// The value of `field` (a `Name:   1234 kB` line) of a `/proc/PID/status` text.
pub fn status_field_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name != field {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_fields_14_and_15_counted_after_the_command_name() {
        // A command name with a space and a parenthesis, as a thread may have.
        let stat = "4242 (bench (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    1234 567 0 0 20 0 9 0 100 1000000 300 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat).unwrap(), 1234 + 567);
        assert!(stat_cpu_ticks("4242 (short) S 1 2").is_err());
        assert!(stat_cpu_ticks("no parenthesis").is_err());
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let status =
            "Name:\tbench\nVmPeak:\t  900000 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(status_field_kib(status, "VmHWM"), Some(51_200));
        assert_eq!(status_field_kib(status, "VmRSS"), Some(40_960));
        assert_eq!(status_field_kib(status, "VmSwap"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu_and_memory() {
        let pid = std::process::id();
        // Burn a little CPU so that at least one tick is counted.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(CpuClock::new().cpu(pid).unwrap() > Duration::ZERO);
        assert!(status_kib(pid, "VmRSS").unwrap() > 0);
        assert!(status_kib(pid, "VmHWM").unwrap() > 0);
    }
}
