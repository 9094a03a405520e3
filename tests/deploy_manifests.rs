//! Checks `deploy/` against the server it deploys. There is no Docker engine or Kubernetes
//! cluster to try the files on, so these tests read them: the Kubernetes manifests under
//! `deploy/k8s` (as plain YAML, no API types), `deploy/Dockerfile` and `.dockerignore`, and hold
//! them to what the code does: the variables `src/config.rs` reads, the values it accepts, the
//! port it listens on and the shutdown drain it takes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use ecommerce::config::Config;
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
];

/// Variables that carry credentials and so belong in the Secret, never in the ConfigMap.
const SECRET_VARIABLES: &[&str] = &["DATABASE_URL", "REDIS_URL", "ADMIN_TOKEN", "SERVICE_TOKEN"];

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

/// Every variable name `src/config.rs` passes to its reader (`r.string("NAME", ..)`,
/// `r.ranged("NAME", ..)`, `lookup("NAME")`, ...), its unit tests aside.
fn variables_the_server_reads() -> BTreeSet<String> {
    const READERS: &[&str] = &["string", "parsed", "ranged", "millis", "lookup"];
    let source = read(&repo().join("src/config.rs"));
    let code = source
        .split("#[cfg(test)]")
        .next()
        .expect("split yields one part");

    let mut names = BTreeSet::new();
    for (open, _) in code.match_indices('(') {
        let before = &code[..open];
        let callee_start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        if !READERS.contains(&&before[callee_start..]) {
            continue;
        }
        let Some(rest) = code[open + 1..].trim_start().strip_prefix('"') else {
            continue;
        };
        let literal = &rest[..rest.find('"').expect("a closed string literal")];
        if is_variable_name(literal) {
            names.insert(literal.to_owned());
        }
    }

    // A new way of reading a variable (say `r.secret("NAME")`) would otherwise go unseen: every
    // literal shaped like a variable name must have been found above.
    let every_literal: BTreeSet<String> = code
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|literal| is_variable_name(literal))
        .map(str::to_owned)
        .collect();
    let unseen: Vec<_> = every_literal.difference(&names).collect();
    assert!(
        unseen.is_empty(),
        "src/config.rs mentions {unseen:?} outside the readers this test knows ({READERS:?}); \
         teach variables_the_server_reads the new one"
    );
    for expected in [
        "LISTEN_ADDR",
        "DATABASE_URL",
        "ADMIN_TOKEN",
        "SHUTDOWN_DRAIN_MS",
    ] {
        assert!(
            names.contains(expected),
            "{expected} not found in src/config.rs"
        );
    }
    names
}

