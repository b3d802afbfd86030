//! Fetching participants' protobuf descriptors: from server reflection, or from a
//! descriptor set file named in the definition.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use prost::Message;
use prost_reflect::DescriptorPool;
use prost_types::FileDescriptorProto;
use saga_engine::DescriptorLookup;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// Descriptors per participant, or the reason they could not be had.
#[derive(Debug, Default)]
pub struct Fetched(pub BTreeMap<String, Result<DescriptorPool, String>>);

impl DescriptorLookup for Fetched {
    fn pool(&self, participant: &str) -> Result<DescriptorPool, String> {
        match self.0.get(participant) {
            Some(result) => result.clone(),
            None => Err(format!("no descriptors for participant `{participant}`")),
        }
    }
}

/// Reads a binary `FileDescriptorSet` file.
pub fn from_file(path: &Path) -> Result<DescriptorPool, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read descriptor set {}: {e}", path.display()))?;
    DescriptorPool::decode(bytes.as_slice()).map_err(|e| {
        format!(
            "descriptor set {} is not a valid FileDescriptorSet: {e}",
            path.display()
        )
    })
}

/// Asks a server's reflection service (v1) for every service it has, and the files they
/// need, retrying until `wait` has passed.
pub async fn from_reflection(endpoint: &str, wait: Duration) -> Result<DescriptorPool, String> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut delay = Duration::from_millis(50);
    loop {
        match fetch(endpoint).await {
            Ok(pool) => return Ok(pool),
            Err(e) if tokio::time::Instant::now() + delay >= deadline => {
                return Err(format!(
                    "cannot fetch descriptors from {endpoint} by server reflection: {e}"
                ));
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn fetch(endpoint: &str) -> Result<DescriptorPool, String> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut client = ServerReflectionClient::new(channel);
    let mut ask = async |request: MessageRequest| -> Result<MessageResponse, String> {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .map_err(|s| format!("reflection refused: {}", s.message()))?
            .into_inner();
        let reply = stream
            .message()
            .await
            .map_err(|s| format!("reflection failed: {}", s.message()))?
            .ok_or("reflection gave no answer")?;
        reply
            .message_response
            .ok_or_else(|| "empty reflection answer".to_owned())
    };

    let services = match ask(MessageRequest::ListServices(String::new())).await? {
        MessageResponse::ListServicesResponse(list) => list.service,
        other => return Err(format!("unexpected reflection answer {other:?}")),
    };
    let mut files: BTreeMap<String, FileDescriptorProto> = BTreeMap::new();
    let mut wanted: Vec<MessageRequest> = services
        .iter()
        .filter(|s| !s.name.starts_with("grpc."))
        .map(|s| MessageRequest::FileContainingSymbol(s.name.clone()))
        .collect();
    let mut asked = BTreeSet::new();
    while let Some(request) = wanted.pop() {
        let reply = match ask(request).await? {
            MessageResponse::FileDescriptorResponse(reply) => reply,
            MessageResponse::ErrorResponse(e) => {
                return Err(format!("reflection error: {}", e.error_message));
            }
            other => return Err(format!("unexpected reflection answer {other:?}")),
        };
        for bytes in reply.file_descriptor_proto {
            let file = FileDescriptorProto::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
            for dependency in &file.dependency {
                if !files.contains_key(dependency) && asked.insert(dependency.clone()) {
                    wanted.push(MessageRequest::FileByFilename(dependency.clone()));
                }
            }
            files.insert(file.name().to_owned(), file);
        }
    }
    let mut pool = DescriptorPool::new();
    pool.add_file_descriptor_protos(files.into_values())
        .map_err(|e| e.to_string())?;
    Ok(pool)
}
