//! Dynamic unary gRPC calls to participants, built from protobuf descriptors.
//!
//! A call's request is JSON (the rendered mapping); the invoker turns it into a
//! `DynamicMessage` of the method's input type, sends it with the `idempotency-key`
//! metadata and a deadline, and turns the reply back into JSON. Channels are created once
//! per endpoint and shared by every saga.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use circuit_breaker::{CircuitBreaker, GrpcClassifier};
use http::uri::PathAndQuery;
use prost::Message;
use prost_reflect::{DynamicMessage, MessageDescriptor, SerializeOptions};
use saga_engine::CallError;
use saga_engine::definition::CallPlan;
use serde_json::Value;
use telemetry::attributes;
use tonic::client::GrpcService;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The codes after which another attempt may succeed. Besides the transient ones, the
/// codes a broken connection or stream produces (UNKNOWN for a transport error, INTERNAL
/// for an HTTP/2 protocol error, CANCELLED for a stream cut short, ABORTED): the call may
/// or may not have been applied, so it is an unknown outcome, settled by trying again with
/// the same idempotency key (the participant answers with its first result). Failing the
/// step instead would compensate around an effect that may stand (a pivot has no undo).
pub fn is_retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::Aborted
    )
}

/// The gRPC code's name as the API shows it, e.g. `FAILED_PRECONDITION`.
pub use telemetry::grpc::code_name;

fn status_error(status: &Status) -> CallError {
    CallError {
        code: code_name(status.code()).to_owned(),
        message: status.message().to_owned(),
        retryable: is_retryable(status.code()),
        // The breaker refused the call: nothing was sent.
        rejected: circuit_breaker::is_rejection(status),
    }
}

fn invalid_request(message: String) -> CallError {
    CallError {
        code: "INVALID_REQUEST".to_owned(),
        message,
        retryable: false,
        rejected: false,
    }
}

/// Encodes a `DynamicMessage` and decodes replies of a known type.
#[derive(Debug, Clone)]
pub struct DynamicCodec {
    output: MessageDescriptor,
}

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> DynamicEncoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> DynamicDecoder {
        DynamicDecoder(self.output.clone())
    }
}

#[derive(Debug)]
pub struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("cannot encode request: {e}")))
    }
}

#[derive(Debug)]
pub struct DynamicDecoder(MessageDescriptor);

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode reply: {e}")))
    }
}

/// Builds the request message from JSON.
pub fn request_message(plan: &CallPlan, request: &Value) -> Result<DynamicMessage, CallError> {
    DynamicMessage::deserialize(plan.input.clone(), request).map_err(|e| {
        invalid_request(format!(
            "request for {} does not fit {}: {e}",
            plan.method,
            plan.input.full_name()
        ))
    })
}

/// The reply as JSON, with field names as in the .proto file and 64-bit integers as numbers.
pub fn reply_json(message: &DynamicMessage) -> Result<Value, CallError> {
    let options = SerializeOptions::new()
        .stringify_64_bit_integers(false)
        .use_proto_field_name(true)
        .skip_default_fields(false);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| invalid_request(format!("cannot read the reply as JSON: {e}")))
}

/// Makes participant calls; cheap to share.
#[derive(Debug, Default)]
pub struct Invoker {
    /// A std Mutex: only held to look up or insert a channel, never across an await.
    channels: Mutex<HashMap<String, Channel>>,
}

impl Invoker {
    pub fn new() -> Invoker {
        Invoker::default()
    }

