//! The admin endpoints over a real socket.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use telemetry::{Admin, serve_admin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn metrics_health_and_readiness_answer() {
    let ready = Arc::new(AtomicBool::new(false));
    let admin = Admin {
        metrics: Arc::new(|| "# TYPE up gauge\nup 1\n# EOF\n".to_owned()),
        ready: Arc::new({
            let ready = Arc::clone(&ready);
            move || {
                if ready.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("database closed".to_owned())
                }
            }
        }),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_admin(listener, admin, async {
        let _ = stopped.await;
    }));

    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("database closed"), "{body}");
    // The probe the container healthchecks use.
    let wait = std::time::Duration::from_secs(5);
    assert_eq!(
        telemetry::probe(&format!("http://{addr}/healthz"), wait).await,
        Ok(())
    );
    let refused = telemetry::probe(&format!("http://{addr}/readyz"), wait)
        .await
        .unwrap_err();
    assert!(
        refused.contains("answered 503") && refused.contains("database closed"),
        "{refused}"
    );
    let bad = telemetry::probe("https://example.invalid/", wait)
        .await
        .unwrap_err();
    assert!(bad.contains("not an http:// URL"), "{bad}");
    ready.store(true, Ordering::SeqCst);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("up 1"), "{body}");
    assert_eq!(get(addr, "/nope").await.0, 404);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
