//! Checks `deploy/` against the server it deploys. There is no Docker engine or Kubernetes
//! cluster to try the files on, so these tests read them: the Kubernetes manifests under
//! `deploy/k8s` (as plain YAML, no API types), `deploy/Dockerfile` and `.dockerignore`, and hold
//! them to what the code does: the variables the server reads (`src/config/variables.rs`), the values it accepts, the
//! port it listens on and the shutdown drain it takes; and the client service config
//! (`deploy/client/`) to the contract.

mod client;
#[allow(dead_code)] // the descriptors are read here; calls are made by tests/it
#[path = "../it/support/contract.rs"]
mod contract;
mod dockerfile;
mod ha;
mod kubernetes;
mod migrations;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use ecommerce::config::{Config, variables::VARIABLES};
use serde::Deserialize;
use serde_yaml::Value;

/// Read by the server but deliberately not provided: DATA_PLATFORM_URL has no default and is read
/// only when DATA_PLATFORM_SINK=http. (RUST_LOG is not here: the ConfigMap sets it, so the log
/// level is changed in one place.)
const OPTIONAL: &[&str] = &[
    "DATA_PLATFORM_URL",
    // TLS is terminated by the mesh in the shipped manifests; docs/DEPLOY.md shows how to mount
    // a certificate and set these instead.
    "TLS_CERT_PATH",
    "TLS_KEY_PATH",
    "TLS_CLIENT_CA_PATH",
    // Tracing is on only where a collector runs; docs/DEPLOY.md shows where to set it.
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    // Read only with tracing on, and only while dashboards still need the older RPC attributes.
    "OTEL_SEMCONV_STABILITY_OPT_IN",
    // Standbys to read from exist only in the highly available set-up (deploy/ha sets it).
    "DATABASE_READ_URL",
];

/// Variables that carry credentials and so belong in the Secret, never in the ConfigMap.
const SECRET_VARIABLES: &[&str] = &["DATABASE_URL", "REDIS_URL", "ADMIN_TOKEN", "SERVICE_TOKEN"];

/// The Services: the ClusterIP one (balances connections), and the headless one whose DNS name
/// lists every ready pod, for clients that balance calls themselves (deploy/client).
const SERVICES: &[&str] = &["ecommerce", "ecommerce-headless"];
/// The highly available overlay.
fn ha_dir() -> PathBuf {
    repo().join("deploy/ha")
}

const KINDS: &[&str] = &[
    "Deployment",
    "Service",
    "ConfigMap",
    "Secret",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s_dir() -> PathBuf {
    repo().join("deploy/k8s")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every YAML document of every manifest under deploy/k8s (the kustomization aside), with the
/// file it came from.
fn documents() -> Vec<(String, Value)> {
    let mut found = Vec::new();
    for file in manifest_files() {
        let text = read(&k8s_dir().join(&file));
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(document).unwrap_or_else(|e| panic!("parsing {file}: {e}"));
            if !value.is_null() {
                found.push((file.clone(), value));
            }
        }
    }
    found
}

fn manifest_files() -> BTreeSet<String> {
    fs::read_dir(k8s_dir())
        .expect("deploy/k8s exists")
        .map(|entry| entry.expect("listing deploy/k8s").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .filter(|name| name != "kustomization.yaml" && name != "kustomization.yml")
        .collect()
}

/// The Service named `name`.
fn service(name: &str) -> Value {
    documents()
        .into_iter()
        .map(|(_, value)| value)
        .find(|value| {
            value["kind"].as_str() == Some("Service")
                && value["metadata"]["name"].as_str() == Some(name)
        })
        .unwrap_or_else(|| panic!("no Service named {name}"))
}

/// The one object of `kind`.
fn object(kind: &str) -> Value {
    let mut matching: Vec<Value> = documents()
        .into_iter()
        .map(|(_, value)| value)
        .filter(|value| value["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(matching.len(), 1, "expected exactly one {kind}");
    matching.remove(0)
}

fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {value:?}"))
}

fn number(value: &Value, what: &str) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: expected a non-negative integer, found {value:?}"))
}

/// A string-to-string mapping (labels, selectors, ConfigMap data).
fn string_map(value: &Value, what: &str) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .unwrap_or_else(|| panic!("{what}: expected a mapping, found {value:?}"))
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                // Kubernetes refuses non-string values in these maps; say so here rather than
                // at apply time.
                other => panic!("{what}: the value of {k:?} must be a quoted string, is {other:?}"),
            };
            (text(k, what).to_owned(), v)
        })
        .collect()
}

fn pod_spec(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]
}

/// The server's container (the only one).
fn container(deployment: &Value) -> &Value {
    let containers = pod_spec(deployment)["containers"]
        .as_sequence()
        .expect("the Deployment has containers");
    assert_eq!(containers.len(), 1, "one container per pod");
    &containers[0]
}

fn container_port(deployment: &Value, name: &str) -> u64 {
    container(deployment)["ports"]
        .as_sequence()
        .expect("the container declares ports")
        .iter()
        .find(|port| port["name"].as_str() == Some(name))
        .map(|port| number(&port["containerPort"], "containerPort"))
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// Every variable the server reads: its configuration table.
fn variables_the_server_reads() -> BTreeSet<String> {
    VARIABLES.iter().map(|v| v.name.to_owned()).collect()
}

fn config_map_data() -> BTreeMap<String, String> {
    string_map(&object("ConfigMap")["data"], "ConfigMap data")
}

/// The Secret's keys and values; the template uses stringData so the placeholders read plainly.
fn secret_data() -> BTreeMap<String, String> {
    let secret = object("Secret");
    assert!(
        secret["data"].is_null(),
        "the Secret template uses stringData only (data would need base64 placeholders)"
    );
    string_map(&secret["stringData"], "Secret stringData")
}

/// The settings as a pod sees them: the ConfigMap, then the Secret, then explicit `env`.
fn pod_environment() -> BTreeMap<String, String> {
    let mut env = config_map_data();
    env.extend(secret_data());
    if let Some(entries) = container(&object("Deployment"))["env"].as_sequence() {
        for entry in entries {
            let name = text(&entry["name"], "env name").to_owned();
            let value = entry["value"].as_str().unwrap_or_default().to_owned();
            env.insert(name, value);
        }
    }
    env
}

fn parse_config(env: &BTreeMap<String, String>) -> Result<Config, String> {
    Config::from_lookup(|key| env.get(key).cloned()).map_err(|e| e.to_string())
}

/// The pod environment with the one value the Secret template leaves empty on purpose filled.
fn filled_config() -> Config {
    let mut env = pod_environment();
    env.insert("ADMIN_TOKEN".into(), "a-real-admin-token".into());
    parse_config(&env).unwrap_or_else(|e| panic!("the manifests' settings are refused: {e}"))
}

/// A Kubernetes quantity ("500m", "2", "256Mi") in base units: cores or bytes.
fn quantity(value: &Value, what: &str) -> f64 {
    let raw = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => panic!("{what}: not a quantity: {other:?}"),
    };
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(raw.len());
    let (digits, suffix) = raw.split_at(split);
    let amount: f64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("{what}: not a quantity: {raw}"));
    let scale = match suffix {
        "m" => 1e-3,
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => panic!("{what}: unknown quantity suffix in {raw}"),
    };
    amount * scale
}