    fn channel(&self, endpoint: &str) -> Result<Channel, CallError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| invalid_request(format!("bad endpoint `{endpoint}`: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Calls `plan`'s method at `endpoint` with a JSON request; the reply comes back as JSON.
    ///
    /// The call is one client span (OpenTelemetry RPC conventions), a child of the current
    /// span, whose W3C trace context goes to the participant in the request metadata.
    pub async fn call(
        &self,
        endpoint: &str,
        plan: &CallPlan,
        request: &Value,
        idempotency_key: &str,
        timeout: Duration,
        breaker: Option<&CircuitBreaker>,
    ) -> Result<Value, CallError> {
        let (service, method) = plan.method.split_once('/').unwrap_or((&plan.method, ""));
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %plan.method,
            otel.kind = "client",
            { attributes::RPC_SYSTEM } = "grpc",
            { attributes::RPC_SERVICE } = service,
            { attributes::RPC_METHOD } = method,
            { attributes::RPC_GRPC_STATUS_CODE } = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let result = self
            .call_inner(
                endpoint,
                plan,
                request,
                idempotency_key,
                timeout,
                breaker,
                &span,
            )
            .instrument(span.clone())
            .await;
        let code = match &result {
            Ok(_) => Some(0),
            Err(e) if e.rejected => None,
            Err(e) => Some(code_number(&e.code)),
        };
        match code {
            Some(code) => {
                span.record(attributes::RPC_GRPC_STATUS_CODE, code);
                if code != 0 {
                    span.record("otel.status_code", "ERROR");
                }
            }
            None => {
                tracing::info!(parent: &span, breaker.state = "open", "circuit breaker rejected the call: nothing was sent");
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn call_inner(
        &self,
        endpoint: &str,
        plan: &CallPlan,
        request: &Value,
        idempotency_key: &str,
        timeout: Duration,
        breaker: Option<&CircuitBreaker>,
        span: &tracing::Span,
    ) -> Result<Value, CallError> {
        let message = request_message(plan, request)?;
        let channel = self.channel(endpoint)?;
        let path = PathAndQuery::try_from(plan.path())
            .map_err(|e| invalid_request(format!("bad method path {}: {e}", plan.path())))?;
        let mut request = tonic::Request::new(message);
        let key = idempotency_key.parse().map_err(|_| {
            invalid_request(format!(
                "idempotency key `{idempotency_key}` is not valid metadata"
            ))
        })?;
        request.metadata_mut().insert("idempotency-key", key);
        telemetry::inject(&span.context(), request.metadata_mut());
        request.set_timeout(timeout);
        let codec = DynamicCodec {
            output: plan.output.clone(),
        };
        let attempt = async {
            match breaker {
                Some(breaker) => {
                    let service =
                        tower::Layer::layer(&breaker.layer(GrpcClassifier::default()), channel);
                    unary(service, endpoint, request, path, codec).await
                }
                None => unary(channel, endpoint, request, path, codec).await,
            }
        };
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(reply)) => reply_json(reply.get_ref()),
            // A server enforcing the `grpc-timeout` we sent answers CANCELLED at the
            // deadline; that is a timeout, and retryable like one.
            Ok(Err(status))
                if status.code() == Code::Cancelled
                    && started.elapsed() >= timeout.mul_f64(0.9) =>
            {
                Err(CallError {
                    rejected: false,
                    code: "DEADLINE_EXCEEDED".to_owned(),
                    message: format!(
                        "no reply from {} within {} ms (the participant cancelled at the deadline)",
                        plan.method,
                        timeout.as_millis()
                    ),
                    retryable: true,
                })
            }
            Ok(Err(status)) => Err(status_error(&status)),
            Err(_) => Err(CallError {
                rejected: false,
                code: "DEADLINE_EXCEEDED".to_owned(),
                message: format!(
                    "no reply from {} within {} ms",
                    plan.method,
                    timeout.as_millis()
                ),
                retryable: true,
            }),
        }
    }
}

/// The number of a gRPC code name (`UNAVAILABLE` → 14), for `rpc.grpc.status_code`; codes
/// of our own (a request that could not be built) count as UNKNOWN (2).
fn code_number(name: &str) -> i64 {
    (0..=16)
        .find(|n| code_name(Code::from_i32(*n)) == name)
        .map_or(2, i64::from)
}

/// One unary call over any gRPC service (a plain channel, or one behind a breaker).
async fn unary<S>(
    service: S,
    endpoint: &str,
    request: tonic::Request<DynamicMessage>,
    path: PathAndQuery,
    codec: DynamicCodec,
) -> Result<tonic::Response<DynamicMessage>, Status>
where
    S: GrpcService<tonic::body::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut grpc = tonic::client::Grpc::new(service);
    grpc.ready().await.map_err(|e| {
        Status::unavailable(format!(
            "participant at {endpoint} is not reachable: {}",
            e.into()
        ))
    })?;
    grpc.unary(request, path, codec).await
}
