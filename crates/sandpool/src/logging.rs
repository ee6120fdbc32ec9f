//! Logs and traces: text or JSON logs on stderr, and (opt-in) OpenTelemetry traces sent over
//! OTLP/HTTP (protobuf) to a collector.
//!
//! Traces carry one span per request and per phase inside it (`auth`, `allocate`,
//! `execute`, `files`), with the pool and operation but never an identifier, token or code.

use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Where traces go.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans go to `/v1/traces`.
    pub endpoint: String,
    pub service_name: String,
}

/// Keeps the trace pipeline alive; dropping it sends the spans still buffered.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(err) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("warning: could not send the last traces: {err}");
            }
        }
    }
}

/// Installs the global subscriber: logs filtered by `SANDPOOL_LOG` (or `RUST_LOG`, default
/// `info`), and spans of sandpool's own crates to the collector when `otlp` is set.
pub fn init(json: bool, otlp: Option<&OtlpSettings>) -> anyhow::Result<TelemetryGuard> {
    let filter = std::env::var("SANDPOOL_LOG").or_else(|_| std::env::var("RUST_LOG")).unwrap_or_else(|_| "info,tower_http=warn".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    let logs = if json { fmt.json().flatten_event(true).with_current_span(false).boxed() } else { fmt.boxed() }.with_filter(filter);

    let (traces, provider) = match otlp {
        None => (None, None),
        Some(settings) => {
            let url = format!("{}/v1/traces", settings.endpoint.trim_end_matches('/'));
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url.clone())
                .with_timeout(Duration::from_secs(10))
                .build()
                .with_context(|| format!("cannot set up the OTLP exporter for {url}"))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name(settings.service_name.clone()).build())
                .build();
            let tracer = provider.tracer("sandpool");
            // Only sandpool's own spans: the request and its phases.
            let targets = Targets::new().with_target("sandpool", LevelFilter::INFO).with_target("sandpool_api", LevelFilter::INFO);
            (Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(targets)), Some(provider))
        }
    };
    let _ = tracing_subscriber::registry().with(logs).with(traces).try_init();
    Ok(TelemetryGuard { provider })
}
