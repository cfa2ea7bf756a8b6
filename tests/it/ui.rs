//! The operator's page (`/ui`) in a real browser: headless Chromium (Debian's
//! `chromium`, installed by scripts/test.sh) driven over the DevTools protocol, against
//! a real gateway with a canary rollout half way (one step judged and passed, the next
//! running), a drifted model whose webhook was delivered, and a few quiet models. The
//! test reads the rendered page (model names, the rollout's steps and verdict numbers,
//! the drawn feature histograms, the outbox), clicks rollback with a read-only token,
//! without a token and with an operator token, checks each outcome on the admin API,
//! saves screenshots (laptop and phone) under target/ui-test/, and fails on any
//! JavaScript error or console error (a Content-Security-Policy violation included; the
//! refusals the test provokes on purpose are logged by Chromium as network errors and
//! are the only ones allowed).
//!
//! The JSON views the page reads (`/admin/overview`, `/admin/models/{m}/rollout`,
//! `/admin/drift/{m}/histograms`, `/admin/outbox`) are checked over plain HTTP too.

use crate::common;
use crate::drift as drift_it;
use crate::rollout as rollout_it;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use modelgate::api::auth::{NamedToken, Permission, token_hash};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const ADMIN: &str = "ui-admin-token-4d1f";
const VIEWER: &str = "ui-viewer-token-9c2e";

/// A headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    child: std::process::Child,
    _profile: tempfile::TempDir,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    /// Every event received so far (console messages, exceptions, log entries).
    events: Vec<Value>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn launch(width: u32, height: u32) -> Browser {
        let bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(&bin)
            .args([
                "--headless",
                // Root (CI) has no user namespace sandbox to offer.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--hide-scrollbars",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}): install Debian's chromium (scripts/test.sh does)")
            });
        // Chromium writes the port it took into the profile folder.
        let port_file = profile.path().join("DevToolsActivePort");
        let until = Instant::now() + Duration::from_secs(60);
        let port: u16 = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                break p;
            }
            assert!(
                Instant::now() < until,
                "chromium did not open its DevTools port"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The page target's socket.
        let url = loop {
            let list: Value = match reqwest::get(format!("http://127.0.0.1:{port}/json/list")).await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            if let Some(u) = list.as_array().and_then(|l| {
                l.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
            }) {
                break u;
            }
            assert!(Instant::now() < until, "chromium lists no page: {list}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("DevTools socket");
        let mut b = Browser {
            child,
            _profile: profile,
            ws,
            next_id: 0,
            events: Vec::new(),
        };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            b.call(domain, json!({})).await;
        }
        b.viewport(width, height, false).await;
        b
    }

    /// Sends one command and waits for its answer (events meanwhile are kept).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(Message::text(msg))
            .await
            .expect("send to chromium");
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let next = tokio::time::timeout_at(until, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method}"))
                .expect("DevTools socket closed")
                .expect("DevTools socket");
            let Message::Text(text) = next else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    panic!("{method} failed: {e}");
                }
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    async fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }

    async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for("document.readyState === 'complete'", "the page to load", 30)
            .await;
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("evaluating {expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is truthy; returns its value.
    async fn wait_for(&mut self, expr: &str, what: &str, secs: u64) -> Value {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.eval(expr).await;
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            if Instant::now() > until {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!("waited {secs} s for {what} ({expr}); the page says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A real mouse click in the middle of the element `selector`.
    async fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let rect = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 return {{x: r.x + r.width / 2, y: r.y + r.height / 2, disabled: !!e.disabled}}; }})()"
            ))
            .await;
        assert!(rect.is_object(), "no element {selector} to click");
        assert_eq!(rect["disabled"], false, "{selector} is disabled");
        let (x, y) = (rect["x"].as_f64().unwrap(), rect["y"].as_f64().unwrap());
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await;
        }
    }

    /// Clicks into `selector` and types `text` as keyboard input.
    async fn type_into(&mut self, selector: &str, text: &str) {
        self.click(selector).await;
        self.call("Input.insertText", json!({"text": text})).await;
    }

    /// A screenshot of the whole page (at most 5,000 pixels tall) into `path`.
    async fn screenshot(&mut self, path: &Path) {
        let m = self.call("Page.getLayoutMetrics", json!({})).await;
        let size = &m["cssContentSize"];
        let (w, h) = (
            size["width"].as_f64().unwrap(),
            size["height"].as_f64().unwrap().min(5000.0),
        );
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true,
                       "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        std::fs::write(path, png).expect("write screenshot");
    }

    /// JavaScript errors and console errors so far, but for network errors (the
    /// answers the test provokes on purpose: 401 and 403).
    fn errors(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter(|e| match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => true,
                Some("Runtime.consoleAPICalled") => {
                    matches!(e["params"]["type"].as_str(), Some("error" | "assert"))
                }
                Some("Log.entryAdded") => {
                    let entry = &e["params"]["entry"];
                    entry["level"] == "error" && entry["source"] != "network"
                }
                _ => false,
            })
            .cloned()
            .collect()
    }

    /// The network errors logged so far (their texts).
    fn network_errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| {
                e["method"] == "Log.entryAdded" && e["params"]["entry"]["source"] == "network"
            })
            .map(|e| {
                e["params"]["entry"]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }
}

