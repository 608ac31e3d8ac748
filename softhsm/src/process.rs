//! Coffer's own service processes (key host, encryption host) started as
//! children: stderr to a log file, ready once they log `listening on ADDR`,
//! stopped when dropped. Shared by `coffer dev` and the tests.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::{SetupError, io_err};

/// A running child service, stopped on drop.
#[derive(Debug)]
pub struct Service {
    child: Child,
    name: String,
    /// Where its stderr goes.
    pub log: std::path::PathBuf,
    /// The address it reported listening on.
    pub addr: String,
}

impl Service {
    /// Starts `cmd` with stderr to `log` and waits (up to 60 s) until it
    /// logs `listening on <addr>`.
    pub fn start(name: &str, mut cmd: Command, log: &Path) -> Result<Self, SetupError> {
        let file = fs::File::create(log).map_err(io_err("cannot create", log))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(io_err("cannot start", Path::new(cmd.get_program())))?;
        let mut service = Self {
            child,
            name: name.to_owned(),
            log: log.to_path_buf(),
            addr: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = fs::read_to_string(log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(|l| l.split("listening on ").nth(1)) {
                service.addr = addr.trim().to_owned();
                return Ok(service);
            }
            if let Ok(Some(status)) = service.child.try_wait() {
                return Err(SetupError::Failed {
                    tool: name.to_owned(),
                    status: status.to_string(),
                    stderr: format!("see {}:\n{}", log.display(), tail(&text)),
                });
            }
            if Instant::now() > deadline {
                return Err(SetupError::Timeout(format!(
                    "{name} did not start within 60 s; see {}",
                    log.display()
                )));
            }
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

    /// Kills it now, as a crash would, and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks it to stop (SIGINT, as Ctrl-C), waits up to 5 s, then kills it.
    pub fn stop(&mut self) {
        if !self.is_running() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within 5 s; killing it", self.name);
        self.kill();
    }

    /// True while it runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
