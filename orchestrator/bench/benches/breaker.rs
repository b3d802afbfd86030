//! Per-call cost of the breaker: through the layer over a trivial inner service (a ready
//! trailers-only `grpc-status: 0` response) in closed, open (the rejection path) and
//! half-open, against the bare inner service; and raw `try_acquire` + `record`.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use circuit_breaker::{CircuitBreaker, Config, GrpcClassifier, Outcome, SlidingWindow, State};
use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use http_body_util::Empty;
use tower::{Layer, Service, ServiceExt};

type Request = http::Request<()>;
type Response = http::Response<Empty<Bytes>>;

fn ok(_: Request) -> Ready<Result<Response, Infallible>> {
    let mut response = http::Response::new(Empty::new());
    response
        .headers_mut()
        .insert("grpc-status", http::HeaderValue::from_static("0"));
    ready(Ok(response))
}

fn config(permitted_in_half_open: u32) -> Config {
    Config {
        window: SlidingWindow::Count(100),
        minimum_calls: 10,
        wait_in_open: Duration::from_millis(50),
        max_wait_in_open: Duration::from_millis(50),
        permitted_calls_in_half_open: permitted_in_half_open,
        ..Config::default()
    }
}

/// Opens `breaker` by failures, waiting `wait` afterwards.
fn open(breaker: &CircuitBreaker, wait: Option<Duration>) {
    while breaker.state() != State::Open {
        breaker
            .try_acquire()
            .expect("closed")
            .record(Outcome::Failure);
    }
    if let Some(wait) = wait {
        std::thread::sleep(wait);
    }
}

/// One call through `service`; every future involved is ready at once.
fn call<S>(service: &mut S)
where
    S: Service<Request>,
{
    let call = async {
        let service = service.ready().await.ok().expect("ready");
        service.call(http::Request::new(())).await.is_ok()
    };
    black_box(call.now_or_never().expect("ready at once"));
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    // Inside a runtime, as in production (tokio's clock is read through its context).
    let _runtime = runtime.enter();
    let mut group = c.benchmark_group("layer");

    let mut bare = tower::service_fn(ok);
    group.bench_function("bare inner service", |b| b.iter(|| call(&mut bare)));

    let breaker = CircuitBreaker::new("bench", config(10));
    let mut closed = breaker
        .layer(GrpcClassifier::default())
        .layer(tower::service_fn(ok));
    group.bench_function("closed", |b| b.iter(|| call(&mut closed)));

    let breaker = CircuitBreaker::new(
        "bench",
        Config {
            wait_in_open: Duration::from_secs(3600),
            max_wait_in_open: Duration::from_secs(3600),
            ..config(10)
        },
    );
    open(&breaker, None);
    let mut open_service = breaker
        .layer(GrpcClassifier::default())
        .layer(tower::service_fn(ok));
    group.bench_function("open (rejected)", |b| b.iter(|| call(&mut open_service)));

    // Enough probes that half-open lasts for the whole measurement.
    let breaker = CircuitBreaker::new("bench", config(u32::MAX));
    open(&breaker, Some(Duration::from_millis(60)));
    let mut half_open = breaker
        .layer(GrpcClassifier::default())
        .layer(tower::service_fn(ok));
    group.bench_function("half-open (probe)", |b| b.iter(|| call(&mut half_open)));
    assert_eq!(breaker.state(), State::HalfOpen);
    group.finish();

    let mut group = c.benchmark_group("raw");
    let breaker = CircuitBreaker::new("bench", config(10));
    group.bench_function("try_acquire + record (closed)", |b| {
        b.iter(|| {
            breaker
                .try_acquire()
                .expect("closed")
                .record(black_box(Outcome::Success))
        })
    });
    group.bench_function("state", |b| b.iter(|| black_box(breaker.state())));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
