//! MLflow's Model Registry as a source: its REST API (registered models, versions,
//! aliases, runs, tags) and its artifact API, and the atomic publish of a version into
//! `<repo>/<model>/<version>/` with its lineage (`model.toml`) from MLflow.
//!
//! The artifact is downloaded through the tracking server (`mlflow-artifacts` proxy, or
//! `model-versions/get-artifact` for other stores), so any artifact store MLflow serves
//! works. A download goes to a hidden staging folder beside the version folders, is
//! hashed while it streams (`model.onnx.sha256`, verified again by the loader), and is
//! renamed into place only when complete: a partial download is never seen as a version.
//! What follows from aliases (routing) is `routing::sync`'s, a layer above.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::lineage::Lineage;
use crate::runtime::MODEL_FILE;

/// The tag modelgate writes on an MLflow model version: what it does with it.
pub const STATE_TAG: &str = "modelgate.state";

/// One `[[sources.mlflow]]` entry.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MlflowConfig {
    /// The tracking server, `http://host:port` (or https).
    pub tracking_uri: String,
    /// Registered model names, served under the same names.
    pub models: Vec<String>,
    /// An MLflow search filter over registered models (`name LIKE 'fraud-%'`, as
    /// `registered-models/search` takes it): every model it finds is served under its
    /// name too, looked up again at each poll.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_filter: Option<String>,
    /// How often the registry is polled, in seconds.
    pub poll_secs: u64,
    /// Bearer token; unset: `MLFLOW_TRACKING_TOKEN`, else none.
    pub token: Option<String>,
    /// HTTP Basic credentials (MLflow's own `basic-auth` app); unset:
    /// `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, as MLflow's client has them.
    pub username: Option<String>,
    pub password: Option<String>,
    /// The alias whose version is routing's stable version.
    pub stable_alias: String,
    /// The alias whose version enters as canary with the model's rollout plan.
    pub canary_alias: String,
    /// One REST call's time limit (a download's limit is per chunk), in seconds.
    pub timeout_secs: u64,
    /// Largest artifact downloaded, in bytes.
    pub max_artifact_bytes: u64,
    /// PEM CA bundle for an https tracking URI; default the system bundle
    /// (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_cert: Option<PathBuf>,
}

impl std::fmt::Debug for MlflowConfig {
    // The secrets stay out of any log this may end up in.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "..");
        f.debug_struct("MlflowConfig")
            .field("tracking_uri", &self.tracking_uri)
            .field("models", &self.models)
            .field("poll_secs", &self.poll_secs)
            .field("token", &hidden(&self.token))
            .field("username", &self.username)
            .field("password", &hidden(&self.password))
            .field("stable_alias", &self.stable_alias)
            .field("canary_alias", &self.canary_alias)
            .field("timeout_secs", &self.timeout_secs)
            .field("max_artifact_bytes", &self.max_artifact_bytes)
            .field("ca_cert", &self.ca_cert)
            .finish()
    }
}

impl Default for MlflowConfig {
    fn default() -> Self {
        MlflowConfig {
            tracking_uri: String::new(),
            models: Vec::new(),
            model_filter: None,
            poll_secs: 30,
            token: None,
            username: None,
            password: None,
            stable_alias: "champion".into(),
            canary_alias: "challenger".into(),
            timeout_secs: 30,
            max_artifact_bytes: 4 << 30,
            ca_cert: None,
        }
    }
}

