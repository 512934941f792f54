//! Who is calling: bearer JWTs (HS256 with a shared secret, or RS256 with a public key),
//! turned into a [`Principal`] that the routes and the command processors judge against.
//!
//! Two roles: `admin` may do anything; `customer` acts only on its own customer id's
//! orders and account. Off by default for local runs (every request is then let through,
//! and the start-up log says so loudly).
//!
//! The middleware here only authenticates: it never reads a path or a query string.
//! Every access rule is decided by the route that serves the request, on the very values
//! it parsed (percent-decoded path segments, a query string whose names are given once),
//! so no check can look at one value while the handler uses another:
//! - `/v1/admin/*` and restocking: [`admin_only`] as a route layer, or [`require_admin`];
//! - accounts, order lists: [`require_customer`] on the parsed `customer_id`;
//! - creating an order: against the body's `customer_id`;
//! - order commands: in the order command processor, against the order's customer in the
//!   write model (so a customer cannot act on another's order, however new it is);
//! - order queries: against the read model's customer; stock history: admin only.
//!
//! The ops routes (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`) are open.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::ApiError;

/// The caller, once its token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin { subject: String },
    Customer { customer_id: String },
}

impl Principal {
    /// How the caller is recorded in events' metadata (`actor`) and judged by processors.
    pub fn actor(&self) -> String {
        match self {
            Principal::Admin { subject } => format!("admin:{subject}"),
            Principal::Customer { customer_id } => format!("customer:{customer_id}"),
        }
    }

    /// May this caller act on `customer_id`'s orders and account?
    pub fn may_act_for(&self, customer_id: &str) -> bool {
        match self {
            Principal::Admin { .. } => true,
            Principal::Customer { customer_id: own } => own == customer_id,
        }
    }
}

/// `403 forbidden` unless `principal` (if auth is on) may act for `customer_id`.
pub fn require_customer(principal: Option<&Principal>, customer_id: &str) -> Result<(), ApiError> {
    match principal {
        Some(p) if !p.may_act_for(customer_id) => Err(forbidden(
            "this token's customer may act only on its own orders and account",
        )),
        _ => Ok(()),
    }
}

/// `403 forbidden` unless auth is off or `principal` is an admin.
pub fn require_admin(principal: Option<&Principal>, what: &str) -> Result<(), ApiError> {
    match principal {
        Some(Principal::Customer { .. }) => {
            Err(forbidden(format!("{what} needs a token with role admin")))
        }
        _ => Ok(()),
    }
}

/// The customer a command's `actor` names, if it is a customer.
pub fn actor_customer(actor: Option<&str>) -> Option<&str> {
    actor.and_then(|a| a.strip_prefix("customer:"))
}

/// `401 unauthorized`.
pub fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// `403 forbidden`.
pub fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// How tokens are checked.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// `admin` or `customer`.
    role: String,
    /// The customer a `customer` token acts for (defaults to `sub`).
    customer_id: Option<String>,
}

impl Authenticator {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> Self {
        Self::new(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// RS256 with an RSA public key in PEM.
    pub fn rs256(public_key_pem: &[u8]) -> Result<Self, String> {
        let key = DecodingKey::from_rsa_pem(public_key_pem)
            .map_err(|e| format!("the RS256 public key is not an RSA public key in PEM: {e}"))?;
        Ok(Self::new(key, Algorithm::RS256))
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        Self { key, validation }
    }

    /// Also require `iss` to be this.
    pub fn with_issuer(mut self, issuer: &str) -> Self {
        self.validation.set_issuer(&[issuer]);
        self
    }

    /// Also require `aud` to contain this.
    pub fn with_audience(mut self, audience: &str) -> Self {
        self.validation.set_audience(&[audience]);
        self
    }

    /// The principal a bearer token stands for.
    pub fn principal(&self, token: &str) -> Result<Principal, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| unauthorized(format!("the bearer token was refused: {e}")))?;
        let claims = data.claims;
        // The principal is written into every event's metadata and keys idempotency:
        // no control characters in it, and a customer's id is a valid customer id.
        if claims.sub.is_empty()
            || claims.sub.len() > 256
            || claims.sub.chars().any(char::is_control)
        {
            return Err(unauthorized(
                "the token's sub must be 1 to 256 characters without control characters",
            ));
        }
        match claims.role.as_str() {
            "admin" => Ok(Principal::Admin {
                subject: claims.sub,
            }),
            "customer" => {
                let customer_id = claims.customer_id.unwrap_or(claims.sub);
                aggregates::CustomerId::new(customer_id.as_str()).map_err(|_| {
                    unauthorized("a customer token's customer_id (or sub) must be a customer id: 1 to 64 of [A-Za-z0-9._-]")
                })?;
                Ok(Principal::Customer { customer_id })
            }
            other => Err(forbidden(format!(
                "the token's role {other:?} is neither admin nor customer"
            ))),
        }
    }
}

/// Routes open to anyone, with or without authentication.
const OPEN_ROUTES: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/openapi.json"];

/// The middleware: checks the bearer token (when auth is on) and puts the [`Principal`]
/// in the request's extensions. It decides no access rule (see the module docs).
pub async fn authenticate(
    State(auth): State<Option<Arc<Authenticator>>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(auth) = auth else {
        return next.run(request).await;
    };
    if OPEN_ROUTES.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let principal = match token {
        None => Err(unauthorized(
            "send `Authorization: Bearer <JWT>`; this Tally has authentication on",
        )),
        Some(token) => auth.principal(token.trim()),
    };
    match principal {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => {
            let unauthorized = error.status == StatusCode::UNAUTHORIZED;
            let mut response = error.into_response();
            if unauthorized {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tally\""),
                );
            }
            response
        }
    }
}

/// A route layer: `403` unless the caller is an admin (or authentication is off). Put on
/// a router, it holds for every route that router matched, whatever the path's spelling.
pub async fn admin_only(request: Request, next: Next) -> Response {
    match require_admin(request.extensions().get::<Principal>(), "this route") {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}
