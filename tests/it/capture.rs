//! Inference capture and feedback against the real server: request ids (the client's or
//! a generated one, in the answer and `x-request-id`), Parquet files read back with the
//! parquet crate (pyarrow reads them in tests/python/test_capture.py), feedback joined
//! after 10,000 other requests, per-item answers, a killed gateway's leftovers, and a
//! full disk that stops capture but not serving.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow_array::{Array, Int64Array, ListArray, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Value, json};

use crate::common;
use crate::drift::iris_rows;

/// A repository with iris version 2 as `name`, capture on for every request.
fn iris_repo(name: &str, capture: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join(name).join("2");
    std::fs::create_dir_all(&v).unwrap();
    // With its model.toml: quality events carry the version's lineage.
    for f in ["model.onnx", "model.toml"] {
        std::fs::copy(common::root().join("models/iris/2").join(f), v.join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join(name).join("config.toml"),
        format!("[capture]\nenabled = true\nsample_rate = 1.0\n{capture}"),
    )
    .unwrap();
    dir
}

/// One iris request over HTTP JSON: (status, x-request-id header, body).
async fn infer(http: &str, model: &str, id: Option<&str>, row: [f32; 4]) -> (u16, String, Value) {
    let mut body = json!({
        "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": row}]
    });
    if let Some(id) = id {
        body["id"] = id.into();
    }
    let resp = reqwest::Client::new()
        .post(format!("{http}/v2/models/{model}/infer"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let header = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, header, resp.json().await.unwrap())
}

fn label_of(body: &Value) -> i64 {
    body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "label")
        .unwrap()["data"][0]
        .as_i64()
        .unwrap()
}