/// Whether `m` can be a model's folder name in the registry.
pub fn servable_name(m: &str) -> bool {
    !(m.is_empty()
        || m.len() > 128
        || m.starts_with('.')
        || !m
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

impl MlflowConfig {
    /// Checks the values; the message names the field.
    pub fn validate(&self, i: usize) -> Result<()> {
        let bad = |field: &str, why: String| {
            Err(Error::Config(format!("sources.mlflow[{i}].{field}: {why}")))
        };
        let uri = self.tracking_uri.trim_end_matches('/');
        if !(uri.starts_with("http://") || uri.starts_with("https://")) || uri.len() < 10 {
            return bad(
                "tracking_uri",
                format!("'{}' is not an http:// or https:// URL", self.tracking_uri),
            );
        }
        if self.models.is_empty() && self.model_filter.is_none() {
            return bad(
                "models",
                "name at least one registered model, or set model_filter".into(),
            );
        }
        if self
            .model_filter
            .as_ref()
            .is_some_and(|f| f.trim().is_empty() || f.len() > 1000)
        {
            return bad(
                "model_filter",
                "must be a non-empty MLflow search filter".into(),
            );
        }
        if let Some(m) = self.models.iter().find(|m| !servable_name(m)) {
            return bad(
                "models",
                format!(
                    "'{m}' is not a model name modelgate can serve (letters, digits, '-', '_', '.')"
                ),
            );
        }
        if self.username.is_some() != self.password.is_some() {
            return bad(
                "username",
                "username and password go together (or both from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)".into(),
            );
        }
        if self.token.is_some() && self.username.is_some() {
            return bad(
                "token",
                "give a token or a username and password, not both".into(),
            );
        }
        if self.poll_secs == 0 || self.poll_secs > 86_400 {
            return bad("poll_secs", "must be between 1 and 86400".into());
        }
        if self.timeout_secs == 0 {
            return bad("timeout_secs", "must be at least 1".into());
        }
        if self.stable_alias.is_empty()
            || self.canary_alias.is_empty()
            || self.stable_alias == self.canary_alias
        {
            return bad(
                "stable_alias",
                "stable_alias and canary_alias must be two different, non-empty aliases".into(),
            );
        }
        Ok(())
    }

    /// The credentials in force: the settings (a token, or a username and password),
    /// else MLflow's environment variables, a token first.
    pub fn credentials(&self) -> Credentials {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(t) = self.token.clone().filter(|t| !t.is_empty()) {
            return Credentials::Bearer(t);
        }
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            return Credentials::Basic(u.clone(), p.clone());
        }
        if let Some(t) = env("MLFLOW_TRACKING_TOKEN") {
            return Credentials::Bearer(t);
        }
        match (
            env("MLFLOW_TRACKING_USERNAME"),
            env("MLFLOW_TRACKING_PASSWORD"),
        ) {
            (Some(u), Some(p)) => Credentials::Basic(u, p),
            _ => Credentials::None,
        }
    }
}

/// How requests to a tracking server authenticate.
#[derive(Clone, PartialEq)]
pub enum Credentials {
    None,
    /// `Authorization: Bearer` (Databricks, proxies in front of MLflow).
    Bearer(String),
    /// `Authorization: Basic` (MLflow's `basic-auth` app).
    Basic(String, String),
}

impl std::fmt::Debug for Credentials {
    // Never the secret itself: settings and clients may end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Bearer(_) => f.write_str("Bearer(..)"),
            Credentials::Basic(u, _) => write!(f, "Basic({u}, ..)"),
        }
    }
}

/// One registered model as MLflow has it now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Remote {
    /// Alias -> version.
    pub aliases: BTreeMap<String, u64>,
    pub versions: BTreeMap<u64, RemoteVersion>,
}

/// One model version as MLflow has it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemoteVersion {
    pub version: u64,
    pub source: String,
    pub run_id: Option<String>,
    pub created_ms: u64,
    pub user_id: Option<String>,
    pub status: String,
    pub tags: BTreeMap<String, String>,
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq)]
pub enum Published {
    /// The version folder is in place with its ONNX file.
    Model { sha256: String, bytes: u64 },
    /// The artifact holds no ONNX file: the folder holds only its lineage (the loader
    /// reports it missing), and this says what was there.
    NotOnnx(String),
}

/// A client of one tracking server.
pub struct Client {
    http: reqwest::Client,
    base: String,
    credentials: Credentials,
    config: MlflowConfig,
}

