//! PostgreSQL clusters of Coffer's own, for development and tests.
//!
//! A cluster lives in a folder of its own (`initdb`), listens on one loopback
//! port and a private socket folder, keeps `fsync` and `synchronous_commit`
//! on, and serves TLS when given a certificate. As root, the server runs as
//! an unprivileged system user (`coffer-pg`), since PostgreSQL refuses root.
//! Starting an already running cluster is a no-op; `stop` is clean.

use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tools::{SetupError, io_err, run};

/// The unprivileged user clusters run as when Coffer runs as root.
const PG_USER: &str = "coffer-pg";

/// A server certificate for a cluster, as PEM files, and who may connect.
#[derive(Clone, Debug, Default)]
pub struct PgTls {
    /// The server certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Client certificates: the CA that issues them and the common names
    /// admitted (each connects as `postgres`). `None`: any TLS client.
    pub clients: Option<PgClients>,
}

/// The client certificates a cluster admits.
#[derive(Clone, Debug)]
pub struct PgClients {
    /// The CA that issues them (PEM).
    pub ca: PathBuf,
    /// Common names admitted.
    pub names: Vec<String>,
}

/// How to stop a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for clients, then shut down cleanly (`-m fast`).
    Fast,
    /// Die at once, as a crash would (`-m immediate`).
    Immediate,
}

/// One PostgreSQL cluster.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PgCluster {
    /// Creates the cluster in `dir` unless it exists, then starts it (or
    /// finds it running). The port is chosen free on first creation and kept
    /// in the cluster's configuration.
    pub fn start(dir: &Path, tls: Option<&PgTls>) -> Result<Self, SetupError> {
        let bin = server_bin_dir()?;
        let data = dir.join("data");
        let fresh = !data.join("PG_VERSION").exists();
        if fresh {
            init(&bin, dir, &data)?;
        }
        let port = configure(dir, &data, tls, fresh)?;
        let cluster = Self {
            dir: dir.to_path_buf(),
            bin,
            port,
        };
        if !cluster.is_running() {
            cluster.pg_ctl(
                &["start", "-w", "-t", "60", "-l"],
                Some(&dir.join("server.log")),
            )?;
        }
        Ok(cluster)
    }

    /// The loopback port the cluster listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`, with `sslmode` if given.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// True while the server answers `pg_ctl status`.
    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"], None).is_ok()
    }

    /// Stops the server; a stopped server is fine.
    pub fn stop(&self, mode: StopMode) -> Result<(), SetupError> {
        if !self.is_running() {
            return Ok(());
        }
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        self.pg_ctl(&["stop", "-w", "-m", mode], None).map(|_| ())
    }

    /// Starts a stopped server again.
    pub fn restart(&self) -> Result<(), SetupError> {
        if self.is_running() {
            return Ok(());
        }
        self.pg_ctl(
            &["start", "-w", "-t", "60", "-l"],
            Some(&self.dir.join("server.log")),
        )
        .map(|_| ())
    }

    fn pg_ctl(
        &self,
        args: &[&str],
        log: Option<&Path>,
    ) -> Result<std::process::Output, SetupError> {
        let mut cmd = as_pg_user(&self.bin.join("pg_ctl"));
        cmd.arg("-D").arg(self.dir.join("data")).args(args);
        if let Some(log) = log {
            cmd.arg(log);
        }
        run(&mut cmd, "postgresql")
    }
}

/// The folder of the PostgreSQL server binaries: the newest
/// `/usr/lib/postgresql/*/bin`, else wherever `initdb` is on PATH.
pub fn server_bin_dir() -> Result<PathBuf, SetupError> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
        .ok_or(SetupError::Missing {
            tool: "initdb and pg_ctl".into(),
            package: "postgresql",
        })
}

/// True when the effective uid is 0 (read from /proc: std has no geteuid
/// and this crate forbids the unsafe libc call).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .to_owned();
            uids.split_whitespace().nth(1).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// A command that runs as the cluster user when we are root.
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", PG_USER, "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn ensure_pg_user() -> Result<(), SetupError> {
    if !is_root() {
        return Ok(());
    }
    // Clusters start from several threads at once. Without the lock a second
    // thread sees the user while `useradd` is still writing the account
    // files, and its initdb is refused (reproduced on a fresh machine).
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serialised = CREATING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let exists = || {
        Command::new("id")
            .arg(PG_USER)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !exists() {
        let created = run(
            Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_USER,
            ]),
            "passwd",
        );
        // Another process may have created it in the meantime.
        if created.is_err() && !exists() {
            created?;
        }
    }
    Ok(())
}

