//! The layer over a `tower_test::mock` service: outcomes from response headers, trailers,
//! bodies and errors; rejections; cancellation; half-open probes under concurrency.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use circuit_breaker::{
    BoxError, CallClock, CircuitBreaker, CircuitBreakerService, ClassifiedBody, Classify, Config,
    GrpcClassifier, Mode, Outcome, SlidingWindow, State, is_rejection,
};
use futures::FutureExt;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::time::advance;
use tonic::Code;
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

const WAIT: Duration = Duration::from_secs(10);
const SLOW: Duration = Duration::from_secs(2);

/// A response body made of frames given up front.
#[derive(Debug, Default)]
struct TestBody {
    frames: VecDeque<Result<Frame<Bytes>, std::io::Error>>,
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.frames.pop_front())
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}

fn trailers(code: Code) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(code as i32));
    trailers
}

/// A trailers-only response: the status is in the headers and there is no body.
fn trailers_only(code: Code) -> Response<TestBody> {
    let mut response = Response::new(TestBody::default());
    *response.headers_mut() = trailers(code);
    response
}

/// A normal response: a message, then the status in the trailers.
fn with_trailers(code: Code) -> Response<TestBody> {
    body(vec![
        Ok(Frame::data(Bytes::from_static(b"message"))),
        Ok(Frame::trailers(trailers(code))),
    ])
}

fn body(frames: Vec<Result<Frame<Bytes>, std::io::Error>>) -> Response<TestBody> {
    Response::new(TestBody {
        frames: frames.into(),
    })
}

type Mock = mock::Mock<Request<()>, Response<TestBody>>;
type Handle = mock::Handle<Request<()>, Response<TestBody>>;
type Layered<C = GrpcClassifier> = CircuitBreakerService<Mock, C>;
type Reply = Result<Response<ClassifiedBody<TestBody, GrpcClassifier>>, BoxError>;

/// Count window of 10, judged from 4 calls, 50% thresholds, 10s in open, 2 probes.
fn config() -> Config {
    Config {
        window: SlidingWindow::Count(10),
        minimum_calls: 4,
        failure_rate_threshold: 50.0,
        slow_call_duration: SLOW,
        slow_call_rate_threshold: 50.0,
        wait_in_open: WAIT,
        wait_in_open_multiplier: 1.0,
        max_wait_in_open: WAIT,
        permitted_calls_in_half_open: 2,
        // Paused time moves tokio's clock, not the kernel's.
        call_clock: CallClock::Runtime,
    }
}

fn setup(config: Config) -> (CircuitBreaker, Layered, Handle) {
    let breaker = CircuitBreaker::new("payment", config);
    let (inner, handle) = mock::pair();
    let service = breaker.layer(GrpcClassifier::default()).layer(inner);
    (breaker, service, handle)
}

/// One call: the mock answers `response` and the caller gets the wrapped response.
async fn roundtrip(
    service: &mut Layered,
    handle: &mut Handle,
    response: Response<TestBody>,
) -> Reply {
    let future = service.ready().await.expect("ready").call(Request::new(()));
    let (_, send) = handle
        .next_request()
        .await
        .expect("the call reached the service");
    send.send_response(response);
    future.await
}

/// Opens the breaker with four trailers-only UNAVAILABLE answers.
async fn open(breaker: &CircuitBreaker, service: &mut Layered, handle: &mut Handle) {
    for _ in 0..4 {
        roundtrip(service, handle, trailers_only(Code::Unavailable))
            .await
            .expect("an answer");
    }
    assert_eq!(breaker.state(), State::Open);
}

fn counts(breaker: &CircuitBreaker) -> (u32, u32, u32) {
    let s = breaker.snapshot();
    (s.calls, s.failures, s.slow_calls)
}

