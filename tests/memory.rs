//! The conformance suite over the same-process `memory` transport.
mod conformance;
conformance_suite!(conformance::Fixture::memory());
