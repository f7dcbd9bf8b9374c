//! The conformance suite over the ipc transport through the bus daemon.
#![cfg(feature = "ipc")]
mod conformance;
conformance_suite!(conformance::Fixture::ipc_bus());
