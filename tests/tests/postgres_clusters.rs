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
