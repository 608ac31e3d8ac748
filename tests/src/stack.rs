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
    /// The private CA.
    pub ca: DevCa,
    /// The key DB cluster.
    pub key_db: PgCluster,
    /// The SoftHSM token of this test's key hosts (SoftHSM misbehaves when
    /// processes share a token at once, so every test has its own).
    pub token: coffer_softhsm::SoftHsmToken,
    /// The scratch folder. Declared last: fields drop in order, and a
    /// cluster whose folder is already gone cannot be stopped (its server
    /// would run on until it notices, about a minute later).
    pub dir: TempDir,
}

/// Common name of the tests' own database client certificate.
pub const DB_TEST: &str = "db-test";

impl Infra {
    /// A CA and a key DB cluster with a certificate from it.
    pub fn new() -> Self {
        let dir = crate::scratch_dir("stack");
        let ca = DevCa::open(&dir.path().join("ca")).expect("CA");
        let key_db = Self::cluster(&ca, dir.path(), "keydb", &["db-keyd"]);
        let token = crate::new_token();
        Self {
            dir,
            ca,
            key_db,
            token,
        }
    }

    /// One more TLS cluster named `name`, admitting the client certificates
    /// named `clients` and the tests' own (`db-test`).
    pub fn cluster(ca: &DevCa, dir: &Path, name: &str, clients: &[&str]) -> PgCluster {
        let cert = ca.server(name).expect("server cert");
        let names = clients.iter().chain(&[DB_TEST]).map(|c| c.to_string());
        PgCluster::start(
            &dir.join(name),
            Some(&PgTls {
                cert: cert.cert,
                key: cert.key,
                clients: Some(coffer_softhsm::PgClients {
                    ca: ca.cert_path(),
                    names: names.collect(),
                }),
            }),
        )
        .expect("cluster")
    }

    /// `--db-client-cert` and `--db-client-key` of the certificate `name`.
    pub fn db_cert_args(&self, name: &str) -> [String; 4] {
        let cert = self.ca.db_client(name).expect("DB client cert");
        [
            "--db-client-cert".into(),
            cert.cert.display().to_string(),
            "--db-client-key".into(),
            cert.key.display().to_string(),
        ]
    }

    /// The tests' own database client certificate.
    pub fn db_test_cert(&self) -> coffer_keyhost::dbtls::DbClientCert {
        let cert = self.ca.db_client(DB_TEST).expect("DB client cert");
        coffer_keyhost::dbtls::DbClientCert {
            db_client_cert: Some(cert.cert),
            db_client_key: Some(cert.key),
        }
    }

    /// A URL for `cluster` that verifies its certificate against the CA.
    pub fn verified_url(&self, cluster: &PgCluster) -> String {
        let client = self.ca.db_client(DB_TEST).expect("DB client cert");
        format!(
            "{}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            cluster.url("postgres"),
            self.ca.cert_path().display(),
            client.cert.display(),
            client.key.display()
        )
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
        .args(self.db_cert_args("db-keyd"))
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
    /// The encryption host process.
    pub encryptd: Proc,
    /// The key host process.
    pub keyd: Proc,
    /// The blob node clusters.
    pub nodes: Vec<PgCluster>,
    /// CA, key DB, token, and the folder of every cluster: declared last,
    /// so it drops after the processes and clusters that use it.
    pub infra: Infra,
}

impl StoragePath {
    /// `n` blob nodes, W = 3, a key host and an encryption host. The
    /// scheduled repair is off so tests that drive repair see every step.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, &["--repair-interval-secs", "0"])
    }

    /// Same, with extra `coffer-encryptd` arguments.
    pub fn start_with(n: usize, encryptd_args: &[&str]) -> Self {
        let infra = Infra::new();
        let nodes: Vec<PgCluster> = (1..=n)
            .map(|i| {
                Infra::cluster(
                    &infra.ca,
                    infra.dir.path(),
                    &format!("blob{i}"),
                    &["db-encryptd"],
                )
            })
            .collect();
        let keyd = infra.start_keyd(&[]);
        let encryptd = Self::start_encryptd(&infra, &keyd, &nodes, encryptd_args);
        Self {
            infra,
            nodes,
            keyd,
            encryptd,
        }
    }

