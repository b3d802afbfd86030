//! The fault-injecting proxy put in front of each participant: HTTP/2 with prior knowledge
//! (h2c, what gRPC clients speak on plain TCP), on both sides.
//!
//! Unary calls are buffered (request and response, trailers included), so a request can be
//! sent upstream twice and an answer can be withheld after the participant applied it.
//! Streaming calls (server reflection, health) are piped through untouched: the
//! orchestrator needs reflection to start, and a fault there tests nothing of the saga
//! rules.
//!
//! Faults, each with its own probability, drawn from the proxy's seeded generator:
//! - **latency**: up to `latency_ms` added, before the request is sent or after its answer;
//! - **reset**: the request is sent and its answer awaited (the effect is applied), then the
//!   client's stream is reset (RST_STREAM): the caller cannot know the outcome;
//! - **blackhole**: the request is held, unanswered, until the heal (then sent) or until
//!   the client gives up;
//! - **refuse**: an accepted connection is closed at once (TCP reset);
//! - **duplicate**: the request is sent upstream a second time, up to
//!   `duplicate_delay_ms` later, and only the first answer goes back.
//!
//! Besides, [`Proxy::partition`] cuts every open connection and refuses new ones until it
//! is lifted, and [`Proxy::heal`] turns every fault off and lets blackholed requests go.
//! When the participant cannot be reached, or fails mid-call, the proxy answers UNAVAILABLE
//! as a gateway does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Collected, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

/// How long a duplicate (sent in the background) may take before it is dropped.
const DUPLICATE_DEADLINE: Duration = Duration::from_secs(10);

/// What a reset does to the client's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResetKind {
    /// RST_STREAM INTERNAL_ERROR: a gRPC client sees INTERNAL, which the orchestrator does
    /// not retry (the step fails and is compensated).
    Internal,
    /// RST_STREAM REFUSED_STREAM: a gRPC client sees UNAVAILABLE and retries, with the
    /// same idempotency key, a call that was in fact applied.
    Refused,
    /// Either, at random.
    Mixed,
}

impl ResetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetKind::Internal => "internal",
            ResetKind::Refused => "refused",
            ResetKind::Mixed => "mixed",
        }
    }
}

/// The faults of one proxy: probabilities per unary request (per accepted connection for
/// `refuse`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProxyFaults {
    pub latency: f64,
    /// Most latency added, in milliseconds (drawn uniformly from 1..=latency_ms).
    pub latency_ms: u64,
    pub reset: f64,
    pub reset_kind: ResetKind,
    pub blackhole: f64,
    pub refuse: f64,
    pub duplicate: f64,
    /// Most delay of the duplicate after the original, in milliseconds.
    pub duplicate_delay_ms: u64,
}

impl ProxyFaults {
    /// No fault at all.
    pub const NONE: ProxyFaults = ProxyFaults {
        latency: 0.0,
        latency_ms: 0,
        reset: 0.0,
        reset_kind: ResetKind::Mixed,
        blackhole: 0.0,
        refuse: 0.0,
        duplicate: 0.0,
        duplicate_delay_ms: 0,
    };
}

/// What a proxy did, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProxyStats {
    /// Unary requests received.
    pub requests: u64,
    pub latency: u64,
    pub reset: u64,
    pub blackhole: u64,
    /// Connections closed at once by the `refuse` fault.
    pub refused: u64,
    pub duplicate: u64,
    /// Partitions, and the connections cut or refused during them.
    pub partitions: u64,
    pub partition_refused: u64,
    /// Requests answered UNAVAILABLE because the participant could not be reached or
    /// failed mid-call (e.g. it was killed).
    pub upstream_failures: u64,
    /// Answers of the participant with grpc-status UNAVAILABLE (its own injected faults,
    /// lost replies).
    pub upstream_unavailable: u64,
}

