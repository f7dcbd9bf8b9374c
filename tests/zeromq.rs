//! The conformance suite over zeromq between sessions with distinct host ids sharing one
//! registry: the selector computes `Remote` itself and routes it to zeromq.
#![cfg(feature = "zeromq")]
mod conformance;
conformance_suite!(conformance::Fixture::zeromq());
