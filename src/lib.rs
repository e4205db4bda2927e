//! pilot-gateway: bridges ordinary TCP clients to agents on the Pilot
//! Protocol overlay through the local daemon's IPC socket.
//!
//! The library holds the product; the crate's binaries are `pilot-gateway`
//! (the product) and `pilot-devd` (a stand-in daemon for trying and testing
//! it, in `src/bin/pilot-devd/`). See `docs/ARCHITECTURE.md` for how the
//! modules fit together.

// Data from outside (daemon, files, command line, network) is never
// unwrapped: every failure becomes an error that says what happened.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// System calls live in `sys` and `privilege` only, each with a SAFETY note.
#![deny(unsafe_code)]

// Entry and commands.
pub mod background;
pub mod cli;
pub mod commands;
pub mod config;
pub mod help;
pub mod output;

// The running gateway and its data path.
pub mod access;
pub mod closing;
pub mod daemon;
pub mod engine;
pub mod expose;
pub mod gateway;
pub mod limits;
pub mod listener;
pub mod notify;
pub mod relay;
pub mod stats;

// Leaves: formats, state, the local system.
pub mod address;
pub mod alias;
pub mod conn_list;
pub mod error;
pub mod escape;
pub mod ipc;
pub mod json;
pub mod log;
#[allow(unsafe_code)]
pub mod privilege;
pub mod proxy;
pub mod registry;
pub mod state;
pub mod subnet;
#[allow(unsafe_code)]
pub mod sys;
#[cfg(test)]
mod testkit;
