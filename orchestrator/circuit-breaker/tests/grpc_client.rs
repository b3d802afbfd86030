//! A real `tonic::client::Grpc` over the layered service: outcomes are read from what tonic
//! reads, and a rejection surfaces as the breaker's own `UNAVAILABLE` status, marked.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use circuit_breaker::{CircuitBreaker, Config, GrpcClassifier, SlidingWindow, State, is_rejection};
use http::uri::PathAndQuery;
use http_body::Frame;
use http_body_util::StreamBody;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use tower::Layer;

/// Messages as raw bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

type Frames = futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;
type Reply = http::Response<StreamBody<Frames>>;

fn grpc_status(code: Code) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", http::HeaderValue::from(code as i32));
    headers
}

fn reply(headers: http::HeaderMap, frames: Vec<Frame<Bytes>>) -> Reply {
    let frames: Vec<_> = frames.into_iter().map(Ok).collect();
    let mut response = http::Response::new(StreamBody::new(futures::stream::iter(frames)));
    *response.headers_mut() = headers;
    response
}

/// A message, then `grpc-status` in the trailers.
fn message(payload: &'static [u8], code: Code) -> Reply {
    let mut framed = vec![0u8];
    framed.extend_from_slice(
        &u32::try_from(payload.len())
            .expect("a short message")
            .to_be_bytes(),
    );
    framed.extend_from_slice(payload);
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    reply(
        headers,
        vec![
            Frame::data(Bytes::from(framed)),
            Frame::trailers(grpc_status(code)),
        ],
    )
}

/// No body; the status in the headers.
fn trailers_only(code: Code) -> Reply {
    reply(grpc_status(code), Vec::new())
}

#[tokio::test(start_paused = true)]
async fn a_tonic_client_sees_outcomes_and_marked_rejections() {
    let breaker = CircuitBreaker::new(
        "payment",
        Config {
            window: SlidingWindow::Count(10),
            minimum_calls: 4,
            wait_in_open: Duration::from_secs(30),
            max_wait_in_open: Duration::from_secs(30),
            ..Config::default()
        },
    );
    let replies = Arc::new(Mutex::new(VecDeque::from([
        message(b"pong", Code::Ok),
        message(b"", Code::Unavailable),
        trailers_only(Code::Unavailable),
        trailers_only(Code::DeadlineExceeded),
    ])));
    let sent = Arc::new(AtomicUsize::new(0));
    let participant = tower::service_fn({
        let replies = Arc::clone(&replies);
        let sent = Arc::clone(&sent);
        move |_: http::Request<tonic::body::Body>| {
            sent.fetch_add(1, Ordering::SeqCst);
            let reply = replies.lock().unwrap().pop_front().expect("a reply");
            async move { Ok::<_, Infallible>(reply) }
        }
    });
    let channel = breaker.layer(GrpcClassifier::default()).layer(participant);
    let mut client = tonic::client::Grpc::new(channel);
    let path = PathAndQuery::from_static("/payment.v1.Payment/AuthorizeCharge");

    let mut call = async || -> Result<Bytes, Status> {
        client.ready().await.map_err(Status::from_error)?;
        client
            .unary(
                tonic::Request::new(Bytes::from_static(b"ping")),
                path.clone(),
                RawCodec,
            )
            .await
            .map(tonic::Response::into_inner)
    };

    assert_eq!(call().await.unwrap(), "pong");
    let snapshot = breaker.snapshot();
    assert_eq!(
        (snapshot.calls, snapshot.failures),
        (1, 0),
        "read from the trailers"
    );

    for expected in [Code::Unavailable, Code::Unavailable, Code::DeadlineExceeded] {
        let status = call().await.unwrap_err();
        assert_eq!(status.code(), expected);
        assert!(!is_rejection(&status), "the participant's own answer");
    }
    assert_eq!(breaker.state(), State::Open, "3 failures in 4 calls");
    assert_eq!(sent.load(Ordering::SeqCst), 4);

    tokio::time::advance(Duration::from_millis(29_500)).await;
    let status = call().await.unwrap_err();
    assert!(is_rejection(&status), "{status:?}");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.message(),
        "circuit breaker `payment` is open; the call was not sent (retry after 500ms)"
    );
    assert_eq!(
        sent.load(Ordering::SeqCst),
        4,
        "the participant was not called"
    );
}
