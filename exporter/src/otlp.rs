//! OTLP/HTTP export of start-up traces (`--otlp-endpoint`).
//!
//! The spans describe things that happened earlier, in other processes, and are
//! rebuilt from ring events with their recorded start and end times. The
//! `tracing` + `tracing-opentelemetry` route cannot express that: a `tracing` span's
//! times are when the exporter enters and closes it. So the spans are built with the
//! OpenTelemetry API's span builder (explicit trace ID, start and end), and shipped
//! by the SDK's batch processor through `opentelemetry-otlp` (HTTP, JSON encoding).

use crate::trace::{AttrValue, FinishedTrace, SpanRec, TraceSink};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Sends finished start-up traces to an OTLP/HTTP endpoint.
pub struct OtlpSink {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl std::fmt::Debug for OtlpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpSink").finish_non_exhaustive()
    }
}

impl OtlpSink {
    /// `url` is the full traces URL, e.g. `http://collector:4318/v1/traces`.
    ///
    /// Must be called outside an async runtime: the blocking HTTP client it builds
    /// runs on the batch processor's own thread.
    pub fn new(url: &str) -> Result<Arc<OtlpSink>, String> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "--otlp-endpoint {url:?}: must be an http:// or https:// URL (OTLP/HTTP)"
            ));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(url)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("--otlp-endpoint {url:?}: {e}"))?;
        let bsp = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_millis(500))
                    .with_max_queue_size(8192)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(bsp)
            .with_resource(
                Resource::builder()
                    .with_service_name("vigil-exporter")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("vigil-exporter");
        Ok(Arc::new(OtlpSink { provider, tracer }))
    }

    /// Sends what is queued and stops the processor.
    pub fn shutdown(&self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }
}

fn time(unix_ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(unix_ns)
}

fn attrs(a: &[(&'static str, AttrValue)]) -> Vec<KeyValue> {
    a.iter()
        .map(|(k, v)| match v {
            AttrValue::Str(s) => KeyValue::new(*k, s.clone()),
            AttrValue::Int(i) => KeyValue::new(*k, *i),
        })
        .collect()
}

impl OtlpSink {
    fn builder(&self, s: &SpanRec) -> SpanBuilder {
        self.tracer
            .span_builder(s.name)
            .with_kind(SpanKind::Internal)
            .with_start_time(time(s.start_unix_ns))
            .with_attributes(attrs(&s.attrs))
    }
}

impl TraceSink for OtlpSink {
    fn export(&self, t: FinishedTrace) {
        let mut root = self
            .builder(&t.root)
            .with_trace_id(TraceId::from(t.trace_id))
            .start_with_context(&self.tracer, &Context::new());
        if !t.complete {
            root.set_status(Status::error(
                "start-up did not record a host-PID detection (process died or timed out)",
            ));
        }
        let cx = Context::new().with_span(root);
        for c in &t.children {
            let mut span = self.builder(c).start_with_context(&self.tracer, &cx);
            span.end_with_timestamp(time(c.end_unix_ns));
        }
        cx.span().end_with_timestamp(time(t.root.end_unix_ns));
    }
}
