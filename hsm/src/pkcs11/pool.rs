//! A small pool of logged-in sessions.
//!
//! A `Session` is `Send` but not `Sync`: each call borrows one exclusively.
//! Sessions are opened lazily up to a cap and reused, never opened per call
//! (SoftHSM gets quadratically slower as closed sessions pile up).

use std::sync::{Arc, Condvar, Mutex};

use cryptoki::context::Pkcs11;
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use crate::error::Result;

use super::errors::{ck, is_session_broken};
use super::module::Module;

#[derive(Debug)]
pub(crate) struct SessionPool {
    module: Pkcs11,
    objects: Arc<Mutex<()>>,
    slot: Slot,
    cap: usize,
    state: Mutex<PoolState>,
    returned: Condvar,
}

#[derive(Debug, Default)]
struct PoolState {
    idle: Vec<Session>,
    open: usize,
}

impl SessionPool {
    /// A pool whose first session (already logged in) is `first`.
    pub(crate) fn new(module: &Module, slot: Slot, cap: usize, first: Session) -> Self {
        Self {
            module: module.context.clone(),
            objects: module.objects.clone(),
            slot,
            cap: cap.max(1),
            state: Mutex::new(PoolState {
                idle: vec![first],
                open: 1,
            }),
            returned: Condvar::new(),
        }
    }

    /// Runs `op` on a pooled session. A session the device reports as broken
    /// is closed instead of returned.
    pub(crate) fn with<T>(&self, op: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        let session = self.checkout()?;
        let result = op(&session);
        let broken = matches!(&result, Err(e) if is_session_broken(e));
        let mut state = self.lock();
        if broken {
            state.open -= 1;
            drop(session);
        } else {
            state.idle.push(session);
        }
        drop(state);
        self.returned.notify_one();
        result
    }

    /// As [`SessionPool::with`], holding the module's object-management
    /// lock: for every call that finds, reads, creates or destroys objects.
    pub(crate) fn with_objects<T>(&self, op: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        self.with(|session| {
            let _serialised = self
                .objects
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            op(session)
        })
    }

    fn checkout(&self) -> Result<Session> {
        let mut state = self.lock();
        loop {
            if let Some(session) = state.idle.pop() {
                return Ok(session);
            }
            if state.open < self.cap {
                state.open += 1;
                drop(state);
                // Login state is per application and token, so a new session
                // is already logged in.
                return self
                    .module
                    .open_rw_session(self.slot)
                    .map_err(ck("C_OpenSession"))
                    .inspect_err(|_| self.lock().open -= 1);
            }
            state = self
                .returned
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
