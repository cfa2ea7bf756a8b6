//! Automated rollouts judged on a real server under real load: identical canaries
//! never roll back, even with a busy process competing for the CPU; a canary three
//! times slower, one that fails 5 % of its requests and one that disagrees with stable
//! on 20 % of the rows each roll back within their first step, with the numbers the
//! verdict stood on in the audit log.
//!
//! Models are built from `tests/fixtures/route` (see tests/it/traffic.rs): 1 the baseline,
//! 2 a good candidate, 3 disagreeing on every row with a signal (an all-zero row has
//! tied scores and agrees), 4 failing on rows whose first feature is not near 0,
//! 5 slow (a 1024x1024 product per row), 6 a third of 5's work.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Publishes fixture version `fixture` as `version` of `name`: copied aside, renamed in.
fn publish(repo: &Path, name: &str, version: u64, fixture: u64) {
    let model = repo.join(name);
    let tmp = model.join(format!(".{version}.tmp"));
    std::fs::create_dir_all(&tmp).expect("mkdir");
    std::fs::copy(
        common::root().join(format!("tests/fixtures/route/{fixture}/model.onnx")),
        tmp.join("model.onnx"),
    )
    .expect("copy");
    std::fs::rename(&tmp, model.join(version.to_string())).expect("rename into place");
}

/// Adds model `name` to `repo`: version v is fixture `fixtures[v - 1]`, all loaded.
pub(crate) fn add_model(repo: &Path, name: &str, fixtures: &[u64]) {
    for (i, &f) in fixtures.iter().enumerate() {
        publish(repo, name, i as u64 + 1, f);
    }
    std::fs::write(
        repo.join(name).join("config.toml"),
        "version_policy = \"all\"\n",
    )
    .expect("config");
}

/// Row `i` of a deterministic, iris-like input (positive features).
pub(crate) fn row(i: usize) -> [f32; 4] {
    let r = common::rand_f32(4, i as u64 + 1);
    [
        5.0 + r[0],
        3.0 + r[1] / 2.0,
        3.5 + r[2] * 1.5,
        1.2 + r[3] / 2.0,
    ]
}

/// A process that keeps a core busy while it lives, as on a shared machine.
struct Busy(std::process::Child);

impl Busy {
    fn start() -> Busy {
        Busy(
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("spawn a busy shell"),
        )
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Client tasks sending requests (model `models[i % len]`, the input `input(i)`) as fast
/// as they are answered, until `stop`. Counts answers by status.
pub(crate) struct Load {
    /// The models that get traffic: those whose rollout is still going.
    models: Arc<RwLock<Vec<String>>>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(
        base: &str,
        models: Vec<String>,
        clients: usize,
        input: fn(usize) -> [f32; 4],
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let models = Arc::new(RwLock::new(models));
        let tasks = (0..clients)
            .map(|_| {
                let (base, models, stop) = (base.to_string(), Arc::clone(&models), stop.clone());
                let (ok, failed, next) = (ok.clone(), failed.clone(), next.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let model = {
                            let m = models.read().expect("model list");
                            if m.is_empty() {
                                break;
                            }
                            m[i % m.len()].clone()
                        };
                        let body = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": input(i)}]});
                        let resp = client
                            .post(format!("{base}/v2/models/{model}/infer"))
                            .json(&body)
                            .send()
                            .await
                            .expect("infer request");
                        match resp.status().as_u16() {
                            200 => ok.fetch_add(1, Ordering::Relaxed),
                            500 => failed.fetch_add(1, Ordering::Relaxed),
                            s => panic!("unexpected status {s}: {:?}", resp.text().await),
                        };
                    }
                })
            })
            .collect();
        Load {
            models,
            stop,
            ok,
            failed,
            tasks,
        }
    }

