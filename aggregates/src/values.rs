//! Value types that validate what crosses the edge: ids, SKUs, quantities and money.
//!
//! Identifiers validate on construction *and* on deserialisation, so a command read from a
//! topic is as trustworthy as one built in code. Ranges are checked by the named
//! constructors (`Quantity::line`, `Cents::unit_price`, ...) that the HTTP layer and the
//! saga use; stored events are not re-checked against today's ranges when they are read
//! back, since the log keeps what was valid when it was written.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A value outside its documented range, or an identifier of the wrong shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A number outside `min..=max`; `rule` is the API's `details.rule`.
    #[error("{field} must be between {min} and {max}, got {got}")]
    OutOfRange {
        rule: &'static str,
        field: &'static str,
        min: i64,
        max: i64,
        got: i64,
    },
    /// An identifier that does not have the documented shape.
    #[error("{field} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    InvalidId { field: &'static str },
}

impl ValueError {
    /// The rule name that API errors report in `details.rule`.
    pub fn rule(&self) -> &'static str {
        match self {
            ValueError::OutOfRange { rule, .. } => rule,
            ValueError::InvalidId { .. } => "invalid_id",
        }
    }
}

fn valid_key(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
        #[serde(try_from = "String", into = "String")]
        #[schemars(with = "String", extend("pattern" = "^[A-Za-z0-9._-]{1,64}$"))]
        pub struct $name(String);

        impl $name {
            /// Validates `s`: 1..=64 characters from `[A-Za-z0-9._-]`.
            pub fn new(s: impl Into<String>) -> Result<Self, ValueError> {
                let s = s.into();
                if valid_key(&s) {
                    Ok(Self(s))
                } else {
                    Err(ValueError::InvalidId { field: $field })
                }
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(s: String) -> Result<Self, ValueError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A stock-keeping unit: the id of an `Inventory` aggregate.
    Sku,
    "sku"
);
string_id!(
    /// A customer: the id of a `PaymentAccount` aggregate and the owner of orders.
    CustomerId,
    "customer_id"
);

/// The id of an `Order` aggregate (and of its fulfilment saga).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct OrderId(pub Uuid);

impl OrderId {
    /// A new random order id.
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    /// Parses the canonical textual form of a UUID.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| ValueError::InvalidId { field: "order_id" })
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

fn in_range(
    got: i64,
    min: i64,
    max: i64,
    field: &'static str,
    rule: &'static str,
) -> Result<u64, ValueError> {
    if (min..=max).contains(&got) {
        Ok(got as u64)
    } else {
        Err(ValueError::OutOfRange {
            rule,
            field,
            min,
            max,
            got,
        })
    }
}

/// A positive number of units of one SKU.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct Quantity(pub u64);

impl Quantity {
    /// Most units of one SKU on one order line.
    pub const MAX_LINE: i64 = 1_000;
    /// Most units one restock may add.
    pub const MAX_RESTOCK: i64 = 1_000_000;

    /// A quantity on an order line: 1..=1000.
    pub fn line(n: i64) -> Result<Self, ValueError> {
        in_range(n, 1, Self::MAX_LINE, "quantity", "quantity_out_of_range").map(Self)
    }

    /// A quantity to restock: 1..=1,000,000.
    pub fn restock(n: i64) -> Result<Self, ValueError> {
        in_range(n, 1, Self::MAX_RESTOCK, "quantity", "quantity_out_of_range").map(Self)
    }
}

/// An amount of money in integer cents.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct Cents(pub u64);

impl Cents {
    /// Largest unit price and largest single deposit: one million currency units.
    pub const MAX_AMOUNT: i64 = 100_000_000;

    /// A unit price on an order line: 1..=100,000,000 cents.
    pub fn unit_price(n: i64) -> Result<Self, ValueError> {
        in_range(
            n,
            1,
            Self::MAX_AMOUNT,
            "unit_price_cents",
            "unit_price_out_of_range",
        )
        .map(Self)
    }

    /// A deposit into a payment account: 1..=100,000,000 cents.
    pub fn deposit(n: i64) -> Result<Self, ValueError> {
        in_range(
            n,
            1,
            Self::MAX_AMOUNT,
            "amount_cents",
            "amount_out_of_range",
        )
        .map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_alphabet_and_length() {
        assert!(Sku::new("ABC-1.x_2").is_ok());
        assert!(Sku::new("a".repeat(64)).is_ok());
        assert!(Sku::new("a".repeat(65)).is_err());
        assert!(Sku::new("").is_err());
        assert!(CustomerId::new("has space").is_err());
        assert!(CustomerId::new("é").is_err());
        assert!(CustomerId::new("slash/no").is_err());
    }

    #[test]
    fn ids_validate_when_deserialised_too() {
        assert!(serde_json::from_str::<Sku>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<Sku>("\"not ok\"").is_err());
        assert!(serde_json::from_str::<OrderId>("\"nope\"").is_err());
    }

    #[test]
    fn order_ids_are_uuids() {
        assert!(OrderId::parse("6f1c1a8e-3a57-4c43-9d0e-8d3c9e8f6a01").is_ok());
        assert_eq!(
            OrderId::parse("42"),
            Err(ValueError::InvalidId { field: "order_id" })
        );
    }

    #[test]
    fn line_quantity_is_1_to_1000() {
        assert_eq!(Quantity::line(1), Ok(Quantity(1)));
        assert_eq!(Quantity::line(1000), Ok(Quantity(1000)));
        for bad in [0, -1, 1001, i64::MAX] {
            let err = Quantity::line(bad).unwrap_err();
            assert_eq!(err.rule(), "quantity_out_of_range");
        }
    }

    #[test]
    fn restock_quantity_is_1_to_a_million() {
        assert!(Quantity::restock(1_000_000).is_ok());
        assert!(Quantity::restock(1_000_001).is_err());
        assert!(Quantity::restock(0).is_err());
    }

    #[test]
    fn unit_price_and_deposit_are_1_to_100_million_cents() {
        assert_eq!(Cents::unit_price(100_000_000), Ok(Cents(100_000_000)));
        assert_eq!(
            Cents::unit_price(0).unwrap_err().rule(),
            "unit_price_out_of_range"
        );
        assert!(Cents::unit_price(100_000_001).is_err());
        assert!(Cents::deposit(1).is_ok());
        assert_eq!(
            Cents::deposit(-5).unwrap_err().rule(),
            "amount_out_of_range"
        );
    }
}
