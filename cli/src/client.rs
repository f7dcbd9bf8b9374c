//! `switchyard send` and `switchyard listen`: one-shot clients of the bus daemon.

use std::path::PathBuf;
use std::time::Duration;

use switchyard::ipc::{IpcBus, IpcConfig, default_socket_path};
use switchyard::{Envelope, Node};

use crate::CliResult;

/// Options of `switchyard send`.
#[derive(clap::Args)]
pub struct SendArgs {
    /// `MACHINE_ID`, `type:TYPE` (one instance, round robin), `all:TYPE` (every instance) or `topic:TOPIC`.
    pub target: String,
    /// Event name, e.g. `ORDER_PLACED`.
    pub event: String,
    /// Payload as JSON (sent as the equivalent MessagePack value); none sends an empty payload.
    pub json: Option<String>,
    /// The daemon's socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// Options of `switchyard listen`.
#[derive(clap::Args)]
pub struct ListenArgs {
    /// Topic pattern: dot-separated, `*` one segment, `#` zero or more (e.g. `orders.#`).
    pub pattern: String,
    /// The daemon's socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Exit after this many events (default: run until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
}

fn connect(socket: Option<PathBuf>, role: &str) -> Result<IpcBus, switchyard::Error> {
    let socket = socket.unwrap_or_else(default_socket_path);
    IpcBus::connect(
        IpcConfig::new(socket).client_id(format!("switchyard-{role}-{}", std::process::id())),
    )
}

/// Runs `switchyard send`.
pub async fn send(args: SendArgs) -> CliResult {
    let payload: serde_json::Value = match &args.json {
        Some(j) => {
            serde_json::from_str(j).map_err(|e| format!("the payload is not valid JSON: {e}"))?
        }
        None => serde_json::Value::Null,
    };
    let bus = connect(args.socket, "send")?;
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
    let bus = connect(args.socket, "listen")?;
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
