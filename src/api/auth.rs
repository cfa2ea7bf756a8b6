//! Who may call what, for both protocols: the admin token and the named tokens of
//! `[auth]` (stored as SHA-256 hashes, each with its permissions), compared in constant
//! time; with no token configured, admin calls are taken from this host only (a
//! loopback peer address): an unconfigured server must not let the network change what
//! it serves. Failures are counted by reason and logged without the token.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The access policy of a running server.
#[derive(Debug, Clone)]
pub struct Auth {
    admin_hash: Option<[u8; 32]>,
    config: AuthConfig,
}

/// Who may call what (`[auth]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Inference needs a token with the `infer` permission.
    pub inference: bool,
    pub tokens: Vec<NamedToken>,
}

/// A named token, stored as the SHA-256 of the token (`modelgate hash-token`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamedToken {
    /// Shown as the actor in the audit log and in logs.
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    pub permissions: Vec<Permission>,
}

impl AuthConfig {
    /// Checks the tokens; `admin_token` says whether an admin token is configured.
    pub fn validate(&self, admin_token: bool) -> Result<()> {
        let bad = |field: &str, why: String| Err(Error::Config(format!("{field}: {why}")));
        let mut names = std::collections::BTreeSet::new();
        for t in &self.tokens {
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return bad(
                    "auth.tokens.name",
                    format!("'{}': names must be unique and non-empty", t.name),
                );
            }
            if hex::decode(&t.sha256).map_or(true, |v| v.len() != 32) {
                return bad(
                    "auth.tokens.sha256",
                    format!("token '{}': 64 hex digits (modelgate hash-token)", t.name),
                );
            }
        }
        if self.inference && self.tokens.is_empty() && !admin_token {
            return bad(
                "auth.inference",
                "needs tokens: add [[auth.tokens]] with the infer permission".into(),
            );
        }
        Ok(())
    }
}

impl NamedToken {
    /// The hash as bytes (zeros if malformed; validate() refuses those).
    pub fn hash_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        if let Ok(v) = hex::decode(&self.sha256)
            && v.len() == 32
        {
            out.copy_from_slice(&v);
        }
        out
    }
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
impl Auth {
    /// The policy of a config: `admin_token` (hashed here, never kept in the clear) and
    /// `[auth]`.
    pub fn new(admin_token: Option<&str>, config: AuthConfig) -> Auth {
        Auth {
            admin_hash: admin_token.map(token_hash),
            config,
        }
    }

    /// No token is configured at all: admin calls are taken from this host only.
    pub fn tokenless(&self) -> bool {
        self.admin_hash.is_none() && self.config.tokens.is_empty()
    }

    /// Inference needs a token (`auth.inference`).
    pub fn inference_needs_token(&self) -> bool {
        self.config.inference
    }

    /// Admits a call that needs `needs`: the rules are those of the module docs (an
    /// admin or named token, compared in constant time; this host only without one).
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        peer: Option<SocketAddr>,
        needs: Permission,
    ) -> Result<String> {
        authorize(self, authorization, peer, needs)
    }
}

fn authorize(
    policy: &Auth,
    authorization: Option<&str>,
    peer: Option<SocketAddr>,
    needs: Permission,
) -> Result<String> {
    let auth = &policy.config;
    let admin_hash = policy.admin_hash;
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
