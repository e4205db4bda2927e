//! pilot-gateway: bridges ordinary TCP clients to agents on the Pilot
//! Protocol overlay through the local daemon's IPC socket.
//!
//! The crate is a library with two binaries: `pilot-gateway` (the product)
//! and `pilot-devd` (a stand-in daemon for trying and testing it). See
//! `docs/ARCHITECTURE.md` for how the modules fit together.

pub mod address;
pub mod error;
pub mod ipc;
pub mod json;
