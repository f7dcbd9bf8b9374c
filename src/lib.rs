//! Switchyard: messaging middleware for state machines.
//!
//! One API whether the peer is on the same thread, in the same process, in
//! another process or on another host: every send goes through a selector that
//! looks up where the target lives and hands the message to the best transport
//! for that distance.
//!
//! This facade re-exports the crates and wires the transports enabled by cargo
//! features into [`builder`]:
//!
//! | feature | transport | reaches |
//! |---|---|---|
//! | `direct` (default) | [`direct`] | same thread |
//! | `memory` (default) | [`memory`] | same thread, same process |
//! | `ipc` (default) | [`ipc`] | same host, other process (bus daemon or peer-to-peer); added with [`Builder::ipc`] |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> switchyard::Result<()> {
//! let session = switchyard::builder().build()?;
//! let pong = session
//!     .machine("pong", "PongService")
//!     .handler(|node, ev| { let _ = node.post_reply(&ev, "PONG", ()); })
//!     .build()
//!     .await?;
//! let ping = session.machine("ping", "PingService").build().await?;
//! let reply = ping.request(pong.id().clone(), "PING", (), std::time::Duration::from_secs(1)).await?;
//! assert_eq!(reply.name(), "PONG");
//! # Ok(()) }
//! ```

use std::sync::Arc;

pub use switchyard_core as core;
pub use switchyard_core::*;
#[cfg(feature = "direct")]
pub use switchyard_direct as direct;
#[cfg(feature = "ipc")]
pub use switchyard_ipc as ipc;
#[cfg(feature = "memory")]
pub use switchyard_memory as memory;
pub use switchyard_selector as selector;
pub use switchyard_selector::{Selector, SelectorBuilder};

/// A session builder with the enabled transports wired into the selector.
pub struct Builder {
    session: SessionBuilder,
    selector: SelectorBuilder,
}

/// Starts a [`Builder`] with every transport enabled by cargo features.
pub fn builder() -> Builder {
    #[allow(unused_mut)]
    let mut selector = Selector::builder();
    #[cfg(feature = "direct")]
    {
        selector = selector.transport(Arc::new(direct::DirectTransport::new()));
    }
    #[cfg(feature = "memory")]
    {
        selector = selector.transport(Arc::new(memory::MemoryTransport::new()));
    }
    Builder {
        session: SessionBuilder::new(),
        selector,
    }
}

impl Builder {
    /// Adjusts the session settings (strict links, registry, heartbeats, host id).
    pub fn session(mut self, f: impl FnOnce(SessionBuilder) -> SessionBuilder) -> Self {
        self.session = f(self.session);
        self
    }
    /// Adjusts the selector (preferences, overrides, removing or adding transports).
    pub fn selector(mut self, f: impl FnOnce(SelectorBuilder) -> SelectorBuilder) -> Self {
        self.selector = f(self.selector);
        self
    }
    /// Adds a transport after the built-in ones.
    pub fn transport(mut self, t: Arc<dyn Transport>) -> Self {
        self.selector = self.selector.transport(t);
        self
    }
    /// Adds the ipc transport of `bus` and makes its daemon-backed registry the session's registry,
    /// so discovery and sends span every process of the host.
    #[cfg(feature = "ipc")]
    pub fn ipc(self, bus: &ipc::IpcBus) -> Self {
        let registry = bus.registry();
        self.transport(bus.transport())
            .session(|s| s.registry(registry))
    }
    /// Builds the session; must run inside a tokio runtime.
    pub fn build(self) -> Result<Session> {
        self.session.router(Arc::new(self.selector.build())).build()
    }
}
