//! TLS for the HTTP and gRPC listeners (rustls, ring): the certificate chain and key
//! from PEM files, ALPN for HTTP/2 and HTTP/1.1, and optional client-certificate
//! authentication against a CA bundle.

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificates.
    #[default]
    None,
    /// Verified when presented; clients without one are admitted.
    Optional,
    /// Every client must present a certificate signed by `client_ca`.
    Required,
}

/// `[tls]` in the config: when present, the HTTP and gRPC listeners speak TLS only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// Serve the metrics port over TLS too (default: plain, for Prometheus on the pod network).
    #[serde(default)]
    pub metrics: bool,
}

impl TlsConfig {
    /// Builds the acceptor; the message names the file that is wrong.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        let bad = |what: &str, path: &PathBuf, e: &dyn std::fmt::Display| {
            Error::Config(format!("tls.{what}: {}: {e}", path.display()))
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| bad("cert", &self.cert, &e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad("cert", &self.cert, &e))?;
        if certs.is_empty() {
            return Err(bad("cert", &self.cert, &"no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| bad("key", &self.key, &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("tls: {e}")))?;
        let builder = match (self.client_auth, &self.client_ca) {
            (ClientAuth::None, _) => builder.with_no_client_auth(),
            (_, None) => {
                return Err(Error::Config(
                    "tls.client_ca: client_auth needs a CA bundle".into(),
                ));
            }
            (mode, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad("client_ca", ca, &e))? {
                    roots
                        .add(c.map_err(|e| bad("client_ca", ca, &e))?)
                        .map_err(|e| bad("client_ca", ca, &e))?;
                }
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                );
                let v = if mode == ClientAuth::Optional {
                    v.allow_unauthenticated()
                } else {
                    v
                };
                builder.with_client_cert_verifier(
                    v.build()
                        .map_err(|e| Error::Config(format!("tls.client_ca: {e}")))?,
                )
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| Error::Config(format!("tls: certificate and key do not match: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}
