use std::collections::HashMap;

use super::{variables::VARIABLES, *};

fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_lookup(move |k| map.get(k).cloned())
}

#[test]
fn defaults_need_only_the_admin_token() {
    let c = config(&[("ADMIN_TOKEN", "0123456789")]).expect("valid");
    assert_eq!(c.server.listen_addr.port(), 50051);
    assert_eq!(c.redis.key_prefix, "ecommerce:");
    assert_eq!(c.orders.max_balance, Won::new(1_000_000_000_000));
    assert_eq!(c.orders.order_ttl, Duration::from_secs(900));
    assert_eq!(c.outbox.sink, SinkKind::Log);
    assert_eq!(c.ranking.timezone, chrono_tz::Asia::Seoul);
    assert_eq!(c.server.max_connection_age, None);
    assert_eq!(c.server.max_connection_age_grace, Duration::from_secs(30));
    assert_eq!(c.server.liveness_stall, Duration::from_secs(10));
    assert_eq!(c.coupons.orphan_grace, Duration::from_millis(500));
}

#[test]
fn every_value_at_the_edges_of_its_range_is_accepted_and_past_them_refused() {
    for variable in VARIABLES {
        let (min, max) = match variable.range {
            variables::Range::Integer { min, max } => (min, max),
            variables::Range::Millis { min, max } | variables::Range::Seconds { min, max } => {
                (min as i64, max as i64)
            }
            _ => continue,
        };
        for (value, ok) in [(min, true), (max, true), (min - 1, false), (max + 1, false)] {
            let value = value.to_string();
            let result = config(&[("ADMIN_TOKEN", "0123456789"), (variable.name, &value)]);
            assert_eq!(result.is_ok(), ok, "{}={value}: {result:?}", variable.name);
        }
    }
}

#[test]
fn user_rate_limits_are_off_unless_both_rate_and_burst_are_set() {
    let user_rate = |rate: &str, burst: &str| {
        config(&[
            ("ADMIN_TOKEN", "0123456789"),
            ("USER_RATE_PER_SEC", rate),
            ("USER_RATE_BURST", burst),
        ])
        .map(|c| c.rate_limits.user)
    };
    assert_eq!(user_rate("0", "0").unwrap(), None);
    assert_eq!(user_rate("20", "0").unwrap(), None);
    assert_eq!(user_rate("0", "40").unwrap(), None);
    assert_eq!(
        user_rate("20", "40").unwrap(),
        Some(UserRate {
            per_sec: 20,
            burst: 40
        })
    );
    let defaults = config(&[("ADMIN_TOKEN", "0123456789")]).unwrap();
    assert_eq!(defaults.rate_limits.user, None);
    assert_eq!(defaults.rate_limits.timeout, Duration::from_millis(50));
}

#[test]
fn hours_take_decimals_above_zero() {
    let park_after = |value: &str| {
        config(&[
            ("ADMIN_TOKEN", "0123456789"),
            ("OUTBOX_PARK_AFTER_HOURS", value),
        ])
        .map(|c| c.outbox.park_after)
    };
    assert_eq!(park_after("72").unwrap(), Duration::from_secs(72 * 3600));
    assert_eq!(park_after("0.001").unwrap(), Duration::from_millis(3600));
    assert_eq!(
        park_after("8760").unwrap(),
        Duration::from_secs(8760 * 3600)
    );
    for refused in ["0", "-1", "8760.5", "NaN", "inf", "soon"] {
        assert!(park_after(refused).is_err(), "{refused}");
    }
    let c = config(&[("ADMIN_TOKEN", "0123456789")]).unwrap();
    assert_eq!(
        c.retention.delivered_events,
        Duration::from_secs(168 * 3600)
    );
    assert_eq!(c.retention.idempotency_keys, Duration::from_secs(72 * 3600));
}

