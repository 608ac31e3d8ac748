//! Tests of the TPM backend's internals against a real swtpm.