    pub(crate) async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("client task");
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

async fn get_json(url: String) -> Value {
    let resp = reqwest::get(url).await.expect("admin request");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

/// Starts a rollout of version 2 over stable 1 with `plan`.
async fn start_rollout(s: &common::TestServer, model: &str, plan: Value) {
    let resp = reqwest::Client::new()
        .put(format!("{}/admin/models/{model}/traffic", s.http))
        .json(
            &json!({"stable": 1, "canary": {"version": 2, "weight": 0}, "rollout": {"plan": plan}}),
        )
        .send()
        .await
        .expect("put traffic");
    let status = resp.status();
    let body: Value = resp.json().await.expect("json");
    assert_eq!(status, 200, "{body}");
}

/// Waits (polling) until no model of `models` has a rollout; returns their routing.
/// Traffic goes only to the models still rolling out.
async fn until_ended(
    s: &common::TestServer,
    load: &Load,
    models: &[String],
    secs: u64,
) -> Vec<Value> {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let mut all = Vec::new();
        for m in models {
            let v = get_json(format!("{}/admin/models/{m}/traffic", s.http)).await;
            all.push(v["routing"].clone());
        }
        if all.iter().all(|r| r.get("rollout").is_none()) {
            return all;
        }
        let going: Vec<(&String, &Value)> = models
            .iter()
            .zip(&all)
            .filter(|(_, r)| r.get("rollout").is_some())
            .collect();
        *load.models.write().expect("model list") =
            going.iter().map(|(m, _)| (*m).clone()).collect();
        let left: Vec<_> = going
            .iter()
            .map(|(m, r)| format!("{m} at step {}", r["rollout"]["step"]))
            .collect();
        assert!(Instant::now() < until, "rollouts did not end: {left:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn audit_of(s: &common::TestServer, model: &str) -> Vec<Value> {
    let v = get_json(format!("{}/admin/audit?model={model}", s.http)).await;
    v.as_array().expect("audit entries").clone()
}

/// The check of one criterion in an audit entry's analysis.
pub(crate) fn check<'a>(analysis: &'a Value, criterion: &str) -> &'a Value {
    analysis["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["criterion"] == criterion))
        .unwrap_or_else(|| panic!("no {criterion} check in {analysis}"))
}

/// Twenty rollouts of a byte-identical canary at once, with the default thresholds,
/// traffic as fast as the clients get answers, and a busy process competing for the
/// CPU: every one promotes, none rolls back. Two follow the issue's reproduction
/// (`--steps 10,50,100 --interval 3`), the others `--steps 50,100 --interval 3` (the
/// same verdicts on fewer requests: a 10 % step needs ten times its canary's samples).
/// About 45,000 requests; 95 to 125 s on the shared 2-core debug build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_canaries_under_load_never_roll_back() {
    // It saturates the CPU on purpose (a busy process, eight clients).
    let _cpu = common::cpu_heavy().await;
    const MODELS: usize = 20;
    const ISSUE_PLAN: usize = 2;
    let repo = tempfile::tempdir().expect("tempdir");
    let models: Vec<String> = (0..MODELS).map(|i| format!("same{i:02}")).collect();
    for m in &models {
        // Stable and canary are both copies of one file.
        add_model(repo.path(), m, &[2, 2]);
    }
    let s = common::start_with(repo.path(), |c| c.traffic.controller_tick_ms = 200).await;
    let _busy = Busy::start();
    let started = Instant::now();
    let load = Load::start(&s.http, models.clone(), 8, row);
    let steps = |i: usize| -> Vec<f64> {
        if i < ISSUE_PLAN {
            vec![10.0, 50.0, 100.0]
        } else {
            vec![50.0, 100.0]
        }
    };
    for (i, m) in models.iter().enumerate() {
        start_rollout(&s, m, json!({"steps": steps(i), "interval_secs": 3})).await;
    }
    let routing = until_ended(&s, &load, &models, 900).await;
    let (ok, failed) = load.stop().await;
    let took = started.elapsed();
    let mut rolled_back = Vec::new();
    let mut audits = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let entries = audit_of(&s, m).await;
        let actions: Vec<&str> = entries
            .iter()
            .map(|e| e["action"].as_str().unwrap_or(""))
            .collect();
        let mut want = vec!["set"];
        want.extend(std::iter::repeat_n("advance", steps(i).len() - 1));
        want.push("promote");
        if actions != want {
            let why = entries
                .last()
                .map_or(String::new(), |e| e["reason"].to_string());
            rolled_back.push(format!("{m}: {actions:?}: {why}"));
        }
        audits.push(entries);
    }
    assert!(
        rolled_back.is_empty(),
        "{} of {MODELS} identical canaries rolled back:\n{}",
        rolled_back.len(),
        rolled_back.join("\n")
    );
    let mut judged = 0;
    for (i, ((m, r), entries)) in models.iter().zip(&routing).zip(&audits).enumerate() {
        assert_eq!(r["stable"], 2, "{m}: {r}");
        for e in &entries[1..] {
            let a = &e["analysis"];
            assert_eq!(a["look"], "end", "{a}");
            let latency = check(a, "latency");
            assert_eq!(latency["status"], "pass", "{m}: {latency}");
            // Judged on enough samples on both sides.
            let min = latency["latency"]["min_samples"].as_u64().unwrap();
            assert!(latency["of"].as_u64().unwrap() >= min, "{latency}");
            assert!(latency["latency"]["stable_samples"].as_u64().unwrap() >= min);
            assert_eq!(check(a, "errors")["status"], "pass");
            judged += 1;
        }
        // The 100 % step compared with stable's samples of the step before.
        let last = &entries.last().expect("entries")["analysis"];
        assert_eq!(
            check(last, "latency")["latency"]["reference_step"],
            steps(i).len() - 1
        );
    }
    assert_eq!(failed, 0);
    eprintln!(
        "{MODELS} identical rollouts ({judged} steps judged) promoted in {took:.1?} ({ok} requests, {:.0}/s)",
        ok as f64 / took.as_secs_f64(),
    );
}