#[test]
fn a_connection_age_of_zero_means_none() {
    let age = |value: &str| {
        config(&[
            ("ADMIN_TOKEN", "0123456789"),
            ("MAX_CONNECTION_AGE_SECS", value),
        ])
        .map(|c| c.server.max_connection_age)
    };
    assert_eq!(age("0").unwrap(), None);
    assert_eq!(age("300").unwrap(), Some(Duration::from_secs(300)));
    assert!(age("-1").is_err());
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = config(&[
        ("LISTEN_ADDR", "nowhere"),
        ("REDIS_KEY_PREFIX", "a{b}"),
        ("DATABASE_MAX_CONNECTIONS", "0"),
        ("LOG_FORMAT", "xml"),
        ("DATA_PLATFORM_SINK", "http"),
        ("TLS_KEY_PATH", "/only/the/key.pem"),
        ("SERVICE_TOKEN", "short"),
        ("MAX_CONNECTION_AGE_GRACE_SECS", "0"),
        ("LIVENESS_STALL_MS", "5"),
        ("SEED_DEMO_DATA", "maybe"),
    ])
    .unwrap_err();
    let text = err.to_string();
    for key in [
        "LISTEN_ADDR",
        "REDIS_KEY_PREFIX",
        "DATABASE_MAX_CONNECTIONS",
        "LOG_FORMAT",
        "ADMIN_TOKEN",
        "DATA_PLATFORM_URL",
        "TLS_CERT_PATH",
        "SERVICE_TOKEN",
        "MAX_CONNECTION_AGE_GRACE_SECS",
        "LIVENESS_STALL_MS",
        "SEED_DEMO_DATA",
    ] {
        assert!(text.contains(key), "{key} missing from {text}");
    }
}

#[test]
fn words_outside_their_list_are_refused() {
    assert!(
        config(&[
            ("ADMIN_TOKEN", "0123456789"),
            ("DATA_PLATFORM_SINK", "kafka")
        ])
        .is_err()
    );
    assert!(config(&[("ADMIN_TOKEN", "0123456789"), ("LOG_FORMAT", "JSON")]).is_ok());
}

#[test]
fn the_nats_sink_has_defaults_and_checks_its_names() {
    let c = config(&[
        ("ADMIN_TOKEN", "0123456789"),
        ("DATA_PLATFORM_SINK", "nats"),
    ])
    .unwrap();
    assert_eq!(
        c.outbox.sink,
        SinkKind::Nats {
            url: "nats://127.0.0.1:4222".into(),
            subject: "ecommerce.events.{type}".into(),
            stream: "ECOMMERCE_EVENTS".into(),
        }
    );
    for (name, value) in [
        ("NATS_URL", "http://nats:4222"),
        ("DATA_PLATFORM_SUBJECT", "events.>"),
        ("DATA_PLATFORM_SUBJECT", "events..{type}"),
        ("DATA_PLATFORM_SUBJECT", "events.*.{type}"),
        // A subject from before the event types: one subject for every type is refused.
        (
            "DATA_PLATFORM_SUBJECT",
            "ecommerce.events.payment_completed",
        ),
        ("DATA_PLATFORM_SUBJECT", "events.{type}.{type}"),
        ("DATA_PLATFORM_SUBJECT", "events.paid_{type}"),
        ("EVENT_SOURCE", "/shop one"),
        ("DATA_PLATFORM_STREAM", "EVENTS.PAID"),
        ("DATA_PLATFORM_STREAM", ""),
    ] {
        let refused = config(&[
            ("ADMIN_TOKEN", "0123456789"),
            ("DATA_PLATFORM_SINK", "nats"),
            (name, value),
        ]);
        assert!(
            refused.unwrap_err().to_string().contains(name),
            "{name}={value}"
        );
    }
}

#[test]
fn each_event_type_gets_its_subject_and_every_event_the_source() {
    let c = config(&[
        ("ADMIN_TOKEN", "0123456789"),
        ("DATA_PLATFORM_SINK", "nats"),
        ("DATA_PLATFORM_SUBJECT", "{type}.shop-1"),
        ("EVENT_SOURCE", "https://shop.example.com/ecommerce"),
    ])
    .unwrap();
    assert!(
        matches!(c.outbox.sink, SinkKind::Nats { ref subject, .. } if subject == "{type}.shop-1")
    );
    assert_eq!(c.outbox.event_source, "https://shop.example.com/ecommerce");
    let defaults = config(&[("ADMIN_TOKEN", "0123456789")]).unwrap();
    assert_eq!(defaults.outbox.event_source, "/ecommerce");
}

#[test]
fn secrets_do_not_leak_through_debug() {
    let c = config(&[
        ("ADMIN_TOKEN", "super-secret-token"),
        ("SERVICE_TOKEN", "service-secret-token-123"),
        ("DATABASE_URL", "postgres://app:db-password@db:5432/shop"),
        ("REDIS_URL", "redis://:redis-password@cache:6379"),
    ])
    .expect("valid");
    let text = format!("{c:?}");
    for secret in [
        "super-secret-token",
        "service-secret-token-123",
        "db-password",
        "redis-password",
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
}