impl std::ops::AddAssign for ProxyStats {
    fn add_assign(&mut self, other: ProxyStats) {
        self.requests += other.requests;
        self.latency += other.latency;
        self.reset += other.reset;
        self.blackhole += other.blackhole;
        self.refused += other.refused;
        self.duplicate += other.duplicate;
        self.partitions += other.partitions;
        self.partition_refused += other.partition_refused;
        self.upstream_failures += other.upstream_failures;
        self.upstream_unavailable += other.upstream_unavailable;
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    latency: AtomicU64,
    reset: AtomicU64,
    blackhole: AtomicU64,
    refused: AtomicU64,
    duplicate: AtomicU64,
    partitions: AtomicU64,
    partition_refused: AtomicU64,
    upstream_failures: AtomicU64,
    upstream_unavailable: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What happens to one request, drawn when it arrives.
#[derive(Debug, Default)]
struct Decision {
    /// Added latency, and whether it comes after the answer (else before the request).
    latency: Option<(Duration, bool)>,
    blackhole: bool,
    reset: Option<h2::Reason>,
    duplicate: Option<Duration>,
}

struct Settings {
    faults: ProxyFaults,
    enabled: bool,
    rng: fastrand::Rng,
}

struct Shared {
    name: String,
    upstream: SocketAddr,
    client: Client<HttpConnector, ProxyBody>,
    /// A std mutex: held only to draw, never across an await.
    settings: Mutex<Settings>,
    /// Bumped at the heal: blackholed requests go on.
    heal: watch::Sender<u64>,
    /// Bumped to cut every open connection.
    cut: watch::Sender<u64>,
    partitioned: AtomicBool,
    counters: Counters,
    /// Duplicates still in flight in the background.
    background: AtomicU64,
}

impl Shared {
    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn decide(&self) -> Decision {
        let mut settings = self.settings();
        if !settings.enabled {
            return Decision::default();
        }
        let f = settings.faults;
        let rng = &mut settings.rng;
        let mut hit = |p: f64| p > 0.0 && rng.f64() < p;
        let latency = hit(f.latency);
        let blackhole = hit(f.blackhole);
        let reset = hit(f.reset);
        let duplicate = hit(f.duplicate);
        Decision {
            latency: (latency && f.latency_ms > 0)
                .then(|| (Duration::from_millis(rng.u64(1..=f.latency_ms)), rng.bool())),
            blackhole,
            reset: reset.then(|| match f.reset_kind {
                ResetKind::Internal => h2::Reason::INTERNAL_ERROR,
                ResetKind::Refused => h2::Reason::REFUSED_STREAM,
                ResetKind::Mixed if rng.bool() => h2::Reason::INTERNAL_ERROR,
                ResetKind::Mixed => h2::Reason::REFUSED_STREAM,
            }),
            duplicate: duplicate.then(|| Duration::from_millis(rng.u64(0..=f.duplicate_delay_ms))),
        }
    }

    fn refuse_connection(&self) -> bool {
        let mut settings = self.settings();
        let p = settings.faults.refuse;
        settings.enabled && p > 0.0 && settings.rng.f64() < p
    }
}

/// A running proxy; dropping it stops accepting.
pub struct Proxy {
    pub name: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.cut.send_modify(|n| *n += 1);
    }
}

impl Proxy {
    /// Starts a proxy on `127.0.0.1:0` forwarding to `upstream`, with `faults` on (if
    /// `enabled`) and its draws seeded by `seed`.
    pub async fn start(
        name: &str,
        upstream: SocketAddr,
        faults: ProxyFaults,
        seed: u64,
    ) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            upstream,
            client,
            settings: Mutex::new(Settings {
                faults,
                enabled: true,
                rng: fastrand::Rng::with_seed(seed),
            }),
            heal: watch::channel(0).0,
            cut: watch::channel(0).0,
            partitioned: AtomicBool::new(false),
            counters: Counters::default(),
            background: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            name: name.to_owned(),
            addr,
            shared,
            accept,
        })
    }

    /// The URL clients use to reach the participant through this proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts every open connection and refuses new ones (`true`), or lifts that (`false`).
    pub fn partition(&self, on: bool) {
        self.shared.partitioned.store(on, Ordering::SeqCst);
        if on {
            bump(&self.shared.counters.partitions);
            self.shared.cut.send_modify(|n| *n += 1);
        }
    }

    /// Turns every fault off, lifts a partition and lets blackholed requests go on.
    pub fn heal(&self) {
        self.shared.settings().enabled = false;
        self.shared.partitioned.store(false, Ordering::SeqCst);
        self.shared.heal.send_modify(|n| *n += 1);
    }

    /// Duplicates still on their way to the participant.
    pub fn in_flight_duplicates(&self) -> u64 {
        self.shared.background.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            requests: get(&c.requests),
            latency: get(&c.latency),
            reset: get(&c.reset),
            blackhole: get(&c.blackhole),
            refused: get(&c.refused),
            duplicate: get(&c.duplicate),
            partitions: get(&c.partitions),
            partition_refused: get(&c.partition_refused),
            upstream_failures: get(&c.upstream_failures),
            upstream_unavailable: get(&c.upstream_unavailable),
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or the like: give the system a moment, never spin.
                tracing::warn!(proxy = %shared.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Closing a connection (refused, cut, or at the end) resets it.
        let _ = stream.set_zero_linger();
        let _ = stream.set_nodelay(true);
        if shared.partitioned.load(Ordering::SeqCst) {
            bump(&shared.counters.partition_refused);
            drop(stream);
            continue;
        }
        if shared.refuse_connection() {
            bump(&shared.counters.refused);
            drop(stream);
            continue;
        }
        tokio::spawn(serve_connection(stream, shared.clone()));
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let mut cut = shared.cut.subscribe();
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |request| handle(shared.clone(), request))
    };
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = connection => {
            if let Err(e) = result {
                tracing::debug!(proxy = %shared.name, error = %e, "client connection ended");
            }
        }
        _ = cut.changed() => {
            bump(&shared.counters.partition_refused);
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, BoxError> {
    if request.uri().path().starts_with("/grpc.") {
        return Ok(pass_through(&shared, request).await);
    }
    // Subscribed before the draw, so a heal between the two still frees a blackhole.
    let mut heal = shared.heal.subscribe();
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    bump(&shared.counters.requests);
    let decision = shared.decide();
    if decision.blackhole {
        bump(&shared.counters.blackhole);
        // Until the heal; if the client gives up first, this future is dropped.
        let _ = heal.changed().await;
    }
    if let Some((latency, false)) = decision.latency {
        bump(&shared.counters.latency);
        tokio::time::sleep(latency).await;
    }
    if let Some(delay) = decision.duplicate {
        bump(&shared.counters.duplicate);
        let (shared, duplicate) = (shared.clone(), upstream_request(&shared, &parts, &body));
        shared.background.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tokio::time::timeout(DUPLICATE_DEADLINE, forward(&shared, duplicate)).await;
            shared.background.fetch_sub(1, Ordering::SeqCst);
        });
    }
    let response = match forward(&shared, upstream_request(&shared, &parts, &body)).await {
        Ok(response) => response,
        Err(e) => {
            bump(&shared.counters.upstream_failures);
            return Ok(unavailable(&format!(
                "proxy: {} did not answer: {}",
                shared.name,
                one_line(&*e)
            )));
        }
    };
    if grpc_status(&response) == Some(14) {
        bump(&shared.counters.upstream_unavailable);
    }
    if let Some(reason) = decision.reset {
        bump(&shared.counters.reset);
        // hyper resets the client's stream with the reason found in the service's error.
        return Err(h2::Error::from(reason).into());
    }
    if let Some((latency, true)) = decision.latency {
        bump(&shared.counters.latency);
        tokio::time::sleep(latency).await;
    }
    let (parts, body) = response.into_parts();
    Ok(Response::from_parts(
        parts,
        body.map_err(|never| match never {}).boxed(),
    ))
}

