//! `/openapi.json` describes every route of API.md with the methods API.md names, every
//! error in the API.md shape, and the limits of the command bodies. The fuzz run (scripts/fuzz, part of
//! scripts/test) then checks the running API against this document.

use serde_json::Value;

/// The routes of the API contract (docs/api.md), method and path.
const API_MD: [(&str, &str); 20] = [
    ("post", "/v1/orders"),
    ("post", "/v1/orders/{order_id}/lines"),
    ("delete", "/v1/orders/{order_id}/lines/{sku}"),
    ("post", "/v1/orders/{order_id}/place"),
    ("post", "/v1/orders/{order_id}/cancel"),
    ("get", "/v1/orders/{order_id}"),
    ("get", "/v1/orders"),
    ("get", "/v1/orders/{order_id}/events"),
    ("get", "/v1/orders/{order_id}/saga"),
    ("post", "/v1/inventory/{sku}/restock"),
    ("get", "/v1/inventory/{sku}"),
    ("get", "/v1/inventory/{sku}/events"),
    ("post", "/v1/accounts/{customer_id}/deposits"),
    ("get", "/v1/accounts/{customer_id}"),
    ("get", "/v1/accounts/{customer_id}/events"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/v1/admin/projections"),
];

fn document() -> Value {
    tally::openapi::document()
}

#[test]
fn every_api_md_route_is_documented() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (method, path) in API_MD {
        assert!(
            doc["paths"][path][method].is_object(),
            "{} {path} is missing from /openapi.json",
            method.to_uppercase()
        );
    }
}

#[test]
fn every_error_response_has_the_error_shape_and_every_operation_an_id() {
    let doc = document();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            assert!(
                op["operationId"].is_string(),
                "{method} {path} has no operationId"
            );
            for (status, response) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ErrorBody",
                        "{method} {path} {status} must answer the API.md error shape"
                    );
                }
            }
        }
    }
    assert!(operations >= API_MD.len());
    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["required"][0], "error");
}

#[test]
fn command_bodies_state_the_limits_api_md_names() {
    let doc = document();
    let line = &doc["components"]["schemas"]["LineBody"]["properties"];
    assert_eq!(line["quantity"]["minimum"], 1);
    assert_eq!(line["quantity"]["maximum"], 1000);
    assert_eq!(line["unit_price_cents"]["maximum"], 100_000_000);
    let restock = &doc["components"]["schemas"]["RestockBody"]["properties"];
    assert_eq!(restock["quantity"]["maximum"], 1_000_000);
    assert_eq!(
        doc["components"]["schemas"]["CreateOrderBody"]["additionalProperties"], false,
        "unknown fields are refused, and the document says so"
    );
}