#[tokio::test(start_paused = true)]
async fn a_trailers_only_status_is_read_from_the_headers() {
    let (breaker, mut service, mut handle) = setup(config());
    let response = roundtrip(&mut service, &mut handle, trailers_only(Code::Unavailable))
        .await
        .unwrap();
    assert!(!response.body().is_pending(), "decided from the headers");
    assert_eq!(counts(&breaker), (1, 1, 0), "before the body is read");
    drop(response);
    assert_eq!(counts(&breaker), (1, 1, 0));
    roundtrip(&mut service, &mut handle, trailers_only(Code::Ok))
        .await
        .unwrap();
    assert_eq!(counts(&breaker), (2, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_normal_status_is_read_from_the_trailers() {
    let (breaker, mut service, mut handle) = setup(config());
    let response = roundtrip(&mut service, &mut handle, with_trailers(Code::Internal))
        .await
        .unwrap();
    assert!(response.body().is_pending());
    assert_eq!(counts(&breaker), (0, 0, 0), "not known before the trailers");
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(
        collected.trailers().unwrap().get("grpc-status").unwrap(),
        "13",
        "trailers pass through"
    );
    assert_eq!(collected.to_bytes(), "message", "data passes through");
    assert_eq!(counts(&breaker), (1, 1, 0));

    let response = roundtrip(&mut service, &mut handle, with_trailers(Code::Ok))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(counts(&breaker), (2, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn business_codes_count_as_successes() {
    let (breaker, mut service, mut handle) = setup(config());
    for code in [
        Code::FailedPrecondition,
        Code::InvalidArgument,
        Code::NotFound,
        Code::AlreadyExists,
        Code::Ok,
    ] {
        for response in [trailers_only(code), with_trailers(code)] {
            let response = roundtrip(&mut service, &mut handle, response)
                .await
                .unwrap();
            response.into_body().collect().await.unwrap();
        }
    }
    let snapshot = breaker.snapshot();
    assert_eq!(
        (snapshot.state, snapshot.calls, snapshot.failures),
        (State::Closed, 10, 0)
    );

    for code in [
        Code::Unavailable,
        Code::DeadlineExceeded,
        Code::ResourceExhausted,
        Code::Internal,
    ] {
        let response = roundtrip(&mut service, &mut handle, with_trailers(code))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(counts(&breaker), (10, 4, 0));
    let response = roundtrip(&mut service, &mut handle, trailers_only(Code::Unavailable))
        .await
        .unwrap();
    drop(response);
    assert_eq!(breaker.state(), State::Open, "5 of the last 10 failed");
}

#[tokio::test(start_paused = true)]
async fn a_body_without_trailers_or_with_an_error_is_a_failure() {
    let (breaker, mut service, mut handle) = setup(config());
    let ends_early = body(vec![Ok(Frame::data(Bytes::from_static(b"half a message")))]);
    let response = roundtrip(&mut service, &mut handle, ends_early)
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(counts(&breaker), (1, 1, 0));

    let fails = body(vec![
        Ok(Frame::data(Bytes::from_static(b"half"))),
        Err(std::io::Error::other("stream reset")),
    ]);
    let response = roundtrip(&mut service, &mut handle, fails).await.unwrap();
    let error = response.into_body().collect().await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "stream reset",
        "the error passes through"
    );
    assert_eq!(counts(&breaker), (2, 2, 0));

    let no_status = body(vec![Ok(Frame::trailers(http::HeaderMap::new()))]);
    let response = roundtrip(&mut service, &mut handle, no_status)
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(counts(&breaker), (3, 3, 0));
}

#[tokio::test(start_paused = true)]
async fn an_http_error_status_is_a_failure() {
    let (breaker, mut service, mut handle) = setup(config());
    let mut response = trailers_only(Code::Ok);
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let response = roundtrip(&mut service, &mut handle, response)
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(counts(&breaker), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn an_inner_error_is_classified_and_passed_through() {
    let (breaker, mut service, mut handle) = setup(config());
    let future = service.ready().await.unwrap().call(Request::new(()));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "connection refused",
    ));
    let error = future.await.unwrap_err();
    let io = error
        .downcast_ref::<std::io::Error>()
        .expect("the inner error");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(counts(&breaker), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_rejects_with_a_marked_status_without_calling() {
    let (breaker, mut service, mut handle) = setup(config());
    open(&breaker, &mut service, &mut handle).await;
    advance(Duration::from_millis(8800)).await;

    let error = service
        .ready()
        .await
        .expect("readiness is not withheld while open")
        .call(Request::new(()))
        .await
        .unwrap_err();
    assert!(
        handle.next_request().now_or_never().is_none(),
        "the call was not sent"
    );
    let status = error.downcast::<tonic::Status>().expect("a tonic::Status");
    assert!(is_rejection(&status));
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.message(),
        "circuit breaker `payment` is open; the call was not sent (retry after 1.2s)"
    );
    let rejected = std::error::Error::source(&*status)
        .and_then(|source| source.downcast_ref::<circuit_breaker::Rejected>())
        .expect("the rejection as source");
    assert_eq!(rejected.retry_after, Some(Duration::from_millis(1200)));

    // An UNAVAILABLE from the participant itself is not a rejection.
    breaker.set_mode(Mode::Normal);
    let response = roundtrip(&mut service, &mut handle, trailers_only(Code::Unavailable))
        .await
        .unwrap();
    assert_eq!(response.headers().get("grpc-status").unwrap(), "14");
    assert_eq!(counts(&breaker), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn poll_ready_delegates_and_never_waits_for_the_breaker() {
    let breaker = CircuitBreaker::new("payment", config());
    let (inner, mut handle) = mock::pair::<Request<()>, Response<TestBody>>();
    let mut service = mock::Spawn::new(breaker.layer(GrpcClassifier::default()).layer(inner));

    handle.allow(0);
    assert!(
        service.poll_ready().is_pending(),
        "the inner service is not ready"
    );
    handle.allow(1);
    assert!(service.is_woken());
    assert!(matches!(service.poll_ready(), Poll::Ready(Ok(()))));

    breaker.set_mode(Mode::ForcedOpen);
    handle.allow(1);
    assert!(
        matches!(service.poll_ready(), Poll::Ready(Ok(()))),
        "forced open, and still ready: the decision is in call()"
    );
    let rejected = service.call(Request::new(())).await.unwrap_err();
    assert!(is_rejection(&rejected.downcast::<tonic::Status>().unwrap()));
}

#[tokio::test(start_paused = true)]
async fn clones_share_the_breaker() {
    let (breaker, mut service, mut handle) = setup(config());
    let mut clone = service.clone();
    open(&breaker, &mut clone, &mut handle).await;
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap_err();
    assert!(is_rejection(&error.downcast::<tonic::Status>().unwrap()));
    assert_eq!(service.breaker().name(), "payment");
}

#[tokio::test(start_paused = true)]
async fn slow_calls_are_timed_until_their_outcome() {
    let (breaker, mut service, mut handle) = setup(config());
    // Slow before the response head.
    let future = service.ready().await.unwrap().call(Request::new(()));
    let (_, send) = handle.next_request().await.unwrap();
    advance(SLOW).await;
    send.send_response(trailers_only(Code::Ok));
    future.await.unwrap();
    assert_eq!(counts(&breaker), (1, 0, 1));

    // Quick head, slow trailers.
    let response = roundtrip(&mut service, &mut handle, with_trailers(Code::Ok))
        .await
        .unwrap();
    advance(SLOW).await;
    response.into_body().collect().await.unwrap();
    assert_eq!(counts(&breaker), (2, 0, 2));

    // Quick.
    roundtrip(&mut service, &mut handle, trailers_only(Code::Ok))
        .await
        .unwrap();
    assert_eq!(counts(&breaker), (3, 0, 2));
    roundtrip(&mut service, &mut handle, trailers_only(Code::Ok))
        .await
        .unwrap();
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.state, State::Open, "2 slow calls of 4");
    assert_eq!(snapshot.slow_call_rate, Some(50.0));
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_only_the_permitted_probes_among_concurrent_callers() {
    let (breaker, mut service, mut handle) = setup(config());
    open(&breaker, &mut service, &mut handle).await;
    advance(WAIT).await;

    let callers: Vec<_> = (0..6)
        .map(|_| tokio::spawn(service.clone().oneshot(Request::new(()))))
        .collect();
    let mut probes = Vec::new();
    for _ in 0..2 {
        probes.push(handle.next_request().await.unwrap().1);
    }
    tokio::task::yield_now().await;
    assert!(
        handle.next_request().now_or_never().is_none(),
        "only 2 probes went"
    );
    assert_eq!(breaker.state(), State::HalfOpen);
    for probe in probes {
        probe.send_response(trailers_only(Code::Ok));
    }
    let mut rejected = 0;
    let mut answered = 0;
    for caller in callers {
        match caller.await.unwrap() {
            Ok(_) => answered += 1,
            Err(error) => {
                let status = error.downcast::<tonic::Status>().unwrap();
                assert!(is_rejection(&status));
                assert_eq!(
                    status.message(),
                    "circuit breaker `payment` is half_open; the call was not sent"
                );
                rejected += 1;
            }
        }
    }
    assert_eq!((answered, rejected), (2, 4));
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_response_future_in_half_open_frees_the_slot() {
    let (breaker, mut service, mut handle) = setup(Config {
        permitted_calls_in_half_open: 1,
        ..config()
    });
    open(&breaker, &mut service, &mut handle).await;
    advance(WAIT).await;

    let probe = service.ready().await.unwrap().call(Request::new(()));
    let (_, abandoned) = handle.next_request().await.unwrap();
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap_err();
    assert!(is_rejection(&error.downcast::<tonic::Status>().unwrap()));

    drop(probe); // the caller gave up (a deadline, a cancelled saga)
    drop(abandoned);
    assert_eq!(
        counts(&breaker),
        (0, 0, 0),
        "a cancelled call records nothing"
    );
    breaker.ready().now_or_never().expect("the slot is free");
    roundtrip(&mut service, &mut handle, trailers_only(Code::Ok))
        .await
        .unwrap();
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_body_in_half_open_frees_the_slot() {
    let (breaker, mut service, mut handle) = setup(Config {
        permitted_calls_in_half_open: 1,
        ..config()
    });
    open(&breaker, &mut service, &mut handle).await;
    advance(WAIT).await;

    let response = roundtrip(&mut service, &mut handle, with_trailers(Code::Ok))
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    assert!(body.is_pending());
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap_err();
    assert!(is_rejection(&error.downcast::<tonic::Status>().unwrap()));

    drop(body); // before the trailers
    assert_eq!(counts(&breaker), (0, 0, 0));
    let response = roundtrip(&mut service, &mut handle, with_trailers(Code::Unavailable))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(breaker.state(), State::Open, "the second probe failed");
    assert_eq!(breaker.snapshot().openings, 2);
}

#[tokio::test(start_paused = true)]
async fn disabled_passes_everything_through() {
    let (breaker, mut service, mut handle) = setup(config());
    breaker.set_mode(Mode::Disabled);
    for _ in 0..10 {
        roundtrip(&mut service, &mut handle, trailers_only(Code::Unavailable))
            .await
            .unwrap();
    }
    assert_eq!(breaker.state(), State::Disabled);
    assert_eq!(counts(&breaker), (0, 0, 0));
}

/// A policy of one's own: NOT_FOUND means the participant lost its data (a failure), and
/// transport errors are someone else's problem (ignored).
#[derive(Clone)]
struct Strict;

impl Classify for Strict {
    fn classify_status(&self, code: Option<Code>) -> Outcome {
        match code {
            Some(Code::Ok) => Outcome::Success,
            Some(Code::NotFound) | None => Outcome::Failure,
            Some(_) => Outcome::Ignored,
        }
    }

    fn classify_error(&self, _: &(dyn std::error::Error + 'static)) -> Outcome {
        Outcome::Ignored
    }
}

#[tokio::test(start_paused = true)]
async fn the_outcome_policy_is_pluggable() {
    let breaker = CircuitBreaker::new("payment", config());
    let (inner, mut handle) = mock::pair::<Request<()>, Response<TestBody>>();
    let mut service: Layered<Strict> = breaker.layer(Strict).layer(inner);
    async fn call(
        service: &mut Layered<Strict>,
        handle: &mut Handle,
        response: Option<Response<TestBody>>,
    ) {
        let future = service.ready().await.unwrap().call(Request::new(()));
        let (_, send) = handle.next_request().await.unwrap();
        match response {
            Some(response) => send.send_response(response),
            None => send.send_error(std::io::Error::other("reset")),
        }
        if let Ok(response) = future.await {
            response.into_body().collect().await.unwrap();
        }
    }
    call(
        &mut service,
        &mut handle,
        Some(with_trailers(Code::Unavailable)),
    )
    .await;
    call(&mut service, &mut handle, None).await;
    assert_eq!(counts(&breaker), (0, 0, 0), "ignored");
    call(
        &mut service,
        &mut handle,
        Some(with_trailers(Code::NotFound)),
    )
    .await;
    call(&mut service, &mut handle, Some(trailers_only(Code::Ok))).await;
    assert_eq!(counts(&breaker), (2, 1, 0));
}
