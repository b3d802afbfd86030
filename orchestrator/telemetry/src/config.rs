//! [`TelemetryConfig`] and [`LogFormat`].

use std::fmt;
use std::str::FromStr;

/// How log lines are written (to stdout, the fmt layer's default writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line, with the current span's fields (`span`) and every enclosing
    /// span (`spans`), so each line inside a saga's span carries `saga.id`.
    Json,
}

impl LogFormat {
    /// "text" or "json".
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown log format name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format {0:?} (expected \"text\" or \"json\")")]
pub struct UnknownLogFormat(pub String);

impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(UnknownLogFormat(s.to_owned())),
        }
    }
}

/// What [`crate::init`] needs to know; everything else comes from the environment (`RUST_LOG`
/// and the `OTEL_*` variables, see the crate documentation).
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Default `service.name`; `OTEL_SERVICE_NAME` (then `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`) overrides it.
    pub service_name: String,
    pub log_format: LogFormat,
    /// `--otlp-endpoint`; when None, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; when all are absent, no span is exported (nothing is
    /// built).
    pub otlp_endpoint: Option<String>,
}

impl TelemetryConfig {
    /// Text logs, endpoint from the environment only.
    pub fn new(service_name: impl Into<String>) -> Self {
        TelemetryConfig {
            service_name: service_name.into(),
            log_format: LogFormat::default(),
            otlp_endpoint: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_name_the_choices_on_error() {
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown log format \"yaml\" (expected \"text\" or \"json\")"
        );
        assert_eq!(LogFormat::Json.to_string(), "json");
    }
}
