//! The conformance behaviours that involve the registry (discovery, globs, types, ids,
//! heartbeats and health, leaving and rejoining, routes that follow the registry), run on
//! sessions whose registry is a `RedisRegistry` (one namespace per world), with the
//! same-process memory transport carrying the messages.
//!
//! Run: `cargo test --features redis --test redis_registry_conformance`.

#![cfg(feature = "redis")]

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use conformance::Fixture;
use switchyard::Location;
use switchyard::redis::{RedisConfig, RedisRegistry, ready_for_tests};

/// Memory transport, Redis registry. The TTL is short so the health behaviour finishes
/// quickly; sessions heartbeat well within it, and nothing is removed during a test.
fn redis_registry() -> Fixture {
    Fixture::new("memory", Location::SameProcess, false, |b, host| {
        let cfg = RedisConfig::from_env().namespace(format!("sy-test-regconf-{}", host.namespace));
        // The fixture hook is synchronous; the multi-thread test runtime can block here.
        let reg = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(
                RedisRegistry::builder(cfg)
                    .ttl(Duration::from_millis(400))
                    .remove_after(Duration::from_secs(60))
                    .connect(),
            )
        })
        .expect("the redis registry connects");
        b.selector(|s| s.without(["direct"])).session(move |s| {
            s.registry(Arc::new(reg))
                .heartbeat_interval(Some(Duration::from_millis(100)))
        })
    })
}

conformance_suite!(@tests (ready_for_tests); redis_registry();
    duplicate_registration_is_error, send_to_unregistered_is_error, session_isolation,
    register_and_discover_by_type, auto_connect_same_type, discover_by_pattern,
    any_of_type_spreads_load, type_based_ping_pong, list_machine_types,
    health_turns_unhealthy_without_heartbeats, rejoined_id_gets_the_new_events,
    declared_sender_follows_a_target_that_moved, declared_sender_to_a_target_that_left,
    semantics_unknown_target, semantics_dead_target, send_delivers_to_target, request_reply,
    mesh_of_ten_all_to_all, session_cleanup_on_drop);
