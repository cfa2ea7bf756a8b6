//! TLS over a real server with certificates the test makes (rcgen): HTTPS and gRPC over
//! TLS work; plain connections to a TLS port do not; with client-certificate auth
//! required, a client without a certificate is refused at the handshake and one with a
//! certificate signed by the CA is served.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use modelgate::tls::{ClientAuth, TlsConfig};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};

struct Pki {
    ca_pem: String,
    client_pem: String,
    client_key_pem: String,
    dir: tempfile::TempDir,
}

/// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate.
fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(vec!["client.test".to_string()]).unwrap();
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        client_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
        dir,
    }
}

fn tls_config(dir: &Path, client_auth: ClientAuth) -> TlsConfig {
    TlsConfig {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: Some(dir.join("ca.pem")),
        client_auth,
        metrics: false,
    }
}

fn https_client(p: &Pki, with_identity: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(p.ca_pem.as_bytes()).unwrap());
    if with_identity {
        let pem = format!("{}{}", p.client_pem, p.client_key_pem);
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

/// Handshake failures are counted by listener only, by every server of the process, and
/// only these tests make them: the tests with a TLS server take turns.
static HANDSHAKES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn http_handshake_failures(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("modelgate_tls_handshake_failures_total{listener=\"http\"} "))
        .map_or(0, |n| n.parse().unwrap())
}

fn https(s: &common::TestServer) -> String {
    s.http.replace("http://127.0.0.1", "https://localhost")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_grpc_over_tls() {
    let _turn = HANDSHAKES.lock().await;
    let p = pki();
    let s =
        common::start_tweaked(|c| c.tls = Some(tls_config(p.dir.path(), ClientAuth::None))).await;
    let c = https_client(&p, false);
    let r = c
        .get(format!("{}/v2/health/ready", https(&s)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{}/v2/models/iris/infer", https(&s)))
        .json(&serde_json::json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP to the TLS port gets no answer.
    assert!(
        reqwest::get(format!("{}/v2/health/live", s.http))
            .await
            .is_err()
    );
    // gRPC over TLS (HTTP/2 by ALPN).
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(p.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let addr = s.grpc.trim_start_matches("http://").to_string();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    let mut g =
        modelgate::proto::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel);
    assert!(
        g.server_live(modelgate::proto::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_when_required() {
    let _turn = HANDSHAKES.lock().await;
    let p = pki();
    let s = common::start_tweaked(|c| c.tls = Some(tls_config(p.dir.path(), ClientAuth::Required)))
        .await;
    let before = http_handshake_failures(&s.metrics_text().await);
    let without = https_client(&p, false)
        .get(format!("{}/v2/health/live", https(&s)))
        .send()
        .await;
    assert!(
        without.is_err(),
        "a client without a certificate was served"
    );
    let with = https_client(&p, true)
        .get(format!("{}/v2/health/live", https(&s)))
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), 200);
    assert!(http_handshake_failures(&s.metrics_text().await) > before);
}

#[test]
fn bad_tls_files_are_clear_errors() {
    let p = pki();
    let mut t = tls_config(p.dir.path(), ClientAuth::None);
    t.key = p.dir.path().join("ca.pem");
    let e = t.acceptor().err().unwrap().to_string();
    assert!(e.contains("tls.key"), "{e}");
    let mut t = tls_config(p.dir.path(), ClientAuth::Required);
    t.client_ca = None;
    assert!(
        t.acceptor()
            .err()
            .unwrap()
            .to_string()
            .contains("client_ca")
    );
    let mut t = tls_config(p.dir.path(), ClientAuth::None);
    t.cert = p.dir.path().join("missing.pem");
    assert!(t.acceptor().err().unwrap().to_string().contains("tls.cert"));
}
