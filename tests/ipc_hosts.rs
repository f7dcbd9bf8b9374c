//! The conformance suite over ipc between sessions with distinct host ids sharing one
//! registry (the daemon's): the multi-host harness the remote transports run on, checked
//! with a transport that needs no server.
#![cfg(feature = "ipc")]
mod conformance;
conformance_suite!(conformance::Fixture::ipc_hosts());
