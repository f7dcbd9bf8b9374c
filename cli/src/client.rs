//! `switchyard send` and `switchyard listen`: one-shot clients of the bus daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use switchyard::ipc::{IpcBus, IpcConfig, default_socket_path};
use switchyard::{Envelope, Node};

use crate::CliResult;

/// Environment variable naming the daemon's socket for every subcommand (`--socket` wins).
pub const SOCKET_ENV: &str = "SWITCHYARD_SOCKET";
/// Environment variable holding the daemon's auth token (`--token-file` and `--token` win).
pub const TOKEN_ENV: &str = "SWITCHYARD_TOKEN";

/// The socket: `--socket`, else `$SWITCHYARD_SOCKET`, else the default path.
pub fn socket_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| {
        std::env::var_os(SOCKET_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(default_socket_path)
}

/// The auth token: `--token`, else the first line of `--token-file`, else `$SWITCHYARD_TOKEN`.
///
/// A token on the command line is visible to every user in `ps`; the file or the
/// environment variable keep it private.
pub fn token(arg: Option<String>, file: Option<&Path>) -> Result<Option<String>, String> {
    if arg.is_some() {
        return Ok(arg);
    }
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read the token file {}: {e}", f.display()))?;
        let t = text.lines().next().unwrap_or("").trim().to_string();
        if t.is_empty() {
            return Err(format!("the token file {} is empty", f.display()));
        }
        return Ok(Some(t));
    }
    Ok(std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()))
}

/// Fails at once, with what to do, when no daemon socket exists at `socket`.
pub fn require_socket(socket: &Path) -> Result<(), String> {
    #[cfg(unix)]
    if !socket.exists() {
        return Err(format!(
            "no bus daemon socket at {}: start one with `switchyard bus --socket {}`, or point --socket / ${SOCKET_ENV} at the running one",
            socket.display(),
            socket.display()
        ));
    }
    #[cfg(not(unix))]
    let _ = socket;
    Ok(())
}

/// Options of `switchyard send`.
#[derive(clap::Args)]
pub struct SendArgs {
    /// `MACHINE_ID`, `type:TYPE` (one instance, round robin), `all:TYPE` (every instance) or `topic:TOPIC`.
    pub target: String,
    /// Event name, e.g. `ORDER_PLACED`.
    pub event: String,
    /// Payload as JSON (sent as the equivalent MessagePack value); none sends an empty payload.
    pub json: Option<String>,
    /// The daemon's socket [default: $SWITCHYARD_SOCKET, else the `switchyard bus` default].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// File whose first line is the daemon's auth token (else $SWITCHYARD_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Options of `switchyard listen`.
#[derive(clap::Args)]
pub struct ListenArgs {
    /// Topic pattern: dot-separated, `*` one segment, `#` zero or more (e.g. `orders.#`).
    pub pattern: String,
    /// The daemon's socket [default: $SWITCHYARD_SOCKET, else the `switchyard bus` default].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// File whose first line is the daemon's auth token (else $SWITCHYARD_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Exit after this many events (default: run until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
}

fn connect(
    socket: Option<PathBuf>,
    token_file: Option<&Path>,
    role: &str,
) -> Result<IpcBus, Box<dyn std::error::Error + Send + Sync>> {
    let socket = socket_path(socket);
    require_socket(&socket)?;
    let mut cfg =
        IpcConfig::new(socket).client_id(format!("switchyard-{role}-{}", std::process::id()));
    cfg.token = token(None, token_file)?;
    Ok(IpcBus::connect(cfg)?)
}

/// Runs `switchyard send`.
pub async fn send(args: SendArgs) -> CliResult {
    let payload: serde_json::Value = match &args.json {
        Some(j) => {
            serde_json::from_str(j).map_err(|e| format!("the payload is not valid JSON: {e}"))?
        }
        None => serde_json::Value::Null,
    };
    let bus = connect(args.socket, args.token_file.as_deref(), "send")?;
    bus.wait_connected(Duration::from_secs(5)).await?;
    let session = switchyard::builder().ipc(&bus).build()?;
    let me = session
        .machine(format!("cli-send-{}", std::process::id()), "SwitchyardCli")
        .build()
        .await?;
    let event = args.event.clone();
    let line = if let Some(topic) = args.target.strip_prefix("topic:") {
        let n = me.publish(topic, event, payload).await?;
        format!(
            "published {} to topic {topic}: {n} subscriber(s)",
            args.event
        )
    } else if let Some(t) = args.target.strip_prefix("type:") {
        let to = me.send_to_any_of_type(t, event, payload).await?;
        format!("sent {} to {to} (type {t})", args.event)
    } else if let Some(t) = args.target.strip_prefix("all:") {
        let n = me.send_to_all_of_type(t, event, payload).await?;
        format!("sent {} to {n} machine(s) of type {t}", args.event)
    } else {
        me.send(args.target.as_str(), event, payload).await?;
        format!("sent {} to {}", args.event, args.target)
    };
    // The daemon handles one connection's frames in order: once it answers this
    // request, everything sent before it has been routed.
    bus.daemon_health().await?;
    println!("{line}");
    me.close().await?;
    session.shutdown();
    Ok(())
}

fn describe(ev: &Envelope) -> String {
    let payload = if ev.payload.is_empty() {
        "null".to_string()
    } else {
        match ev.payload.read::<serde_json::Value>() {
            Ok(v) => v.to_string(),
            Err(e) => format!("<undecodable payload: {e}>"),
        }
    };
    format!("{} {} from {} {}", ev.target, ev.name(), ev.source, payload)
}

/// Runs `switchyard listen`: one line per event, `topic:T EVENT from SOURCE JSON`.
pub async fn listen(args: ListenArgs) -> CliResult {
    // A bad pattern is refused before connecting.
    switchyard::TopicPattern::parse(&args.pattern)?;
    let bus = connect(args.socket, args.token_file.as_deref(), "listen")?;
    bus.wait_connected(Duration::from_secs(5)).await?;
    let session = switchyard::builder().ipc(&bus).build()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let me = session
        .machine(
            format!("cli-listen-{}", std::process::id()),
            "SwitchyardCli",
        )
        .handler(move |_: &Node, ev: Envelope| {
            let _ = tx.send(describe(&ev));
        })
        .build()
        .await?;
    let _sub = me.subscribe(&args.pattern).await?;
    println!("listening on {}", args.pattern);
    let mut seen = 0u64;
    loop {
        tokio::select! {
            line = rx.recv() => {
                let Some(line) = line else { break };
                println!("{line}");
                seen += 1;
                if args.count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    me.close().await?;
    session.shutdown();
    Ok(())
}
