//! The conformance suite over the same-thread `direct` transport.
mod conformance;
conformance_suite!(conformance::Fixture::direct());
