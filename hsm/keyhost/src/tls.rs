//! Mutual TLS between Coffer's internal hosts.
//!
//! Every internal listener requires a client certificate issued by the
//! stack's CA (a certificate from anywhere else is refused during the
//! handshake) and learns the caller's role from the certificate's URI SAN
//! `urn:coffer:role:<role>`. TLS 1.3 and 1.2 with rustls's defaults, which
//! are forward-secret AEAD suites only.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Prefix of the URI SAN naming a certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:coffer:role:";

/// Installs aws-lc-rs as the process's rustls provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The certificates of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading the private key {}", path.display()))
}

fn roots(ca: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).context("adding the CA certificate")?;
    }
    Ok(roots)
}

/// A server that demands a client certificate issued by `client_ca`.
pub fn mtls_server_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<Arc<ServerConfig>> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca)?), provider())
            .build()
            .context("building the client certificate verifier")?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("loading the server certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client trusting only `ca`, presenting `identity` (cert, key) if given.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .context("loading the client certificate")?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Who is calling, from its verified client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The role named in the certificate, if any.
    pub role: Option<String>,
}

impl Peer {
    fn from_certs(certs: Option<&[CertificateDer<'_>]>) -> Self {
        let role = certs.and_then(|c| c.first()).and_then(|leaf| role_of(leaf));
        Self { role }
    }
}

/// The role a certificate carries in its URI SAN.
pub fn role_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => {
            uri.strip_prefix(ROLE_URI_PREFIX).map(str::to_owned)
        }
        _ => None,
    })
}

/// Serves `app` over mutual TLS until `shutdown` completes. Each connection's
/// [`Peer`] is available to handlers as an `Extension<Peer>`.
pub async fn serve_mtls(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let acceptor = TlsAcceptor::from(config);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        // Answers go out as soon as they are written: with Nagle on, a
        // response split over two segments waits for the peer's delayed ACK
        // (40 ms on Linux).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // A client that never finishes its handshake must not hold a task forever.
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!("TLS handshake refused: {e}");
                    return;
                }
                Err(_) => return,
            };
            let peer = Peer::from_certs(tls.get_ref().1.peer_certificates());
            let service = TowerToHyperService::new(app.layer(Extension(peer)));
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}