/// A canary three times slower than stable (fixture 5 against fixture 6) rolls back at
/// the end of its first step, on the latency test. At 25 % stable gets three times the
/// canary's samples, so its p99 bound is not just its slowest request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_times_slower_canary_rolls_back_at_the_end_of_its_first_step() {
    // Not beside a test that saturates the CPU: under that load every request's p99 is
    // the machine's stalls, not the model's speed, and a 3x slower canary meets a p99
    // limit that stable's stalls set.
    let _cpu = common::cpu_heavy().await;
    let repo = tempfile::tempdir().expect("tempdir");
    add_model(repo.path(), "slow3x", &[6, 5]);
    let s = common::start_with(repo.path(), |c| c.traffic.controller_tick_ms = 200).await;
    let models = vec!["slow3x".to_string()];
    let load = Load::start(&s.http, models.clone(), 2, row);
    start_rollout(
        &s,
        "slow3x",
        json!({"steps": [25, 100], "interval_secs": 2}),
    )
    .await;
    let routing = until_ended(&s, &load, &models, 300).await;
    load.stop().await;
    assert_eq!(routing[0]["rejected"], json!([2]), "{}", routing[0]);
    let entries = audit_of(&s, "slow3x").await;
    let last = entries.last().expect("entries");
    assert_eq!(last["action"], "rollback", "{last}");
    let a = &last["analysis"];
    assert_eq!(a["step"], 1, "within the first step");
    assert_eq!(a["look"], "end", "latency is judged at the end of the step");
    let l = check(a, "latency");
    assert_eq!(l["status"], "breach", "{l}");
    assert!(l["p_value"].as_f64().unwrap() < a["alpha"].as_f64().unwrap() / 2.0);
    // The figures: the canary's p99 well above stable's, and above the limit.
    let (c99, s99) = (
        a["canary"]["p99_ms"].as_f64().unwrap(),
        a["stable"]["p99_ms"].as_f64().unwrap(),
    );
    assert!(c99 > l["threshold"].as_f64().unwrap(), "{a}");
    assert!(
        a["canary"]["p50_ms"].as_f64().unwrap() > 1.5 * a["stable"]["p50_ms"].as_f64().unwrap(),
        "{a}"
    );
    let reason = last["reason"].as_str().unwrap();
    assert!(reason.contains("latency p99"), "{reason}");
    eprintln!("slow canary: p99 {c99:.2} ms against stable {s99:.2} ms; {reason}");
}

