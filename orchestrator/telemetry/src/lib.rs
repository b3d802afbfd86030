//! Observability shared by the orchestrator and the participants: one [`init`] that installs
//! the `tracing` subscriber (an `EnvFilter`, human-readable or JSON log lines, and, when an
//! OTLP endpoint is configured, an OpenTelemetry layer exporting spans over OTLP/gRPC), the
//! span attribute names every crate uses ([`attributes`]), W3C trace-context propagation in
//! gRPC metadata ([`inject`], [`extract`], [`current_trace_id`]), and the admin HTTP server
//! (`/metrics`, `/healthz`, `/readyz`, module `admin`).
//!
//! - [`init`] / [`test_subscriber`]: build the subscriber; [`Telemetry`] owns the tracer
//!   providers, hands out per-service tracers for services that run in the same process
//!   ([`Telemetry::service_tracer`]) and flushes every span on [`Telemetry::shutdown`] or drop.
//! - [`grpc`]: [`grpc::ServerTracingLayer`], a tower layer for tonic servers that starts one
//!   server span per call (parented by the caller's `traceparent`) and reports each call's
//!   outcome to an optional [`grpc::CallObserver`] (metrics).
//! - [`serve_admin`]: the admin endpoints, with [`Admin`] supplying the metrics text and the
//!   readiness check.
//!
//! Environment: `RUST_LOG` (default `info`, with the SDK's own chatter at `warn`) filters log lines and spans alike, exported or
//! not. An OTLP endpoint comes from [`TelemetryConfig::otlp_endpoint`], else
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`;
//! `OTEL_SDK_DISABLED=true` turns export off. `service.name` is `OTEL_SERVICE_NAME`, else
//! `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, else the config's; the other
//! `OTEL_RESOURCE_ATTRIBUTES` are added to every provider's resource. `OTEL_TRACES_SAMPLER`
//! and `OTEL_TRACES_SAMPLER_ARG` are read here, strictly (an unknown sampler or a bad ratio
//! is an error, where the SDK would fall back silently). Only the gRPC protocol is built in:
//! `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` other than `grpc` is an error. The exporter and
//! the batch processor read the rest themselves (`OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`,
//! `_COMPRESSION`, `OTEL_BSP_*`).
//!
//! Invariant: nothing here is exported, and no exporter, thread or runtime is created, unless
//! an OTLP endpoint is configured; export runs on its own small runtime, so flushing at exit
//! never waits on the application's runtime.

pub mod admin;
pub mod attributes;
pub mod grpc;

mod config;
mod propagation;

pub use admin::{Admin, DEFAULT_ADMIN_LISTEN, probe, serve_admin, serve_admin_with};
pub use config::{LogFormat, TelemetryConfig, UnknownLogFormat};
pub use propagation::{current_trace_id, extract, inject};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SimpleSpanProcessor, SpanExporter,
    TracerProviderBuilder,
};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::registry::Registry;

/// The tracer type [`Telemetry::tracer`] and [`Telemetry::service_tracer`] return.
pub type Tracer = SdkTracer;

/// The instrumentation scope name of the tracers this crate creates.
const SCOPE: &str = "saga";

/// The log filter when `RUST_LOG` is unset: `info`, but only warnings and errors of the
/// OpenTelemetry SDK itself (its info lines announce its own setup).
const DEFAULT_FILTER: &str =
    "info,opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn";

/// How long [`Telemetry::shutdown`] waits for each provider to export its last spans.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry is already initialized: a global tracing subscriber is already set")]
    AlreadyInitialized,
    #[error("invalid {variable}: {reason}")]
    InvalidEnv {
        variable: &'static str,
        reason: String,
    },
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(String),
    #[error("cannot build the OTLP span exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("cannot start the span export runtime: {0}")]
    Runtime(std::io::Error),
}

/// `Result` with [`TelemetryError`].
pub type Result<T, E = TelemetryError> = std::result::Result<T, E>;