async fn post(http: &str, path: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{http}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Closed Parquet files under `dir`, sorted.
fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn read(path: &Path) -> Vec<RecordBatch> {
    let f = std::fs::File::open(path).unwrap();
    ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

fn strings(b: &RecordBatch, col: &str) -> Vec<String> {
    let a = b
        .column_by_name(col)
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

fn ints(b: &RecordBatch, col: &str) -> Vec<Option<i64>> {
    let a = b
        .column_by_name(col)
        .unwrap()
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    (0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i)))
        .collect()
}

fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && labels.split(',').all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_returned_records_are_written_and_feedback_joins_after_ten_thousand_requests() {
    let _cpu = common::cpu_heavy().await;
    let repo = iris_repo("capjoin", "");
    let capture_dir = tempfile::tempdir().unwrap();
    let s = common::start_with(repo.path(), |c| {
        c.capture.dir = Some(capture_dir.path().to_path_buf());
    })
    .await;
    // The client's id comes back in the body and the header.
    let (st, header, first) =
        infer(&s.http, "capjoin", Some("req-first"), [5.1, 3.5, 1.4, 0.2]).await;
    assert_eq!(st, 200, "{first}");
    assert_eq!(header, "req-first");
    assert_eq!(first["id"], "req-first");
    let first_label = label_of(&first);
    // Without one, a generated id, the same in both.
    let (_, header, body) = infer(&s.http, "capjoin", None, [6.7, 3.0, 5.2, 2.3]).await;
    assert!(header.starts_with("gen-"), "{header}");
    assert_eq!(body["id"], header.as_str());
    let generated = header;
    let generated_label = label_of(&body);
    // 10,000 other requests, eight at a time.
    let mut tasks = Vec::new();
    for t in 0..8 {
        let http = s.http.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..1250 {
                let x = (i % 50) as f32 / 10.0;
                let (st, _, _) = infer(
                    &http,
                    "capjoin",
                    Some(&format!("bulk-{t}-{i}")),
                    [x, 3.0, x, 1.0],
                )
                .await;
                assert_eq!(st, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (st, answer) = post(
        &s.http,
        "/v2/models/capjoin/feedback",
        json!({"feedback": [
            {"id": "req-first", "label": first_label},
            {"id": generated, "label": (generated_label + 1) % 3},
            {"id": "never-sent", "label": 1},
            {"id": "req-first", "value": 0.5},
            {"id": "req-first", "label": "two"},
            {"id": 7, "label": 1},
            {"id": "req-first"},
            "not an item",
        ]}),
    )
    .await;
    assert_eq!(st, 200, "{answer}");
    let statuses: Vec<&str> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "joined",
            "joined",
            "unknown",
            "malformed",
            "malformed",
            "malformed",
            "malformed",
            "malformed"
        ],
        "{answer}"
    );
    assert_eq!(answer["joined"], 2);
    assert_eq!(answer["unknown"], 1);
    assert_eq!(answer["malformed"], 5);
    // Every malformed item says why.
    for r in answer["results"].as_array().unwrap() {
        if r["status"] == "malformed" {
            assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
        }
    }
    // A whole-call error only for what is not a list of items, or an unknown model.
    let (st, _) = post(&s.http, "/v2/models/capjoin/feedback", json!({"items": []})).await;
    assert_eq!(st, 400);
    let (st, _) = post(
        &s.http,
        "/v2/models/nosuch/feedback",
        json!({"feedback": []}),
    )
    .await;
    assert_eq!(st, 404);
    let text = s.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "modelgate_feedback_total",
            "model=\"capjoin\",outcome=\"unknown\""
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "modelgate_feedback_total",
            "model=\"capjoin\",outcome=\"joined\""
        ),
        2.0
    );
    // Flushed: the files are visible, with every request, and the joined feedback.
    let (st, flushed) = post(&s.http, "/admin/capture/flush", json!({})).await;
    assert_eq!(st, 200, "{flushed}");
    let files = parquet_files(capture_dir.path());
    let capture: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.starts_with(capture_dir.path().join("capjoin/2")))
        .collect();
    assert!(!capture.is_empty(), "{files:?}");
    for f in &capture {
        let parent = f.parent().unwrap().file_name().unwrap().to_str().unwrap();
        assert!(parent.starts_with("date=20"), "{}", f.display());
    }
    let batches: Vec<RecordBatch> = capture.iter().flat_map(|f| read(f)).collect();
    let ids: Vec<String> = batches.iter().flat_map(|b| strings(b, "id")).collect();
    assert_eq!(ids.len(), 10_002);
    assert!(ids.contains(&"req-first".to_string()));
    assert!(ids.contains(&generated));
    // The first record holds what was sent and answered.
    let b = batches
        .iter()
        .find(|b| strings(b, "id").contains(&"req-first".to_string()))
        .unwrap();
    let row = strings(b, "id")
        .iter()
        .position(|i| i == "req-first")
        .unwrap();
    let x = b
        .column_by_name("X")
        .unwrap()
        .as_any()
        .downcast_ref::<ListArray>()
        .unwrap()
        .value(row);
    let x = x
        .as_any()
        .downcast_ref::<arrow_array::Float32Array>()
        .unwrap();
    assert_eq!(x.values().to_vec(), vec![5.1f32, 3.5, 1.4, 0.2]);
    let label = b
        .column_by_name("label")
        .unwrap()
        .as_any()
        .downcast_ref::<ListArray>()
        .unwrap()
        .value(row);
    let label = label.as_any().downcast_ref::<Int64Array>().unwrap();
    assert_eq!(label.values().to_vec(), vec![first_label]);
    assert_eq!(strings(b, "variant")[row], "stable");
    assert_eq!(ints(b, "version")[row], Some(2));
    let feedback: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.starts_with(capture_dir.path().join("capjoin/feedback")))
        .collect();
    assert_eq!(feedback.len(), 1, "{files:?}");
    let fb = read(feedback[0]);
    let fb_ids: Vec<String> = fb.iter().flat_map(|b| strings(b, "id")).collect();
    assert_eq!(fb_ids, vec!["req-first".to_string(), generated.clone()]);
    let labels: Vec<Option<i64>> = fb.iter().flat_map(|b| ints(b, "label")).collect();
    let predicted: Vec<Option<i64>> = fb.iter().flat_map(|b| ints(b, "predicted_label")).collect();
    assert_eq!(
        labels,
        vec![Some(first_label), Some((generated_label + 1) % 3)]
    );
    assert_eq!(predicted, vec![Some(first_label), Some(generated_label)]);
    // The admin view counts it all.
    let state: Value = reqwest::get(format!("{}/admin/capture", s.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["records_written"], 10_002, "{state}");
    assert_eq!(state["records_dropped"], 0, "{state}");
    assert_eq!(state["feedback_joined"], 2, "{state}");
    assert_eq!(state["feedback_unknown"], 1, "{state}");
    assert_eq!(state["writing"], true, "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_for_an_expired_prediction_is_expired_and_a_small_index_forgets() {
    let repo = iris_repo("capexpire", "");
    let capture_dir = tempfile::tempdir().unwrap();
    let s = common::start_with(repo.path(), |c| {
        c.capture.dir = Some(capture_dir.path().to_path_buf());
        c.capture.feedback_max_age_secs = 1;
        c.capture.feedback_index_size = 3;
    })
    .await;
    infer(&s.http, "capexpire", Some("old"), [5.1, 3.5, 1.4, 0.2]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..3 {
        infer(
            &s.http,
            "capexpire",
            Some(&format!("new-{i}")),
            [5.1, 3.5, 1.4, 0.2],
        )
        .await;
    }
    infer(&s.http, "capexpire", Some("newest"), [5.1, 3.5, 1.4, 0.2]).await;
    let (_, a) = post(
        &s.http,
        "/v2/models/capexpire/feedback",
        json!({"feedback": [{"id": "new-0", "label": 0}, {"id": "newest", "label": 0}, {"id": "old", "label": 0}]}),
    )
    .await;
    let statuses: Vec<&str> = a["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    // new-0 was pushed out by the size limit; old had gone the same way.
    assert_eq!(statuses, ["unknown", "joined", "unknown"], "{a}");

    // An index with room: the old prediction is expired, not unknown.
    let repo2 = iris_repo("capexpire2", "");
    let dir2 = tempfile::tempdir().unwrap();
    let s2 = common::start_with(repo2.path(), |c| {
        c.capture.dir = Some(dir2.path().to_path_buf());
        c.capture.feedback_max_age_secs = 1;
    })
    .await;
    infer(&s2.http, "capexpire2", Some("old"), [5.1, 3.5, 1.4, 0.2]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, a) = post(
        &s2.http,
        "/v2/models/capexpire2/feedback",
        json!({"feedback": [{"id": "old", "label": 0}]}),
    )
    .await;
    assert_eq!(a["results"][0]["status"], "expired", "{a}");
    assert_eq!(a["expired"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_leaves_no_visible_half_written_file_and_the_next_start_cleans_up() {
    let repo = iris_repo("capkill", "");
    let capture_dir = tempfile::tempdir().unwrap();
    let dir = capture_dir.path().to_path_buf();
    let mut spawned = common::spawn_with(repo.path(), |c| {
        c.capture.dir = Some(dir.clone());
    })
    .await;
    for i in 0..200 {
        let (st, _, _) = infer(
            &spawned.http,
            "capkill",
            Some(&format!("a-{i}")),
            [5.0, 3.0, 1.5, 0.2],
        )
        .await;
        assert_eq!(st, 200);
    }
    let (st, _) = post(&spawned.http, "/admin/capture/flush", json!({})).await;
    assert_eq!(st, 200);
    for i in 0..200 {
        infer(
            &spawned.http,
            "capkill",
            Some(&format!("b-{i}")),
            [5.0, 3.0, 1.5, 0.2],
        )
        .await;
    }
    // The second file is being written (its first row group out after a second).
    let until = Instant::now() + Duration::from_secs(10);
    while !all_files(&dir)
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".inprogress"))
    {
        assert!(
            Instant::now() < until,
            "no file in progress: {:?}",
            all_files(&dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    spawned.child.kill().unwrap();
    spawned.child.wait().unwrap();
    // What a reader sees: only closed, complete files.
    let visible = parquet_files(&dir);
    assert_eq!(visible.len(), 1, "{visible:?}");
    let ids: Vec<String> = read(&visible[0])
        .iter()
        .flat_map(|b| strings(b, "id"))
        .collect();
    assert_eq!(ids.len(), 200);
    assert!(ids.iter().all(|i| i.starts_with("a-")));
    for p in all_files(&dir) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.ends_with(".parquet") || name.starts_with('.'),
            "a reader would see {name}"
        );
    }
    // The next start removes the leftover and captures on.
    let s = common::start_with(repo.path(), |c| {
        c.capture.dir = Some(dir.clone());
    })
    .await;
    infer(&s.http, "capkill", Some("c-0"), [5.0, 3.0, 1.5, 0.2]).await;
    post(&s.http, "/admin/capture/flush", json!({})).await;
    assert!(
        !all_files(&dir)
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".inprogress")),
        "{:?}",
        all_files(&dir)
    );
    assert_eq!(parquet_files(&dir).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_capture_counted_and_serving_goes_on() {
    let repo = iris_repo("capfull", "");
    let disk = common::Tmpfs::mount(256);
    let s = common::start_with(repo.path(), |c| {
        c.capture.dir = Some(disk.0.clone());
    })
    .await;
    let filler = common::fill(&disk.0);
    for i in 0..600 {
        let (st, _, body) = infer(
            &s.http,
            "capfull",
            Some(&format!("f-{i}")),
            [5.0, 3.0, 1.5, 0.2],
        )
        .await;
        assert_eq!(st, 200, "{body}");
    }
    // The writer tries to write, fails, and stops.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        // Closing the file is when its bytes must reach the disk.
        post(&s.http, "/admin/capture/flush", json!({})).await;
        let state: Value = reqwest::get(format!("{}/admin/capture", s.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if state["writing"] == false && state["records_dropped"].as_u64() > Some(0) {
            assert!(state["last_error"].as_str().is_some(), "{state}");
            break;
        }
        assert!(
            Instant::now() < until,
            "a full disk was not noticed: {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = s.metrics_text().await;
    assert!(
        metric(
            &text,
            "modelgate_capture_dropped_total",
            "model=\"capfull\",reason=\"write_error\""
        ) > 0.0,
        "{text}"
    );
    // Still serving.
    let (st, _, _) = infer(&s.http, "capfull", None, [5.0, 3.0, 1.5, 0.2]).await;
    assert_eq!(st, 200);
    // Space again: capture resumes after its pause.
    std::fs::remove_file(filler).unwrap();
    tokio::time::sleep(modelgate::capture::writer::PAUSE + Duration::from_millis(500)).await;
    infer(&s.http, "capfull", Some("after"), [5.0, 3.0, 1.5, 0.2]).await;
    let (st, _) = post(&s.http, "/admin/capture/flush", json!({})).await;
    assert_eq!(st, 200);
    let ids: Vec<String> = parquet_files(&disk.0)
        .iter()
        .flat_map(|f| read(f))
        .flat_map(|b| strings(&b, "id"))
        .collect();
    assert!(ids.contains(&"after".to_string()), "{ids:?}");
    drop(s);
}

/// `model.quality` events written to the outbox (its receiver is not listening).
fn quality_events(outbox: &Path) -> Vec<Value> {
    all_files(outbox)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let pending: Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
            serde_json::from_str::<Value>(pending["body"].as_str()?).ok()
        })
        .filter(|e| e["type"] == "model.quality")
        .collect()
}

/// Sends `requests` iris requests of 50 rows over HTTP and labels every row: the
/// truth is the prediction, except for a random tenth of the rows (a wrong class), and, with
/// `flip_class`, every row predicted as that class. Returns (rows, correct) and stops
/// early once `until_event` sees an event.
async fn labelled_traffic(
    s: &common::TestServer,
    model: &str,
    requests: usize,
    flip_class: Option<i64>,
    outbox: &Path,
    until_event: bool,
) -> (u64, u64) {
    let iris = iris_rows();
    let client = reqwest::Client::new();
    let (mut rows, mut correct) = (0u64, 0u64);
    let mut rng = fastrand::Rng::with_seed(17);
    for r in 0..requests {
        let id = format!("{model}-{r}");
        let (_, predicted) = predict_iris(&client, &s.http, model, &id, &iris, r, 50).await;
        let truth: Vec<i64> = predicted
            .iter()
            .map(|&p| {
                if rng.f64() < 0.1 || flip_class == Some(p) {
                    (p + 1) % 3
                } else {
                    p
                }
            })
            .collect();
        rows += truth.len() as u64;
        correct += truth.iter().zip(&predicted).filter(|(t, p)| t == p).count() as u64;
        let (st, a) = post(
            &s.http,
            &format!("/v2/models/{model}/feedback"),
            json!({"feedback": [{"id": id, "label": truth}]}),
        )
        .await;
        assert_eq!(st, 200, "{a}");
        assert_eq!(a["joined"], 1, "{a}");
        if until_event && !quality_events(outbox).is_empty() {
            break;
        }
    }
    (rows, correct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_alarms_for_a_worse_version_within_two_windows_and_never_for_an_unchanged_one() {
    let _cpu = common::cpu_heavy().await;
    // Reference accuracy 0.9: what the unchanged version has on this traffic.
    let quality = "reference_accuracy = 0.9\nquality_window = 500\n";
    let repo = iris_repo("capqgood", quality);
    let bad = iris_repo("capqbad", quality);
    for e in std::fs::read_dir(bad.path()).unwrap().flatten() {
        std::fs::rename(e.path(), repo.path().join(e.file_name())).unwrap();
    }
    let capture_dir = tempfile::tempdir().unwrap();
    let outbox = tempfile::tempdir().unwrap();
    // A receiver that is not there: events stay in the outbox, where the test reads them.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let s = common::start_with(repo.path(), |c| {
        c.capture.dir = Some(capture_dir.path().to_path_buf());
        c.drift.outbox = Some(outbox.path().to_path_buf());
        c.drift.allow_private_webhooks = true;
        c.drift.webhook_initial_backoff_ms = 60_000;
        c.drift.webhooks = vec![modelgate::outbox::WebhookTarget {
            name: "quality".into(),
            url: format!("http://127.0.0.1:{port}/hook"),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        }];
    })
    .await;
    // Class 2 answered wrong on purpose: within two windows (1,000 labelled rows, and
    // the request that completes the second one), model.quality fires.
    let (rows, _) = labelled_traffic(&s, "capqbad", 100, Some(2), outbox.path(), true).await;
    let events = quality_events(outbox.path());
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(rows <= 1_050, "raised only after {rows} labelled rows");
    let d = &events[0]["data"];
    assert_eq!(d["model"], "capqbad");
    assert_eq!(d["version"], 2);
    assert_eq!(d["metric"], "accuracy");
    assert_eq!(d["reference"], 0.9);
    assert!(d["live"].as_f64().unwrap() < 0.8, "{d}");
    // The version's lineage, so that a retrainer sees what got worse (issue 19).
    assert_eq!(d["lineage"]["source"], "models/generate.py", "{d}");
    assert_eq!(d["lineage"]["metrics"]["training_accuracy"], 0.987, "{d}");
    // It names the capture and feedback files that cover the window, and they exist.
    let files = d["capture"]["files"].as_array().unwrap();
    assert!(!files.is_empty(), "{d}");
    for f in files
        .iter()
        .chain(d["capture"]["feedback_files"].as_array().unwrap())
    {
        let p = capture_dir.path().join(f.as_str().unwrap());
        assert!(!read(&p).is_empty(), "{}", p.display());
    }
    // The unchanged version: 100,000 labelled rows, no event, and the accuracy it
    // reports is the one counted here.
    let (rows, correct) = labelled_traffic(&s, "capqgood", 2_000, None, outbox.path(), false).await;
    assert_eq!(rows, 100_000);
    assert_eq!(
        quality_events(outbox.path()).len(),
        1,
        "an unchanged version raised an alarm"
    );
    // The writer thread joins the last feedback a moment after it was accepted.
    let until = Instant::now() + Duration::from_secs(15);
    let q = loop {
        let state: Value = reqwest::get(format!("{}/admin/capture", s.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let q = state["quality"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["model"] == "capqgood")
            .unwrap()
            .clone();
        if q["rows"] == 100_000 || Instant::now() >= until {
            break q;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(q["rows"], 100_000, "{q}");
    assert_eq!(q["state"], "OK", "{q}");
    assert_eq!(q["windows_tested"], 200, "{q}");
    let accuracy = q["accuracy"].as_f64().unwrap();
    assert!(
        (accuracy - correct as f64 / rows as f64).abs() < 1e-12,
        "{accuracy} vs {correct}/{rows}"
    );
    let text = s.metrics_text().await;
    let exported = metric(&text, "modelgate_quality_accuracy", "model=\"capqgood\"");
    assert!((exported - accuracy).abs() < 1e-9, "{exported}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_grpc_answer_names_its_generated_id_and_feedback_joins_by_it() {
    use modelgate::proto as pb;
    let repo = iris_repo("capgrpc", "");
    let capture_dir = tempfile::tempdir().unwrap();
    let s = common::start_with(repo.path(), |c| {
        c.capture.dir = Some(capture_dir.path().to_path_buf());
    })
    .await;
    let mut c =
        pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(s.grpc.clone())
            .await
            .unwrap();
    let req = pb::ModelInferRequest {
        model_name: "capgrpc".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![common::f32_bytes(&[6.7, 3.0, 5.2, 2.3]).into()],
        ..Default::default()
    };
    let r = c.model_infer(req).await.unwrap();
    // Captured: the generated id is in the body and in the metadata, and only it (the
    // rest of the answer metadata is off by default).
    let header = r.metadata().get("x-request-id").unwrap().to_str().unwrap();
    assert!(header.starts_with("gen-"), "{header}");
    assert_eq!(r.get_ref().id, header);
    assert!(r.metadata().get("x-variant").is_none());
    let label = r
        .get_ref()
        .outputs
        .iter()
        .position(|o| o.name == "label")
        .map(|i| i64::from_le_bytes(r.get_ref().raw_output_contents[i][..8].try_into().unwrap()))
        .unwrap();
    let (st, answer) = post(
        &s.http,
        "/v2/models/capgrpc/feedback",
        json!({"feedback": [{"id": header, "label": label}]}),
    )
    .await;
    assert_eq!(st, 200, "{answer}");
    assert_eq!(answer["joined"], 1, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drift_event_names_the_captured_files_of_its_window() {
    use crate::drift::{Receiver, iris_repo as drift_repo, iris_rows, send, target};
    use arrow_array::TimestampMillisecondArray;
    let _cpu = common::cpu_heavy().await;
    // Drift on (the version's profile), capture of every request.
    let repo = drift_repo(
        "capdrift",
        "cooldown_secs = 0\n[capture]\nenabled = true\nsample_rate = 1.0\n",
    );
    let capture_dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    let (addr, _stop) = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let s = common::start_with(repo.path(), |c| {
        c.capture.dir = Some(capture_dir.path().to_path_buf());
        c.drift.webhooks = vec![target("capdrift", addr.port())];
        c.drift.webhook_initial_backoff_ms = 100;
        c.drift.allow_private_webhooks = true;
    })
    .await;
    let rows = iris_rows();
    let started_ms = modelgate::util::now_ms();
    // Petal length shifted by a lot: an event within a few hundred rows.
    let mut sent = 0;
    while receiver.deliveries().is_empty() {
        assert!(sent < 3000, "no webhook after {sent} shifted requests");
        send(&s.grpc, "capdrift", &rows, 100, 8, 2.0).await;
        sent += 100;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let e = receiver.deliveries()[0].body.clone();
    assert_eq!(e["type"], "model.drift", "{e}");
    let w = &e["data"]["window"];
    let (from, to) = (w["from_ms"].as_u64().unwrap(), w["to_ms"].as_u64().unwrap());
    assert!(started_ms <= from && from <= to, "{w}");
    assert!(w["from"].as_str().unwrap().ends_with('Z'), "{w}");
    // The event names closed capture files of that version; they hold rows of the window.
    let c = &e["data"]["capture"];
    assert_eq!(c["dir"], capture_dir.path().display().to_string(), "{c}");
    let files = c["files"].as_array().unwrap();
    assert!(!files.is_empty(), "{c}");
    let mut in_window = 0;
    for f in files {
        let rel = f.as_str().unwrap();
        assert!(rel.starts_with("capdrift/2/date="), "{rel}");
        let path = capture_dir.path().join(rel);
        assert!(
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("part-"),
            "{rel}"
        );
        for b in read(&path) {
            let t = b
                .column_by_name("time")
                .unwrap()
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .unwrap();
            in_window += (0..t.len())
                .filter(|&i| (from as i64..=to as i64).contains(&t.value(i)))
                .count();
        }
    }
    let window_rows = e["data"]["samples"]["window_rows"].as_u64().unwrap();
    assert!(
        in_window as u64 >= window_rows.min(100),
        "{in_window} captured rows in the window of {window_rows}"
    );
    assert_eq!(c["feedback_rows"], 0, "{c}");
}

/// Iris versions 1 and 2 (copies of one file) as `name`, capture on for every request.
pub(crate) fn iris_pair(repo: &Path, name: &str) {
    for v in ["1", "2"] {
        let dir = repo.join(name).join(v);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            common::root().join("models/iris/2/model.onnx"),
            dir.join("model.onnx"),
        )
        .unwrap();
    }
    std::fs::write(
        repo.join(name).join("config.toml"),
        "version_policy = \"all\"\n[capture]\nenabled = true\nsample_rate = 1.0\n",
    )
    .unwrap();
}

/// Request `id` to `model` at `base`: `n` iris rows from row `r * n` on (wrapping).
/// Returns the version that answered and its predicted labels.
async fn predict_iris(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    id: &str,
    iris: &[[f32; 4]],
    r: usize,
    n: usize,
) -> (String, Vec<i64>) {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| iris[(r * n + i) % iris.len()])
        .collect();
    let resp: Value = client
        .post(format!("{base}/v2/models/{model}/infer"))
        .json(&json!({"id": id, "inputs": [{"name": "X", "shape": [n, 4], "datatype": "FP32", "data": data}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let predicted = resp["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("{resp}"))
        .iter()
        .find(|o| o["name"] == "label")
        .unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    (
        resp["model_version"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        predicted,
    )
}

/// One labelled iris request to `model` at `base` (5 rows, request `r`), its rows
/// labelled at once at the same server: the truth is the prediction but for a random
/// tenth of the rows, and, with `bad_canary`, for rows version 2 answered as class 2, a
/// wrong class (a canary that is worse on labelled traffic only: its answers agree with
/// stable's).
pub(crate) async fn labelled_request(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    iris: &[[f32; 4]],
    r: usize,
    bad_canary: bool,
    rng: &mut fastrand::Rng,
) {
    let id = format!("{model}-{r}");
    let (version, predicted) = predict_iris(client, base, model, &id, iris, r, 5).await;
    let canary = version == "2";
    let truth: Vec<i64> = predicted
        .into_iter()
        .map(|p| {
            if rng.f64() < 0.1 || (bad_canary && canary && p == 2) {
                (p + 1) % 3
            } else {
                p
            }
        })
        .collect();
    let (st, a) = post(
        base,
        &format!("/v2/models/{model}/feedback"),
        json!({"feedback": [{"id": id, "label": truth}]}),
    )
    .await;
    assert_eq!((st, &a["joined"]), (200, &json!(1)), "{a}");
}

/// Labelled iris traffic to `model` ([`labelled_request`]) until its rollout ends.
/// Returns the routing once the rollout ended.
async fn labelled_until_rollout_ends(
    s: &common::TestServer,
    model: &str,
    bad_canary: bool,
) -> Value {
    let mut rng = fastrand::Rng::with_seed(5);
    let client = reqwest::Client::new();
    let iris = iris_rows();
    let deadline = Instant::now() + Duration::from_secs(240);
    for r in 0.. {
        if r % 50 == 0 {
            let t: Value = reqwest::get(format!("{}/admin/models/{model}/traffic", s.http))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if t["routing"]["rollout"].is_null() {
                return t["routing"].clone();
            }
            assert!(Instant::now() < deadline, "the rollout did not end: {t}");
        }
        labelled_request(&client, &s.http, model, &iris, r, bad_canary, &mut rng).await;
    }
    unreachable!()
}

/// The rollout judge's quality criterion on real joined feedback: a canary whose
/// answers agree with stable's but are wrong on one class of labelled traffic rolls
/// back at the end of its first step on accuracy alone; the same canary with labels as
/// good as stable's promotes, the accuracy check passing at each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_worse_on_labelled_traffic_rolls_back_and_an_equal_one_promotes() {
    let _cpu = common::cpu_heavy().await;
    let repo = tempfile::tempdir().unwrap();
    iris_pair(repo.path(), "qworse");
    iris_pair(repo.path(), "qequal");
    let capture_dir = tempfile::tempdir().unwrap();
    let s = common::start_with(repo.path(), |c| {
        c.capture.dir = Some(capture_dir.path().to_path_buf());
        c.traffic.controller_tick_ms = 200;
    })
    .await;
    let plan = json!({"steps": [50, 100], "interval_secs": 1, "min_requests": 20,
                      "max_accuracy_drop": 0.05, "min_labelled": 300});
    for m in ["qworse", "qequal"] {
        let (st, body) = {
            let resp = reqwest::Client::new()
                .put(format!("{}/admin/models/{m}/traffic", s.http))
                .json(&json!({"stable": 1, "canary": {"version": 2, "weight": 0}, "rollout": {"plan": plan}}))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        };
        assert_eq!(st, 200, "{body}");
    }
    let audit = |m: &'static str| {
        let http = s.http.clone();
        async move {
            reqwest::get(format!("{http}/admin/audit?model={m}"))
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
                .as_array()
                .unwrap()
                .clone()
        }
    };
    let accuracy = |e: &Value| crate::rollout::check(&e["analysis"], "accuracy").clone();

    let routing = labelled_until_rollout_ends(&s, "qworse", true).await;
    assert_eq!(routing["rejected"], json!([2]), "{routing}");
    let entries = audit("qworse").await;
    let last = entries.last().unwrap();
    assert_eq!(last["action"], "rollback", "{last}");
    assert_eq!(last["analysis"]["step"], 1, "{last}");
    let a = accuracy(last);
    assert_eq!(a["status"], "breach", "{a}");
    assert!(a["observed"].as_f64().unwrap() < 0.75, "{a}");
    assert!(a["threshold"].as_f64().unwrap() > 0.8, "{a}");
    assert!(a["of"].as_u64().unwrap() >= 300, "{a}");
    // Accuracy alone: the answers themselves agree with stable's.
    let checks = last["analysis"]["checks"].as_array().unwrap();
    let breached: Vec<&Value> = checks.iter().filter(|c| c["status"] == "breach").collect();
    assert_eq!(breached.len(), 1, "{checks:?}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("accuracy on labelled traffic"),
        "{last}"
    );

    let routing = labelled_until_rollout_ends(&s, "qequal", false).await;
    assert_eq!(routing["stable"], 2, "{routing}");
    let entries = audit("qequal").await;
    let decided: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "advance" || e["action"] == "promote")
        .collect();
    assert_eq!(decided.len(), 2, "{entries:?}");
    for e in decided {
        let a = accuracy(e);
        assert_eq!(a["status"], "pass", "{a}");
        assert!(a["of"].as_u64().unwrap() >= 300, "{a}");
    }
    // The counts the judge read are the ones /admin/capture shows.
    let state: Value = reqwest::get(format!("{}/admin/capture", s.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let q = state["quality"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["model"] == "qworse" && q["variant"] == "canary")
        .unwrap()
        .clone();
    assert_eq!(q["rows"], q["class_rows"], "{q}");
    assert!(
        q["correct"].as_u64().unwrap() < q["rows"].as_u64().unwrap(),
        "{q}"
    );
}

/// `modelgate profile --label-column` measures the version's accuracy on labelled
/// data (or on `--validation-data`), the profile carries it, and the live quality is
/// tested against it when the config sets no reference; bad label columns are clear
/// errors that write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labelled_profile_is_the_reference_of_live_quality() {
    let repo = iris_repo("capprof", "quality_window = 500\n");
    let dir = tempfile::tempdir().unwrap();
    // The training data with its species (50 rows each, in order), label in the middle.
    let mut csv = String::from("sepal_length,sepal_width,species,petal_length,petal_width\n");
    let mut validation = csv.clone();
    for (i, r) in iris_rows().iter().enumerate() {
        let line = format!("{},{},{},{},{}\n", r[0], r[1], i / 50, r[2], r[3]);
        csv.push_str(&line);
        if i % 3 == 0 {
            validation.push_str(&line);
        }
    }
    let (train, held_out) = (dir.path().join("train.csv"), dir.path().join("val.csv"));
    std::fs::write(&train, csv).unwrap();
    std::fs::write(&held_out, validation).unwrap();
    let profile = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .args(["profile", "--model-repository"])
            .arg(repo.path())
            .args(["--model", "capprof", "--version", "2", "--data"])
            .arg(&train)
            .args(extra)
            .output()
            .unwrap()
    };
    let path = repo.path().join("capprof/2/profile.json");
    for (args, error) in [
        (vec!["--label-column", "colour"], "no such column"),
        (
            vec!["--validation-data", held_out.to_str().unwrap()],
            "needs --label-column",
        ),
    ] {
        let out = profile(&args);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(error), "{stderr}");
        assert!(!path.exists());
    }
    let out = profile(&["--label-column", "species"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reference accuracy 0.9867 on 150 labelled rows"),
        "{stdout}"
    );
    let p: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    // The label is not a feature.
    let names: Vec<&str> = p["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    );
    assert_eq!(p["quality"]["rows"], 150);
    // 148 of 150: the bundled version's training accuracy (its model.toml says 0.987).
    assert!(
        (p["quality"]["accuracy"].as_f64().unwrap() - 148.0 / 150.0).abs() < 1e-12,
        "{p}"
    );
    let out = profile(&[
        "--label-column",
        "2",
        "--validation-data",
        held_out.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        (&p["rows"], &p["quality"]["rows"]),
        (&json!(150), &json!(50)),
        "{p}"
    );
    let reference = p["quality"]["accuracy"].as_f64().unwrap();

    // Served: live quality is tested against the profile's accuracy.
    let outbox = tempfile::tempdir().unwrap();
    let capture_dir = tempfile::tempdir().unwrap();
    let s = common::start_with(repo.path(), |c| {
        c.capture.dir = Some(capture_dir.path().to_path_buf());
        c.drift.outbox = Some(outbox.path().to_path_buf());
    })
    .await;
    labelled_traffic(&s, "capprof", 10, None, outbox.path(), false).await;
    let state: Value = reqwest::get(format!("{}/admin/capture", s.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let q = state["quality"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["model"] == "capprof")
        .unwrap()
        .clone();
    assert_eq!(q["reference_source"], "profile", "{q}");
    assert_eq!(q["reference"].as_f64().unwrap(), reference, "{q}");
    assert_eq!(q["windows_tested"], 1, "{q}");
}
