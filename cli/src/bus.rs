//! `switchyard bus`: the inter-process bus daemon (the logic lives in `switchyard_ipc::daemon`).

use std::path::PathBuf;
use std::time::Duration;

use switchyard::ipc::{DaemonConfig, IpcBus, IpcConfig, WhenFull, frame::DEFAULT_MAX_FRAME};

use crate::CliResult;
use crate::client::{require_socket, socket_path, token};

/// Options of `switchyard bus`.
#[derive(clap::Args)]
pub struct BusArgs {
    /// Socket path [default: $SWITCHYARD_SOCKET, else $XDG_RUNTIME_DIR/switchyard/bus.sock, else $TMPDIR/switchyard-$USER/bus.sock].
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
    /// Auth token clients must present in their handshake. Visible to every user in `ps`:
    /// prefer --token-file or $SWITCHYARD_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// File whose first line is the auth token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Bytes queued in the daemon per client; past it a send to one of its machines gets --when-full.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub queue_limit: usize,
    /// What a send to a machine whose queue is full gets: `nack` (the sender is told) or `drop_oldest` (counted).
    #[arg(long, default_value = "nack", value_parser = ["nack", "drop_oldest"])]
    pub when_full: String,
    /// Disconnect a client whose queue stays full this long, in milliseconds (slow subscribers).
    #[arg(long, default_value_t = 10_000)]
    pub slow_timeout_ms: u64,
    /// Daemon-wide bytes for queued frames and large frames being read; past it large frames are refused.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub memory_budget: usize,
    /// A frame must arrive whole within this many milliseconds of its first byte.
    #[arg(long, default_value_t = 30_000)]
    pub frame_timeout_ms: u64,
    /// Drop clients that send nothing for this many milliseconds (0: never; Rust clients ping by themselves).
    #[arg(long, default_value_t = 0)]
    pub idle_timeout_ms: u64,
    /// Heartbeat TTL of machines that register without one, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub ttl_ms: u64,
    /// Do not start a daemon: ask the one running on --socket for its health and print it.
    #[arg(long)]
    pub status: bool,
}

/// Runs `switchyard bus` until SIGINT/SIGTERM, then drains and removes the socket.
pub async fn run(args: BusArgs) -> CliResult {
    let socket = socket_path(args.socket);
    let token = token(args.token, args.token_file.as_deref())?;
    if args.status {
        return status(socket, token).await;
    }
    let mut cfg = DaemonConfig::new(&socket);
    cfg.group = args.group;
    cfg.allow_any_uid = args.allow_any_uid;
    cfg.max_frame = args.max_frame;
    cfg.token = token;
    cfg.default_ttl = Duration::from_millis(args.ttl_ms);
    cfg.outbox_limit = args.queue_limit;
    cfg.when_full = WhenFull::parse(&args.when_full).unwrap_or_default();
    cfg.slow_timeout = Duration::from_millis(args.slow_timeout_ms);
    cfg.memory_budget = args.memory_budget;
    cfg.frame_timeout = Duration::from_millis(args.frame_timeout_ms);
    cfg.idle_timeout =
        (args.idle_timeout_ms > 0).then(|| Duration::from_millis(args.idle_timeout_ms));
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
    require_socket(&socket)?;
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
    println!("  nacked (queue full)  {}", h.nacked_full);
    println!("  dropped oldest       {}", h.dropped_oldest);
    println!("  dropped (slow sub.)  {}", h.dropped_slow);
    println!("  slow disconnects     {}", h.slow_disconnects);
    println!("  refused over budget  {}", h.over_budget);
    println!(
        "  memory budget        {} of {} bytes in use",
        h.budget_used, h.budget_limit
    );
    println!("  out-of-fd refusals   {}", h.fd_exhausted);
    println!("  clients rejected     {}", h.rejected);
    println!("  last activity        {last}");
    bus.close();
    Ok(())
}