/// Rolls a failing or disagreeing canary (fixture `canary` as version 2) out with a
/// long interval, under inputs from `input`, and returns the audit entry that ended it
/// and the time it took.
async fn early_rollback(model: &str, canary: u64, input: fn(usize) -> [f32; 4]) -> Value {
    // Four clients as fast as they are answered until the rollout ends.
    let _cpu = common::cpu_heavy().await;
    let repo = tempfile::tempdir().expect("tempdir");
    add_model(repo.path(), model, &[1, canary]);
    let s = common::start_with(repo.path(), |c| c.traffic.controller_tick_ms = 200).await;
    let models = vec![model.to_string()];
    let load = Load::start(&s.http, models.clone(), 4, input);
    let started = Instant::now();
    let interval = 600.0;
    start_rollout(
        &s,
        model,
        json!({"steps": [50, 100], "interval_secs": interval}),
    )
    .await;
    let routing = until_ended(&s, &load, &models, 300).await;
    let (ok, failed) = load.stop().await;
    assert!(started.elapsed().as_secs_f64() < interval);
    assert_eq!(routing[0]["rejected"], json!([2]), "{}", routing[0]);
    let entries = audit_of(&s, model).await;
    let last = entries.last().expect("entries").clone();
    assert_eq!(last["action"], "rollback", "{last}");
    let a = &last["analysis"];
    assert_eq!(a["step"], 1, "within the first step");
    assert_eq!(a["look"], "early", "before the interval ended: {a}");
    assert!(a["elapsed_secs"].as_f64().unwrap() < interval);
    eprintln!(
        "{model}: rolled back after {:.1} s ({ok} answered, {failed} failed): {}",
        a["elapsed_secs"], last["reason"]
    );
    last
}

/// Inputs on which fixture 4 fails one request in 20: the others have a first feature
/// of 0, which it answers.
fn fails_one_in_twenty(i: usize) -> [f32; 4] {
    let mut r = row(i);
    if !i.is_multiple_of(20) {
        r[0] = 0.0;
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_five_percent_rolls_back_before_its_step_ends() {
    let last = early_rollback("fail5", 4, fails_one_in_twenty).await;
    let a = &last["analysis"];
    let e = check(a, "errors");
    assert_eq!(e["status"], "breach", "{e}");
    assert_eq!(e["test"], "sequential likelihood ratio");
    assert!(e["sequential"]["likelihood_ratio"].as_f64().unwrap() >= 1e4);
    // Above the 1 % allowed (a sequential test stops when the rate it saw is high, so
    // the rate at the stop runs above the true 5 %: bounds wide enough never to flake).
    let rate = e["observed"].as_f64().unwrap();
    assert!(rate > 0.01 && rate < 0.5, "{e}");
    assert_eq!(a["canary"]["errors"], e["count"]);
    assert!(a["stable"]["requests"].as_u64().unwrap() > 0);
    assert_eq!(a["stable"]["errors"], 0);
    assert!(last["reason"].as_str().unwrap().contains("error rate"));
}

/// Inputs on which fixture 3 disagrees with stable on one row in 5: the others are all
/// zero (every score 0, the same label from both).
fn disagrees_one_in_five(i: usize) -> [f32; 4] {
    if i.is_multiple_of(5) {
        row(i)
    } else {
        [0.0; 4]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_disagreeing_on_a_fifth_of_rows_rolls_back_before_its_step_ends() {
    let last = early_rollback("dis20", 3, disagrees_one_in_five).await;
    let a = &last["analysis"];
    let d = check(a, "disagreement");
    assert_eq!(d["status"], "breach", "{d}");
    // Above the 5 % allowed (the rate at a sequential test's stop runs high: no
    // tighter bound that could flake).
    let rate = d["observed"].as_f64().unwrap();
    assert!(rate > 0.05, "{d}");
    assert_eq!(d["threshold"], 0.05);
    assert!(last["reason"].as_str().unwrap().contains("disagreement"));
}
