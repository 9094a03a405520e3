//! The Kubernetes manifests: objects, selectors, ports, probes, resources, security, and the
//! environment the pods get.

use std::collections::BTreeSet;

use super::*;

#[test]
fn every_kind_is_present_once_and_the_kustomization_lists_every_file() {
    let documents = documents();
    for kind in KINDS {
        let count = documents
            .iter()
            .filter(|(_, value)| value["kind"].as_str() == Some(kind))
            .count();
        let expected = if *kind == "Service" {
            SERVICES.len()
        } else {
            1
        };
        assert_eq!(
            count, expected,
            "expected {expected} {kind} under deploy/k8s"
        );
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

    let service = service("ecommerce");
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
        u64::from(config.server.listen_addr.port()),
        grpc,
        "LISTEN_ADDR and the grpc container port differ"
    );
    assert!(
        config.server.listen_addr.ip().is_unspecified(),
        "LISTEN_ADDR must listen on every interface of the pod, not {}",
        config.server.listen_addr
    );

    let service = service("ecommerce");
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
        ("livenessProbe", ecommerce::LIVENESS),
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
    let stall = filled_config().server.liveness_stall.as_secs();
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
        config.server.max_connection_age.is_some(),
        "without MAX_CONNECTION_AGE_SECS, pods the HPA adds get no calls from connected clients"
    );
    // Every unary call ends by its deadline (capped by DEFAULT_DEADLINE_MS), so a grace at
    // least that long lets every call in flight at the GOAWAY finish.
    assert!(
        config.server.max_connection_age_grace >= config.server.default_deadline,
        "MAX_CONNECTION_AGE_GRACE_SECS ({:?}) would cut calls that DEFAULT_DEADLINE_MS ({:?}) \
         still allows",
        config.server.max_connection_age_grace,
        config.server.default_deadline
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

    let drain = filled_config().server.shutdown_drain.as_secs();
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
        "the manifests set {unknown:?}, which the server does not read (src/config/variables.rs)"
    );
    let missing: Vec<_> = reads
        .iter()
        .filter(|name| !provided.contains(*name) && !OPTIONAL.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the server reads {missing:?}, which neither the ConfigMap nor the Secret provides"
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
    assert!(config.postgres.run_migrations);
    assert!(
        !config.server.seed_demo_data,
        "no demo catalog in a shared database"
    );
    assert_eq!(
        config.telemetry.log_format,
        ecommerce::config::LogFormat::Json
    );

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
