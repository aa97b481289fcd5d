//! Which span a unit of work is in the distributed trace, and — with the cargo feature
//! `otlp` — exporting those spans to an OpenTelemetry collector.
//!
//! [`continue_trace`] is what the receiver and the worker call for each request or message:
//! it makes the `tracing` span a child of the incoming W3C trace context and returns the
//! context to hand on (into the messages, into the outcome event). Without the feature (the
//! default build, no OpenTelemetry crates at all) that is a new span id in the same trace.
//! With `otlp` and `OTEL_EXPORTER_OTLP_ENDPOINT` set, the span is exported over OTLP/HTTP
//! and the ids handed on are the exported span's, so a trace back-end shows receiver, worker
//! and every consumer of the outcome event in one trace.

use tracing::Span;

use crate::message::TraceContext;

/// Put `span` into the trace `incoming` belongs to (a new trace when there is none) and
/// return the trace context of `span`, for what it publishes. Records `trace_id` and
/// `span_id` on `span` when it declares those fields.
pub fn continue_trace(span: &Span, incoming: Option<TraceContext>) -> TraceContext {
    let made_up = || incoming.map_or_else(TraceContext::new_root, |t| t.child());
    #[cfg(feature = "otlp")]
    let own = export::continue_trace(span, incoming).unwrap_or_else(made_up);
    #[cfg(not(feature = "otlp"))]
    let own = made_up();
    span.record("trace_id", own.trace_id());
    span.record("span_id", own.span_id());
    own
}

/// Install the log subscriber with OTLP export, when `OTEL_EXPORTER_OTLP_ENDPOINT` asks for
/// it; `false` leaves logging to `telemetry::init`. Without the feature: always `false`.
pub fn init(cfg: &crate::config::LogConfig) -> bool {
    #[cfg(feature = "otlp")]
    return export::init(cfg);
    #[cfg(not(feature = "otlp"))]
    {
        let _ = cfg;
        false
    }
}

/// Flush and stop the exporter (spans of the last seconds are otherwise lost at exit).
pub fn shutdown() {
    #[cfg(feature = "otlp")]
    export::shutdown();
}

#[cfg(feature = "otlp")]
mod export {
    use std::sync::OnceLock;

    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
    };
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    use crate::config::LogConfig;
    use crate::message::TraceContext;

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    pub(super) fn init(cfg: &LogConfig) -> bool {
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
            return false;
        }
        // Endpoint, headers and timeout come from the standard OTEL_EXPORTER_OTLP_* variables.
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                eprintln!("flagrelay: OTLP export disabled: {e}");
                return false;
            }
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("flagrelay")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("flagrelay");
        let _ = PROVIDER.set(provider);

        let filter = crate::telemetry::log_filter(cfg);
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let fmt = if cfg.format == "json" {
            fmt.json().flatten_event(true).boxed()
        } else {
            fmt.compact().boxed()
        };
        // The log filter decides what is printed; spans are exported from `info` up whatever
        // the log level (a quiet log must not mean an empty trace).
        let spans = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        tracing_subscriber::registry()
            .with(crate::telemetry::quiet_dependencies())
            .with(fmt.with_filter(filter))
            .with(spans)
            .try_init()
            .is_ok()
    }

    /// The exported span's own context, once it is parented on `incoming`; `None` when no
    /// exporter is installed (then `super` makes up the ids).
    pub(super) fn continue_trace(
        span: &Span,
        incoming: Option<TraceContext>,
    ) -> Option<TraceContext> {
        PROVIDER.get()?;
        if let Some(incoming) = incoming {
            let remote = SpanContext::new(
                TraceId::from_hex(&incoming.trace_id()).ok()?,
                SpanId::from_hex(&incoming.span_id()).ok()?,
                if incoming.sampled() {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                true,
                TraceState::default(),
            );
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let context = span.context();
        let own = context.span().span_context().clone();
        if !own.is_valid() {
            return None;
        }
        TraceContext::parse(&format!(
            "00-{}-{}-{:02x}",
            own.trace_id(),
            own.span_id(),
            own.trace_flags().to_u8()
        ))
    }

    pub(super) fn shutdown() {
        if let Some(provider) = PROVIDER.get()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flagrelay: OTLP export did not flush: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_continues_the_incoming_trace_or_starts_one() {
        let span = tracing::info_span!("t", trace_id = tracing::field::Empty);
        let incoming = TraceContext::new_root();
        let own = continue_trace(&span, Some(incoming));
        assert_eq!(own.trace_id(), incoming.trace_id());
        assert_ne!(own.span_id(), incoming.span_id());
        let fresh = continue_trace(&span, None);
        assert_ne!(fresh.trace_id(), incoming.trace_id());
    }
}
