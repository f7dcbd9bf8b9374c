//! The conformance suite over RabbitMQ: every machine in a session of its own, with a host
//! id of its own, the sessions sharing one registry, so the selector computes `Remote`
//! itself and the broker carries everything (`carried_by == "rabbitmq"`).
#![cfg(feature = "rabbitmq")]
mod conformance;

use switchyard::rabbitmq::ready_for_tests;

conformance_suite!(
    conformance::Fixture::rabbitmq(),
    skip_unless = ready_for_tests
);