fn out_dir() -> PathBuf {
    let d = common::root().join("target/ui-test");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tokens(c: &mut modelgate::config::Config) {
    c.admin_token = Some(ADMIN.into());
    c.auth.tokens = vec![NamedToken {
        name: "viewer".into(),
        sha256: hex::encode(token_hash(VIEWER)),
        permissions: vec![Permission::Read],
    }];
}

async fn get(s: &common::TestServer, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new().get(format!("{}{path}", s.http));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn routing(s: &common::TestServer, model: &str) -> Value {
    let (st, v) = get(s, &format!("/admin/models/{model}/traffic"), Some(ADMIN)).await;
    assert_eq!(st, 200, "{v}");
    v["routing"].clone()
}

/// A repository with `rollme` (stable 1, candidate 2), the drift test's iris as
/// `driftiris`, and quiet models `quiet1..=n`.
fn repo(quiet: usize) -> tempfile::TempDir {
    let repo = drift_it::iris_repo("driftiris", drift_it::QUICK);
    rollout_it::add_model(repo.path(), "rollme", &[1, 2]);
    for i in 1..=quiet {
        rollout_it::add_model(repo.path(), &format!("quiet{i}"), &[1]);
    }
    repo
}

/// Starts a rollout of rollme 2 over 1 and drives traffic until its first step is
/// judged (passed): the rollout then waits in its second step, where no traffic comes.
async fn rollout_half_way(s: &common::TestServer) {
    let resp = reqwest::Client::new()
        .put(format!("{}/admin/models/rollme/traffic", s.http))
        .bearer_auth(ADMIN)
        .json(&json!({"stable": 1, "canary": {"version": 2, "weight": 0},
                      "rollout": {"plan": {"steps": [25, 50, 100], "interval_secs": 2}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let load = rollout_it::Load::start(&s.http, vec!["rollme".into()], 2, rollout_it::row);
    let until = Instant::now() + Duration::from_secs(240);
    loop {
        let r = routing(s, "rollme").await;
        assert!(r.get("rollout").is_some(), "the rollout ended early: {r}");
        if r["rollout"]["step"] == 1 {
            break;
        }
        assert!(Instant::now() < until, "the first step was not judged: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_page_shows_models_rollout_and_drift_and_its_buttons_obey_the_tokens() {
    // Load for a rollout step, then a browser: not beside the tests that time things.
    let _cpu = common::cpu_heavy().await;
    let receiver = drift_it::Receiver::default();
    let (addr, _stop) = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let repo = repo(4);
    let s = common::start_with(repo.path(), |c| {
        tokens(c);
        c.traffic.controller_tick_ms = 200;
        c.drift.webhooks = vec![drift_it::target("hooks", addr.port())];
        c.drift.webhook_initial_backoff_ms = 100;
        c.drift.allow_private_webhooks = true;
    })
    .await;
    rollout_half_way(&s).await;
    // Petal length shifted by two units: the quick detector finds drift in a window.
    let rows = drift_it::iris_rows();
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        drift_it::send(&s.grpc, "driftiris", &rows, 300, 4, 2.0).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, d) = get(&s, "/admin/drift/driftiris", Some(VIEWER)).await;
        if d["windows"][0]["state"] == "DRIFT" && !receiver.deliveries().is_empty() {
            break;
        }
        assert!(Instant::now() < until, "no drift: {d}");
    }

    // A trickle of requests while the page is looked at (ten a second: the running step
    // needs a thousand to be judged), so that it has live rates to show.
    let trickle = tokio_util::sync::CancellationToken::new();
    let (t, http) = (trickle.clone(), s.http.clone());
    let trickling = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut i = 0;
        while !t.is_cancelled() {
            let body = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": rollout_it::row(i)}]});
            let resp = client
                .post(format!("{http}/v2/models/rollme/infer"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            i += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let dir = out_dir();
    let mut b = Browser::launch(1366, 900).await;
    b.goto(&format!("{}/ui", s.http)).await;
    // Without a token the admin API refuses, and the page says so.
    let banner = b
        .wait_for(
            "(() => { const e = document.getElementById('banner'); return !e.hidden && e.textContent; })()",
            "the refusal banner",
            20,
        )
        .await;
    assert!(
        banner
            .as_str()
            .unwrap()
            .contains("a valid admin bearer token is required"),
        "{banner}"
    );
    b.screenshot(&dir.join("01-no-token.png")).await;

    // A read-only token: everything is shown.
    b.type_into("#token", VIEWER).await;
    b.click("#token-use").await;
    let names = b
        .wait_for(
            "(() => { const n = [...document.querySelectorAll('details.card[data-model]')].map(e => e.dataset.model); return n.length >= 6 && n; })()",
            "the model cards",
            20,
        )
        .await;
    assert_eq!(
        names,
        json!([
            "driftiris",
            "quiet1",
            "quiet2",
            "quiet3",
            "quiet4",
            "rollme"
        ])
    );
    // The models that need attention open by themselves; the quiet ones stay closed.
    let open = b
        .eval("[...document.querySelectorAll('details.card[open]')].map(e => e.dataset.model)")
        .await;
    assert_eq!(open, json!(["driftiris", "rollme"]));
    // The rollout: step 1 passed with its numbers, step 2 running, step 3 to come.
    let rollme = "details.card[data-model='rollme']";
    let steps = b
        .wait_for(
            &format!("(() => {{ const s = [...document.querySelectorAll(\"{rollme} .timeline li\")].map(e => e.dataset.status); return s.length === 3 && s; }})()"),
            "the rollout timeline",
            20,
        )
        .await;
    assert_eq!(steps, json!(["passed", "running", "pending"]));
    let first = b
        .eval(&format!(
            "document.querySelector(\"{rollme} .timeline li[data-step='0']\").innerText"
        ))
        .await;
    let first = first.as_str().unwrap();
    for needle in [
        "25 %", "advance", "latency", "errors", "canary", "stable", "p99",
    ] {
        assert!(first.contains(needle), "step 1 lacks {needle}: {first}");
    }
    // The canary's request count the verdict stood on is on the page.
    let entries = get(&s, "/admin/audit?model=rollme", Some(VIEWER)).await.1;
    let advance = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "advance")
        .expect("an advance entry")
        .clone();
    let canary_requests = advance["analysis"]["canary"]["requests"].to_string();
    assert!(
        first.contains(&canary_requests),
        "{canary_requests} not in {first}"
    );
    // Versions with their state, role and live figures.
    let versions = b
        .wait_for(
            &format!("(() => {{ const t = document.querySelector(\"{rollme} table.versions\").innerText; return t.includes('/s') && t; }})()"),
            "live rates",
            20,
        )
        .await;
    let versions = versions.as_str().unwrap();
    for needle in ["v1", "v2", "ready", "stable", "canary", "/s", "ms"] {
        assert!(
            versions.contains(needle),
            "versions table lacks {needle}: {versions}"
        );
    }
    // Drift: the state, the evidence and a drawn histogram per feature, live against
    // the reference, the drifted feature marked.
    let drift = "details.card[data-model='driftiris']";
    b.wait_for(
        &format!("document.querySelectorAll(\"{drift} figure.hist svg rect.bar-live\").length > 0"),
        "drawn live histograms",
        20,
    )
    .await;
    let figures = b
        .eval(&format!(
            "[...document.querySelectorAll(\"{drift} figure.hist\")].map(f => [f.dataset.feature, f.querySelectorAll('rect.bar-ref').length, f.querySelectorAll('rect.bar-live').length, f.className])"
        ))
        .await;
    let figures = figures.as_array().unwrap();
    assert_eq!(figures.len(), 4, "{figures:?}");
    for f in figures {
        let (refs, lives) = (f[1].as_u64().unwrap(), f[2].as_u64().unwrap());
        assert!(refs >= 5 && refs == lives, "{f}");
    }
    let petal = figures
        .iter()
        .find(|f| f[0] == "petal_length")
        .expect("petal_length");
    assert!(petal[3].as_str().unwrap().contains("drift"), "{petal}");
    let summary = b
        .eval(&format!(
            "document.querySelector(\"{drift} > summary\").textContent"
        ))
        .await;
    assert!(
        summary.as_str().unwrap().contains("drift DRIFT"),
        "{summary}"
    );
    // The outbox: the delivered drift event.
    let outbox = b
        .wait_for(
            "(() => { const t = document.querySelector(\"#outbox [data-target='hooks']\"); return t && t.innerText.includes('delivered') && t.innerText; })()",
            "the outbox's delivery",
            20,
        )
        .await;
    assert!(outbox.as_str().unwrap().contains("backlog 0"), "{outbox}");
    b.screenshot(&dir.join("02-laptop.png")).await;

    // Roll back with the read-only token: refused, and nothing changes.
    let msg = format!("{rollme} .action-msg");
    b.click(&format!("{rollme} button[data-action='rollback']"))
        .await;
    let refusal = b
        .wait_for(
            &format!("(() => {{ const m = document.querySelector(\"{msg}\"); return m.classList.contains('refusal') && m.textContent; }})()"),
            "the refusal of a read-only token",
            20,
        )
        .await;
    assert!(
        refusal
            .as_str()
            .unwrap()
            .contains("token 'viewer' lacks the 'traffic' permission"),
        "{refusal}"
    );
    assert_eq!(routing(&s, "rollme").await["rollout"]["step"], 1);

    // Without any token: refused too.
    b.click("#token-forget").await;
    b.eval(&format!(
        "document.querySelector(\"{msg}\").textContent = ''"
    ))
    .await;
    b.click(&format!("{rollme} button[data-action='rollback']"))
        .await;
    let refusal = b
        .wait_for(
            &format!("(() => {{ const m = document.querySelector(\"{msg}\"); return m.classList.contains('refusal') && m.textContent; }})()"),
            "the refusal without a token",
            20,
        )
        .await;
    assert!(
        refusal
            .as_str()
            .unwrap()
            .contains("(401): a valid admin bearer token is required"),
        "{refusal}"
    );
    assert_eq!(routing(&s, "rollme").await["rollout"]["step"], 1);
    b.screenshot(&dir.join("03-refused.png")).await;

    trickle.cancel();
    trickling.await.unwrap();

    // With the operator's token: rolled back, on the API and on the page.
    b.type_into("#token", ADMIN).await;
    b.click("#token-use").await;
    b.type_into(&format!("{rollme} input.reason"), "ui test")
        .await;
    b.click(&format!("{rollme} button[data-action='rollback']"))
        .await;
    b.wait_for(
        &format!("(() => {{ const m = document.querySelector(\"{msg}\"); return m.classList.contains('ok') && m.textContent.includes('rolled back'); }})()"),
        "the rollback",
        20,
    )
    .await;
    let r = routing(&s, "rollme").await;
    // No rollout; the canary gets no more traffic, and is not entered again.
    assert!(r.get("rollout").is_none(), "{r}");
    assert!(r.get("canary").is_none_or(|c| c["weight"] == 0.0), "{r}");
    assert_eq!(r["stable"], 1);
    assert_eq!(r["rejected"], json!([2]));
    let last = get(&s, "/admin/audit?model=rollme", Some(ADMIN)).await.1;
    let last = last.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["action"], "rollback");
    assert_eq!(last["actor"], "admin");
    assert_eq!(last["reason"], "ui test");
    let steps = b
        .wait_for(
            &format!("(() => {{ const s = [...document.querySelectorAll(\"{rollme} .timeline li\")].map(e => e.dataset.status); return s[1] === 'failed' && s; }})()"),
            "the timeline after the rollback",
            20,
        )
        .await;
    assert_eq!(steps, json!(["passed", "failed", "skipped"]));
    b.screenshot(&dir.join("04-rolled-back.png")).await;

    // The filter keeps the list readable with many models.
    b.type_into("#filter", "quiet").await;
    b.wait_for(
        "[...document.querySelectorAll('details.card')].filter(e => !e.hidden).length === 4",
        "the filtered list",
        20,
    )
    .await;
    b.eval("(() => { const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input')); })()")
        .await;

    // A phone: one column, nothing wider than the screen.
    b.viewport(390, 844, true).await;
    b.wait_for(
        "[...document.querySelectorAll('details.card')].filter(e => !e.hidden).length === 6",
        "the whole list again",
        20,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A page wider than the screen would widen the layout viewport past 390 px.
    let widths = b
        .eval("[document.documentElement.scrollWidth, window.innerWidth]")
        .await;
    assert_eq!(widths, json!([390, 390]), "the page is wider than a phone");
    b.screenshot(&dir.join("05-phone.png")).await;
    // What the phone's screen shows first.
    let shot = b
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    std::fs::write(dir.join("06-phone-screen.png"), png).unwrap();

    let errors = b.errors();
    assert!(
        errors.is_empty(),
        "JavaScript or console errors: {errors:#?}"
    );
    // The refusals provoked above are the only network errors.
    for e in b.network_errors() {
        assert!(e.contains("401") || e.contains("403"), "{e}");
    }
    eprintln!("screenshots in {}", dir.display());
}

/// The page's files and their headers, and the JSON views it reads, over plain HTTP:
/// each view needs the read permission, as the rest of the admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_with_a_strict_policy_and_its_views_need_a_token() {
    let repo = repo(0);
    let s = common::start_with(repo.path(), tokens).await;
    let client = reqwest::Client::new();
    for (path, kind) in [
        ("/ui", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let resp = client
            .get(format!("{}{path}", s.http))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        for needle in [
            "default-src 'self'",
            "script-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(needle), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["x-frame-options"], "DENY");
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let body = resp.text().await.unwrap();
        assert!(!body.contains(ADMIN) && !body.contains(VIEWER));
    }
    let views = [
        "/admin/overview",
        "/admin/outbox",
        "/admin/models/rollme/rollout",
        "/admin/drift/driftiris/histograms",
    ];
    for path in views {
        assert_eq!(get(&s, path, None).await.0, 401, "{path}");
        assert_eq!(get(&s, path, Some("wrong")).await.0, 401, "{path}");
        assert_eq!(get(&s, path, Some(VIEWER)).await.0, 200, "{path}");
    }
    assert_eq!(
        get(&s, "/admin/models/nosuch/rollout", Some(VIEWER))
            .await
            .0,
        404
    );
    assert_eq!(
        get(&s, "/admin/drift/nosuch/histograms", Some(VIEWER))
            .await
            .0,
        404
    );
    // No rollout yet: null. No target: an empty outbox.
    assert_eq!(
        get(&s, "/admin/models/rollme/rollout", Some(VIEWER))
            .await
            .1,
        Value::Null
    );
    assert_eq!(get(&s, "/admin/outbox", Some(VIEWER)).await.1, json!([]));

    // Live figures: the first reading starts the window, the next one has a rate.
    get(&s, "/admin/overview", Some(VIEWER)).await;
    for i in 0..40 {
        let body = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": rollout_it::row(i)}]});
        let resp = client
            .post(format!("{}/v2/models/rollme/infer", s.http))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, o) = get(&s, "/admin/overview", Some(VIEWER)).await;
    let m = o["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "rollme")
        .unwrap();
    assert_eq!(m["version_policy"], "all");
    assert_eq!(m["routing"]["effective_stable"], 2);
    let v2 = &m["versions"][1];
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["state"], "READY");
    assert_eq!(v2["role"], "stable");
    assert_eq!(v2["live"]["requests"], 40, "{v2}");
    assert_eq!(v2["live"]["error_rate"], 0.0);
    let rate = v2["live"]["requests_per_sec"].as_f64().unwrap();
    assert!(rate > 0.0 && rate <= 40.0 / 1.1, "{rate}");
    assert!(v2["live"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(m["versions"][0]["role"], "direct");
    assert_eq!(m["versions"][0]["live"]["requests"], 0);

    // Histograms: the reference bins of each feature; no window tested yet.
    let (_, h) = get(&s, "/admin/drift/driftiris/histograms", Some(VIEWER)).await;
    let v = &h["versions"][0];
    assert_eq!(v["version"], 2);
    assert_eq!(v["reference"], "profile.json");
    let f = &v["features"][0];
    assert_eq!(f["name"], "sepal_length");
    let bins = f["reference"].as_array().unwrap().len();
    assert_eq!(f["edges"].as_array().unwrap().len() + 1, bins);
    assert!(f["live"].is_null());
    // Samples in, a window tested: live shares over the same bins, summing to one.
    let rows = drift_it::iris_rows();
    drift_it::send(&s.grpc, "driftiris", &rows, 400, 2, 0.0).await;
    let until = Instant::now() + Duration::from_secs(30);
    let live = loop {
        let (_, h) = get(&s, "/admin/drift/driftiris/histograms", Some(VIEWER)).await;
        let l = h["versions"][0]["features"][2]["live"].clone();
        if !l.is_null() {
            assert!(
                h["versions"][0]["status"]["windows_tested"]
                    .as_u64()
                    .unwrap()
                    >= 1
            );
            break l;
        }
        assert!(Instant::now() < until, "no window tested: {h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let live: Vec<f64> = live
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(live.len(), bins);
    assert!((live.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{live:?}");
}