fn init(bin: &Path, dir: &Path, data: &Path) -> Result<(), SetupError> {
    ensure_pg_user()?;
    fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    if is_root() {
        // The server user must reach the folder; it owns only the cluster's.
        let mut ancestor = Some(dir);
        while let Some(path) = ancestor {
            if let Ok(meta) = fs::metadata(path) {
                let mode = meta.permissions().mode();
                if mode & 0o001 == 0 {
                    let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o011));
                }
            }
            ancestor = path.parent();
        }
        run(
            Command::new("chown").arg(format!("{PG_USER}:")).arg(dir),
            "coreutils",
        )?;
    }
    run(
        as_pg_user(&bin.join("initdb")).arg("-D").arg(data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--data-checksums",
        ]),
        "postgresql",
    )?;
    Ok(())
}

/// Writes Coffer's settings (`coffer.conf`, included from postgresql.conf)
/// and returns the port.
fn configure(dir: &Path, data: &Path, tls: Option<&PgTls>, fresh: bool) -> Result<u16, SetupError> {
    let conf = data.join("coffer.conf");
    let port = match fs::read_to_string(&conf) {
        Ok(text) if !fresh => text
            .lines()
            .find_map(|l| l.strip_prefix("port = ")?.trim().parse().ok())
            .ok_or_else(|| SetupError::Timeout(format!("no port in {}", conf.display())))?,
        _ => free_port()?,
    };
    let socket_dir = dir.join("socket");
    fs::create_dir_all(&socket_dir).map_err(io_err("cannot create", &socket_dir))?;
    let mut settings = format!(
        "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
         fsync = on\nsynchronous_commit = on\nfull_page_writes = on\nmax_connections = 200\n\
         logging_collector = off\nlog_statement = 'none'\nlog_min_error_statement = panic\n",
        socket_dir.display()
    );
    if let Some(tls) = tls {
        // Copied into the cluster's folder: the server user must own its key.
        let (cert, key) = (data.join("server.crt"), data.join("server.key"));
        fs::copy(&tls.cert, &cert).map_err(io_err("cannot copy", &tls.cert))?;
        fs::copy(&tls.key, &key).map_err(io_err("cannot copy", &tls.key))?;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
            .map_err(io_err("cannot chmod", &key))?;
        // Over TCP, TLS only; the private socket folder stays for local tools.
        // With client certificates, only the admitted names get in.
        let tcp = match &tls.clients {
            None => "hostssl all all 127.0.0.1/32 trust".to_owned(),
            Some(clients) => {
                let ca = data.join("client-ca.crt");
                fs::copy(&clients.ca, &ca).map_err(io_err("cannot copy", &clients.ca))?;
                settings.push_str("ssl_ca_file = 'client-ca.crt'\n");
                let ident: String = clients
                    .names
                    .iter()
                    .map(|name| format!("coffer {name} postgres\n"))
                    .collect();
                let ident_file = data.join("pg_ident.conf");
                fs::write(&ident_file, ident).map_err(io_err("cannot write", &ident_file))?;
                "hostssl all all 127.0.0.1/32 cert map=coffer".to_owned()
            }
        };
        let hba = data.join("pg_hba.conf");
        fs::write(
            &hba,
            format!("local all all trust\n{tcp}\nhostnossl all all 0.0.0.0/0 reject\n"),
        )
        .map_err(io_err("cannot write", &hba))?;
        settings.push_str(
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_min_protocol_version = 'TLSv1.2'\n",
        );
    }
    fs::write(&conf, settings).map_err(io_err("cannot write", &conf))?;
    let main_conf = data.join("postgresql.conf");
    let text = fs::read_to_string(&main_conf).map_err(io_err("cannot read", &main_conf))?;
    if !text.contains("include_if_exists = 'coffer.conf'") {
        fs::write(
            &main_conf,
            format!("{text}\ninclude_if_exists = 'coffer.conf'\n"),
        )
        .map_err(io_err("cannot write", &main_conf))?;
    }
    if is_root() {
        run(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{PG_USER}:"))
                .arg(dir),
            "coreutils",
        )?;
    }
    Ok(port)
}

fn free_port() -> Result<u16, SetupError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("cannot bind", Path::new("127.0.0.1:0")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io_err("cannot bind", Path::new("127.0.0.1:0")))
}

impl Drop for PgCluster {
    /// Clusters never outlive their owner (a test, or `coffer dev`).
    fn drop(&mut self) {
        let _ = self.stop(StopMode::Fast);
    }
}
