//! A software TPM (swtpm) on loopback TCP, with a state folder of its own.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::tools::{SetupError, io_err, run};

/// A running swtpm. Stopped cleanly (TPM2_Shutdown, then the control
/// channel's shutdown) by [`Swtpm::stop`] or on drop, so the TPM state in the
/// folder survives for the next start.
#[derive(Debug)]
pub struct Swtpm {
    state_dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Swtpm {
    /// Starts a swtpm keeping its state in `state_dir` (created if missing)
    /// on two free loopback ports.
    pub fn start(state_dir: &Path) -> Result<Self, SetupError> {
        fs::create_dir_all(state_dir).map_err(io_err("cannot create", state_dir))?;
        let mut last_error = None;
        // A port found free can be taken by someone else before swtpm binds
        // it: try a few pairs.
        for _ in 0..5 {
            let port = free_port_pair()?;
            match Self::start_on(state_dir, port) {
                Ok(tpm) => return Ok(tpm),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or(SetupError::Timeout("swtpm did not start".into())))
    }

    fn start_on(state_dir: &Path, port: u16) -> Result<Self, SetupError> {
        let log = state_dir.join("swtpm.log");
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state_dir.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .arg("--log")
            .arg(format!("file={},level=1", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SetupError::Missing {
                tool: "swtpm".into(),
                package: "swtpm",
            },
            _ => SetupError::Failed {
                tool: "swtpm".into(),
                status: "could not start".into(),
                stderr: e.to_string(),
            },
        })?;
        let mut tpm = Self {
            state_dir: state_dir.to_path_buf(),
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(tpm.addr()).is_ok() {
                // Someone else's server may hold the port while ours failed
                // to bind and is exiting: make sure ours is still alive.
                sleep(Duration::from_millis(30));
                if let Some(Ok(None)) = tpm.child.as_mut().map(Child::try_wait) {
                    return Ok(tpm);
                }
            }
            if let Some(Ok(Some(status))) = tpm.child.as_mut().map(Child::try_wait) {
                tpm.child = None;
                return Err(SetupError::Failed {
                    tool: "swtpm".into(),
                    status: status.to_string(),
                    stderr: fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            if Instant::now() > deadline {
                return Err(SetupError::Timeout(format!(
                    "swtpm did not listen on {} within 10 s",
                    tpm.addr()
                )));
            }
            sleep(Duration::from_millis(20));
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The TCTI string for tss-esapi and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The folder holding the TPM's state.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Shuts the TPM down cleanly and waits for the process to end.
    pub fn stop(mut self) -> Result<(), SetupError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), SetupError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // TPM2_Shutdown(CLEAR) first so the TPM saves its state and does not
        // count the stop as an attack on the next start.
        let tpm_shutdown = run(
            Command::new("tpm2_shutdown")
                .arg("-c")
                .env("TPM2TOOLS_TCTI", self.tcti()),
            "tpm2-tools",
        );
        let ctrl = run(
            Command::new("swtpm_ioctl")
                .arg("--tcp")
                .arg(format!("127.0.0.1:{}", self.port + 1))
                .arg("-s"),
            "swtpm-tools",
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return tpm_shutdown.and(ctrl).map(|_| ());
            }
            sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        tpm_shutdown.and(ctrl)?;
        Err(SetupError::Timeout(
            "swtpm did not exit after shutdown; killed".into(),
        ))
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// A port P such that P and P+1 are both free on loopback now.
///
/// Chosen below the kernel's ephemeral range: the swtpm TCTI opens a TCP
/// connection per TPM command, and the thousands of client ports it leaves
/// in TIME_WAIT would otherwise collide with a pair picked there.
fn free_port_pair() -> Result<u16, SetupError> {
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(2).max(10_100));
    for _ in 0..200 {
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).map_err(|e| SetupError::Timeout(format!("no randomness: {e}")))?;
        let port = low + u16::from_le_bytes(r) % (high - low);
        let free = |p: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok();
        if free(port) && free(port + 1) {
            return Ok(port);
        }
    }
    Err(SetupError::Timeout(
        "no two adjacent free loopback ports".into(),
    ))
}
