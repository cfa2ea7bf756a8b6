//! Many replicas behave as one: three real modelgate processes on one registry, a real
//! Prometheus scraping them every second, every replica running the rollout controller
//! with `[traffic.analysis] source = "prometheus"`.
//!
//! - a byte-identical canary advances and promotes, each decision audited once, with
//!   counts equal to the fleet's (what the clients got from the three replicas in the
//!   judged window, within a scrape at each end);
//! - a canary failing 5 % of its requests rolls back;
//! - with Prometheus stopped mid-rollout the step is inconclusive (audited, nothing else
//!   changes) until it is back, and then the rollout finishes;
//! - quality: a canary worse on labelled traffic rolls back on accuracy counted over
//!   every replica's joined feedback, an equal one promotes.
//!
//! Models are the route fixtures of tests/it/rollout.rs: 1 the baseline, 2 a good
//! candidate, 4 failing on rows whose first feature is not near 0.

use crate::common;
use crate::prometheus::{free_port, start_prometheus};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn publish(repo: &Path, name: &str, version: u64, fixture: u64) {
    let model = repo.join(name);
    let tmp = model.join(format!(".{version}.tmp"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(
        common::root().join(format!("tests/fixtures/route/{fixture}/model.onnx")),
        tmp.join("model.onnx"),
    )
    .unwrap();
    std::fs::rename(&tmp, model.join(version.to_string())).unwrap();
}

fn add_model(repo: &Path, name: &str, fixtures: &[u64]) {
    for (i, &f) in fixtures.iter().enumerate() {
        publish(repo, name, i as u64 + 1, f);
    }
    std::fs::write(
        repo.join(name).join("config.toml"),
        "version_policy = \"all\"\n",
    )
    .unwrap();
}

/// Row `i`: fixture 4 fails one in twenty (the others have a first feature of 0).
fn row(i: usize) -> [f32; 4] {
    let r = common::rand_f32(4, i as u64 + 1);
    let first = if i.is_multiple_of(20) {
        5.0 + r[0]
    } else {
        0.0
    };
    [first, 3.0 + r[1] / 2.0, 3.5 + r[2] * 1.5, 1.2 + r[3] / 2.0]
}

/// One answer the clients got: when (Unix ms), from which replica, model, variant.
#[derive(Clone)]
struct Answer {
    ms: u64,
    replica: usize,
    model: String,
    canary: bool,
    failed: bool,
}

/// Clients sending to the replicas in turn, recording every answer, until stopped.
struct Load {
    models: Arc<Mutex<Vec<String>>>,
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(replicas: Vec<String>, clients: usize) -> Load {
        let models = Arc::new(Mutex::new(Vec::<String>::new()));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (replicas, models, answers, stop, next) = (
                    replicas.clone(),
                    models.clone(),
                    answers.clone(),
                    stop.clone(),
                    next.clone(),
                );
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        // Model i % len, so that each model's rows (i / len) run through
                        // every index and every replica in turn.
                        let (model, k) = {
                            let m = models.lock().unwrap();
                            if m.is_empty() {
                                (None, 0)
                            } else {
                                (Some(m[i % m.len()].clone()), i / m.len())
                            }
                        };
                        let Some(model) = model else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        let replica = k % replicas.len();
                        let body = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": row(k)}]});
                        let Ok(resp) = client
                            .post(format!("{}/v2/models/{model}/infer", replicas[replica]))
                            .json(&body)
                            .send()
                            .await
                        else {
                            continue;
                        };
                        let status = resp.status().as_u16();
                        let canary = resp
                            .headers()
                            .get("x-variant")
                            .is_some_and(|v| v == "canary");
                        assert!(
                            status == 200 || status == 500,
                            "status {status}: {:?}",
                            resp.text().await
                        );
                        answers.lock().unwrap().push(Answer {
                            ms: modelgate::util::now_ms(),
                            replica,
                            model,
                            canary,
                            failed: status == 500,
                        });
                    }
                })
            })
            .collect();
        Load {
            models,
            answers,
            stop,
            tasks,
        }
    }

    fn set_models(&self, m: &[&str]) {
        *self.models.lock().unwrap() = m.iter().map(|s| s.to_string()).collect();
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// Waits until Prometheus has scraped all `n` replicas (its discovery hands new
/// targets to the scrapers up to 5 s after it starts, so a fixed sleep is not enough:
/// a window that begins before the first scrape undercounts).
async fn until_scraped(prom_port: u16, n: usize) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let v =
            crate::prometheus::query(&format!("http://127.0.0.1:{prom_port}"), "count(up == 1)")
                .await;
        let up = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0);
        if up >= n {
            // One more scrape, so that every series has a sample before the window.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            return;
        }
        assert!(
            Instant::now() < until,
            "Prometheus scrapes {up} of {n} replicas"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get_json(url: String) -> Value {
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn start_rollout(base: &str, model: &str, plan: Value) {
    let resp = reqwest::Client::new()
        .put(format!("{base}/admin/models/{model}/traffic"))
        .json(
            &json!({"stable": 1, "canary": {"version": 2, "weight": 0}, "rollout": {"plan": plan}}),
        )
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
}

async fn routing(base: &str, model: &str) -> Value {
    get_json(format!("{base}/admin/models/{model}/traffic")).await["routing"].clone()
}

async fn audit(base: &str, model: &str) -> Vec<Value> {
    get_json(format!("{base}/admin/audit?model={model}&limit=1000"))
        .await
        .as_array()
        .unwrap()
        .clone()
}

async fn until_ended(base: &str, model: &str, secs: u64) -> Value {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let r = routing(base, model).await;
        if r.get("rollout").is_none() {
            return r;
        }
        assert!(
            Instant::now() < until,
            "{model}: rollout did not end: {r}\n{:#?}",
            audit(base, model).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The canary answers the clients got of `model` in `(start, end]` (Unix ms), per replica.
fn canary_answers(answers: &[Answer], model: &str, start: u64, end: u64) -> [u64; 3] {
    let mut n = [0; 3];
    for a in answers
        .iter()
        .filter(|a| a.model == model && a.canary && a.ms > start && a.ms <= end)
    {
        n[a.replica] += 1;
    }
    n
}

/// What one replica's controller looks at every 250 ms, judging from Prometheus.
fn fleet_config(c: &mut modelgate::config::Config, prom_port: u16) {
    c.traffic.controller_tick_ms = 250;
    c.traffic.analysis.source = modelgate::routing::analysis::Source::Prometheus;
    c.traffic.analysis.prometheus_url = Some(format!("http://127.0.0.1:{prom_port}"));
    c.traffic.analysis.scrape_interval_secs = 1.0;
    c.traffic.analysis.timeout_ms = 5000;
    c.traffic.analysis.retry_secs = 1.0;
    c.traffic.analysis.max_inconclusive = 1000;
    c.model_defaults.instances = 1;
}

/// Replicas on one registry judging from a real Prometheus that scrapes them all.
struct Fleet {
    replicas: Vec<common::Spawned>,
    /// `host:port` of each replica's metrics endpoint: its `instance` in Prometheus.
    targets: Vec<String>,
    bases: Vec<String>,
    prom_port: u16,
    prom_dir: tempfile::TempDir,
    prom: Option<crate::prometheus::Kill>,
}

impl Fleet {
    /// `n` replicas of `repo` with [`fleet_config`] and `tweak`, and their Prometheus.
    async fn start(
        repo: &Path,
        n: usize,
        tweak: impl Fn(usize, &mut modelgate::config::Config),
    ) -> Fleet {
        let prom_port = free_port();
        let mut replicas = Vec::new();
        for i in 0..n {
            replicas.push(
                common::spawn_with(repo, |c| {
                    fleet_config(c, prom_port);
                    tweak(i, c);
                })
                .await,
            );
        }
        let targets: Vec<String> = replicas
            .iter()
            .map(|r| {
                r.metrics
                    .trim_start_matches("http://")
                    .trim_end_matches("/metrics")
                    .to_string()
            })
            .collect();
        let prom_dir = tempfile::tempdir().unwrap();
        let prom = Some(start_prometheus(prom_dir.path(), prom_port, &targets).await);
        let bases = replicas.iter().map(|r| r.http.clone()).collect();
        Fleet {
            replicas,
            targets,
            bases,
            prom_port,
            prom_dir,
            prom,
        }
    }

    /// Prometheus again, on the same port and data, after it was stopped.
    async fn restart_prometheus(&mut self) {
        self.prom =
            Some(start_prometheus(self.prom_dir.path(), self.prom_port, &self.targets).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_judge_rollouts_from_prometheus_as_one() {
    // Three server processes, a Prometheus and four clients.
    let _cpu = common::cpu_heavy().await;
    let repo = tempfile::tempdir().unwrap();
    add_model(repo.path(), "fgood", &[2, 2]);
    add_model(repo.path(), "fbad", &[1, 4]);
    add_model(repo.path(), "fdown", &[2, 2]);
    let mut fleet = Fleet::start(repo.path(), 3, |_, _| {}).await;
    let (prom_port, bases) = (fleet.prom_port, fleet.bases.clone());
    let load = Load::start(bases.clone(), 6);
    load.set_models(&["fgood", "fbad"]);
    // Let every replica's series reach Prometheus before the steps begin.
    until_scraped(prom_port, 3).await;
    let base = &bases[0];
    // Latency needs ln(alpha/2)/ln(0.99) samples an arm: 229 at alpha 0.2.
    start_rollout(
        base,
        "fgood",
        json!({"steps": [50, 100], "interval_secs": 5, "min_requests": 50, "alpha": 0.2}),
    )
    .await;
    start_rollout(
        base,
        "fbad",
        json!({"steps": [50, 100], "interval_secs": 120, "min_requests": 50}),
    )
    .await;
    let bad = until_ended(base, "fbad", 100).await;
    assert_eq!(bad["rejected"], json!([2]), "{bad}");
    load.set_models(&["fgood"]);
    let good = until_ended(base, "fgood", 100).await;
    assert_eq!(good["stable"], 2, "{good}");

    // One audit entry per decision, though three controllers made each.
    let entries = audit(base, "fgood").await;
    let auto: Vec<&Value> = entries.iter().filter(|e| e["actor"] == "auto").collect();
    let actions: Vec<&str> = auto.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["advance", "promote"], "{entries:#?}");
    let answers = load.answers.lock().unwrap().clone();
    for e in &auto {
        let a = &e["analysis"];
        let fleet = &a["fleet"];
        assert_eq!(fleet["replicas"], 3, "{a}");
        let (start, end) = (
            fleet["start_ms"].as_u64().unwrap(),
            fleet["end_ms"].as_u64().unwrap(),
        );
        assert_eq!(a["look"], "end", "{a}");
        let counted = a["canary"]["requests"].as_u64().unwrap();
        let seen = canary_answers(&answers, "fgood", start, end);
        let total: u64 = seen.iter().sum();
        // Within one scrape at each end of the window (and a second of slack).
        let per_sec = total as f64 * 1000.0 / (end - start) as f64;
        let slack = (per_sec * 1.5).ceil() as u64 + 5;
        eprintln!(
            "fgood {}: audit counted {counted} canary requests; clients got {seen:?} = {total} (slack {slack})",
            e["action"]
        );
        assert!(
            counted.abs_diff(total) <= slack,
            "{}: audit {counted}, replicas {seen:?}",
            e["action"]
        );
        // The fleet's, not one replica's share.
        assert!(seen.iter().all(|&n| n > 0 && n < total), "{seen:?}");
        assert!(
            counted as f64 > 1.5 * *seen.iter().max().unwrap() as f64,
            "{seen:?}"
        );
    }
    // The next step began where the judged window ended: the same on every replica.
    assert_eq!(
        auto[0]["after"]["rollout"]["step_started_ms"],
        auto[0]["analysis"]["fleet"]["end_ms"]
    );
    // Every replica applies the same generation.
    let generation = good["generation"].as_u64().unwrap();
    for b in &bases {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if routing(b, "fgood").await["generation"].as_u64() == Some(generation) {
                break;
            }
            assert!(Instant::now() < until, "{b} lags");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let bad_entries = audit(base, "fbad").await;
    let rollback: Vec<&Value> = bad_entries
        .iter()
        .filter(|e| e["action"] == "rollback")
        .collect();
    assert_eq!(rollback.len(), 1, "{bad_entries:#?}");
    let a = &rollback[0]["analysis"];
    assert_eq!(a["fleet"]["replicas"], 3, "{a}");
    let errors = crate::rollout::check(a, "errors");
    assert_eq!(errors["status"], "breach", "{errors}");
    let failed_answers = answers
        .iter()
        .filter(|x| x.model == "fbad" && x.failed)
        .count();
    assert!(failed_answers > 0);

    // Prometheus stops during a step: inconclusive, nothing changes until it is back.
    load.set_models(&["fdown"]);
    start_rollout(
        base,
        "fdown",
        json!({"steps": [50, 100], "interval_secs": 4, "min_requests": 50, "alpha": 0.2}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(fleet.prom.take());
    let before = routing(base, "fdown").await;
    assert_eq!(before["rollout"]["step"], 0, "{before}");
    // Past the step's end and its settle time: every look is inconclusive.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let during = routing(base, "fdown").await;
    assert_eq!(during["rollout"]["step"], 0, "{during}");
    assert_eq!(during["canary"], before["canary"]);
    assert_eq!(
        during["rollout"]["step_started_ms"],
        before["rollout"]["step_started_ms"]
    );
    let inconclusive = during["rollout"]["inconclusive"].as_u64().unwrap_or(0);
    assert!(inconclusive >= 2, "{during}");
    let entries = audit(base, "fdown").await;
    let kinds: Vec<&str> = entries
        .iter()
        .filter(|e| e["actor"] == "auto")
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        kinds.iter().all(|k| *k == "inconclusive"),
        "nothing but inconclusive looks while Prometheus is down: {kinds:?}"
    );
    // One entry per look, however many replicas looked: the entries count the looks
    // 1, 2, 3, ... (a replica's snapshot may lag the file, so the count it shows is a
    // lower bound).
    let counts: Vec<u64> = entries
        .iter()
        .filter(|e| e["actor"] == "auto")
        .map(|e| e["after"]["rollout"]["inconclusive"].as_u64().unwrap())
        .collect();
    let k = counts.len() as u64;
    assert_eq!(counts, (1..=k).collect::<Vec<u64>>(), "one entry per look");
    assert!(inconclusive <= k, "{inconclusive} > {k}");
    assert!(
        entries.last().unwrap()["reason"]
            .as_str()
            .unwrap()
            .contains("Prometheus"),
        "{:?}",
        entries.last()
    );
    let r = &fleet.replicas;
    let metrics =
        r[0].metrics_text().await + &r[1].metrics_text().await + &r[2].metrics_text().await;
    assert!(
        metrics.contains("modelgate_rollout_inconclusive_total{model=\"fdown\",look=\"end\"}"),
        "no inconclusive count"
    );
    // Back: the rollout goes on from routing.toml and finishes.
    fleet.restart_prometheus().await;
    let done = until_ended(base, "fdown", 90).await;
    assert_eq!(done["stable"], 2, "{done}");
    load.stop().await;
    // Each replica exports the generation it applies, once it has seen the last change
    // of routing.toml (the answer above came from one replica; the others follow the
    // file, within a few seconds).
    let g = done["generation"].as_u64().unwrap();
    let want = format!("modelgate_routing_generation{{model=\"fdown\"}} {g}");
    for r in &fleet.replicas {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let text = r.metrics_text().await;
            if text.contains(&want) {
                break;
            }
            assert!(
                Instant::now() < until,
                "{}",
                text.lines()
                    .filter(|l| l.contains("routing_generation"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The replica that made a rollout's latest decision is killed in the middle of the
/// rollout: another one continues it from routing.toml, and the rollout finishes with
/// every step judged once in the audit log. Then a replica is frozen (SIGSTOP) while the
/// routing changes: `modelgate ctl traffic get M --fleet` names it as lagging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_leaves_its_rollout_to_the_others_and_ctl_names_a_frozen_one() {
    let _cpu = common::cpu_heavy().await;
    let repo = tempfile::tempdir().unwrap();
    add_model(repo.path(), "fkill", &[2, 2]);
    let fleet = Fleet::start(repo.path(), 3, |_, _| {}).await;
    let Fleet {
        mut replicas,
        targets,
        bases,
        prom_port,
        prom,
        ..
    } = fleet;
    let names: Vec<String> = replicas.iter().map(|r| r.replica.clone()).collect();
    assert!(names.iter().all(|n| !n.is_empty()), "{names:?}");
    let load = Load::start(bases.clone(), 6);
    load.set_models(&["fkill"]);
    until_scraped(prom_port, 3).await;
    start_rollout(
        &bases[0],
        "fkill",
        json!({"steps": [30, 60, 100], "interval_secs": 5, "min_requests": 50, "alpha": 0.2}),
    )
    .await;
    // The first decision: who made it?
    let until = Instant::now() + Duration::from_secs(90);
    let first = loop {
        let entries = audit(&bases[0], "fkill").await;
        if let Some(e) = entries
            .iter()
            .find(|e| e["actor"] == "auto" && e["action"] == "advance")
        {
            break e.clone();
        }
        assert!(Instant::now() < until, "no decision: {entries:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let decider = names
        .iter()
        .position(|n| first["replica"] == n.as_str())
        .unwrap_or_else(|| panic!("{} is none of {names:?}", first["replica"]));
    replicas[decider].child.kill().unwrap();
    replicas[decider].child.wait().unwrap();
    let alive: Vec<usize> = (0..3).filter(|&i| i != decider).collect();
    let base = &bases[alive[0]];
    let done = until_ended(base, "fkill", 120).await;
    assert_eq!(done["stable"], 2, "{done}");
    let entries = audit(base, "fkill").await;
    let auto: Vec<&Value> = entries.iter().filter(|e| e["actor"] == "auto").collect();
    let actions: Vec<&str> = auto.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["advance", "advance", "promote"], "{entries:#?}");
    let steps: Vec<u64> = auto
        .iter()
        .map(|e| e["analysis"]["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3], "each step judged once");
    // The decisions after the kill were made by the replicas still alive.
    for e in &auto[1..] {
        assert_ne!(e["replica"], first["replica"], "{e}");
        assert!(names.contains(&e["replica"].as_str().unwrap().to_string()));
    }

    // Freeze one of the others, change the routing through the third, and ask.
    let (frozen, changer) = (alive[0], alive[1]);
    let pid = replicas[frozen].child.id().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let resp = reqwest::Client::new()
        .put(format!("{}/admin/models/fkill/traffic", bases[changer]))
        .json(&json!({"stable": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Two scrapes for the change to reach Prometheus from the replica that applied it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["ctl", "traffic", "get", "fkill", "--fleet", "--prometheus"])
        .arg(format!("http://127.0.0.1:{prom_port}"))
        .output()
        .unwrap();
    signal("-CONT");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lagging: Vec<&str> = v["lagging"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    // The frozen one (not scraped now, on the old generation) and the killed one (not
    // scraped since); never the one that applied the change.
    assert!(lagging.contains(&targets[frozen].as_str()), "{v}");
    assert!(!lagging.contains(&targets[changer].as_str()), "{v}");
    let row = |i: usize| {
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["replica"] == targets[i].as_str())
            .cloned()
            .unwrap_or_else(|| panic!("no row for {} in {v}", targets[i]))
    };
    assert_eq!(row(changer)["stable"], 1, "{v}");
    assert_eq!(row(frozen)["scraped_now"], false, "{v}");
    assert!(
        row(frozen)["generation"].as_u64() < row(changer)["generation"].as_u64(),
        "{v}"
    );
    load.stop().await;
    drop(prom);
}

/// What `/admin/capture` of one replica says of a (model, variant): labelled class
/// rows and how many were right (0, 0 before any feedback).
async fn replica_quality(base: &str, model: &str, variant: &str) -> (u64, u64) {
    let state = get_json(format!("{base}/admin/capture")).await;
    state["quality"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|q| q["model"] == model && q["variant"] == variant)
        .map_or((0, 0), |q| {
            (
                q["class_rows"].as_u64().unwrap(),
                q["correct"].as_u64().unwrap(),
            )
        })
}

/// Quality judged on the fleet's labels: three capturing replicas, each request sent
/// to the next replica and its rows labelled at the replica that answered it (5 rows a
/// request; the truth is the prediction but for a random tenth, and, for `fqworse`,
/// rows version 2 answered as class 2: a canary worse on labelled traffic only, its
/// answers agreeing with stable's). `fqworse` rolls back at the end of its first step
/// on accuracy counted over all three replicas; `fqequal` promotes, the accuracy check
/// passing at each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_judge_quality_on_the_fleets_labelled_rows() {
    let _cpu = common::cpu_heavy().await;
    let repo = tempfile::tempdir().unwrap();
    crate::capture::iris_pair(repo.path(), "fqworse");
    crate::capture::iris_pair(repo.path(), "fqequal");
    let captures: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let dirs: Vec<std::path::PathBuf> = captures.iter().map(|d| d.path().to_path_buf()).collect();
    let fleet = Fleet::start(repo.path(), 3, |i, c| c.capture.dir = Some(dirs[i].clone())).await;
    let bases = fleet.bases.clone();
    until_scraped(fleet.prom_port, 3).await;
    let plan = json!({"steps": [50, 100], "interval_secs": 4, "min_requests": 20, "alpha": 0.2,
                      "max_accuracy_drop": 0.05, "min_labelled": 300});
    start_rollout(&bases[0], "fqworse", plan.clone()).await;
    start_rollout(&bases[0], "fqequal", plan).await;

    let mut rng = fastrand::Rng::with_seed(5);
    let iris = crate::drift::iris_rows();
    let client = reqwest::Client::new();
    let mut rolling = vec!["fqworse", "fqequal"];
    let mut ended = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    for r in 0usize.. {
        if r % 60 == 0 {
            for m in rolling.clone() {
                let routing = routing(&bases[0], m).await;
                if routing.get("rollout").is_none() {
                    rolling.retain(|x| *x != m);
                    ended.insert(m, routing);
                }
            }
            if rolling.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "rollouts of {rolling:?} did not end"
            );
        }
        let model = rolling[r % rolling.len()];
        let base = &bases[(r / 2) % bases.len()];
        let bad = model == "fqworse";
        crate::capture::labelled_request(&client, base, model, &iris, r, bad, &mut rng).await;
    }
    assert_eq!(
        ended["fqworse"]["rejected"],
        json!([2]),
        "{:?}",
        ended["fqworse"]
    );
    assert_eq!(ended["fqequal"]["stable"], 2, "{:?}", ended["fqequal"]);
    let accuracy = |e: &Value| crate::rollout::check(&e["analysis"], "accuracy").clone();

    let entries = audit(&bases[0], "fqworse").await;
    let auto: Vec<&Value> = entries.iter().filter(|e| e["actor"] == "auto").collect();
    assert_eq!(auto.len(), 1, "{entries:#?}");
    let last = auto[0];
    assert_eq!(last["action"], "rollback", "{last}");
    assert_eq!(last["analysis"]["step"], 1, "{last}");
    assert_eq!(last["analysis"]["fleet"]["replicas"], 3, "{last}");
    let a = accuracy(last);
    assert_eq!(a["status"], "breach", "{a}");
    assert!(a["observed"].as_f64().unwrap() < 0.75, "{a}");
    let breached: Vec<&Value> = last["analysis"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "breach")
        .collect();
    assert_eq!(breached.len(), 1, "accuracy alone: {breached:?}");
    // The labels judged are the fleet's: more than any one replica joined, and no more
    // than all of them did (the canary got no traffic after the rollback).
    let of = a["of"].as_u64().unwrap();
    assert!(of >= 300, "{a}");
    let mut per_replica = Vec::new();
    for b in &bases {
        per_replica.push(replica_quality(b, "fqworse", "canary").await.0);
    }
    let total: u64 = per_replica.iter().sum();
    eprintln!(
        "fqworse: judged {of} labelled canary rows; the replicas joined {per_replica:?} = {total}"
    );
    assert!(of <= total, "{of} > {per_replica:?}");
    assert!(
        of as f64 > 1.5 * *per_replica.iter().max().unwrap() as f64,
        "{of} against {per_replica:?}"
    );

    let entries = audit(&bases[0], "fqequal").await;
    let decided: Vec<&Value> = entries.iter().filter(|e| e["actor"] == "auto").collect();
    let actions: Vec<&str> = decided
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["advance", "promote"], "{entries:#?}");
    for e in decided {
        assert_eq!(e["analysis"]["fleet"]["replicas"], 3, "{e}");
        let a = accuracy(e);
        assert_eq!(a["status"], "pass", "{a}");
        assert!(a["of"].as_u64().unwrap() >= 300, "{a}");
    }
    // The counters the fleet judge read are on every replica's /metrics.
    let text = fleet.replicas[1].metrics_text().await;
    for name in [
        "modelgate_quality_class_rows_total",
        "modelgate_quality_correct_rows_total",
    ] {
        assert!(
            text.contains(&format!(
                "{name}{{model=\"fqequal\",version=\"2\",variant=\"canary\"}}"
            )),
            "no {name} in {text}"
        );
    }
}
