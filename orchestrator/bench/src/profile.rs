//! `--perf DIR`: `perf record` attached to the orchestrator and to each participant for the
//! measured part of a scenario (warm-up excluded), one `DIR/<scenario>-<process>.data` each.
//! Read them with `perf report -i FILE --no-children`. Profiling slows the processes down:
//! figures of a profiled run are not the benchmark's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// Samples per second and per process. DWARF unwinding: release builds have no frame
/// pointers, and `debug = "line-tables-only"` gives the symbols and lines.
const FREQUENCY: &str = "499";
const CALL_GRAPH: &str = "dwarf,32768";

#[derive(Debug, Clone)]
pub struct Profiler {
    dir: PathBuf,
}

/// `perf record` processes attached for one scenario.
pub struct Recording {
    perfs: Vec<(u32, Child, PathBuf)>,
}

impl Profiler {
    pub fn new(dir: &Path) -> anyhow::Result<Profiler> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Profiler {
            dir: dir.to_owned(),
        })
    }

    /// Attaches `perf record` to each `(name, pid)`.
    pub async fn start(
        &self,
        scenario: &str,
        targets: &[(String, u32)],
    ) -> anyhow::Result<Recording> {
        let mut perfs = Vec::new();
        for (name, pid) in targets {
            let output = self.dir.join(format!("{scenario}-{name}.data"));
            let log = std::fs::File::create(output.with_extension("log"))?;
            let child = Command::new("perf")
                .args([
                    "record",
                    "-q",
                    "-F",
                    FREQUENCY,
                    "--call-graph",
                    CALL_GRAPH,
                    "-p",
                ])
                .arg(pid.to_string())
                .arg("-o")
                .arg(&output)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .context("cannot run `perf record` (is perf installed?)")?;
            let perf_pid = child.id().context("perf has no pid")?;
            perfs.push((perf_pid, child, output));
        }
        // Give perf a moment to attach before the load starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Recording { perfs })
    }
}

impl Recording {
    /// Stops every `perf record` (SIGINT by pid: it writes its file and exits).
    pub async fn stop(self) -> anyhow::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for (pid, mut child, output) in self.perfs {
            std::process::Command::new("kill")
                .arg("-INT")
                .arg(pid.to_string())
                .status()
                .context("cannot run `kill`")?;
            match tokio::time::timeout(Duration::from_secs(120), child.wait()).await {
                Ok(Ok(_)) => files.push(output),
                Ok(Err(e)) => return Err(e).context("cannot wait for perf"),
                Err(_) => {
                    let _ = child.start_kill();
                    bail!("perf record (pid {pid}) did not stop within 120 s");
                }
            }
        }
        Ok(files)
    }
}
