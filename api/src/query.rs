//! Query strings, read one way everywhere: names and values percent-decoded, and a name
//! given twice refused with `400` — so that no check can read one `customer_id` while
//! the handler reads another (`?customer_id=bob&customer%5Fid=alice`).

use std::collections::HashMap;

use serde_json::json;

use crate::ApiError;

/// The decoded parameters of one query string, each name at most once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QueryParams(HashMap<String, String>);

impl QueryParams {
    /// Parses `raw` (the part after `?`, if any). A repeated name, however it is
    /// encoded, is `400 malformed_request` naming it.
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let mut params = HashMap::new();
        for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            if params
                .insert(name.clone().into_owned(), value.into_owned())
                .is_some()
            {
                return Err(ApiError::malformed(format!(
                    "query parameter {name:?} is given more than once; give it once"
                ))
                .with_details(json!({ "field": name })));
            }
        }
        Ok(Self(params))
    }

    /// The value of `name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_are_decoded() {
        let q = QueryParams::parse(Some("customer%5Fid=al%69ce&limit=5")).unwrap();
        assert_eq!(q.get("customer_id"), Some("alice"));
        assert_eq!(q.get("limit"), Some("5"));
        assert_eq!(q.get("status"), None);
        assert_eq!(QueryParams::parse(None).unwrap(), QueryParams::default());
    }

    #[test]
    fn a_repeated_name_is_refused_however_it_is_spelled() {
        for raw in [
            "customer_id=bob&customer_id=alice",
            "customer_id=bob&customer%5Fid=alice",
            "customer%5fid=bob&customer_id=bob",
        ] {
            let err = QueryParams::parse(Some(raw)).unwrap_err();
            assert_eq!(err.status, 400, "{raw}");
            assert_eq!(err.body()["error"]["details"]["field"], "customer_id");
        }
    }
}
