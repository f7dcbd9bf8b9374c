//! Configuration of the RabbitMQ transport: the broker URL, the namespace, the mode and the limits.

use std::time::Duration;

/// The environment variable read by [`RabbitConfig::from_env`] for the broker URL.
pub const URL_ENV: &str = "SWITCHYARD_AMQP_URL";

/// The URL used when none is given: the local broker with the default account.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long messages live on the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Transient exchanges, queues and messages: fastest; what the broker holds is lost
    /// when the broker restarts.
    #[default]
    Fast,
    /// Durable exchanges and queues, persistent messages: whatever the broker confirmed
    /// survives a broker restart.
    Durable,
}

/// Settings of a [`crate::RabbitTransport`].
#[derive(Clone, Debug)]
pub struct RabbitConfig {
    /// `amqp://user:password@host:port/vhost` or `amqps://...` (credentials and TLS come from it).
    pub url: String,
    /// Prefix of every exchange and queue name: two deployments on one broker with different
    /// namespaces never see each other.
    pub namespace: String,
    /// Transient or durable.
    pub mode: Mode,
    /// Unacknowledged deliveries the broker sends each consumer ahead (AMQP QoS).
    pub prefetch: u16,
    /// Longest wait for the first connection (and for each reconnection attempt).
    pub connect_timeout: Duration,
    /// How long a send (or a bind) waits for the connection while it is being restored
    /// before it fails with a retryable [`switchyard_core::Error::Transport`].
    pub outage_wait: Duration,
    /// First delay between reconnection attempts; it doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest delay between reconnection attempts.
    pub backoff_max: Duration,
    /// Largest encoded envelope; bigger is [`switchyard_core::Error::TooLarge`] at the sender.
    pub max_message: usize,
    /// `x-max-priority` of machine and group queues (0 turns broker priorities off).
    pub max_priority: u8,
    /// Exchange that malformed or rejected messages are dead-lettered to (`None`: dropped).
    pub dead_letter_exchange: Option<String>,
    /// Fast mode: a machine queue nobody consumes is deleted by the broker after this long
    /// (its process died without closing it). Durable queues never expire.
    pub queue_expiry: Duration,
    /// Publishes that may wait for their confirm at once within one batch.
    pub confirm_window: usize,
    /// PEM file of the CA that signed the broker's certificate, for `amqps://` when it is
    /// not in the system's trust store (needs feature `tls`).
    pub tls_ca_file: Option<std::path::PathBuf>,
}

impl RabbitConfig {
    /// Settings for the broker at `url`, with the default namespace `switchyard`.
    pub fn new(url: impl Into<String>) -> RabbitConfig {
        RabbitConfig {
            url: url.into(),
            namespace: "switchyard".into(),
            mode: Mode::Fast,
            prefetch: 256,
            connect_timeout: Duration::from_secs(5),
            outage_wait: Duration::from_secs(10),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            max_message: 16 * 1024 * 1024,
            max_priority: 9,
            dead_letter_exchange: None,
            queue_expiry: Duration::from_secs(60),
            confirm_window: 512,
            tls_ca_file: None,
        }
    }

    /// Settings for the broker named by `SWITCHYARD_AMQP_URL`, else the local one ([`DEFAULT_URL`]).
    pub fn from_env() -> RabbitConfig {
        RabbitConfig::new(std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_string()))
    }

    /// Sets the namespace (prefix of every exchange and queue).
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// Trusts the CA in this PEM file for `amqps://` brokers (needs feature `tls`).
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the prefetch (at least 1).
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// Sets how long sends wait for a lost connection to come back.
    pub fn outage_wait(mut self, d: Duration) -> Self {
        self.outage_wait = d;
        self
    }

    /// Sets the connection timeout.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Sets the dead-letter exchange of machine and group queues.
    pub fn dead_letter_exchange(mut self, ex: impl Into<String>) -> Self {
        self.dead_letter_exchange = Some(ex.into());
        self
    }

    /// The URL with its password replaced by `***`, for messages and logs.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

impl Default for RabbitConfig {
    fn default() -> Self {
        RabbitConfig::from_env()
    }
}

/// `amqp://user:secret@host` → `amqp://user:***@host`.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &rest[at..])
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
        assert_eq!(redact("nonsense"), "nonsense");
    }
}