/// Returned by [`init`]: owns the tracer providers. [`Telemetry::shutdown`] (or dropping it)
/// exports the spans still buffered; keep it alive until the process is about to exit.
pub struct Telemetry {
    export: Option<Arc<Export>>,
    /// The providers created so far: the main one first, then one per service tracer. A std
    /// mutex: only held to push or drain the list, never across an `.await`.
    providers: Mutex<Vec<SdkTracerProvider>>,
    main: Option<SdkTracerProvider>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("exporting", &self.exporting())
            .field("endpoint", &self.export.as_ref().map(|e| e.describe()))
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.export.is_some()
    }

    /// The tracer of this process's own service (the one the subscriber's OpenTelemetry layer
    /// uses), e.g. for [`grpc::ServerTracingLayer`] in a binary that runs one service. None
    /// when not exporting.
    pub fn tracer(&self) -> Option<Tracer> {
        self.main.as_ref().map(|p| p.tracer(SCOPE))
    }

    /// A tracer reporting as another service: its own provider, with resource
    /// `service.name = service_name` (other `OTEL_RESOURCE_ATTRIBUTES` still apply), the same
    /// sampler and exporter settings. For services that run inside this process (the
    /// participants of `orchestrator dev`). None when not exporting. Each call creates a new
    /// provider, flushed by [`Telemetry::shutdown`]; call it once per service.
    pub fn service_tracer(&self, service_name: &str) -> Option<Tracer> {
        let export = self.export.as_ref()?;
        let provider = match export.provider(resource(service_name, true)) {
            Ok(provider) => provider,
            Err(error) => {
                // The settings were already validated by `init`; this cannot fail in practice.
                tracing::warn!(service = service_name, cause = %error, "no tracer for service");
                return None;
            }
        };
        let tracer = provider.tracer(SCOPE);
        self.providers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(provider);
        Some(tracer)
    }

    /// Flushes and shuts down every provider, so that no span is lost at exit. Blocks the
    /// calling thread for at most a few seconds per provider: the export itself runs on its
    /// own runtime, but a collector served by the caller's runtime (an in-process receiver
    /// in a test) cannot answer while its only thread blocks here; use
    /// [`Telemetry::shutdown_async`] there. Idempotent; spans ended afterwards are dropped.
    pub fn shutdown(&self) {
        for provider in self.take_providers() {
            // Errors are "already shut down" or a failed last export: nothing left to do.
            let _ = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        }
    }

    /// [`Telemetry::shutdown`] on a blocking thread, leaving the caller's runtime free.
    pub async fn shutdown_async(&self) {
        let providers = self.take_providers();
        if providers.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for provider in providers {
                let _ = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
            }
        })
        .await;
    }

    /// Exports every span ended so far now, rather than at the batch processor's next
    /// scheduled export (`OTEL_BSP_SCHEDULE_DELAY`, 5 s by default), and waits for the
    /// export; runs on a blocking thread. Export errors are ignored, as in the background.
    pub async fn flush(&self) {
        let providers = self
            .providers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if providers.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for provider in providers {
                let _ = provider.force_flush();
            }
        })
        .await;
    }

    fn take_providers(&self) -> Vec<SdkTracerProvider> {
        std::mem::take(
            &mut *self
                .providers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where spans go: the OTLP endpoint (or, in tests, a given exporter), plus the settings
/// shared by every provider.
struct Export {
    sampler: Sampler,
    target: Target,
}

enum Target {
    Otlp {
        endpoint: String,
        /// Runs the exporters' gRPC connections, independent of the application's runtime.
        /// Shut down in the background when the last [`Telemetry`] reference goes away.
        runtime: Mutex<Option<tokio::runtime::Runtime>>,
    },
    Custom(Box<dyn Fn(TracerProviderBuilder) -> TracerProviderBuilder + Send + Sync>),
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Target::Otlp { runtime, .. } = &self.target
            && let Some(runtime) = runtime
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
        {
            // Dropping a runtime blocks, which panics inside async code: don't wait.
            runtime.shutdown_background();
        }
    }
}

impl Export {
    fn describe(&self) -> String {
        match &self.target {
            Target::Otlp { endpoint, .. } => endpoint.clone(),
            Target::Custom(_) => "custom exporter".to_owned(),
        }
    }

    /// A provider with `resource`, the shared sampler and a batch exporter to the target.
    fn provider(&self, resource: Resource) -> Result<SdkTracerProvider> {
        let builder = SdkTracerProvider::builder()
            .with_sampler(self.sampler.clone())
            .with_resource(resource);
        match &self.target {
            Target::Otlp { endpoint, runtime } => {
                let guard = runtime
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let Some(runtime) = guard.as_ref() else {
                    return Err(TelemetryError::Exporter {
                        endpoint: endpoint.clone(),
                        reason: "telemetry is shut down".to_owned(),
                    });
                };
                // The tonic channel spawns its connection tasks on the current runtime.
                let _entered = runtime.enter();
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .build()
                    .map_err(|e| TelemetryError::Exporter {
                        endpoint: endpoint.clone(),
                        reason: e.to_string(),
                    })?;
                Ok(builder
                    .with_span_processor(BatchSpanProcessor::builder(exporter).build())
                    .build())
            }
            Target::Custom(add) => Ok(add(builder).build()),
        }
    }
}

/// The resource of a provider: the SDK's telemetry attributes, `OTEL_RESOURCE_ATTRIBUTES`,
/// and `service.name`. For this process's own service (`forced` false) the name is, in
/// order of precedence, `OTEL_SERVICE_NAME`, `service.name` in `OTEL_RESOURCE_ATTRIBUTES`,
/// then `name`; a service tracer's name (`forced`) always wins.
fn resource(name: &str, forced: bool) -> Resource {
    let builder = Resource::builder_empty()
        .with_service_name(name.to_owned())
        .with_detectors(&[
            Box::new(TelemetryResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ]);
    let builder = if forced {
        builder.with_service_name(name.to_owned())
    } else {
        match env_var("OTEL_SERVICE_NAME") {
            Some(service) => builder.with_service_name(service),
            None => builder,
        }
    };
    builder.build()
}

/// A non-empty environment variable.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Looks up a (non-empty) variable: [`env_var`], or a map in unit tests.
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` strictly (the SDK would fall back
/// to the default sampler with only an internal warning). Default: `parentbased_always_on`.
fn sampler_from_env(env_var: Env<'_>) -> Result<Sampler> {
    const VAR: &str = "OTEL_TRACES_SAMPLER";
    const ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
    let ratio = || -> Result<f64> {
        match env_var(ARG) {
            None => Ok(1.0),
            Some(arg) => match arg.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(TelemetryError::InvalidEnv {
                    variable: ARG,
                    reason: format!("{arg:?} is not a ratio between 0 and 1"),
                }),
            },
        }
    };
    let Some(name) = env_var(VAR) else {
        return Ok(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
    };
    Ok(match name.trim() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
        }
        other => {
            return Err(TelemetryError::InvalidEnv {
                variable: VAR,
                reason: format!(
                    "unsupported sampler {other:?} (expected always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off or parentbased_traceidratio)"
                ),
            });
        }
    })
}

/// Only gRPC is built in: reject an explicit request for another OTLP protocol rather than
/// silently sending gRPC to an HTTP collector.
fn check_protocol(env_var: Env<'_>) -> Result<()> {
    for variable in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(protocol) = env_var(variable)
            && protocol.trim() != "grpc"
        {
            return Err(TelemetryError::InvalidEnv {
                variable,
                reason: format!("protocol {protocol:?} is not supported (only \"grpc\")"),
            });
        }
    }
    Ok(())
}

/// The endpoint spans are exported to: the flag, then `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// then `OTEL_EXPORTER_OTLP_ENDPOINT`; None (no export) when all are absent or
/// `OTEL_SDK_DISABLED=true`.
fn endpoint(config: &TelemetryConfig, env_var: Env<'_>) -> Option<String> {
    if env_var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    config
        .otlp_endpoint
        .clone()
        .filter(|e| !e.trim().is_empty())
        .or_else(|| env_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env_var("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

type Base = Layered<EnvFilter, Registry>;
type BoxedLayer = Box<dyn Layer<Base> + Send + Sync>;

/// Targets whose spans and events never reach the OpenTelemetry layer: the exporter's own
/// transport (otherwise exporting a span would create spans to export).
fn otel_filter() -> Targets {
    Targets::new()
        .with_default(tracing::Level::TRACE)
        .with_target("h2", tracing::level_filters::LevelFilter::OFF)
        .with_target("hyper", tracing::level_filters::LevelFilter::OFF)
        .with_target("hyper_util", tracing::level_filters::LevelFilter::OFF)
        .with_target("tower", tracing::level_filters::LevelFilter::OFF)
        .with_target("tonic", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry", tracing::level_filters::LevelFilter::OFF)
        .with_target(
            "opentelemetry_sdk",
            tracing::level_filters::LevelFilter::OFF,
        )
        .with_target(
            "opentelemetry_otlp",
            tracing::level_filters::LevelFilter::OFF,
        )
        .with_target(
            "opentelemetry_proto",
            tracing::level_filters::LevelFilter::OFF,
        )
}

/// Everything `init` and `test_subscriber` build, before installation.
struct Parts {
    subscriber: Layered<Vec<BoxedLayer>, Base>,
    telemetry: Telemetry,
}

fn build(config: TelemetryConfig, target: Option<Target>, test: bool) -> Result<Parts> {
    let filter = match env_var("RUST_LOG") {
        Some(directives) => {
            EnvFilter::try_new(directives).map_err(|e| TelemetryError::Filter(e.to_string()))?
        }
        None => EnvFilter::new(DEFAULT_FILTER),
    };

    let mut layers: Vec<BoxedLayer> = Vec::new();
    layers.push(match (config.log_format, test) {
        // Logs go to stderr; stdout stays for what a command prints.
        (LogFormat::Text, false) => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        (LogFormat::Text, true) => tracing_subscriber::fmt::layer().with_test_writer().boxed(),
        (LogFormat::Json, test) => {
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(true);
            if test {
                layer.with_test_writer().boxed()
            } else {
                layer.with_writer(std::io::stderr).boxed()
            }
        }
    });

    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );

    let target = match target {
        Some(target) => Some(target),
        None => match endpoint(&config, &env_var) {
            None => None,
            Some(endpoint) => {
                check_protocol(&env_var)?;
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("otel-export")
                    .enable_all()
                    .build()
                    .map_err(TelemetryError::Runtime)?;
                Some(Target::Otlp {
                    endpoint,
                    runtime: Mutex::new(Some(runtime)),
                })
            }
        },
    };

    let telemetry = match target {
        None => Telemetry {
            export: None,
            providers: Mutex::new(Vec::new()),
            main: None,
        },
        Some(target) => {
            let export = Arc::new(Export {
                sampler: sampler_from_env(&env_var)?,
                target,
            });
            let provider = export.provider(resource(&config.service_name, false))?;
            layers.push(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer(SCOPE))
                    .with_filter(otel_filter())
                    .boxed(),
            );
            Telemetry {
                export: Some(export),
                providers: Mutex::new(vec![provider.clone()]),
                main: Some(provider),
            }
        }
    };

    let subscriber = Registry::default().with(filter).with(layers);
    Ok(Parts {
        subscriber,
        telemetry,
    })
}

/// Installs the global tracing subscriber (see the crate documentation) and, when exporting,
/// the global OpenTelemetry tracer provider; always sets the global text-map propagator to
/// W3C trace context. Call it once, early in `main`, and keep the returned [`Telemetry`]
/// until exit. A second call (or a subscriber installed by someone else) returns
/// [`TelemetryError::AlreadyInitialized`].
pub fn init(config: TelemetryConfig) -> Result<Telemetry> {
    let Parts {
        subscriber,
        telemetry,
    } = build(config, None, false)?;
    if tracing::dispatcher::set_global_default(subscriber.into()).is_err() {
        telemetry.shutdown();
        return Err(TelemetryError::AlreadyInitialized);
    }
    // Records of the `log` crate (sled's) become events, unless someone else took `log`.
    let _ = tracing_log::LogTracer::builder()
        .with_max_level(tracing_log::AsLog::as_log(
            &tracing::level_filters::LevelFilter::current(),
        ))
        .init();
    if let Some(provider) = &telemetry.main {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    Ok(telemetry)
}

/// Builds the same subscriber as [`init`] (log lines go to the test harness's captured
/// output) without installing anything globally but the propagator: for tests that scope a
/// subscriber with `tracing::subscriber::with_default` or `set_default`.
pub fn test_subscriber(
    config: TelemetryConfig,
) -> Result<(impl tracing::Subscriber + Send + Sync + 'static, Telemetry)> {
    let Parts {
        subscriber,
        telemetry,
    } = build(config, None, true)?;
    Ok((subscriber, telemetry))
}

/// Like [`test_subscriber`], but spans (of the subscriber and of every
/// [`Telemetry::service_tracer`]) go to clones of `exporter` through a simple (synchronous)
/// span processor, e.g. `opentelemetry_sdk`'s `InMemorySpanExporter`; the OTLP endpoint
/// settings are ignored. `OTEL_TRACES_SAMPLER` and the resource variables still apply.
/// Spans are exported as each one ends; note that `InMemorySpanExporter` forgets them when
/// [`Telemetry::shutdown`] shuts it down, so read them before.
pub fn test_subscriber_with_exporter<E>(
    config: TelemetryConfig,
    exporter: E,
) -> Result<(impl tracing::Subscriber + Send + Sync + 'static, Telemetry)>
where
    E: SpanExporter + Clone + Send + Sync + 'static,
{
    let target = Target::Custom(Box::new(move |builder: TracerProviderBuilder| {
        builder.with_span_processor(SimpleSpanProcessor::new(exporter.clone()))
    }));
    let Parts {
        subscriber,
        telemetry,
    } = build(config, Some(target), true)?;
    Ok((subscriber, telemetry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_uses_the_config_name_by_default_and_forces_service_names() {
        let main = resource("orchestrator", false);
        let forced = resource("payment", true);
        let name = |r: &Resource| {
            r.get(&opentelemetry::Key::new("service.name"))
                .map(|v| v.to_string())
        };
        if std::env::var_os("OTEL_SERVICE_NAME").is_none()
            && std::env::var_os("OTEL_RESOURCE_ATTRIBUTES").is_none()
        {
            assert_eq!(name(&main).as_deref(), Some("orchestrator"));
        }
        assert_eq!(name(&forced).as_deref(), Some("payment"));
        assert!(
            forced
                .get(&opentelemetry::Key::new("telemetry.sdk.name"))
                .is_some()
        );
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
                .filter(|v| !v.trim().is_empty())
        }
    }

    #[test]
    fn samplers_follow_the_otel_variables_and_reject_unknown_ones() {
        let sampler =
            |vars: &[(&str, &str)]| sampler_from_env(&env(vars)).map(|s| format!("{s:?}"));
        assert_eq!(
            sampler(&[]).unwrap(),
            format!("{:?}", Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        );
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "always_off")]).unwrap(),
            "AlwaysOff"
        );
        assert_eq!(
            sampler(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25")
            ])
            .unwrap(),
            format!(
                "{:?}",
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.25)))
            )
        );
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "traceidratio")]).unwrap(),
            "TraceIdRatioBased(1.0)"
        );
        let err = sampler(&[("OTEL_TRACES_SAMPLER", "xray")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid OTEL_TRACES_SAMPLER: unsupported sampler \"xray\""),
            "{err}"
        );
        let err = sampler(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ])
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid OTEL_TRACES_SAMPLER_ARG"),
            "{err}"
        );
    }

    #[test]
    fn the_endpoint_comes_from_the_flag_then_the_traces_then_the_general_variable() {
        let mut config = TelemetryConfig::new("orchestrator");
        let both = [
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://all:4317"),
        ];
        assert_eq!(endpoint(&config, &env(&[])), None);
        assert_eq!(
            endpoint(&config, &env(&both)).as_deref(),
            Some("http://traces:4317")
        );
        assert_eq!(
            endpoint(&config, &env(&both[1..])).as_deref(),
            Some("http://all:4317")
        );
        config.otlp_endpoint = Some("http://flag:4317".to_owned());
        assert_eq!(
            endpoint(&config, &env(&both)).as_deref(),
            Some("http://flag:4317")
        );
        assert_eq!(
            endpoint(&config, &env(&[("OTEL_SDK_DISABLED", "true")])),
            None
        );
        // An empty flag counts as absent.
        config.otlp_endpoint = Some(String::new());
        assert_eq!(
            endpoint(&config, &env(&both[1..])).as_deref(),
            Some("http://all:4317")
        );
    }

    #[test]
    fn only_the_grpc_protocol_is_accepted() {
        assert!(check_protocol(&env(&[])).is_ok());
        assert!(check_protocol(&env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])).is_ok());
        let err = check_protocol(&env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "http/protobuf",
        )]))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: protocol \"http/protobuf\" is not supported (only \"grpc\")"
        );
    }

    #[test]
    fn the_exporter_transport_is_filtered_out_of_spans() {
        let filter = otel_filter();
        for target in [
            "h2",
            "hyper::client",
            "hyper_util::client",
            "tower::buffer",
            "tonic::transport",
            "opentelemetry_sdk",
        ] {
            assert!(
                !filter.would_enable(target, &tracing::Level::ERROR),
                "{target}"
            );
        }
        assert!(filter.would_enable("orchestrator::runtime", &tracing::Level::INFO));
    }
}
