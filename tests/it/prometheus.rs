//! A real Prometheus (Debian's `prometheus` package; scripts/test.sh installs it)
//! scrapes a running modelgate: the key series arrive, every Grafana dashboard
//! expression and every alert rule runs without error against them, and
//! `promtool check metrics` finds nothing wrong with /metrics.
//!
//! The server runs in a process of its own: promtool and the queries see its series
//! only, not those of every other test in this process.

use crate::common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn tool(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = format!("{dir}/{name}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    panic!("{name} is not installed: apt-get install prometheus (scripts/test.sh does)");
}

pub async fn query(prom: &str, q: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A free loopback port (bound, then released for the process that will listen on it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Prometheus on 127.0.0.1:`port` scraping `targets` (`host:port`) every second,
/// its data in `dir` (kept over a restart with the same `dir`); waits until it answers.
pub async fn start_prometheus(dir: &std::path::Path, port: u16, targets: &[String]) -> Kill {
    let list = targets
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: modelgate\n    static_configs:\n      - targets: [{list}]\n"
        ),
    )
    .unwrap();
    let child = Command::new(tool("prometheus"))
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prom = format!("http://127.0.0.1:{port}");
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(format!("{prom}/-/ready")).await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < until, "Prometheus never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Kill(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_key_series_and_runs_every_rule_and_panel() {
    let repo = common::test_repo();
    let s = common::spawn_with(repo.path(), |c| {
        c.admin_token = Some("prometheus-test-admin-token".into())
    })
    .await;
    // Some traffic: successes over both protocols' HTTP side, a client error.
    let c = reqwest::Client::new();
    for _ in 0..5 {
        let r = c
            .post(format!("{}/v2/models/iris/infer", s.http))
            .json(&json!({"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let _ = c
        .post(format!("{}/v2/models/iris/infer", s.http))
        .body("{")
        .send()
        .await;
    // An admin call with a wrong token, so that the auth-failure series is linted too.
    let r = c
        .get(format!("{}/admin/audit", s.http))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());

    // promtool's linter on the exposition.
    let text = s.metrics_text().await;
    let mut check = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = common::root().join("deploy/prometheus/alerts.yml");
    let rules_file = rules.clone();
    let out = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Prometheus scraping this server every second, with the alert rules loaded.
    let dir = tempfile::tempdir().unwrap();
    let target = s
        .metrics
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: modelgate\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _prom = Kill(
        Command::new(tool("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let prom = format!("http://127.0.0.1:{port}");
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(format!("{prom}/api/v1/query?query=up")).await
            && let Ok(v) = r.json::<Value>().await
            && v["data"]["result"][0]["value"][1] == "1"
        {
            break;
        }
        assert!(Instant::now() < until, "Prometheus never scraped modelgate");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The key series are there, with their labels.
    for q in [
        r#"modelgate_requests_total{model="iris",code="ok",variant="stable",protocol="http"}"#,
        r#"modelgate_requests_total{model="iris",code="invalid_request"}"#,
        r#"modelgate_request_duration_seconds_bucket{model="iris"}"#,
        r#"modelgate_queue_duration_seconds_count{model="iris"}"#,
        r#"modelgate_inference_duration_seconds_count{model="iris"}"#,
        r#"modelgate_batch_size_rows_count{model="iris"}"#,
        r#"modelgate_model_versions_ready{model="iris"}"#,
        r#"modelgate_traffic_stable_version{model="iris"}"#,
        r#"modelgate_connections_open{listener="http"}"#,
    ] {
        let v = query(&prom, q).await;
        assert_eq!(v["status"], "success", "{q}: {v}");
        assert!(
            !v["data"]["result"].as_array().unwrap().is_empty(),
            "no series for {q}"
        );
    }
    // Every dashboard expression is valid PromQL over these series.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("deploy/grafana/modelgate.json")).unwrap(),
    )
    .unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap().replace("$model", ".*");
            let v = query(&prom, &expr).await;
            assert_eq!(
                v["status"], "success",
                "panel '{}': {expr}: {v}",
                p["title"]
            );
        }
    }
    let v = query(
        &prom,
        r#"sum(modelgate_model_versions_ready{model=~".*"}) > 0"#,
    )
    .await;
    assert_eq!(v["status"], "success");
    // Every alert rule is loaded and evaluates without error.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r: Value = reqwest::get(format!("{prom}/api/v1/rules"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let rules: Vec<&Value> = r["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        // Every rule of the file (capture added two to the original six).
        let in_file = std::fs::read_to_string(&rules_file)
            .unwrap()
            .lines()
            .filter(|l| l.trim_start().starts_with("- alert:"))
            .count();
        assert_eq!(rules.len(), in_file, "{r}");
        assert!(in_file >= 8, "{in_file}");
        let evaluated = rules
            .iter()
            .all(|r| r["lastEvaluation"] != "0001-01-01T00:00:00Z");
        if evaluated {
            for rule in rules {
                assert_eq!(rule["health"], "ok", "{rule}");
            }
            break;
        }
        assert!(Instant::now() < until, "rules never evaluated: {r}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
