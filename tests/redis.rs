//! The conformance suite over Redis: every machine in a session of its own, with a host id
//! of its own, the sessions sharing one registry, so the selector computes `Remote` itself
//! and Redis carries everything (`carried_by == "redis"`): machine sends, requests and
//! groups on streams, topics on pub/sub.
#![cfg(feature = "redis")]
mod conformance;

use switchyard::redis::ready_for_tests;

conformance_suite!(conformance::Fixture::redis(), skip_unless = ready_for_tests);
