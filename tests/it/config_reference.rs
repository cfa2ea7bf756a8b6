//! docs/CONFIG.md is checked against the config structs: every key the server config
//! and a model's config.toml accept is documented, and every documented key exists.

use crate::common;

use std::collections::BTreeSet;

use modelgate::api::auth::NamedToken;
use modelgate::config::Config;
use modelgate::registry::settings::{DeclaredTensor, ModelSettings};

/// Dotted key paths of a TOML value (`a.b`, arrays of tables as `a.b[].c`).
fn keys(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                // version_policy = { latest = 1 } is a value, not a table of keys.
                if k == "version_policy" {
                    out.insert(p);
                    continue;
                }
                keys(&p, v, out);
            }
        }
        toml::Value::Array(a) => match a.first() {
            Some(first @ toml::Value::Table(_)) => keys(&format!("{prefix}[]"), first, out),
            _ => {
                out.insert(prefix.to_string());
            }
        },
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

/// Every key of the server config, with the optional ones filled in.
fn server_keys() -> BTreeSet<String> {
    let mut c = Config {
        admin_token: Some("x".repeat(16)),
        onnxruntime_lib: Some("/lib".into()),
        io_threads: Some(2),
        ..Config::default()
    };
    c.traffic.audit_log = Some("/a".into());
    c.drift.outbox = Some("/o".into());
    c.drift.claim_dir = Some("/f".into());
    c.traffic.analysis.prometheus_url = Some("http://p:9090".into());
    c.traffic.analysis.bearer_token = Some("t".into());
    c.capture.dir = Some("/c".into());
    c.drift.webhooks = vec![modelgate::outbox::WebhookTarget {
        name: "n".into(),
        url: "http://h/".into(),
        secret: "whsec_x".into(),
    }];
    c.sources.mlflow = vec![modelgate::sources::mlflow::MlflowConfig {
        token: Some("t".into()),
        model_filter: Some("name LIKE 'x%'".into()),
        username: Some("u".into()),
        password: Some("p".into()),
        ca_cert: Some("/ca".into()),
        ..Default::default()
    }];
    c.auth.tokens = vec![NamedToken {
        name: "n".into(),
        sha256: "0".repeat(64),
        permissions: vec![],
    }];
    c.tls = Some(modelgate::tls::TlsConfig {
        cert: "/c".into(),
        key: "/k".into(),
        client_ca: Some("/ca".into()),
        client_auth: modelgate::tls::ClientAuth::None,
        metrics: false,
    });
    let t = DeclaredTensor {
        name: "x".into(),
        datatype: "FP32".into(),
        shape: vec![-1],
    };
    c.model_defaults.input = Some(vec![t.clone()]);
    c.model_defaults.output = Some(vec![t]);
    let mut out = BTreeSet::new();
    keys("", &toml::Value::try_from(&c).unwrap(), &mut out);
    out
}

/// Every key of a model's config.toml (its settings, `[traffic]`, `[drift]`,
/// `[capture]`).
fn model_keys() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut s = ModelSettings::default();
    let t = DeclaredTensor {
        name: "x".into(),
        datatype: "FP32".into(),
        shape: vec![-1],
    };
    s.input = Some(vec![t.clone()]);
    s.output = Some(vec![t]);
    keys("", &toml::Value::try_from(&s).unwrap(), &mut out);
    let mut traffic = modelgate::routing::ModelTrafficConfig::default();
    traffic.rollout.max_mean_abs_diff = Some(0.1);
    traffic.rollout.max_accuracy_drop = Some(0.02);
    traffic.rollout.max_mae_increase = Some(0.1);
    keys(
        "traffic",
        &toml::Value::try_from(&traffic).unwrap(),
        &mut out,
    );
    keys(
        "drift",
        &toml::Value::try_from(modelgate::drift::ModelDriftConfig::default()).unwrap(),
        &mut out,
    );
    let capture = modelgate::capture::ModelCaptureConfig {
        reference_accuracy: Some(0.9),
        reference_mae: Some(0.1),
        ..Default::default()
    };
    keys(
        "capture",
        &toml::Value::try_from(&capture).unwrap(),
        &mut out,
    );
    out
}

/// The keys a section of docs/CONFIG.md documents: table rows starting with `key`.
fn documented(section: &str) -> BTreeSet<String> {
    let doc = std::fs::read_to_string(common::root().join("docs/CONFIG.md")).unwrap();
    let start = doc
        .find(section)
        .unwrap_or_else(|| panic!("no section {section}"));
    let rest = &doc[start + section.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    rest[..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_server_key_is_documented_and_every_documented_key_exists() {
    let want = server_keys();
    let doc = documented("## Server config");
    let missing: Vec<_> = want.difference(&doc).collect();
    let stale: Vec<_> = doc.difference(&want).collect();
    assert!(missing.is_empty(), "undocumented server keys: {missing:?}");
    assert!(stale.is_empty(), "documented but not in Config: {stale:?}");
}

#[test]
fn every_model_key_is_documented_and_every_documented_key_exists() {
    let want = model_keys();
    let doc = documented("## Model config.toml");
    let missing: Vec<_> = want.difference(&doc).collect();
    let stale: Vec<_> = doc.difference(&want).collect();
    assert!(missing.is_empty(), "undocumented model keys: {missing:?}");
    assert!(
        stale.is_empty(),
        "documented but not in the model config: {stale:?}"
    );
}
