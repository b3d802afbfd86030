//! The YAML shape of a definition, as written, with source positions kept for errors.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefinition {
    pub name: Spanned<String>,
    pub version: Spanned<u32>,
    #[serde(default)]
    pub description: Option<String>,
    /// Field name to type (`string`, `integer`, `number`, `boolean`, `list`, `object`,
    /// `any`; a trailing `?` marks the field optional).
    #[serde(default)]
    pub input: Option<BTreeMap<String, Spanned<String>>>,
    pub participants: BTreeMap<String, Spanned<RawParticipant>>,
    pub steps: Vec<Spanned<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParticipant {
    pub endpoint: Spanned<String>,
    /// A binary `FileDescriptorSet` (path relative to the definition file); absent means the
    /// participant's gRPC server reflection.
    #[serde(default)]
    pub descriptor_set: Option<Spanned<String>>,
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    pub compensation_retry: Option<Spanned<RawRetry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub initial_backoff: Option<Spanned<String>>,
    #[serde(default)]
    pub max_backoff: Option<Spanned<String>>,
    #[serde(default)]
    pub multiplier: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub name: Spanned<String>,
    pub participant: Spanned<String>,
    #[serde(default)]
    pub kind: Option<Spanned<String>>,
    pub action: Spanned<RawCall>,
    #[serde(default)]
    pub compensation: Option<Spanned<RawCall>>,
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    pub compensation_retry: Option<Spanned<RawRetry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCall {
    pub method: Spanned<String>,
    #[serde(default)]
    pub request: BTreeMap<String, Spanned<serde_json::Value>>,
}