fn is_variable_name(s: &str) -> bool {
    s.len() > 2
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
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

#[test]
fn every_kind_is_present_once_and_the_kustomization_lists_every_file() {
    let documents = documents();
    for kind in KINDS {
        let count = documents
            .iter()
            .filter(|(_, value)| value["kind"].as_str() == Some(kind))
            .count();
        assert_eq!(count, 1, "expected one {kind} under deploy/k8s");
    }
    for (file, value) in &documents {
        let kind = text(&value["kind"], file);
        assert!(KINDS.contains(&kind), "{file}: unexpected kind {kind}");
        assert!(value["apiVersion"].is_string(), "{file}: no apiVersion");
        assert!(value["metadata"]["name"].is_string(), "{file}: no name");
    }

    let kustomization: Value =
        serde_yaml::from_str(&read(&k8s_dir().join("kustomization.yaml"))).expect("valid YAML");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .expect("kustomization resources")
        .iter()
        .map(|resource| text(resource, "resource").to_owned())
        .collect();
    assert_eq!(
        listed,
        manifest_files(),
        "kustomization.yaml must list exactly the manifests in deploy/k8s"
    );
}

#[test]
fn the_service_the_pdb_and_the_hpa_select_the_deployments_pods() {
    let deployment = object("Deployment");
    assert_eq!(deployment["metadata"]["name"].as_str(), Some("ecommerce"));
    let selector = string_map(
        &deployment["spec"]["selector"]["matchLabels"],
        "Deployment selector",
    );
    assert!(!selector.is_empty(), "the Deployment selects by label");
    let pod_labels = string_map(
        &deployment["spec"]["template"]["metadata"]["labels"],
        "pod labels",
    );
    for (key, value) in &selector {
        assert_eq!(
            pod_labels.get(key),
            Some(value),
            "the pod template lacks the selector's label {key}"
        );
    }

    let service = object("Service");
    assert_eq!(
        string_map(&service["spec"]["selector"], "Service selector"),
        selector,
        "the Service must select the Deployment's pods, and only them"
    );
    let pdb = object("PodDisruptionBudget");
    assert_eq!(
        string_map(&pdb["spec"]["selector"]["matchLabels"], "PDB selector"),
        selector,
        "the PodDisruptionBudget must cover the Deployment's pods"
    );

    let target = &object("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"];
    assert_eq!(target["apiVersion"].as_str(), Some("apps/v1"));
    assert_eq!(target["kind"].as_str(), Some("Deployment"));
    assert_eq!(target["name"], deployment["metadata"]["name"]);
}

#[test]
fn ports_match_the_listen_address_and_the_service() {
    let deployment = object("Deployment");
    let grpc = container_port(&deployment, "grpc");
    assert_eq!(grpc, 50051);
    assert_eq!(container_port(&deployment, "metrics"), 9090);

    let config = filled_config();
    assert_eq!(
        u64::from(config.listen_addr.port()),
        grpc,
        "LISTEN_ADDR and the grpc container port differ"
    );
    assert!(
        config.listen_addr.ip().is_unspecified(),
        "LISTEN_ADDR must listen on every interface of the pod, not {}",
        config.listen_addr
    );

    let service = object("Service");
    assert_eq!(service["spec"]["type"].as_str(), Some("ClusterIP"));
    let ports = service["spec"]["ports"]
        .as_sequence()
        .expect("Service ports");
    let port = |name: &str| {
        ports
            .iter()
            .find(|port| port["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("the Service has no port named {name}"))
    };
    let grpc_port = port("grpc");
    assert_eq!(number(&grpc_port["port"], "Service grpc port"), 50051);
    assert_eq!(
        grpc_port["appProtocol"].as_str(),
        Some("kubernetes.io/h2c"),
        "gRPC is plaintext HTTP/2"
    );
    for (name, container_port_number) in [("grpc", grpc), ("metrics", 9090)] {
        let target = &port(name)["targetPort"];
        assert!(
            target.as_str() == Some(name) || target.as_u64() == Some(container_port_number),
            "the Service's {name} port must target the container's {name} port, not {target:?}"
        );
    }
}

#[test]
fn readiness_and_liveness_are_grpc_health_checks_on_the_grpc_port() {
    let deployment = object("Deployment");
    let grpc = container_port(&deployment, "grpc");
    let container = container(&deployment);
    // Readiness follows the overall health (Postgres and Redis, NOT_SERVING from SIGTERM on);
    // liveness follows the process alone, so a dependency outage never restarts the pods.
    for (probe, service) in [
        ("readinessProbe", ""),
        ("livenessProbe", ecommerce::health::LIVENESS),
    ] {
        let check = &container[probe]["grpc"];
        assert!(check.is_mapping(), "{probe} must be a native grpc probe");
        // Kubernetes' gRPC probes take a number only, not a port name.
        assert_eq!(
            check["port"].as_u64(),
            Some(grpc),
            "{probe} must check the grpc port"
        );
        assert_eq!(
            check["service"].as_str().unwrap_or_default(),
            service,
            "{probe} checks the wrong health name"
        );
    }

    let window = |probe: &str| {
        let probe_value = &container[probe];
        let period = probe_value["periodSeconds"].as_u64().unwrap_or(10);
        let failures = probe_value["failureThreshold"].as_u64().unwrap_or(3);
        period * failures
    };
    // After a stall, liveness stays NOT_SERVING for one more threshold: a single stall just
    // past the threshold must not be enough to restart the pod.
    let stall = filled_config().liveness_stall.as_secs();
    assert!(
        window("livenessProbe") > 2 * stall,
        "liveness gives up after {} s: one stall of LIVENESS_STALL_MS ({stall} s) would restart \
         the pod",
        window("livenessProbe")
    );
    assert!(window("readinessProbe") < window("livenessProbe"));
    assert!(
        container["startupProbe"].is_mapping(),
        "a startupProbe covers migrations at start-up"
    );
}

#[test]
fn connections_age_with_a_grace_no_call_outlives() {
    let config = filled_config();
    assert!(
        config.max_connection_age.is_some(),
        "without MAX_CONNECTION_AGE_SECS, pods the HPA adds get no calls from connected clients"
    );
    // Every unary call ends by its deadline (capped by DEFAULT_DEADLINE_MS), so a grace at
    // least that long lets every call in flight at the GOAWAY finish.
    assert!(
        config.max_connection_age_grace >= config.default_deadline,
        "MAX_CONNECTION_AGE_GRACE_SECS ({:?}) would cut calls that DEFAULT_DEADLINE_MS ({:?}) \
         still allows",
        config.max_connection_age_grace,
        config.default_deadline
    );
}

#[test]
fn the_readme_documents_every_variable_the_server_reads() {
    let readme = read(&repo().join("README.md"));
    let start = readme
        .find("## Configuration")
        .expect("README has a Configuration section");
    let section = &readme[start..];
    let table = &section[..section[2..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 2)];
    let missing: Vec<_> = variables_the_server_reads()
        .into_iter()
        .filter(|name| !table.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "README's configuration table lacks {missing:?}"
    );
}

#[test]
fn requests_and_limits_are_set_for_cpu_and_memory() {
    let deployment = object("Deployment");
    let resources = &container(&deployment)["resources"];
    for resource in ["cpu", "memory"] {
        let what = |kind: &str| format!("{kind}.{resource}");
        let request = quantity(&resources["requests"][resource], &what("requests"));
        let limit = quantity(&resources["limits"][resource], &what("limits"));
        assert!(request > 0.0, "{resource} request missing");
        assert!(request <= limit, "the {resource} request exceeds its limit");
    }
}

#[test]
fn the_grace_period_covers_the_pre_stop_sleep_and_the_drain() {
    let deployment = object("Deployment");
    let grace = number(
        &pod_spec(&deployment)["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    let pre_stop = &container(&deployment)["lifecycle"]["preStop"];
    assert!(pre_stop.is_mapping(), "a preStop hook is required");
    // The runtime image is distroless: there is no /bin/sleep for an exec hook to run.
    assert!(
        pre_stop["exec"].is_null(),
        "the image has no shell or sleep binary; use the sleep action"
    );
    let sleep = number(&pre_stop["sleep"]["seconds"], "preStop sleep seconds");
    assert!(sleep > 0);

    let drain = filled_config().shutdown_drain.as_secs();
    assert!(
        drain > 0,
        "SHUTDOWN_DRAIN_MS must be set for a rolling update"
    );
    // Strictly more, so the calls in flight still have time after the drain.
    assert!(
        grace > sleep + drain,
        "terminationGracePeriodSeconds {grace} leaves no time for calls in flight after the \
         preStop sleep ({sleep} s) and the drain ({drain} s)"
    );
}

#[test]
fn pods_run_as_non_root_on_a_read_only_root() {
    let deployment = object("Deployment");
    let pod = &pod_spec(&deployment)["securityContext"];
    let container = &container(&deployment)["securityContext"];
    // Container settings override the pod's, so a container value wins where present.
    let effective = |key: &str| {
        if container[key].is_null() {
            pod[key].clone()
        } else {
            container[key].clone()
        }
    };
    assert_eq!(effective("runAsNonRoot").as_bool(), Some(true));
    if let Some(uid) = effective("runAsUser").as_u64() {
        assert_ne!(uid, 0, "runAsUser must not be root");
    }
    assert_eq!(container["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(container["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(
        container["capabilities"]["drop"]
            .as_sequence()
            .is_some_and(|drop| drop.iter().any(|c| c.as_str() == Some("ALL"))),
        "every capability must be dropped"
    );
    assert_eq!(
        effective("seccompProfile")["type"].as_str(),
        Some("RuntimeDefault")
    );
}

#[test]
fn the_pods_get_every_variable_the_server_reads_and_no_other() {
    let reads = variables_the_server_reads();
    let config_map = config_map_data();
    let secret = secret_data();

    // The Deployment must take its environment from these two objects.
    let deployment = object("Deployment");
    let env_from = container(&deployment)["envFrom"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    let referenced = |kind: &str| -> Vec<String> {
        env_from
            .iter()
            .filter_map(|source| source[kind]["name"].as_str().map(str::to_owned))
            .collect()
    };
    let name = |kind: &str| text(&object(kind)["metadata"]["name"], kind).to_owned();
    assert_eq!(name("ConfigMap"), "ecommerce-config");
    assert_eq!(name("Secret"), "ecommerce-secrets");
    assert_eq!(referenced("configMapRef"), vec![name("ConfigMap")]);
    assert_eq!(referenced("secretRef"), vec![name("Secret")]);

    let provided: BTreeSet<String> = pod_environment().into_keys().collect();
    let unknown: Vec<_> = provided
        .iter()
        .filter(|name| !reads.contains(*name))
        .collect();
    assert!(
        unknown.is_empty(),
        "the manifests set {unknown:?}, which src/config.rs does not read"
    );
    let missing: Vec<_> = reads
        .iter()
        .filter(|name| !provided.contains(*name) && !OPTIONAL.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "src/config.rs reads {missing:?}, which neither the ConfigMap nor the Secret provides"
    );

    let both: Vec<_> = config_map
        .keys()
        .filter(|name| secret.contains_key(*name))
        .collect();
    assert!(
        both.is_empty(),
        "{both:?} set in the ConfigMap and the Secret"
    );
    for name in SECRET_VARIABLES {
        assert!(
            !config_map.contains_key(*name),
            "{name} carries a credential: the Secret, not the ConfigMap"
        );
        assert!(secret.contains_key(*name), "the Secret lacks {name}");
    }
}

#[test]
fn the_server_accepts_the_settings_but_not_the_unfilled_secret() {
    let config = filled_config();
    assert!(config.run_migrations);
    assert!(
        !config.seed_demo_data,
        "no demo catalog in a shared database"
    );
    assert_eq!(config.log_format, ecommerce::config::LogFormat::Json);

    // A pod started from the template as committed must refuse to start, rather than serve
    // AdminService behind a token anyone can read in the repository.
    let error =
        parse_config(&pod_environment()).expect_err("the unfilled Secret template must be refused");
    assert!(error.contains("ADMIN_TOKEN"), "{error}");
    assert_eq!(
        error.lines().count(),
        2,
        "only ADMIN_TOKEN should be refused: {error}"
    );
}

#[test]
fn rollouts_autoscaling_and_disruptions_keep_capacity() {
    let deployment = object("Deployment");
    let rolling = &deployment["spec"]["strategy"]["rollingUpdate"];
    assert_eq!(rolling["maxUnavailable"].as_u64(), Some(0));
    assert_eq!(rolling["maxSurge"].as_u64(), Some(1));

    let hpa = object("HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"].as_str(), Some("autoscaling/v2"));
    let min = number(&hpa["spec"]["minReplicas"], "minReplicas");
    let max = number(&hpa["spec"]["maxReplicas"], "maxReplicas");
    assert!(min >= 3 && max >= min, "replicas {min}..={max}");
    // The HPA owns the replica count: a fixed one would undo its scaling on every apply.
    assert!(
        deployment["spec"]["replicas"].is_null(),
        "the Deployment must leave `replicas` to the HorizontalPodAutoscaler"
    );
    let cpu = hpa["spec"]["metrics"]
        .as_sequence()
        .expect("HPA metrics")
        .iter()
        .find(|metric| metric["resource"]["name"].as_str() == Some("cpu"))
        .expect("a CPU metric");
    assert_eq!(
        cpu["resource"]["target"]["type"].as_str(),
        Some("Utilization")
    );
    let target = number(
        &cpu["resource"]["target"]["averageUtilization"],
        "averageUtilization",
    );
    assert!((50..=90).contains(&target), "CPU target {target}%");
    assert!(
        number(
            &hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
            "scale-down stabilization window"
        ) > 0
    );

    let pdb = &object("PodDisruptionBudget")["spec"];
    match (pdb["maxUnavailable"].as_u64(), pdb["minAvailable"].as_u64()) {
        (Some(max_unavailable), None) => assert!(max_unavailable >= 1),
        // Below the HPA's minimum, or no voluntary eviction could ever proceed.
        (None, Some(min_available)) => assert!(min_available < min),
        other => panic!("the PDB needs one of maxUnavailable or minAvailable, found {other:?}"),
    }
}

#[test]
fn the_secret_holds_the_credentials() {
    let secret = object("Secret");
    assert_eq!(secret["type"].as_str(), Some("Opaque"));
    let data = secret_data();
    for key in ["DATABASE_URL", "ADMIN_TOKEN"] {
        assert!(data.contains_key(key), "the Secret lacks {key}");
    }
}

/// Dockerfile instructions, one per entry, with continuation lines joined and comments dropped.
fn dockerfile_instructions() -> Vec<String> {
    let text = read(&repo().join("deploy/Dockerfile"));
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        instructions.push(current);
    }
    instructions
}

fn keyword(instruction: &str) -> String {
    instruction
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_as_non_root_in_another() {
    let instructions = dockerfile_instructions();
    let mut stages: Vec<Vec<String>> = Vec::new();
    for instruction in instructions {
        if keyword(&instruction) == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(instruction);
    }
    assert!(stages.len() >= 2, "a build stage and a runtime stage");

    let build = stages[0].join("\n");
    assert!(build.contains("rust:1-bookworm"), "the official Rust image");
    assert!(
        build.contains("cargo build --release --locked --bin ecommerce"),
        "a locked release build of the server"
    );
    // build.rs compiles proto/, sqlx::migrate! embeds migrations/.
    for input in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "proto",
        "migrations",
        "src",
    ] {
        assert!(
            stages[0]
                .iter()
                .any(|instruction| keyword(instruction) == "COPY"
                    && instruction.split_whitespace().any(|word| word == input)),
            "the build stage does not copy {input}"
        );
    }

    let runtime = stages.last().expect("a runtime stage");
    for instruction in runtime {
        let words: Vec<&str> = instruction
            .split(|c: char| c.is_whitespace() || "/\"'[],;&|".contains(c))
            .collect();
        assert!(
            !words.contains(&"cargo") && !words.contains(&"rustc"),
            "the runtime stage must not build: {instruction}"
        );
    }
    let user = runtime
        .iter()
        .rfind(|instruction| keyword(instruction) == "USER")
        .expect("the runtime stage sets USER");
    let uid = user.split_whitespace().nth(1).expect("USER names a user");
    let uid = uid.split(':').next().expect("a uid");
    assert!(
        uid.parse::<u32>().is_ok_and(|uid| uid != 0),
        "USER must be a numeric non-root uid (runAsNonRoot cannot check a name): {user}"
    );
    assert!(
        runtime
            .iter()
            .any(|i| keyword(i) == "EXPOSE" && i.split_whitespace().any(|p| p == "50051")),
        "the runtime stage exposes the gRPC port"
    );
    assert!(
        runtime
            .iter()
            .any(|i| i == r#"ENTRYPOINT ["/usr/local/bin/ecommerce"]"#),
        "the runtime stage runs the server"
    );
}

#[test]
fn the_docker_context_leaves_out_build_output_and_history() {
    let ignore = read(&repo().join(".dockerignore"));
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    for excluded in ["target/", ".git"] {
        assert!(
            patterns.contains(&excluded),
            ".dockerignore lacks {excluded}"
        );
    }
    for needed in [
        "src",
        "proto",
        "migrations",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
    ] {
        assert!(
            !patterns.iter().any(|p| p.trim_end_matches('/') == needed),
            ".dockerignore excludes {needed}, which the build needs"
        );
    }
}
