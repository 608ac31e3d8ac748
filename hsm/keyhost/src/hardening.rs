//! Process hardening for the services that hold keys or plaintext: no core
//! dumps (a dump would write keys and records to disk) and, where the OS
//! allows, memory locked so that nothing is swapped out.

use rustix::mm::{MlockAllFlags, mlockall};
use rustix::process::{
    DumpableBehavior, Resource, Rlimit, getrlimit, set_dumpable_behavior, setrlimit,
};

/// How a process was hardened, for its start-up log line.
#[derive(Debug, PartialEq, Eq)]
pub struct Hardening {
    /// Core dumps are off (RLIMIT_CORE 0 and not dumpable, which also keeps
    /// other processes of the same user from ptrace-reading its memory).
    pub no_core_dumps: bool,
    /// All memory, present and future, is locked in RAM.
    pub memory_locked: bool,
}

/// Turns core dumps off and locks memory when the memlock limit cannot be
/// hit (unlimited, or root): under a finite limit a locked process would
/// see allocations fail later, so it stays unlocked and says so.
pub fn harden(name: &str) -> Hardening {
    let no_core_dumps = no_core_dumps();
    if !no_core_dumps {
        tracing::warn!("{name}: could not turn core dumps off");
    }
    let memory_locked = lock_all_memory(name);
    tracing::info!(
        "{name}: core dumps {}, memory {}",
        if no_core_dumps { "off" } else { "ON" },
        if memory_locked {
            "locked"
        } else {
            "not locked"
        }
    );
    Hardening {
        no_core_dumps,
        memory_locked,
    }
}

fn no_core_dumps() -> bool {
    let zero = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    setrlimit(Resource::Core, zero).is_ok()
        && set_dumpable_behavior(DumpableBehavior::NotDumpable).is_ok()
}

fn lock_all_memory(name: &str) -> bool {
    let limit = getrlimit(Resource::Memlock);
    let root = rustix::process::geteuid().is_root();
    if limit.current.is_some() && !root {
        tracing::info!(
            "{name}: memory not locked (RLIMIT_MEMLOCK is finite; \
             LimitMEMLOCK=infinity in its systemd unit locks it)"
        );
        return false;
    }
    // ONFAULT: pages are locked as they are first touched, not all at once.
    let flags = MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT;
    match mlockall(flags) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("{name}: memory not locked: {e}");
            false
        }
    }
}
