//! What a calling team loads: `deploy/client/service-config.json` (gRFC A6: retries, per-method
//! timeouts, round_robin over the replicas) against the contract's descriptors, and the headless
//! Service whose DNS name gives a client every replica to balance over.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use super::*;
use crate::contract::{Contract, Method};

const SERVICE_CONFIG: &str = include_str!("../../deploy/client/service-config.json");

/// The gRPC status codes by name, as a service config spells them.
const CODES: &[&str] = &[
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A protobuf JSON Duration ("0.05s", "10s") in seconds.
fn seconds(value: &Json, what: &str) -> f64 {
    value
        .as_str()
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or_else(|| panic!("{what}: not a positive duration like \"0.5s\": {value}"))
}

/// The method config that applies to `method` (gRFC A6: the entry naming the method, else the
/// one naming its service), with where it was found.
fn config_of<'a>(config: &'a Json, method: &Method) -> Option<&'a Json> {
    let entries = config["methodConfig"].as_array().expect("methodConfig");
    let names = |entry: &'a Json| entry["name"].as_array().expect("name").iter();
    let named = |service_only: bool| {
        entries.iter().find(|entry| {
            names(entry).any(|name| {
                name["service"].as_str() == Some(&method.service)
                    && if service_only {
                        name.get("method").is_none()
                    } else {
                        name["method"].as_str() == Some(&method.name)
                    }
            })
        })
    };
    named(false).or_else(|| named(true))
}

#[test]
fn the_service_config_names_real_methods_and_retries_only_what_is_safe() {
    let config: Json = serde_json::from_str(SERVICE_CONFIG).expect("valid JSON");
    let contract = Contract::load();
    assert_eq!(
        config["loadBalancingConfig"][0],
        serde_json::json!({ "round_robin": {} }),
        "calls are balanced over every replica the name resolves to"
    );

    // Every name is a service (and method) of the contract, and names one entry only.
    let mut seen = BTreeMap::new();
    for (i, entry) in config["methodConfig"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for name in entry["name"]
            .as_array()
            .expect("each methodConfig has names")
        {
            let service = name["service"].as_str().expect("a service name");
            let method = name
                .get("method")
                .map(|m| m.as_str().expect("a method name"));
            assert!(
                contract
                    .methods
                    .iter()
                    .any(|m| m.service == service && method.is_none_or(|method| m.name == method)),
                "{service}/{method:?} is not in the contract"
            );
            assert_eq!(
                seen.insert((service, method), i),
                None,
                "{name} named twice"
            );
        }
        seconds(&entry["timeout"], "timeout");
        if let Some(retry) = entry.get("retryPolicy") {
            let attempts = retry["maxAttempts"].as_u64().expect("maxAttempts");
            assert!((2..=5).contains(&attempts), "maxAttempts {attempts}: 2..5");
            let initial = seconds(&retry["initialBackoff"], "initialBackoff");
            assert!(seconds(&retry["maxBackoff"], "maxBackoff") >= initial);
            assert!(retry["backoffMultiplier"].as_f64().is_some_and(|m| m > 0.0));
            let codes = retry["retryableStatusCodes"].as_array().expect("codes");
            assert!(!codes.is_empty());
            for code in codes {
                assert!(CODES.contains(&code.as_str().unwrap_or("")), "{code}");
            }
        }
        assert!(
            entry.get("hedgingPolicy").is_none(),
            "hedging sends writes twice"
        );
    }

    let mut wrong = Vec::new();
    for method in &contract.methods {
        let path = method.path();
        let Some(entry) = config_of(&config, method) else {
            wrong.push(format!("{path}: no timeout (name it or its service)"));
            continue;
        };
        let retried = entry.get("retryPolicy").is_some();
        let safe = method.is_read() || contract.is_keyed(method);
        if retried && !safe {
            wrong.push(format!(
                "{path} writes without an idempotency key: a retry could do it twice"
            ));
        }
        if safe && !retried {
            wrong.push(format!(
                "{path} is safe to retry ({}): give it the retry policy of its kind",
                if method.is_read() {
                    "a read"
                } else {
                    "a keyed write"
                }
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "deploy/client/service-config.json:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn a_headless_service_gives_clients_every_replica() {
    let headless = service("ecommerce-headless");
    assert_eq!(
        headless["spec"]["clusterIP"].as_str(),
        Some("None"),
        "headless: its DNS name resolves to the pods, one address each"
    );
    assert_eq!(
        headless["spec"]["selector"],
        service("ecommerce")["spec"]["selector"],
        "the same pods as the ClusterIP Service"
    );
    assert_ne!(
        headless["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true),
        "a pod that is not ready must drop out of the DNS answer"
    );
    let ports = headless["spec"]["ports"].as_sequence().expect("ports");
    let grpc = ports
        .iter()
        .find(|p| p["name"].as_str() == Some("grpc"))
        .expect("a grpc port");
    assert_eq!(number(&grpc["port"], "grpc port"), 50051);
    assert_eq!(grpc["targetPort"].as_str(), Some("grpc"));
    assert_eq!(grpc["appProtocol"].as_str(), Some("kubernetes.io/h2c"));
}
