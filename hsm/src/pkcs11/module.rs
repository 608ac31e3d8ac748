//! Loading a PKCS#11 module once per process.
//!
//! `C_Initialize` may run once per process and `C_Finalize` ends every user
//! of the module, so several backends on one module (tests, or a key host
//! with two tokens) must share one initialised context. It is kept for the
//! life of the process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use crate::error::{Error, Result};

/// A loaded module and the lock its users take around object management.
#[derive(Clone, Debug)]
pub(crate) struct Module {
    pub(crate) context: Pkcs11,
    /// SoftHSM corrupts its object store when threads create, destroy or
    /// search token objects at the same time (intermittent
    /// `CKR_GENERAL_ERROR`, seen in our tests and in Parsec's issue #264),
    /// so object management is serialised per module; crypto calls are not.
    pub(crate) objects: Arc<Mutex<()>>,
}

static MODULES: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();

/// The initialised context of the module at `path`, loading it on first use.
/// Every caller in the process shares it; it is never finalised.
pub fn shared_module(path: &Path) -> Result<Pkcs11> {
    module(path).map(|m| m.context)
}

pub(crate) fn module(path: &Path) -> Result<Module> {
    let unavailable = |reason: String| Error::Unavailable {
        what: format!("PKCS#11 module {}", path.display()),
        reason,
    };
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(module) = modules.get(path) {
        return Ok(module.clone());
    }
    if !path.exists() {
        return Err(unavailable("no such file".into()));
    }
    let module = Pkcs11::new(path).map_err(|e| unavailable(e.to_string()))?;
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(unavailable(e.to_string())),
    }
    let module = Module {
        context: module,
        objects: Arc::default(),
    };
    modules.insert(path.to_path_buf(), module.clone());
    Ok(module)
}
