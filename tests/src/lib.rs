//! Shared helpers for the process-level integration tests; they arrive with the server.
#![forbid(unsafe_code)]
