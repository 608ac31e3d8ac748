//! Coffer's own PostgreSQL clusters: created, started, restarted idempotently
//! and stopped, as the dev stack and the storage tests use them.

use std::net::TcpStream;

use coffer_softhsm::{PgCluster, StopMode};

#[test]
fn a_cluster_starts_idempotently_survives_a_crash_and_stops() {
    let dir = coffer_tests::scratch_dir("pg");
    let cluster = PgCluster::start(&dir.path().join("node"), None).unwrap();
    let port = cluster.port();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "listening on 127.0.0.1:{port}"
    );

    // Starting again finds it running on the same port.
    let again = PgCluster::start(&dir.path().join("node"), None).unwrap();
    assert_eq!(again.port(), port);

    cluster.stop(StopMode::Immediate).unwrap();
    assert!(!cluster.is_running());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    cluster.restart().unwrap();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "recovered after a crash"
    );

    cluster.stop(StopMode::Fast).unwrap();
    assert!(!cluster.is_running());
}

#[test]
fn a_tls_cluster_is_verified_full_and_refuses_plaintext() {
    let dir = coffer_tests::scratch_dir("pgtls");
    let ca = coffer_softhsm::DevCa::open(&dir.path().join("ca")).unwrap();
    let cert = ca.server("blob-1").unwrap();
    let tls = coffer_softhsm::PgTls {
        cert: cert.cert,
        key: cert.key,
        clients: None,
    };
    let cluster = PgCluster::start(&dir.path().join("node"), Some(&tls)).unwrap();
    let psql = |sslmode: &str| {
        std::process::Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode} sslrootcert={}",
                cluster.port(),
                ca.cert_path().display()
            ))
            .args(["-tAc", "select ssl from pg_stat_ssl where pid = pg_backend_pid()"])
            .output()
            .unwrap()
    };
    let verified = psql("verify-full");
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&verified.stdout).trim(), "t");
    let plain = psql("disable");
    assert!(
        !plain.status.success(),
        "a plaintext connection was accepted"
    );
}
