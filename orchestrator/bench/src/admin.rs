//! Reading the orchestrator's admin `/metrics` (Prometheus text) over a plain HTTP/1.1
//! request on loopback: enough of a client for one GET, so the bench needs no HTTP stack.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The body of `GET http://ADDR/metrics`.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to the admin endpoint {addr}"))?;
        stream
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let response = String::from_utf8(response).context("the metrics are not UTF-8")?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no end of the HTTP headers")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!(
                "GET /metrics answered {}",
                head.lines().next().unwrap_or("")
            );
        }
        if head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"))
        {
            return Ok(dechunk(body));
        }
        Ok(body.to_owned())
    })
    .await
    .with_context(|| format!("GET http://{addr}/metrics took more than 10s"))?
}

/// The payload of a chunked HTTP/1.1 body (sizes in hex, each chunk followed by CRLF).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the sample `name` (with its labels exactly as written, e.g.
/// `saga_sagas{status="WAITING"}`) in a Prometheus text exposition.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        // The name must end here: `saga_x_count` is not `saga_x_count_total`.
        if !rest.starts_with([' ', '\t']) {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Flushes (fsyncs) the orchestrator's store has made: the count of its flush-duration
/// histogram.
pub const FLUSHES: &str = "saga_store_flush_duration_seconds_count";

/// Total seconds the orchestrator's store spent flushing (sled flush + fdatasync).
pub const FLUSH_SECONDS: &str = "saga_store_flush_duration_seconds_sum";

/// Sagas whose stored status is WAITING (read from the store at scrape time).
pub const WAITING: &str = "saga_sagas{status=\"WAITING\"}";

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP saga_store_flush_duration_seconds Flush duration.\n\
        # TYPE saga_store_flush_duration_seconds histogram\n\
        saga_store_flush_duration_seconds_sum 1.5\n\
        saga_store_flush_duration_seconds_count 1234\n\
        saga_store_flush_duration_seconds_bucket{le=\"0.001\"} 10\n\
        saga_sagas{status=\"RUNNING\"} 3\n\
        saga_sagas{status=\"WAITING\"} 10000\n";

    #[test]
    fn samples_are_found_by_exact_name_and_labels() {
        assert_eq!(sample(TEXT, FLUSHES), Some(1234.0));
        assert_eq!(sample(TEXT, FLUSH_SECONDS), Some(1.5));
        assert_eq!(sample(TEXT, WAITING), Some(10_000.0));
        assert_eq!(sample(TEXT, "saga_store_flush_duration_seconds"), None);
        assert_eq!(sample(TEXT, "saga_sagas{status=\"FAILED\"}"), None);
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