    fn start_encryptd(infra: &Infra, keyd: &Proc, nodes: &[PgCluster], extra: &[&str]) -> Proc {
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
            .arg(blob_nodes.join(","))
            .args(infra.db_cert_args("db-encryptd"))
            .args(extra);
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
                client: self.infra.db_test_cert(),
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

/// The public API host (`coffer serve`) over a whole storage path and a
/// metadata DB cluster of its own, with an operator key and a client that
/// trusts only the stack's CA.
#[derive(Debug)]
pub struct ApiStack {
    /// The API host process (declared first: stopped before the clusters).
    pub api: Proc,
    /// The metadata DB cluster.
    pub meta: PgCluster,
    /// The storage path under the API host (key host, encryption host, nodes).
    pub path: StoragePath,
    /// The installation's operator key (in `operator.key`, mode 0600).
    pub operator_key: String,
    /// An HTTPS client that trusts only the stack's CA (no client certificate).
    pub client: reqwest::Client,
}

/// One answer of the API host, read whole.
#[derive(Debug)]
pub struct ApiResponse {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body.
    pub body: bytes::Bytes,
}

impl ApiResponse {
    /// The body as JSON (panics, showing the body, if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: the body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-request-id` header.
    pub fn request_id(&self) -> Option<&str> {
        self.header("x-request-id")
    }
}

impl ApiStack {
    /// A storage path with 4 blob nodes, a `meta` cluster, and `coffer serve`
    /// on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Same, with extra `coffer serve` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        use std::os::unix::fs::OpenOptionsExt;

        let path = StoragePath::start(4);
        let infra = &path.infra;
        let meta = Infra::cluster(
            &infra.ca,
            infra.dir.path(),
            "meta",
            &["db-api", "db-worker"],
        );
        let server = infra.ca.server("api").expect("API host cert");
        let client_cert = infra.client_cert(coffer_keyhost::api::roles::API_HOST);

        let operator_key = format!(
            "coffer_op_{}{}{}{}",
            crate::random_hex(),
            crate::random_hex(),
            crate::random_hex(),
            crate::random_hex()
        );
        let secret = format!(
            "{}{}{}{}",
            crate::random_hex(),
            crate::random_hex(),
            crate::random_hex(),
            crate::random_hex()
        );
        let write_0600 = |name: &str, text: &str| {
            use std::io::Write;
            let file = infra.path(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .expect("secret file");
            f.write_all(text.as_bytes()).expect("write secret file");
            file
        };
        let operator_file = write_0600("operator.key", &operator_key);
        let secret_file = write_0600("api.secret", &secret);

        let mut cmd = Command::new(bin("coffer"));
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--cert")
            .arg(&server.cert)
            .arg("--key")
            .arg(&server.key)
            .arg("--ca")
            .arg(infra.ca.cert_path())
            .arg("--meta-db")
            .arg(meta.url("postgres"))
            .arg("--encryptd")
            .arg(path.encryptd.url())
            .arg("--client-cert")
            .arg(&client_cert.cert)
            .arg("--client-key")
            .arg(&client_cert.key)
            .arg("--operator-key-file")
            .arg(&operator_file)
            .arg("--secret-file")
            .arg(&secret_file)
            .args(infra.db_cert_args("db-api"))
            .args(extra);
        let api =
            Proc::start("coffer-api", cmd, &infra.path("api.log")).expect("start coffer serve");

        coffer_keyhost::tls::install_crypto_provider();
        let tls =
            coffer_keyhost::tls::client_config(&infra.ca.cert_path(), None).expect("client TLS");
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .expect("client");
        Self {
            api,
            meta,
            path,
            operator_key,
            client,
        }
    }

    /// Starts a maintenance worker (`coffer worker`, role `maintenance`).
    pub fn start_worker(&self) -> Proc {
        self.start_worker_with_key_host(&self.path.keyd.url())
    }

    /// Same, against another key host URL (a dead one, to see jobs fail).
    pub fn start_worker_with_key_host(&self, key_host: &str) -> Proc {
        let infra = &self.path.infra;
        let cert = infra.client_cert(coffer_keyhost::api::roles::MAINTENANCE);
        let mut cmd = Command::new(bin("coffer"));
        cmd.arg("worker")
            .arg("--ca")
            .arg(infra.ca.cert_path())
            .arg("--meta-db")
            .arg(self.meta.url("postgres"))
            .arg("--key-host")
            .arg(key_host)
            .arg("--encryptd")
            .arg(self.path.encryptd.url())
            .arg("--client-cert")
            .arg(&cert.cert)
            .arg("--client-key")
            .arg(&cert.key)
            .args(["--poll-ms", "100", "--rotation-grace-secs", "1"])
            .args(infra.db_cert_args("db-worker"));
        Proc::start("coffer-worker", cmd, &infra.path("worker.log")).expect("start coffer worker")
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.api.url()
    }

    /// A request to `path` (e.g. `/v1/studies`), with `Authorization: Bearer
    /// <key>` if a key is given.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, format!("{}{path}", self.url()));
        match key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    /// Sends a request and reads the whole answer.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> ApiResponse {
        let response = request.send().await.expect("the API host answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("the whole body");
        ApiResponse {
            status,
            headers,
            body,
        }
    }

    /// `GET path` with a bearer key.
    pub async fn get(&self, path: &str, key: Option<&str>) -> ApiResponse {
        self.send(self.request(reqwest::Method::GET, path, key))
            .await
    }

    /// `DELETE path` with a bearer key.
    pub async fn delete(&self, path: &str, key: Option<&str>) -> ApiResponse {
        self.send(self.request(reqwest::Method::DELETE, path, key))
            .await
    }

    /// `POST path` with a JSON body and a bearer key.
    pub async fn post_json(
        &self,
        path: &str,
        key: Option<&str>,
        body: &serde_json::Value,
    ) -> ApiResponse {
        self.send(self.request(reqwest::Method::POST, path, key).json(body))
            .await
    }

    /// `PUT path` with a JSON body and a bearer key.
    pub async fn put_json(
        &self,
        path: &str,
        key: Option<&str>,
        body: &serde_json::Value,
    ) -> ApiResponse {
        self.send(self.request(reqwest::Method::PUT, path, key).json(body))
            .await
    }

    /// A request with a raw body and content type.
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> ApiResponse {
        self.send(
            self.request(method, path, key)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body),
        )
        .await
    }
}
