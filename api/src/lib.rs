//! Tally's shared HTTP pieces, used by the command routes (`commands`), the query routes
//! (`projections`) and the ops routes (the `tally` binary): the one error shape of API.md,
//! a strict JSON body reader, and parsing of ids in paths.

pub mod auth;
mod body;
mod error;
pub mod limits;
pub mod openapi;
mod query;

pub use body::{json_body, parse_customer_id, parse_order_id, parse_sku, MAX_BODY_BYTES};
pub use error::{client_errors_in_shape, ApiError};
pub use query::QueryParams;
