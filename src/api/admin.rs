//! Admin side of the API, shared by both protocols: who may call it, Triton's model
//! repository extension (index, load, unload), and traffic routing (get, set, promote,
//! rollback, audit log).
//!
//! With an admin token configured, every admin call needs it (`Authorization: Bearer`).
//! Without one, admin calls are taken from this host only (a loopback peer address):
//! an unconfigured server must not let the network change what it serves.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::registry::scan;
use crate::routing::TrafficSpec;
use crate::routing::control::{self, Action};
use crate::routing::store::AuditEntry;
use crate::service::AppState;

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
}

/// What a call may do; each named token lists the ones it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Read routing, the audit log, drift state and the repository index.
    Read,
    /// Change routing: set, promote, rollback.
    Traffic,
    /// Load and unload models.
    Repository,
    /// Call inference (when `auth.inference` requires tokens for it).
    Infer,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Traffic => "traffic",
            Permission::Repository => "repository",
            Permission::Infer => "infer",
        }
    }
}

/// SHA-256 of a token, as `auth.tokens` store it (hex).
pub fn token_hash(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Admits a call that needs `needs` and names its actor for the audit log.
///
/// Tokens: `admin_token` (every permission, actor `admin`) and the named tokens of
/// `auth.tokens` (stored as SHA-256 hashes, actor = their name). The presented token is
/// hashed and compared with every configured hash in constant time. A wrong or missing
/// token is 401, a token without the permission 403; both are counted and logged
/// without the token. With no token configured at all, admin calls are taken from this
/// host only (loopback peer), as `localhost`.
pub fn authorize(
    state: &AppState,
    authorization: Option<&str>,
    peer: Option<SocketAddr>,
    needs: Permission,
) -> Result<String> {
    let auth = &state.config.auth;
    let admin_hash = state.config.admin_token.as_deref().map(token_hash);
    if admin_hash.is_none() && auth.tokens.is_empty() {
        return if needs == Permission::Infer || peer.is_some_and(|p| p.ip().is_loopback()) {
            Ok("localhost".into())
        } else {
            refuse("not_local");
            tracing::warn!(peer = ?peer, "admin call refused: no admin token is configured, so only this host may call");
            Err(Error::Forbidden(
                "no admin token is configured: the admin API answers this host only".into(),
            ))
        };
    }
    let got = authorization
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(token_hash);
    let Some(got) = got else {
        refuse("missing");
        tracing::warn!(peer = ?peer, permission = needs.as_str(), "call refused: no bearer token");
        return Err(Error::Unauthenticated(token_required(needs)));
    };
    // Every configured hash is compared, match or not: the time taken does not tell
    // which token (or how much of one) matched.
    let mut found: Option<(String, bool)> = None;
    if let Some(h) = admin_hash
        && constant_time_eq(&got, &h)
    {
        found = Some(("admin".into(), true));
    }
    for t in &auth.tokens {
        let want = t.hash_bytes();
        if constant_time_eq(&got, &want) && found.is_none() {
            found = Some((t.name.clone(), t.permissions.contains(&needs)));
        }
    }
    match found {
        Some((name, true)) => Ok(name),
        Some((name, false)) => {
            refuse("permission");
            tracing::warn!(token = %name, permission = needs.as_str(), "call refused: the token lacks the permission");
            Err(Error::Forbidden(format!(
                "token '{name}' lacks the '{}' permission",
                needs.as_str()
            )))
        }
        None => {
            refuse("invalid");
            tracing::warn!(peer = ?peer, permission = needs.as_str(), "call refused: unknown bearer token");
            Err(Error::Unauthenticated(token_required(needs)))
        }
    }
}

/// What a refused caller is told it needs: inference and admin calls are told apart.
fn token_required(needs: Permission) -> String {
    match needs {
        Permission::Infer => {
            "inference needs a valid bearer token with the 'infer' permission (auth.inference is on)"
                .into()
        }
        Permission::Read | Permission::Traffic | Permission::Repository => {
            "a valid admin bearer token is required".into()
        }
    }
}

fn refuse(reason: &'static str) {
    metrics::counter!(crate::metrics::ADMIN_AUTH_FAILURES, "reason" => reason).increment(1);
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in b.iter().enumerate() {
        diff |= usize::from(x ^ a.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Every model and version the repository holds or serves, with its state: READY,
/// LOADING (files still being written), UNAVAILABLE (failed, with the reason; or
/// `unloaded`: not selected by the version policy, or not loaded in explicit mode).
/// A READY row's reason says when config.toml is not in force or a reload failed.
/// `ready_only` keeps the READY rows.
pub fn repository_index(state: &AppState, ready_only: bool) -> Vec<IndexEntry> {
    let snapshot = state.registry.snapshot();
    let mut rows = Vec::new();
    let entry = |name: &str, version: String, st: &'static str, reason: String| IndexEntry {
        name: name.to_string(),
        version,
        state: st,
        reason,
    };
    for (name, model) in &snapshot.models {
        let mut versions: std::collections::BTreeMap<u64, IndexEntry> = Default::default();
        for v in model.versions.keys() {
            // Serving the previous load of a version whose reload failed.
            let reason = model.failed.get(v).map_or_else(String::new, |r| {
                format!("serving the previous load; reloading failed: {r}")
            });
            versions.insert(*v, entry(name, v.to_string(), "READY", reason));
        }
        for (v, r) in &model.pending {
            versions
                .entry(*v)
                .or_insert_with(|| entry(name, v.to_string(), "LOADING", r.clone()));
        }
        for (v, r) in &model.failed {
            versions
                .entry(*v)
                .or_insert_with(|| entry(name, v.to_string(), "UNAVAILABLE", r.clone()));
        }
        for v in &model.unloaded {
            versions
                .entry(*v)
                .or_insert_with(|| entry(name, v.to_string(), "UNAVAILABLE", "unloaded".into()));
        }
        if versions.is_empty() {
            rows.push(entry(
                name,
                String::new(),
                "UNAVAILABLE",
                model.failure_summary(),
            ));
        } else if let Some(err) = &model.error {
            // config.toml is not in force: what serves runs under the previous one.
            for e in versions.values_mut().filter(|e| e.state == "READY") {
                e.reason = err.clone();
            }
        }
        rows.extend(versions.into_values());
    }
    // Models on disk that are not loaded (explicit mode, or just appeared).
    if let Ok(on_disk) = scan::model_folders(state.registry.root()) {
        for name in on_disk.iter().filter(|n| !snapshot.models.contains_key(*n)) {
            rows.push(entry(name, String::new(), "UNAVAILABLE", "unloaded".into()));
        }
    }
    if ready_only {
        rows.retain(|r| r.state == "READY");
    }
    rows.sort_by(|a, b| {
        (&a.name, a.version.parse::<u64>().ok()).cmp(&(&b.name, b.version.parse::<u64>().ok()))
    });
    rows
}

/// Loads (or reloads) a model. Blocking work runs off the async threads.
pub async fn load(state: &Arc<AppState>, model: &str) -> Result<()> {
    let registry = Arc::clone(&state.registry);
    let name = model.to_string();
    tokio::task::spawn_blocking(move || registry.load_model(&name))
        .await
        .map_err(|e| Error::Internal(format!("load task failed: {e}")))??;
    Ok(())
}

/// Unloads a model (explicit mode only: in poll mode the repository decides).
pub async fn unload(state: &Arc<AppState>, model: &str) -> Result<()> {
    if state.registry.mode() == crate::config::ControlMode::Poll {
        return Err(Error::invalid(
            "unload needs --model-control-mode explicit; in poll mode, remove the model's folder",
        ));
    }
    let registry = Arc::clone(&state.registry);
    let name = model.to_string();
    tokio::task::spawn_blocking(move || registry.unload_model(&name))
        .await
        .map_err(|e| Error::Internal(format!("unload task failed: {e}")))??;
    Ok(())
}

/// A model's routing as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TrafficView {
    pub model: String,
    /// The routing state (routing.toml).
    pub routing: TrafficSpec,
    /// The version unpinned requests go to now (unless routed to the canary).
    pub effective_stable: Option<u64>,
    /// Versions ready to serve.
    pub ready_versions: Vec<u64>,
    /// Why routing.toml is not in force, when it is not.
    pub routing_error: Option<String>,
}

/// The routing of `model` now.
pub fn traffic_get(state: &AppState, model: &str) -> Result<TrafficView> {
    let snapshot = state.registry.snapshot();
    let m = snapshot.model(model)?;
    Ok(TrafficView {
        model: m.name.clone(),
        routing: m.routing.clone(),
        effective_stable: m.stable,
        ready_versions: m.versions.keys().copied().collect(),
        routing_error: m.routing_error.clone(),
    })
}

/// What an admin call changes.
// One value per admin call, moved once: a box would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Change {
    Set(TrafficSpec),
    Promote,
    Rollback,
}

/// Applies a routing change (off the async threads: it may load versions) and returns
/// the routing after it.
pub async fn traffic_change(
    state: &Arc<AppState>,
    model: &str,
    actor: &str,
    change: Change,
    reason: &str,
) -> Result<TrafficView> {
    let (st, name, actor, reason) = (
        Arc::clone(state),
        model.to_string(),
        actor.to_string(),
        reason.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        let (action, default_reason) = match &change {
            Change::Set(_) => (Action::Set, "set by an operator"),
            Change::Promote => (Action::Promote, "promoted by an operator"),
            Change::Rollback => (Action::Rollback, "rolled back by an operator"),
        };
        let reason = if reason.is_empty() {
            default_reason
        } else {
            &reason
        };
        control::apply(
            &st.registry,
            &st.traffic,
            &name,
            &actor,
            action,
            reason,
            |now, _| match change {
                Change::Set(spec) => Ok(spec),
                Change::Promote => control::promoted(now),
                Change::Rollback => control::rolled_back(now),
            },
        )
    })
    .await
    .map_err(|e| Error::Internal(format!("routing change task failed: {e}")))??;
    traffic_get(state, model)
}

/// The newest audit entries (at most `limit`, oldest first), optionally of one model.
pub async fn audit(
    state: &Arc<AppState>,
    model: Option<String>,
    limit: usize,
) -> Result<Vec<AuditEntry>> {
    let st = Arc::clone(state);
    tokio::task::spawn_blocking(move || st.traffic.audit.read(model.as_deref(), limit))
        .await
        .map_err(|e| Error::Internal(format!("audit read task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-124", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
