//! Coffer hosts: the API host, the encryption host, the blob store client and the CLI (later issues).
