//! Coffer's hosts and command-line interface.
//!
//! Today: the `coffer` CLI and its local development stack (a SoftHSM token
//! and a swtpm with a round trip through both key backends). The API host,
//! encryption host, blob store client and maintenance worker land here next
//! (see `shared/DESIGN.md`).

pub mod api;
pub mod blob;
pub mod cli;
pub mod crypto;
pub mod encryptd;
pub mod worker;