impl Client {
    /// A client for one `[[sources.mlflow]]` entry.
    pub fn new(config: &MlflowConfig) -> Result<Client> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(config.timeout_secs.min(10)))
            .read_timeout(Duration::from_secs(config.timeout_secs));
        if config.tracking_uri.starts_with("https://") {
            let path = config
                .ca_cert
                .clone()
                .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
            let pem = std::fs::read(&path).map_err(|e| {
                Error::Config(format!(
                    "sources.mlflow: CA bundle {} for {}: {e} (set ca_cert)",
                    path.display(),
                    config.tracking_uri
                ))
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| Error::Config(format!("sources.mlflow: HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: config.tracking_uri.trim_end_matches('/').to_string(),
            credentials: config.credentials(),
            config: config.clone(),
        })
    }

    /// The settings this client runs with.
    pub fn config(&self) -> &MlflowConfig {
        &self.config
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        match &self.credentials {
            Credentials::None => {}
            Credentials::Bearer(t) => r = r.bearer_auth(t),
            Credentials::Basic(u, p) => r = r.basic_auth(u, Some(p)),
        }
        r
    }

    /// Sends a REST request within `timeout_secs` and maps the answer (see
    /// [`Client::send_within`]).
    async fn send(&self, r: reqwest::RequestBuilder, what: &str) -> Result<reqwest::Response> {
        let limit = Duration::from_secs(self.config.timeout_secs);
        self.send_within(r.timeout(limit), what).await
    }

    /// Sends a request with the time limit it carries and maps the answer: unreachable
    /// or 5xx -> Unavailable; 401 or 403 -> Unauthenticated (credentials); 404 ->
    /// NotFound; other 4xx -> InvalidRequest.
    async fn send_within(
        &self,
        r: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::Response> {
        let uri = &self.base;
        let resp = r.send().await.map_err(|e| {
            Error::Unavailable(format!("MLflow at {uri} unreachable ({what}): {e}"))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        let msg = format!("MLflow at {uri} answered {status} to {what}: {body}");
        Err(match status.as_u16() {
            401 | 403 => Error::Unauthenticated(format!(
                "MLflow at {uri} refused the credentials (HTTP {}; check token, or username and password, or MLFLOW_TRACKING_TOKEN / MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD): {body}",
                status.as_u16()
            )),
            404 => Error::NotFound(msg),
            400..=499 => Error::InvalidRequest(msg),
            _ => Error::Unavailable(msg),
        })
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let r = self.request(reqwest::Method::GET, path).query(query);
        self.send(r, path)
            .await?
            .json()
            .await
            .map_err(|e| Error::Unavailable(format!("MLflow {path}: malformed answer: {e}")))
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Result<()> {
        let r = self.request(method, path).json(&body);
        self.send(r, path).await.map(drop)
    }

    /// Checks that the server answers and accepts the credentials.
    pub async fn check(&self) -> Result<()> {
        self.get(
            "/api/2.0/mlflow/registered-models/search",
            &[("max_results", "1")],
        )
        .await
        .map(drop)
    }

    /// The registered models `filter` finds (MLflow's search syntax), paged; names
    /// modelgate cannot serve are left out with a warning.
    pub async fn search_models(&self, filter: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let mut q = vec![("filter", filter), ("max_results", "100")];
            if !token.is_empty() {
                q.push(("page_token", token.as_str()));
            }
            let page = self
                .get("/api/2.0/mlflow/registered-models/search", &q)
                .await?;
            for m in page["registered_models"].as_array().into_iter().flatten() {
                let Some(name) = m["name"].as_str() else {
                    continue;
                };
                if servable_name(name) {
                    names.push(name.to_string());
                } else {
                    tracing::warn!(model = %name, "MLflow model matched by model_filter is not a name modelgate can serve (letters, digits, '-', '_', '.'); skipped");
                }
            }
            match page["next_page_token"].as_str() {
                Some(t) if !t.is_empty() && names.len() < 10_000 => token = t.to_string(),
                _ => break,
            }
        }
        Ok(names)
    }

    /// A registered model's aliases and versions.
    pub async fn model(&self, name: &str) -> Result<Remote> {
        let m = self
            .get("/api/2.0/mlflow/registered-models/get", &[("name", name)])
            .await?;
        let mut remote = Remote::default();
        for a in m["registered_model"]["aliases"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let (Some(alias), Some(v)) = (
                a["alias"].as_str(),
                a["version"].as_str().and_then(|v| v.parse().ok()),
            ) {
                remote.aliases.insert(alias.to_string(), v);
            }
        }
        let filter = format!("name='{}'", name.replace('\'', "\\'"));
        let mut token = String::new();
        loop {
            let mut q = vec![("filter", filter.as_str()), ("max_results", "200")];
            if !token.is_empty() {
                q.push(("page_token", token.as_str()));
            }
            let page = self
                .get("/api/2.0/mlflow/model-versions/search", &q)
                .await?;
            for v in page["model_versions"].as_array().into_iter().flatten() {
                if let Some(rv) = remote_version(v) {
                    remote.versions.insert(rv.version, rv);
                }
            }
            match page["next_page_token"].as_str() {
                Some(t) if !t.is_empty() && remote.versions.len() < 100_000 => {
                    token = t.to_string();
                }
                _ => break,
            }
        }
        Ok(remote)
    }

    /// The lineage of a version from MLflow: its run (id, metrics, params, git commit,
    /// dataset), creator, creation time, source and tags.
    pub async fn lineage(&self, name: &str, rv: &RemoteVersion) -> Result<Lineage> {
        let mut l = Lineage {
            source: Some(format!("mlflow:{}#{name}/{}", self.base, rv.version)),
            source_run: rv.run_id.clone(),
            creator: rv.user_id.clone(),
            created_at: (rv.created_ms > 0).then(|| {
                crate::util::rfc3339_ms(
                    std::time::UNIX_EPOCH + Duration::from_millis(rv.created_ms),
                )
            }),
            ..Lineage::default()
        };
        let mut tags: BTreeMap<String, String> = rv
            .tags
            .iter()
            .filter(|(k, _)| !k.starts_with("modelgate."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tags.insert("mlflow.source".into(), rv.source.clone());
        if let Some(run) = &rv.run_id {
            let r = self
                .get("/api/2.0/mlflow/runs/get", &[("run_id", run)])
                .await?;
            let run = &r["run"];
            if l.creator.is_none() {
                l.creator = run["info"]["user_id"].as_str().map(str::to_string);
            }
            for m in run["data"]["metrics"].as_array().into_iter().flatten() {
                if let (Some(k), Some(v)) = (m["key"].as_str(), m["value"].as_f64())
                    && v.is_finite()
                {
                    l.metrics.insert(k.to_string(), v);
                }
            }
            for p in run["data"]["params"].as_array().into_iter().flatten() {
                if let (Some(k), Some(v)) = (p["key"].as_str(), p["value"].as_str()) {
                    l.params.insert(k.to_string(), v.to_string());
                }
            }
            for t in run["data"]["tags"].as_array().into_iter().flatten() {
                if let (Some(k), Some(v)) = (t["key"].as_str(), t["value"].as_str()) {
                    match k {
                        "mlflow.source.git.commit" => l.code_commit = Some(v.to_string()),
                        "training_data" => l.training_data = Some(v.to_string()),
                        "parent_version" => l.parent_version = v.parse().ok(),
                        _ => {}
                    }
                }
            }
            if l.training_data.is_none() {
                l.training_data = run["inputs"]["dataset_inputs"][0]["dataset"]["source"]
                    .as_str()
                    .or_else(|| l.params.get("training_data").map(String::as_str))
                    .map(str::to_string);
            }
        }
        if let Some(p) = rv.tags.get("parent_version").and_then(|p| p.parse().ok()) {
            l.parent_version = Some(p);
        }
        l.tags = tags;
        Ok(l)
    }

    /// Publishes a version into `model_dir/<version>/`: downloads its ONNX artifact into
    /// a hidden staging folder (hashing it as it streams), writes `model.onnx.sha256` and
    /// `model.toml`, flushes, and renames the folder into place. A version folder that
    /// exists already is left alone. A failed download leaves nothing behind.
    pub async fn publish(
        &self,
        model_dir: &Path,
        name: &str,
        rv: &RemoteVersion,
    ) -> Result<Published> {
        let target = model_dir.join(rv.version.to_string());
        let io = |what: &str, p: &Path, e: std::io::Error| {
            Error::Unavailable(format!("{what} {}: {e}", p.display()))
        };
        std::fs::create_dir_all(model_dir).map_err(|e| io("cannot create", model_dir, e))?;
        let staging = model_dir.join(format!(".mlflow-{}-{:08x}", rv.version, fastrand::u32(..)));
        std::fs::create_dir(&staging).map_err(|e| io("cannot create", &staging, e))?;
        let result = async {
            let lineage = self.lineage(name, rv).await?;
            let published = self.download(name, rv, &staging.join(MODEL_FILE)).await?;
            if let Published::Model { sha256, .. } = &published {
                write_synced(
                    &staging.join(format!("{MODEL_FILE}.sha256")),
                    format!("{sha256}  {MODEL_FILE}\n").as_bytes(),
                )?;
            }
            write_synced(
                &staging.join(crate::lineage::LINEAGE_FILE),
                lineage.to_toml()?.as_bytes(),
            )?;
            if target.exists() {
                return Err(Error::Unavailable(format!(
                    "{} appeared while downloading; left as it is",
                    target.display()
                )));
            }
            std::fs::rename(&staging, &target).map_err(|e| io("cannot publish", &target, e))?;
            if let Ok(d) = std::fs::File::open(model_dir) {
                let _ = d.sync_all();
            }
            Ok(published)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result
    }

    /// Downloads the version's ONNX file to `dest`.
    async fn download(&self, name: &str, rv: &RemoteVersion, dest: &Path) -> Result<Published> {
        let version = rv.version.to_string();
        let uri = self
            .get(
                "/api/2.0/mlflow/model-versions/get-download-uri",
                &[("name", name), ("version", &version)],
            )
            .await?["artifact_uri"]
            .as_str()
            .unwrap_or(&rv.source)
            .to_string();
        let request = if let Some(path) = proxied_path(&uri) {
            let (file, size) = if path.ends_with(".onnx") {
                (path.clone(), None)
            } else {
                let listing = self
                    .get("/api/2.0/mlflow-artifacts/artifacts", &[("path", &path)])
                    .await?;
                let files: Vec<(String, Option<u64>)> = listing["files"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|f| !f["is_dir"].as_bool().unwrap_or(false))
                    .filter_map(|f| {
                        Some((f["path"].as_str()?.to_string(), f["file_size"].as_u64()))
                    })
                    .collect();
                let onnx: Vec<&(String, Option<u64>)> =
                    files.iter().filter(|(f, _)| f.ends_with(".onnx")).collect();
                let pick = onnx
                    .iter()
                    .find(|(f, _)| f == MODEL_FILE)
                    .or_else(|| (onnx.len() == 1).then(|| &onnx[0]));
                let Some((f, size)) = pick else {
                    let names: Vec<&str> = files.iter().map(|(f, _)| f.as_str()).collect();
                    return Ok(Published::NotOnnx(format!(
                        "the artifact {uri} holds no single ONNX file (.onnx) to serve; it holds: [{}]",
                        names.join(", ")
                    )));
                };
                (format!("{path}/{f}"), *size)
            };
            (
                self.request(
                    reqwest::Method::GET,
                    &format!("/api/2.0/mlflow-artifacts/artifacts/{file}"),
                ),
                size,
            )
        } else {
            // Any other store: the server reads it for us.
            let r = self
                .request(reqwest::Method::GET, "/model-versions/get-artifact")
                .query(&[("name", name), ("version", &version), ("path", MODEL_FILE)]);
            (r, None)
        };
        let (r, size) = request;
        // A download may take long: the time limit applies per chunk (the client's
        // read_timeout), not to the whole transfer as for a REST call.
        let mut resp = match self
            .send_within(
                r.timeout(Duration::from_secs(24 * 3600)),
                "artifact download",
            )
            .await
        {
            Err(Error::NotFound(m)) => {
                return Ok(Published::NotOnnx(format!(
                    "no {MODEL_FILE} in the artifact {uri}: {m}"
                )));
            }
            other => other?,
        };
        let expected = size.or(resp.content_length());
        let max = self.config.max_artifact_bytes;
        if expected.is_some_and(|n| n > max) {
            return Err(Error::Unavailable(format!(
                "the artifact of {name} version {version} is larger than max_artifact_bytes ({max})"
            )));
        }
        let mut file = std::fs::File::create(dest)
            .map_err(|e| Error::Unavailable(format!("cannot write {}: {e}", dest.display())))?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            Error::Unavailable(format!(
                "download of {name} version {version} broke off: {e}"
            ))
        })? {
            bytes += chunk.len() as u64;
            if bytes > max {
                return Err(Error::Unavailable(format!(
                    "the artifact of {name} version {version} is larger than max_artifact_bytes ({max})"
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .map_err(|e| Error::Unavailable(format!("cannot write {}: {e}", dest.display())))?;
        }
        if let Some(n) = expected
            && n != bytes
        {
            return Err(Error::Unavailable(format!(
                "download of {name} version {version} is incomplete: {bytes} of {n} bytes"
            )));
        }
        file.sync_all()
            .map_err(|e| Error::Unavailable(format!("cannot flush {}: {e}", dest.display())))?;
        Ok(Published::Model {
            sha256: hex::encode(hasher.finalize()),
            bytes,
        })
    }

    /// Points an alias at a version.
    pub async fn set_alias(&self, name: &str, alias: &str, version: u64) -> Result<()> {
        self.call(
            reqwest::Method::POST,
            "/api/2.0/mlflow/registered-models/alias",
            json!({"name": name, "alias": alias, "version": version.to_string()}),
        )
        .await
    }

    /// Removes an alias (absent is fine).
    pub async fn delete_alias(&self, name: &str, alias: &str) -> Result<()> {
        match self
            .call(
                reqwest::Method::DELETE,
                "/api/2.0/mlflow/registered-models/alias",
                json!({"name": name, "alias": alias}),
            )
            .await
        {
            Err(Error::NotFound(_)) => Ok(()),
            other => other,
        }
    }

    /// Sets a tag on a model version.
    pub async fn set_tag(&self, name: &str, version: u64, key: &str, value: &str) -> Result<()> {
        self.call(
            reqwest::Method::POST,
            "/api/2.0/mlflow/model-versions/set-tag",
            json!({"name": name, "version": version.to_string(), "key": key, "value": value}),
        )
        .await
    }
}

/// The value of the [`STATE_TAG`]: state, time and reason as one JSON object.
pub fn state_tag(state: &str, reason: &str) -> String {
    json!({
        "state": state,
        "time": crate::util::rfc3339_ms(std::time::SystemTime::now()),
        "reason": reason,
    })
    .to_string()
}

/// The path under the artifact proxy of an `mlflow-artifacts:` URI
/// (`mlflow-artifacts:/0/run/artifacts/model`, or with a host:
/// `mlflow-artifacts://host:5000/0/run/...`).
fn proxied_path(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("mlflow-artifacts:")?;
    let path = match rest.strip_prefix("//") {
        Some(with_host) => with_host.split_once('/').map_or("", |(_, p)| p),
        None => rest,
    };
    Some(path.trim_matches('/').to_string())
}

fn remote_version(v: &Value) -> Option<RemoteVersion> {
    Some(RemoteVersion {
        version: v["version"].as_str()?.parse().ok().filter(|&n| n > 0)?,
        source: v["source"].as_str().unwrap_or("").to_string(),
        run_id: v["run_id"]
            .as_str()
            .filter(|r| !r.is_empty())
            .map(str::to_string),
        created_ms: v["creation_timestamp"].as_u64().unwrap_or(0),
        user_id: v["user_id"]
            .as_str()
            .filter(|u| !u.is_empty())
            .map(str::to_string),
        status: v["status"].as_str().unwrap_or("").to_string(),
        tags: v["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| {
                Some((
                    t["key"].as_str()?.to_string(),
                    t["value"].as_str()?.to_string(),
                ))
            })
            .collect(),
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let io =
        |e: std::io::Error| Error::Unavailable(format!("cannot write {}: {e}", path.display()));
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_settings_and_never_show_in_debug() {
        let basic = MlflowConfig {
            username: Some("svc".into()),
            password: Some("s3cret-pw".into()),
            ..MlflowConfig::default()
        };
        assert_eq!(
            basic.credentials(),
            Credentials::Basic("svc".into(), "s3cret-pw".into())
        );
        let bearer = MlflowConfig {
            token: Some("tok-123".into()),
            ..MlflowConfig::default()
        };
        assert_eq!(bearer.credentials(), Credentials::Bearer("tok-123".into()));
        for shown in [
            format!("{basic:?}"),
            format!("{bearer:?}"),
            format!("{:?}", basic.credentials()),
        ] {
            assert!(
                !shown.contains("s3cret-pw") && !shown.contains("tok-123"),
                "{shown}"
            );
        }
    }

    #[test]
    fn artifact_paths_and_settings() {
        assert_eq!(
            proxied_path("mlflow-artifacts:/0/abc/artifacts/model").as_deref(),
            Some("0/abc/artifacts/model")
        );
        assert_eq!(
            proxied_path("mlflow-artifacts://mlflow:5000/0/abc/m/").as_deref(),
            Some("0/abc/m")
        );
        assert_eq!(proxied_path("s3://bucket/x"), None);
        let ok = MlflowConfig {
            tracking_uri: "http://127.0.0.1:5000".into(),
            models: vec!["fraud".into()],
            ..MlflowConfig::default()
        };
        assert!(ok.validate(0).is_ok());
        for (bad, field) in [
            (
                MlflowConfig {
                    tracking_uri: "mlflow:5000".into(),
                    ..ok.clone()
                },
                "tracking_uri",
            ),
            (
                MlflowConfig {
                    models: vec![],
                    ..ok.clone()
                },
                "models",
            ),
            (
                MlflowConfig {
                    models: vec!["a/b".into()],
                    ..ok.clone()
                },
                "models",
            ),
            (
                MlflowConfig {
                    poll_secs: 0,
                    ..ok.clone()
                },
                "poll_secs",
            ),
            (
                MlflowConfig {
                    username: Some("svc".into()),
                    ..ok.clone()
                },
                "username",
            ),
            (
                MlflowConfig {
                    token: Some("t".into()),
                    username: Some("svc".into()),
                    password: Some("pw".into()),
                    ..ok.clone()
                },
                "token",
            ),
            (
                MlflowConfig {
                    canary_alias: "champion".into(),
                    ..ok.clone()
                },
                "stable_alias",
            ),
        ] {
            let e = bad.validate(2).unwrap_err().to_string();
            assert!(e.contains(&format!("sources.mlflow[2].{field}")), "{e}");
        }
        let v = remote_version(&json!({"version": "3", "source": "s", "run_id": "", "tags": [{"key": "k", "value": "v"}]})).unwrap();
        assert_eq!((v.version, v.run_id, v.tags["k"].as_str()), (3, None, "v"));
        assert!(remote_version(&json!({"version": "0"})).is_none());
    }
}
