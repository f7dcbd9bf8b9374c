//! The conformance suite over the ipc transport, peer-to-peer.
#![cfg(feature = "ipc")]
mod conformance;
conformance_suite!(conformance::Fixture::ipc_p2p());
