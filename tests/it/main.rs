//! The integration tests, one test binary: each module was its own binary once, each
//! linking the whole crate. Run one module with `cargo test --test it traffic::`.
//!
//! Every test of every module runs in this one process, as many at a time as there are
//! cores: what a process has once (the metrics recorder, ONNX Runtime's environment,
//! its memory) all of them share. `common` says how a test keeps to itself all the same.

// Test code: a panic is the failure report, and tests spawn on the runtime directly
// (they own it and end it). The crate's [lints] keep both out of the server.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod auth;
mod batch_stats;
mod batching;
mod capture;
mod cli;
mod common;
mod config_reference;
mod drift;
mod fleet;
mod front_door;
mod fuzz_decoders;
mod grpc_api;
mod hot_swap;
mod http_api;
mod inline;
mod limits;
mod mlflow;
mod prometheus;
mod readiness;
mod repository;
mod rollout;
mod tls;
mod traffic;
mod ui;
