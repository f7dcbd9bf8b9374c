//! Switchyard on Redis: discovery that spans hosts, and a transport for machines on other hosts.
//!
//! - [`RedisRegistry`] implements the core `Registry` for many
//!   processes on many hosts: one hash per machine, an index per type, liveness as keys
//!   with a TTL that heartbeats refresh, and a watch channel of joins, leaves and health
//!   changes.
//! - The transport carries topics on Redis pub/sub (at-most-once, lowest latency) and
//!   machine inboxes, any-of-type sends and consumer groups on Redis Streams
//!   (at-least-once).
//!
//! Every key and channel starts with the configured namespace, so deployments sharing one
//! Redis never see each other. docs/PROTOCOL.md gives the key and channel layout.

mod config;
mod names;
pub mod registry;
mod settings;
mod transport;
mod wire;

pub use config::{DEFAULT_URL, RedisConfig, URL_ENV, ready_for_tests};
pub use names::{FIELD, GROUP, escape as escape_glob, glob as topic_glob};
pub use registry::{RedisRegistry, RedisRegistryBuilder};
pub use settings::RedisTransportConfig;
pub use transport::{META_NAMESPACE, NAME, RedisTransport};
