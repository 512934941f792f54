//! Per-client rate limits and header limits, as middleware.
//!
//! Two token buckets, both `rate` requests a second on average and `burst` at once:
//! - per client address, BEFORE authentication ([`limit_by_address`]), so a flood of bad
//!   tokens is limited too. Behind a proxy every client shares the proxy's address: with
//!   `trusted_proxies` (CIDRs), a request from such a proxy is counted against the
//!   address its `X-Forwarded-For` names (the right-most one that is not itself a
//!   trusted proxy); from anyone else the header is ignored, so it cannot be forged;
//! - per principal, AFTER authentication, when it is on ([`limit_by_principal`]), so one
//!   customer cannot escape its allowance by moving from address to address. (Clients
//!   behind one NAT still share that address's bucket: size the limits for it.)
//!
//! The defaults are far above one client's ordinary use; a client past them gets
//! `429 rate_limited` with `Retry-After` (seconds) and `details.retry_after_ms`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;
use serde_json::json;

use crate::auth::Principal;
use crate::ApiError;

/// Checks between two sweeps of buckets that hold no information any more.
const SWEEP_EVERY: u64 = 10_000;

/// Token buckets per key (an address or a principal).
pub struct RateLimiter {
    buckets: DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
}

impl RateLimiter {
    /// `rate` requests per second on average (> 0), `burst` at once (at least 1).
    pub fn new(rate: f64, burst: u32) -> Self {
        let period = Duration::from_secs_f64(1.0 / rate.max(1e-6));
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .expect("the period is at least 1 ns")
            .allow_burst(NonZeroU32::new(burst.max(1)).expect("at least 1"));
        Self {
            buckets: DefaultKeyedRateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one request from `key`'s bucket, or says how long until one is there.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            // Full buckets hold no information: drop them so memory follows live clients.
            self.buckets.retain_recent();
            self.buckets.shrink_to_fit();
        }
        self.buckets
            .check_key(&key.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.buckets.clock().now()))
    }
}

/// What the two rate-limit middlewares share.
#[derive(Clone)]
pub struct RateLimits {
    pub by_address: Arc<RateLimiter>,
    pub by_principal: Arc<RateLimiter>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Arc<Vec<IpNet>>,
}

impl RateLimits {
    /// Both buckets at `rate`/`burst`, believing `X-Forwarded-For` from `trusted_proxies`.
    pub fn new(rate: f64, burst: u32, trusted_proxies: Vec<IpNet>) -> Self {
        Self {
            by_address: Arc::new(RateLimiter::new(rate, burst)),
            by_principal: Arc::new(RateLimiter::new(rate, burst)),
            trusted_proxies: Arc::new(trusted_proxies),
        }
    }
}

/// Probes and scrapers are never limited.
fn exempt(request: &Request) -> bool {
    matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics")
}

/// The middleware that runs BEFORE authentication: one bucket per client address.
pub async fn limit_by_address(
    State(limits): State<Option<RateLimits>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(limits) = limits else {
        return next.run(request).await;
    };
    if exempt(&request) {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let client = peer
        .map(|peer| {
            bucket_of(client_address(
                peer,
                request.headers(),
                &limits.trusted_proxies,
            ))
        })
        .unwrap_or_default();
    match limits.by_address.check(&format!("addr:{client}")) {
        Ok(()) => next.run(request).await,
        Err(wait) => too_many(wait),
    }
}

/// The middleware that runs AFTER authentication: one bucket per principal (when
/// authentication is on; without it the address bucket is the only one).
pub async fn limit_by_principal(
    State(limits): State<Option<RateLimits>>,
    request: Request,
    next: Next,
) -> Response {
    let (Some(limits), Some(principal)) = (limits, request.extensions().get::<Principal>()) else {
        return next.run(request).await;
    };
    if exempt(&request) {
        return next.run(request).await;
    }
    match limits.by_principal.check(&principal.actor()) {
        Ok(()) => next.run(request).await,
        Err(wait) => too_many(wait),
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy — the right-most
/// `X-Forwarded-For` address that is not a trusted proxy itself.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    // `::ffff:10.0.0.1` from a dual-stack listener is 10.0.0.1.
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for hop in forwarded.into_iter().rev() {
        match hop.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()) {
            Ok(ip) if is_trusted(&ip) => client = ip,
            Ok(ip) => return ip,
            // A hop we cannot read: the last address we could is the best we know.
            Err(_) => return client,
        }
    }
    client
}

/// The bucket of an address: IPv4 addresses one by one, IPv6 by /64 (one end site holds a
/// whole /64, so single addresses would hand it a fresh bucket per request).
fn bucket_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let net = ipnet::Ipv6Net::new(v6, 64).map(|n| n.trunc());
            net.map(|n| n.to_string())
                .unwrap_or_else(|_| v6.to_string())
        }
    }
}

fn too_many(wait: Duration) -> Response {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests from this client; retry in {seconds} s"),
    )
    .with_details(json!({ "retry_after_ms": wait.as_millis() as u64 }))
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// Most header fields one request may carry (below hyper's own 100, past which hyper
/// answers a bare 431 before any middleware runs).
pub const MAX_HEADERS: usize = 64;
/// Most bytes of header names and values one request may carry.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The middleware: `431 headers_too_large` past [`MAX_HEADERS`] or [`MAX_HEADER_BYTES`].
pub async fn header_limits(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("at most {MAX_HEADERS} header fields and {MAX_HEADER_BYTES} bytes of headers"),
        )
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.7".parse().unwrap(),
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "8.8.8.8".parse().unwrap();
        assert_eq!(
            client_address(proxy, &headers, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap(),
            "the right-most untrusted hop; what the client wrote before it is not believed"
        );
        assert_eq!(client_address(stranger, &headers, &trusted), stranger);
        assert_eq!(client_address(proxy, &headers, &[]), proxy);
        assert_eq!(client_address(proxy, &HeaderMap::new(), &trusted), proxy);
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            client_address(mapped, &headers, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap(),
            "a v4-mapped peer is its IPv4 address"
        );
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let a = bucket_of("2001:db8:1:2::1".parse().unwrap());
        let b = bucket_of("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = bucket_of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(bucket_of("192.0.2.7".parse().unwrap()), "192.0.2.7");
    }

    #[test]
    fn a_burst_past_the_bucket_waits_for_the_rate() {
        let limiter = RateLimiter::new(10.0, 3);
        for _ in 0..3 {
            assert!(limiter.check("a").is_ok());
        }
        let wait = limiter.check("a").unwrap_err();
        assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(
            limiter.check("b").is_ok(),
            "clients have buckets of their own"
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.check("a").is_ok(), "the bucket refills at the rate");
    }
}
