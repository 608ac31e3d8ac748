//! Coffer's key host: the only process that talks to the HSM or TPM and
//! the only one with access to the key DB.
//!
//! It serves a small API over mutual TLS ([`server`]); each client
//! certificate carries a role that the key host enforces. It never receives
//! tenant, study, participant or record data: only KEK ids and its own
//! random key refs.

pub mod api;
pub mod client;
pub mod config;
pub mod db;
pub mod dbtls;
pub mod hardening;
pub mod logging;
pub mod oplog;
pub mod ratelimit;
pub mod server;
pub mod settings;
pub mod tls;
