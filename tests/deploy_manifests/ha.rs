//! The highly available overlay (`deploy/ha`): three Postgres instances with synchronous
//! replication that never acknowledges a commit one machine holds, Redis behind three
//! Sentinels, three NATS nodes and a stream with three replicas, and the service's settings
//! pointing at them, accepted by the server's own parser.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// Every document of the overlay's own files, by kind and name.
fn overlay() -> Vec<Value> {
    let mut found = Vec::new();
    for entry in fs::read_dir(ha_dir()).expect("deploy/ha exists") {
        let path = entry.expect("listing deploy/ha").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        for document in serde_yaml::Deserializer::from_str(&read(&path)) {
            let value = Value::deserialize(document).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !value.is_null() {
                found.push(value);
            }
        }
    }
    found
}

fn find(kind: &str, name: &str) -> Value {
    overlay()
        .into_iter()
        .find(|v| v["kind"].as_str() == Some(kind) && v["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("deploy/ha has no {kind} {name}"))
}

/// The pods' environment with the overlay's patches applied.
fn ha_environment() -> BTreeMap<String, String> {
    let mut env = pod_environment();
    env.extend(string_map(
        &find("ConfigMap", "ecommerce-config")["data"],
        "config patch",
    ));
    env.extend(string_map(
        &find("Secret", "ecommerce-secrets")["stringData"],
        "secret patch",
    ));
    env
}

fn host_of(url: &str) -> &str {
    let after_at = url.rsplit_once('@').map_or(url, |(_, rest)| rest);
    let after_scheme = after_at
        .split_once("://")
        .map_or(after_at, |(_, rest)| rest);
    after_scheme
        .split([':', '/', '?'])
        .next()
        .unwrap_or_default()
}

#[test]
fn the_kustomization_builds_on_deploy_k8s_and_lists_every_file() {
    let kustomization: Value =
        serde_yaml::from_str(&read(&ha_dir().join("kustomization.yaml"))).expect("valid YAML");
    let mut listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| text(r, "resource").to_owned())
        .collect();
    assert!(
        listed.remove("../k8s"),
        "the overlay is deploy/k8s plus the rest"
    );
    for patch in kustomization["patches"].as_sequence().expect("patches") {
        listed.insert(text(&patch["path"], "patch").to_owned());
    }
    let files: BTreeSet<String> = fs::read_dir(ha_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, files,
        "kustomization.yaml must use every file in deploy/ha"
    );
}

#[test]
fn postgres_runs_three_instances_that_acknowledge_only_replicated_commits() {
    let cluster = find("Cluster", "ecommerce-pg");
    assert_eq!(
        text(&cluster["apiVersion"], "apiVersion"),
        "postgresql.cnpg.io/v1"
    );
    assert_eq!(number(&cluster["spec"]["instances"], "instances"), 3);
    let synchronous = &cluster["spec"]["postgresql"]["synchronous"];
    assert!(number(&synchronous["number"], "synchronous number") >= 1);
    assert_eq!(
        text(&synchronous["dataDurability"], "dataDurability"),
        "required",
        "a primary alone must never acknowledge a commit"
    );
    assert_eq!(
        text(
            &cluster["spec"]["affinity"]["podAntiAffinityType"],
            "anti-affinity"
        ),
        "required",
        "one instance per node"
    );
    let env = ha_environment();
    assert_eq!(
        host_of(&env["DATABASE_URL"]),
        "ecommerce-pg-rw",
        "the primary's Service"
    );
    assert_eq!(
        host_of(&env["DATABASE_READ_URL"]),
        "ecommerce-pg-ro",
        "the standbys' Service"
    );
}

#[test]
fn redis_runs_behind_three_sentinels_the_service_asks() {
    let redis = find("StatefulSet", "redis");
    assert_eq!(number(&redis["spec"]["replicas"], "replicas"), 3);
    let scripts = string_map(&find("ConfigMap", "redis-scripts")["data"], "redis scripts");
    let monitor = scripts["sentinel.sh"]
        .lines()
        .find(|l| l.trim_start().starts_with("sentinel monitor"))
        .expect("a sentinel monitor line");
    let words: Vec<&str> = monitor.split_whitespace().collect();
    let (name, quorum) = (words[2], words[5]);
    assert_eq!(quorum, "2", "a majority of the three Sentinels");
    let url = &ha_environment()["REDIS_URL"];
    assert!(url.starts_with("redis-sentinel://"), "{url}");
    assert!(
        url.contains(&format!("sentinelServiceName={name}")),
        "{url}"
    );
    assert_eq!(
        url.matches("node=").count(),
        2,
        "all three Sentinels: {url}"
    );
}

#[test]
fn nats_runs_three_nodes_and_the_stream_keeps_three_replicas() {
    let nats = find("StatefulSet", "nats");
    assert_eq!(number(&nats["spec"]["replicas"], "replicas"), 3);
    let conf = &string_map(&find("ConfigMap", "nats-config")["data"], "nats config")["nats.conf"];
    assert_eq!(
        conf.matches("nats://nats-").count(),
        3,
        "routes to the three nodes"
    );
    let job = find("Job", "ecommerce-events-stream");
    let command: Vec<String> = job["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_sequence()
        .expect("the Job's command")
        .iter()
        .map(|a| text(a, "argument").to_owned())
        .collect();
    let env = ha_environment();
    assert!(command.contains(&"--replicas=3".to_string()), "{command:?}");
    assert!(
        command.contains(&env["DATA_PLATFORM_STREAM"]),
        "the service's stream: {command:?}"
    );
    // The stream captures every type's subject: the template with its `{type}` token as `*`.
    let subjects = env["DATA_PLATFORM_SUBJECT"].replace("{type}", "*");
    assert!(
        command.contains(&format!("--subjects={subjects}")),
        "the service's subjects ({subjects}): {command:?}"
    );
    assert_eq!(env["DATA_PLATFORM_SINK"], "nats");
    assert_eq!(
        env["NATS_URL"].split(',').count(),
        3,
        "every node: {}",
        env["NATS_URL"]
    );
}

#[test]
fn the_server_accepts_the_overlays_settings() {
    let mut env = ha_environment();
    env.insert("ADMIN_TOKEN".into(), "a-real-admin-token".into());
    let config = parse_config(&env).unwrap_or_else(|e| panic!("refused: {e}"));
    assert!(
        config.postgres.read.is_some(),
        "catalog reads go to the standbys"
    );
}