/// Streams a (streaming) call through, without faults.
async fn pass_through(shared: &Shared, request: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = request.into_parts();
    let mut upstream = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
    *upstream.uri_mut() = upstream_uri(shared, upstream.uri());
    match shared.client.request(upstream).await {
        Ok(response) => response.map(|body| body.map_err(BoxError::from).boxed()),
        Err(e) => {
            bump(&shared.counters.upstream_failures);
            unavailable(&format!(
                "proxy: {} did not answer: {}",
                shared.name,
                one_line(&e)
            ))
        }
    }
}

fn upstream_uri(shared: &Shared, uri: &http::Uri) -> http::Uri {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("http://{}{path}", shared.upstream)
        .parse()
        .unwrap_or_else(|_| uri.clone())
}

fn upstream_request(
    shared: &Shared,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Request<ProxyBody> {
    let mut request = Request::new(
        Full::new(body.clone())
            .map_err(|never| match never {})
            .boxed(),
    );
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = upstream_uri(shared, &parts.uri);
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request
}

/// Sends a buffered request and buffers the whole answer (trailers included).
async fn forward(
    shared: &Shared,
    request: Request<ProxyBody>,
) -> Result<Response<Collected<Bytes>>, BoxError> {
    let response = shared.client.request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?;
    Ok(Response::from_parts(parts, body))
}

fn grpc_status(response: &Response<Collected<Bytes>>) -> Option<i32> {
    let header = response
        .body()
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| response.headers().get("grpc-status"))?;
    header.to_str().ok()?.parse().ok()
}

/// A trailers-only gRPC answer with status UNAVAILABLE.
fn unavailable(message: &str) -> Response<ProxyBody> {
    // grpc-message is percent-encoded: keep it to plain printable ASCII without `%`.
    let message: String = message
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '%' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut response = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", http::HeaderValue::from_static("14"));
    if let Ok(value) = http::HeaderValue::from_str(&message) {
        headers.insert("grpc-message", value);
    }
    response
}

fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
