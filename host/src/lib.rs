//! Coffer's hosts and command-line interface: the public API host (`api`),
//! the encryption host (`encryptd`) and its blob store client (`blob`), the
//! maintenance worker (`worker`), the record crypto (`crypto`), and the
//! `coffer` CLI with its local development stack (`cli`). The key host and
//! the key backends live in `hsm/`.

pub mod api;
pub mod blob;
pub mod cli;
pub mod crypto;
pub mod encryptd;
pub mod worker;
