//! The KEK versions currently loaded in the TPM, least recently used first.
//!
//! Loading a blob costs about as much as the HMAC itself, so the last two
//! KEK versions stay loaded. Two, because the TPM has three transient slots
//! and TPM2_Load or TPM2_Create needs two free ones (the persistent storage
//! root borrows one, the new key takes another): one is flushed first.

use tss_esapi::handles::KeyHandle;

use crate::types::{KekId, KekVersion};

/// Most KEK versions loaded at once.
const CAPACITY: usize = 2;

#[derive(Debug, Default)]
pub(crate) struct LoadedKeys {
    /// Least recently used first.
    entries: Vec<(KekId, KekVersion, KeyHandle)>,
}

impl LoadedKeys {
    /// The handle of a loaded version, now the most recently used.
    pub(crate) fn get(&mut self, kek: &KekId, version: KekVersion) -> Option<KeyHandle> {
        let at = self
            .entries
            .iter()
            .position(|(k, v, _)| k == kek && *v == version)?;
        let entry = self.entries.remove(at);
        let handle = entry.2;
        self.entries.push(entry);
        Some(handle)
    }

    /// Takes out the least recently used entry if the cache is full: the
    /// caller flushes it before loading another.
    pub(crate) fn make_room(&mut self) -> Option<KeyHandle> {
        (self.entries.len() >= CAPACITY).then(|| self.entries.remove(0).2)
    }

    /// Records a freshly loaded version (after [`LoadedKeys::make_room`]).
    pub(crate) fn insert(&mut self, kek: &KekId, version: KekVersion, handle: KeyHandle) {
        self.entries.push((kek.clone(), version, handle));
    }

    /// Takes out one version, for flushing.
    pub(crate) fn remove(&mut self, kek: &KekId, version: KekVersion) -> Option<KeyHandle> {
        let at = self
            .entries
            .iter()
            .position(|(k, v, _)| k == kek && *v == version)?;
        Some(self.entries.remove(at).2)
    }

    /// Takes out everything, for flushing.
    pub(crate) fn drain(&mut self) -> Vec<KeyHandle> {
        self.entries.drain(..).map(|(_, _, h)| h).collect()
    }

    /// Number of loaded versions.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}
