//! pilot-gateway: bridges ordinary TCP clients to agents on the Pilot
//! Protocol overlay through the local daemon's IPC socket.
//!
//! The crate is a library with two binaries: `pilot-gateway` (the product)
//! and `pilot-devd` (a stand-in daemon for trying and testing it). See
//! `docs/ARCHITECTURE.md` for how the modules fit together.

// Data from outside (daemon, files, command line, network) is never
// unwrapped: every failure becomes an error that says what happened.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod access;
pub mod address;
pub mod alias;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod expose;
pub mod gateway;
pub mod ipc;
pub mod json;
pub mod log;
pub mod privilege;
pub mod state;
pub mod subnet;
pub mod sys;
