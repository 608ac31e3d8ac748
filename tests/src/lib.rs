//! Shared fixtures for the suites in `tests/tests/`.
