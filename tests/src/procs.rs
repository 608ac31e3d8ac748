//! Coffer's own processes, started from the workspace's built binaries.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A built binary of the workspace (`scripts/test` builds them first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// A running child process, killed on drop; its stderr goes to a log file.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// The address it reported listening on.
    pub addr: String,
}

impl Proc {
    /// Starts `cmd` with stderr to `log` and waits until it logs
    /// `listening on <addr>`.
    pub fn start(mut cmd: Command, log: &Path) -> Self {
        let file = fs::File::create(log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start process");
        let mut proc = Self {
            child,
            log: log.to_path_buf(),
            addr: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = fs::read_to_string(log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(|l| l.split("listening on ").nth(1)) {
                proc.addr = addr.trim().to_owned();
                return proc;
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening:\n{text}",
                    log.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not listening after 30 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The base URL of its HTTPS listener.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it now (as a crash would) and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// True while it runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
