//! Settings of the transport on top of the shared [`RedisConfig`].

use std::time::Duration;

use crate::config::RedisConfig;

/// Settings of a [`crate::RedisTransport`].
#[derive(Clone, Debug)]
pub struct RedisTransportConfig {
    /// Server URL and namespace (shared with the registry).
    pub redis: RedisConfig,
    /// How long a send, publish or bind waits for a lost connection to come back before it
    /// fails with a retryable `Error::Transport`.
    pub outage_wait: Duration,
    /// Longest wait for one connection attempt.
    pub connect_timeout: Duration,
    /// First delay between reconnection attempts; it doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest delay between reconnection attempts.
    pub backoff_max: Duration,
    /// Largest encoded envelope; bigger is `Error::TooLarge` at the sender.
    pub max_message: usize,
    /// Approximate bound of every stream (`XADD ... MAXLEN ~`): the oldest entries go first.
    pub stream_maxlen: usize,
    /// An entry read by a consumer but not acknowledged for this long is claimed by another
    /// consumer of its stream (a member that died before acknowledging).
    pub claim_idle: Duration,
    /// Entries read per stream at once.
    pub read_count: usize,
    /// Longest single blocking read; binds wake the reader earlier.
    pub block: Duration,
    /// How long a machine's inbox stream outlives the last refresh by its session (every
    /// third of it, while the machine is bound): the inboxes of a process that died without
    /// unbinding are removed by Redis after this, with what they held, so dead deployments
    /// do not fill the server. `None` keeps them until a machine of the same id binds and
    /// leaves again.
    pub inbox_lease: Option<Duration>,
}

impl RedisTransportConfig {
    /// Defaults on top of `redis`.
    pub fn new(redis: RedisConfig) -> RedisTransportConfig {
        RedisTransportConfig {
            redis,
            outage_wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            max_message: 16 * 1024 * 1024,
            stream_maxlen: 100_000,
            claim_idle: Duration::from_secs(30),
            read_count: 256,
            block: Duration::from_secs(2),
            inbox_lease: Some(Duration::from_secs(3600)),
        }
    }

    /// Defaults, with the server of [`RedisConfig::from_env`] (`SWITCHYARD_REDIS_URL`).
    pub fn from_env() -> RedisTransportConfig {
        RedisTransportConfig::new(RedisConfig::from_env())
    }

    /// Sets [`RedisTransportConfig::inbox_lease`].
    pub fn inbox_lease(mut self, lease: Option<Duration>) -> Self {
        self.inbox_lease = lease;
        self
    }

    /// Uses `namespace` as the prefix of every key and channel.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.redis.namespace = namespace.into();
        self
    }

    /// Uses the server at `url`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.redis.url = url.into();
        self
    }

    /// Sets how long sends wait for a lost connection to come back.
    pub fn outage_wait(mut self, d: Duration) -> Self {
        self.outage_wait = d;
        self
    }

    /// Sets the idle time after which another consumer claims unacknowledged entries.
    pub fn claim_idle(mut self, d: Duration) -> Self {
        self.claim_idle = d;
        self
    }

    /// Sets the approximate bound of every stream.
    pub fn stream_maxlen(mut self, n: usize) -> Self {
        self.stream_maxlen = n.max(1);
        self
    }
}

impl Default for RedisTransportConfig {
    fn default() -> Self {
        RedisTransportConfig::from_env()
    }
}
