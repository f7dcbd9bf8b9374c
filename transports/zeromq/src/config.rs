//! Settings of the transport, and binding its sockets before the crate takes them.

use std::time::Duration;

use switchyard_core::{Error, Result};

/// Settings of a zeromq transport.
#[derive(Clone, Debug)]
pub struct ZmqConfig {
    /// Where the ROUTER binds: `tcp://HOST:PORT` (port 0 picks a free one) or `ipc:///path`.
    pub router_bind: String,
    /// Where the PUB binds.
    pub pub_bind: String,
    /// The ROUTER endpoint peers are told (default: the bound one, with its real port).
    pub router_advertise: Option<String>,
    /// The PUB endpoint peers are told.
    pub pub_advertise: Option<String>,
    /// Bytes of sends to one peer process that may be unacknowledged at once (default 1 MiB,
    /// at least 256 KiB); past it senders wait.
    pub window: usize,
    /// How long bytes may wait for an acknowledgement (and a request for its answer) before
    /// the peer counts as gone (default 5 s).
    pub peer_timeout: Duration,
    /// How long connecting to a peer may take (default 2 s).
    pub connect_timeout: Duration,
    /// Largest encoded envelope sent or accepted (default 16 MiB).
    pub max_message_size: usize,
    /// Also reach machines in other processes of this host (`Location::SameMachine`); by
    /// default only other hosts (`Remote`), the same host being ipc's.
    pub same_machine: bool,
    /// How long a receiver holds back an acknowledgement of fewer than 64 KiB (default 5 ms).
    pub ack_delay: Duration,
}

impl Default for ZmqConfig {
    fn default() -> Self {
        ZmqConfig {
            router_bind: "tcp://127.0.0.1:0".into(),
            pub_bind: "tcp://127.0.0.1:0".into(),
            router_advertise: None,
            pub_advertise: None,
            window: 1024 * 1024,
            peer_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_message_size: 16 * 1024 * 1024,
            same_machine: false,
            ack_delay: Duration::from_millis(5),
        }
    }
}

impl ZmqConfig {
    /// Binds the ROUTER and the PUB here (`tcp://0.0.0.0:5555`, `tcp://127.0.0.1:0`, `ipc:///run/x`).
    pub fn bind(mut self, router: impl Into<String>, publish: impl Into<String>) -> Self {
        self.router_bind = router.into();
        self.pub_bind = publish.into();
        self
    }
    /// Tells peers these endpoints instead of the bound ones (a host behind NAT, a container).
    pub fn advertise(mut self, router: impl Into<String>, publish: impl Into<String>) -> Self {
        self.router_advertise = Some(router.into());
        self.pub_advertise = Some(publish.into());
        self
    }
    /// Also carries sends between processes of one host.
    pub fn same_machine(mut self, on: bool) -> Self {
        self.same_machine = on;
        self
    }
    /// Sets the unacknowledged-bytes window per peer process.
    pub fn window(mut self, bytes: usize) -> Self {
        self.window = bytes;
        self
    }
    /// Sets how long a peer may stay silent with bytes outstanding.
    pub fn peer_timeout(mut self, t: Duration) -> Self {
        self.peer_timeout = t;
        self
    }
    /// Sets how long connecting may take.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }
}

/// A listener bound now (so its real address is known at once), handed to the crate later.
pub(crate) enum Bound {
    Tcp(std::net::TcpListener),
    #[cfg(unix)]
    Ipc(std::os::unix::net::UnixListener),
}

impl From<Bound> for zeromq::Listener {
    fn from(b: Bound) -> Self {
        match b {
            Bound::Tcp(l) => l.into(),
            #[cfg(unix)]
            Bound::Ipc(l) => l.into(),
        }
    }
}

/// Binds `endpoint`; returns the listener and the endpoint peers should use.
pub(crate) fn bind_now(endpoint: &str, advertise: Option<&str>) -> Result<(Bound, String)> {
    let bad = |why: String| Error::Config(format!("zeromq endpoint `{endpoint}`: {why}"));
    if let Some(addr) = endpoint.strip_prefix("tcp://") {
        let l = std::net::TcpListener::bind(addr).map_err(|e| {
            bad(format!(
                "cannot bind: {e}; pick a free port or another address"
            ))
        })?;
        l.set_nonblocking(true)
            .map_err(|e| bad(format!("cannot set non-blocking: {e}")))?;
        let local = l
            .local_addr()
            .map_err(|e| bad(format!("no local address: {e}")))?;
        let adv = match advertise {
            Some(a) => a.to_string(),
            None if local.ip().is_unspecified() => {
                return Err(bad(format!(
                    "bound to all interfaces ({local}), so peers need an address they can reach: \
                     set ZmqConfig::advertise (e.g. tcp://<this host's IP>:{})",
                    local.port()
                )));
            }
            None => format!("tcp://{local}"),
        };
        return Ok((Bound::Tcp(l), adv));
    }
    #[cfg(unix)]
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
            bad(format!(
                "cannot bind: {e}; remove a stale socket file or pick another path"
            ))
        })?;
        l.set_nonblocking(true)
            .map_err(|e| bad(format!("cannot set non-blocking: {e}")))?;
        return Ok((Bound::Ipc(l), advertise.unwrap_or(endpoint).to_string()));
    }
    Err(bad(
        "only tcp://HOST:PORT and ipc:///path endpoints are supported".into(),
    ))
}
