//! `switchyard bus`: the inter-process bus daemon (the logic lives in `switchyard_ipc::daemon`).

use std::path::PathBuf;
use std::time::Duration;

use switchyard::ipc::{
    DaemonConfig, IpcBus, IpcConfig, default_socket_path, frame::DEFAULT_MAX_FRAME,
};

use crate::CliResult;

/// Options of `switchyard bus`.
#[derive(clap::Args)]
pub struct BusArgs {
    /// Socket path [default: $XDG_RUNTIME_DIR/switchyard/bus.sock, else $TMPDIR/switchyard-$USER/bus.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Numeric group id allowed to connect: the socket becomes mode 0660 owned by it (default 0600, own uid only).
    #[arg(long)]
    pub group: Option<u32>,
    /// Accept clients of any uid (skips the SO_PEERCRED check).
    #[arg(long)]
    pub allow_any_uid: bool,
    /// Largest frame accepted, in bytes; bigger frames get the client dropped.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// Auth token clients must present in their handshake.
    #[arg(long)]
    pub token: Option<String>,
    /// Heartbeat TTL of machines that register without one, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub ttl_ms: u64,
    /// Do not start a daemon: ask the one running on --socket for its health and print it.
    #[arg(long)]
    pub status: bool,
}

/// Runs `switchyard bus` until SIGINT/SIGTERM, then drains and removes the socket.
pub async fn run(args: BusArgs) -> CliResult {
    let socket = args.socket.unwrap_or_else(default_socket_path);
    if args.status {
        return status(socket, args.token).await;
    }
    let mut cfg = DaemonConfig::new(&socket);
    cfg.group = args.group;
    cfg.allow_any_uid = args.allow_any_uid;
    cfg.max_frame = args.max_frame;
    cfg.token = args.token;
    cfg.default_ttl = Duration::from_millis(args.ttl_ms);
    let handle = switchyard::ipc::Daemon::start(cfg)?;
    println!("switchyard bus listening on {}", socket.display());
    wait_for_signal().await;
    tracing::info!("signal received: draining and stopping");
    let health = handle.health();
    handle.shutdown().await;
    println!(
        "switchyard bus stopped: {} routed, {} dropped, {} clients rejected",
        health.routed, health.dropped, health.rejected
    );
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut i), Ok(mut t)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Prints the health report of the daemon on `socket`.
async fn status(socket: PathBuf, token: Option<String>) -> CliResult {
    let mut cfg =
        IpcConfig::new(&socket).client_id(format!("switchyard-status-{}", std::process::id()));
    cfg.token = token;
    cfg.request_timeout = Duration::from_secs(3);
    let bus = IpcBus::connect(cfg)?;
    bus.wait_connected(Duration::from_secs(3)).await?;
    let h = bus.daemon_health().await?;
    let last = if h.last_activity_us == 0 {
        "never".to_string()
    } else {
        let ago = switchyard::transport::envelope::now_micros().saturating_sub(h.last_activity_us);
        format!("{:.1} s ago", ago as f64 / 1e6)
    };
    println!("switchyard bus on {}", socket.display());
    println!("  connections          {}", h.connections);
    println!("  registered machines  {}", h.machines);
    println!("  messages routed      {}", h.routed);
    println!("  dropped              {}", h.dropped);
    println!("  clients rejected     {}", h.rejected);
    println!("  last activity        {last}");
    bus.close();
    Ok(())
}
