//! The storage path's real parts for a test: a private CA, a key DB
//! cluster, blob node clusters, a SoftHSM token and the key host process.

use std::path::{Path, PathBuf};
use std::process::Command;

use coffer_softhsm::{DevCa, IssuedCert, PgCluster, PgTls};
use secrecy::ExposeSecret;
use tempfile::TempDir;

use coffer_softhsm::Service as Proc;

use crate::bin;

/// A CA and the clusters of one test, in one scratch folder.
#[derive(Debug)]
pub struct Infra {
    /// The scratch folder (kept alive as long as the infra).
    pub dir: TempDir,
    /// The private CA.
    pub ca: DevCa,
    /// The key DB cluster.
    pub key_db: PgCluster,
    /// The SoftHSM token of this test's key hosts (SoftHSM misbehaves when
    /// processes share a token at once, so every test has its own).
    pub token: coffer_softhsm::SoftHsmToken,
}

impl Infra {
    /// A CA and a key DB cluster with a certificate from it.
    pub fn new() -> Self {
        let dir = crate::scratch_dir("stack");
        let ca = DevCa::open(&dir.path().join("ca")).expect("CA");
        let key_db = Self::cluster(&ca, dir.path(), "keydb");
        let token = crate::new_token();
        Self {
            dir,
            ca,
            key_db,
            token,
        }
    }

    /// One more TLS cluster named `name`.
    pub fn cluster(ca: &DevCa, dir: &Path, name: &str) -> PgCluster {
        let cert = ca.server(name).expect("server cert");
        PgCluster::start(
            &dir.join(name),
            Some(&PgTls {
                cert: cert.cert,
                key: cert.key,
            }),
        )
        .expect("cluster")
    }

    /// The path of a file in the scratch folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts a key host on this test's SoftHSM token, on a free port.
    pub fn start_keyd(&self, extra: &[&str]) -> Proc {
        self.start_keyd_on("127.0.0.1:0", extra)
    }

    /// Starts a key host listening on `listen`.
    pub fn start_keyd_on(&self, listen: &str, extra: &[&str]) -> Proc {
        let token = &self.token;
        let server = self.ca.server("keyhost").expect("key host cert");
        let pin_file = self.path("pin");
        std::fs::write(&pin_file, token.user_pin().expose_secret()).expect("pin file");
        let mut cmd = Command::new(bin("coffer-keyd"));
        cmd.args([
            "--listen",
            listen,
            "--backend",
            "pkcs11",
            "--pkcs11-sessions",
            "1",
        ])
        .arg("--cert")
        .arg(&server.cert)
        .arg("--key")
        .arg(&server.key)
        .arg("--ca")
        .arg(self.ca.cert_path())
        .arg("--key-db")
        .arg(self.key_db.url("postgres"))
        .arg("--pkcs11-module")
        .arg(coffer_softhsm::find_softhsm_module().expect("softhsm"))
        .args(["--pkcs11-token", token.label()])
        .arg("--pkcs11-pin-file")
        .arg(&pin_file)
        .arg("--oplog")
        .arg(self.path("keyd-ops.log"))
        .args(extra)
        .env("SOFTHSM2_CONF", token.conf_path());
        Proc::start("coffer-keyd", cmd, &self.path("keyd.log")).expect("start the key host")
    }

    /// A client certificate for `role`.
    pub fn client_cert(&self, role: &str) -> IssuedCert {
        self.ca.client(role).expect("client cert")
    }
}

impl Default for Infra {
    fn default() -> Self {
        Self::new()
    }
}

/// The whole storage path of one test: the key host and encryption host
/// processes over a key DB cluster and blob node clusters.
#[derive(Debug)]
pub struct StoragePath {
    /// CA, key DB, token.
    pub infra: Infra,
    /// The blob node clusters.
    pub nodes: Vec<PgCluster>,
    /// The key host process.
    pub keyd: Proc,
    /// The encryption host process.
    pub encryptd: Proc,
}

impl StoragePath {
    /// `n` blob nodes, W = 3, a key host and an encryption host.
    pub fn start(n: usize) -> Self {
        let infra = Infra::new();
        let nodes: Vec<PgCluster> = (1..=n)
            .map(|i| Infra::cluster(&infra.ca, infra.dir.path(), &format!("blob{i}")))
            .collect();
        let keyd = infra.start_keyd(&[]);
        let encryptd = Self::start_encryptd(&infra, &keyd, &nodes);
        Self {
            infra,
            nodes,
            keyd,
            encryptd,
        }
    }

    fn start_encryptd(infra: &Infra, keyd: &Proc, nodes: &[PgCluster]) -> Proc {
        let server = infra.ca.server("encryptd").expect("cert");
        let client = infra.client_cert(coffer_keyhost::api::roles::ENCRYPTION_HOST);
        let blob_nodes: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut cmd = Command::new(bin("coffer-encryptd"));
        cmd.args(["--listen", "127.0.0.1:0"])
            .arg("--cert")
            .arg(&server.cert)
            .arg("--key")
            .arg(&server.key)
            .arg("--ca")
            .arg(infra.ca.cert_path())
            .arg("--key-host")
            .arg(keyd.url())
            .arg("--client-cert")
            .arg(&client.cert)
            .arg("--client-key")
            .arg(&client.key)
            .arg("--blob-nodes")
            .arg(blob_nodes.join(","));
        Proc::start("coffer-encryptd", cmd, &infra.path("encryptd.log"))
            .expect("start the encryption host")
    }

    /// The blob store as the encryption host sees it, for repair and inspection.
    pub fn blob_store(&self) -> coffer_host::blob::PgBlobStore {
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| coffer_host::blob::NodeConfig {
                id: format!("node{}", i + 1),
                host: "127.0.0.1".into(),
                port: n.port(),
                database: "postgres".into(),
                user: "postgres".into(),
                root_cert: self.infra.ca.cert_path(),
            })
            .collect();
        coffer_host::blob::PgBlobStore::new(&coffer_host::blob::PgBlobConfig::new(nodes))
            .expect("blob store")
    }

    /// A client of the encryption host with the API host's certificate.
    pub fn api_client(&self) -> reqwest::Client {
        self.client_as(coffer_keyhost::api::roles::API_HOST)
    }

    /// A client of the encryption host presenting a certificate for `role`.
    pub fn client_as(&self, role: &str) -> reqwest::Client {
        coffer_keyhost::tls::install_crypto_provider();
        let cert = self.infra.client_cert(role);
        let tls = coffer_keyhost::tls::client_config(
            &self.infra.ca.cert_path(),
            Some((&cert.cert, &cert.key)),
        )
        .expect("client TLS");
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .expect("client")
    }
}
