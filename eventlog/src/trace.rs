//! W3C trace context (`traceparent`): carried from the HTTP request into every command,
//! event and saga step, so that one trace id follows an order through the whole system.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

const TRACEPARENT: &str = "traceparent";

/// The `traceparent` a command of the current request carries, written and read by
/// OpenTelemetry's W3C propagator:
/// - the span this request runs in, when spans are exported — so the command, its events
///   and the saga's spans land in the very trace the collector got from the HTTP span;
/// - else the caller's `traceparent` (`caller`), when it is valid;
/// - else a new sampled one.
pub fn request_traceparent(caller: Option<&str>) -> String {
    let propagator = TraceContextPropagator::new();
    let inject = |cx: &opentelemetry::Context| {
        let mut carrier = HashMap::new();
        propagator.inject_context(cx, &mut carrier);
        carrier.remove(TRACEPARENT)
    };
    if let Some(current) = inject(&tracing::Span::current().context()) {
        return current;
    }
    if let Some(caller) = caller {
        let carrier = HashMap::from([(TRACEPARENT.to_string(), caller.to_string())]);
        if let Some(continued) = inject(&propagator.extract(&carrier)) {
            return continued;
        }
    }
    new_traceparent()
}

/// The trace id of a valid `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (Some(version), Some(trace), Some(span), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then_some(trace)
}

/// A new sampled `traceparent`, for a request that came without one.
pub fn new_traceparent() -> String {
    let span = Uuid::new_v4().into_bytes();
    let context = SpanContext::new(
        TraceId::from_bytes(Uuid::new_v4().into_bytes()),
        SpanId::from_bytes(span[..8].try_into().expect("8 of 16 bytes")),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(
        &opentelemetry::Context::new().with_remote_span_context(context),
        &mut carrier,
    );
    carrier
        .remove(TRACEPARENT)
        .expect("a valid span context is always injected")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_traceparents_give_their_trace_id() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id(&new_traceparent()).map(str::len), Some(32));
        // Without an exported span, a valid caller's trace is continued, a bad one replaced.
        assert_eq!(trace_id(&request_traceparent(Some(tp))), trace_id(tp));
        let fresh = request_traceparent(Some("00-zz-00f067aa0ba902b7-01"));
        assert!(trace_id(&fresh).is_some_and(|t| t != "4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
    }
}
