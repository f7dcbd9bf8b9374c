//! `switchyard demo`: a small hybrid deployment that shows location-aware selection at work.
//!
//! One `ui` machine talks to machines at every distance the enabled transports
//! reach: pinned to its own single-threaded context (`SameThread`), elsewhere in
//! this process (`SameProcess`), in a second process that the demo starts from
//! its own binary (`SameMachine`, through a bus daemon it runs in-process on a
//! temporary socket), and in a third process started with a host id of its own
//! (`Remote`, over zeromq tcp on loopback; it finds the others through the same
//! daemon's registry, which is why one host can play two). It sends by id, by
//! type (`send_to_any_of_type`) and by topic; every receiver answers `SEEN` with
//! the transport that carried the event (`Envelope::carried_by`), and the sender
//! prints that beside the location the selector computed (`Node::locate`).
//!
//! `--amqp` / `--redis` are where remote machines will join; until those
//! transports exist the demo checks that the broker answers and says so in one line.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::ipc::{Daemon, DaemonConfig, IpcBus, IpcConfig};
use switchyard::zeromq::{ZmqConfig, ZmqTransport};
use switchyard::{Envelope, Location, MachineId, Node, Session};
use tokio::sync::mpsc;

use crate::CliResult;
use crate::bench::helper::{Helper, READY, until_parent_leaves};
use crate::bench::say;

/// How long the demo waits for one answer before giving up.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `switchyard demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Remote machines through RabbitMQ at this URL (e.g. amqp://127.0.0.1:5672); the transport is not built yet, so the demo checks the broker and says so.
    #[arg(long, value_name = "URL")]
    amqp: Option<String>,
    /// Remote machines through Redis at this URL (e.g. redis://127.0.0.1:6379); the transport is not built yet, so the demo checks the server and says so.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Internal: run as the demo's second process, on the bus daemon at this socket.
    #[arg(long, hide = true, value_name = "SOCKET")]
    child: Option<PathBuf>,
    /// Internal: run as the demo's third process ("another host"), registry on this socket.
    #[arg(long, hide = true, value_name = "SOCKET")]
    remote_child: Option<PathBuf>,
}

/// The host id of the demo's third process: not this host's, so the selector computes `Remote`.
const REMOTE_HOST: &str = "switchyard-demo-remote-host";

/// What a receiver reports back to the sender.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Seen {
    event: String,
    via: String,
}

/// One report as the sender sees it.
struct Report {
    from: MachineId,
    seen: Seen,
}

/// Answers every event with `SEEN` and the transport that carried it.
fn reporter(node: &Node, ev: Envelope) {
    let seen = Seen {
        event: ev.name().to_string(),
        via: ev.carried_by.unwrap_or("?").to_string(),
    };
    if let Err(e) = node.post(ev.source.clone(), "SEEN", seen) {
        tracing::warn!(machine = %node.id(), error = %e, "could not answer SEEN");
    }
}

/// Runs `switchyard demo` (or, with the hidden `--child`, its second process).
pub async fn run(args: DemoArgs) -> CliResult {
    if let Some(socket) = &args.child {
        return run_child(socket).await;
    }
    if let Some(socket) = &args.remote_child {
        return run_remote_child(socket).await;
    }
    // The bus daemon runs inside this process on a fresh socket, so the demo needs no server.
    let socket = switchyard::ipc::unique_socket_path(&std::env::temp_dir(), "switchyard-demo");
    let daemon = Daemon::start(DaemonConfig::new(&socket)).map_err(|e| {
        format!(
            "cannot start the demo's bus daemon at {}: {e}",
            socket.display()
        )
    })?;
    let result = run_parent(&args, &socket).await;
    daemon.shutdown().await;
    result
}

async fn run_parent(args: &DemoArgs, socket: &Path) -> CliResult {
    // The first registration waits for the connection (up to the client's request timeout).
    let bus = IpcBus::connect(IpcConfig::new(socket).client_id("switchyard-demo"))?;
    // Remote machines are reached over zeromq tcp; its endpoints go into the registry entries.
    let zmq = ZmqTransport::new(ZmqConfig::default())?;
    let session = switchyard::builder().ipc(&bus).zeromq(&zmq).build()?;
    let result = deployment(args, &session, socket, &zmq).await;
    session.shutdown();
    bus.close();
    result
}

async fn deployment(
    args: &DemoArgs,
    session: &Session,
    socket: &Path,
    zmq: &ZmqTransport,
) -> CliResult {
    let ui_thread = session.context();
    let (tx, mut rx) = mpsc::channel::<Report>(64);

    let ui = session
        .machine("ui", "Ui")
        .context(ui_thread)
        .handler(move |_node, ev| {
            if ev.name() != "SEEN" {
                return;
            }
            match ev.data::<Seen>() {
                Ok(seen) => {
                    let report = Report {
                        from: ev.source.clone(),
                        seen,
                    };
                    if tx.try_send(report).is_err() {
                        tracing::warn!("demo report queue full; dropping a report");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable SEEN payload"),
            }
        })
        .build()
        .await?;

    // Same single-threaded context as `ui`: SameThread.
    let _display = session
        .machine("display", "Display")
        .context(ui_thread)
        .handler(reporter)
        .build()
        .await?;
    // Not pinned: SameProcess.
    let mut workers = Vec::new();
    for id in ["worker-1", "worker-2"] {
        workers.push(
            session
                .machine(id, "Worker")
                .handler(reporter)
                .build()
                .await?,
        );
    }
    let logger = session
        .machine("logger", "Logger")
        .handler(reporter)
        .build()
        .await?;
    let _sub = logger.subscribe("orders.#").await?;

    // Another process on this host: SameMachine. Killed on drop, so an early return cannot leak it.
    let mut child = Helper::start(
        "demo's second process",
        [
            OsStr::new("demo"),
            OsStr::new("--child"),
            socket.as_os_str(),
        ],
    )
    .await?;
    // "Another host": a third process with a host id of its own, reached over zeromq.
    let mut remote_child = Helper::start(
        "demo's third process",
        [
            OsStr::new("demo"),
            OsStr::new("--remote-child"),
            socket.as_os_str(),
        ],
    )
    .await?;
    let remote_router = ui
        .locate(&MachineId::from("shipping"))
        .await
        .ok()
        .and_then(|(e, _)| e.metadata.get(switchyard::zeromq::ROUTER_KEY).cloned())
        .unwrap_or_else(|| "?".into());

    let remote = remote_notes(args).await;
    let worker_count = ui.discover("Worker").await?.len();
    let mut demo = Demo {
        ui: &ui,
        rx: &mut rx,
        seen: BTreeSet::new(),
    };

    say!(
        "switchyard demo: `ui` sends by id, by type and by topic; each receiver answers with the transport that carried it"
    );
    say!(
        "  this process (pid {}): ui and display share one single-threaded context; worker-1, worker-2, logger (subscribed to orders.#)",
        std::process::id()
    );
    say!(
        "  second process (pid {}), through a bus daemon on {}: worker-3, billing, audit (subscribed to orders.#)",
        child.pid(),
        socket.display()
    );
    say!(
        "  third process (pid {}), host id `{REMOTE_HOST}`: worker-4, shipping, archive (subscribed to orders.#);",
        remote_child.pid()
    );
    say!(
        "    reached over zeromq tcp (its ROUTER {remote_router}, ours {}); a host of its own as far as the selector",
        zmq.router_endpoint()
    );
    say!(
        "    can tell. All three processes share the bus daemon's registry, which spans this one host: across real hosts, share one that spans them (switchyard::redis::RedisRegistry)"
    );
    say!();
    demo.by_id("display", "REFRESH").await?;
    demo.by_id("worker-1", "JOB").await?;
    for _ in 0..worker_count {
        demo.by_type("Worker", "JOB").await?;
    }
    demo.by_id("billing", "INVOICE").await?;
    demo.by_id("shipping", "SHIP").await?;
    // logger here, audit in the second process, archive in the third.
    demo.by_topic("orders.created", "ORDER_CREATED", 3).await?;
    child.stop().await;
    remote_child.stop().await;
    say!();
    for line in remote {
        say!("{line}");
    }
    let locations: BTreeSet<Location> = demo.seen.iter().map(|(l, _)| *l).collect();
    let locations: Vec<String> = locations.iter().map(|l| format!("{l:?}")).collect();
    let transports: BTreeSet<&str> = demo.seen.iter().map(|(_, t)| t.as_str()).collect();
    say!(
        "locations seen: {}; transports used: {}",
        locations.join(", "),
        transports.into_iter().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// The second process: `worker-3` (a Worker), `billing` and `audit` (subscribed to `orders.#`), until stdin closes.
async fn run_child(socket: &Path) -> CliResult {
    let bus = IpcBus::connect(IpcConfig::new(socket).client_id("switchyard-demo-child"))?;
    let session = switchyard::builder().ipc(&bus).build()?;
    let _worker = session
        .machine("worker-3", "Worker")
        .handler(reporter)
        .build()
        .await?;
    let _billing = session
        .machine("billing", "Billing")
        .handler(reporter)
        .build()
        .await?;
    let audit = session
        .machine("audit", "Auditor")
        .handler(reporter)
        .build()
        .await?;
    let _sub = audit.subscribe("orders.#").await?;
    say!("{READY}");
    until_parent_leaves().await;
    session.shutdown();
    bus.close();
    Ok(())
}

/// The third process: `worker-4` (a Worker), `shipping` and `archive` (subscribed to `orders.#`),
/// with a host id of its own, on the daemon's registry but without the ipc transport (the
/// parent reaches it as `Remote`, over zeromq only), until stdin closes.
async fn run_remote_child(socket: &Path) -> CliResult {
    let bus = IpcBus::connect(IpcConfig::new(socket).client_id("switchyard-demo-remote"))?;
    let zmq = ZmqTransport::new(ZmqConfig::default())?;
    let registry = bus.registry();
    let session = switchyard::builder()
        .zeromq(&zmq)
        .session(|s| s.registry(registry).host_id(REMOTE_HOST))
        .build()?;
    let _worker = session
        .machine("worker-4", "Worker")
        .handler(reporter)
        .build()
        .await?;
    let _shipping = session
        .machine("shipping", "Shipping")
        .handler(reporter)
        .build()
        .await?;
    let archive = session
        .machine("archive", "Archive")
        .handler(reporter)
        .build()
        .await?;
    let _sub = archive.subscribe("orders.#").await?;
    say!("{READY}");
    until_parent_leaves().await;
    session.shutdown();
    bus.close();
    Ok(())
}

struct Demo<'a> {
    ui: &'a Node,
    rx: &'a mut mpsc::Receiver<Report>,
    seen: BTreeSet<(Location, String)>,
}

impl Demo<'_> {
    async fn by_id(&mut self, to: &str, event: &'static str) -> CliResult {
        self.ui.send(to, event, ()).await?;
        let r = self.answer(event).await?;
        self.print(&r, "by id".to_string()).await
    }

    async fn by_type(&mut self, machine_type: &str, event: &'static str) -> CliResult {
        self.ui.send_to_any_of_type(machine_type, event, ()).await?;
        let r = self.answer(event).await?;
        self.print(&r, format!("by type {machine_type}")).await
    }

    /// Publishes and waits for the `expected` subscribers of the deployment to answer.
    async fn by_topic(&mut self, topic: &str, event: &'static str, expected: usize) -> CliResult {
        // Cross-process subscribers are counted by the daemon, not here, so wait for the known ones.
        self.ui.publish(topic, event, ()).await?;
        let n = expected;
        let mut reports = Vec::with_capacity(n);
        for _ in 0..n {
            reports.push(self.answer(event).await?);
        }
        reports.sort_by(|a, b| a.from.cmp(&b.from));
        for r in &reports {
            self.print(r, format!("by topic {topic}")).await?;
        }
        Ok(())
    }

    /// Waits for the `SEEN` answering `event`, never longer than [`ANSWER_TIMEOUT`].
    async fn answer(
        &mut self,
        event: &str,
    ) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
        loop {
            match tokio::time::timeout(ANSWER_TIMEOUT, self.rx.recv()).await {
                Ok(Some(r)) if r.seen.event == event => return Ok(r),
                Ok(Some(_)) => continue,
                Ok(None) => return Err("the demo's reply channel closed".into()),
                Err(_) => {
                    return Err(
                        format!("no machine answered `{event}` within {ANSWER_TIMEOUT:?}").into(),
                    );
                }
            }
        }
    }

    async fn print(&mut self, r: &Report, how: String) -> CliResult {
        let (_, location) = self.ui.locate(&r.from).await?;
        say!(
            "ui -> {:<10} {:<24} location={:<12} transport={}",
            r.from.as_str(),
            how,
            format!("{location:?}"),
            r.seen.via
        );
        self.seen.insert((location, r.seen.via.clone()));
        Ok(())
    }
}

/// One line per remote flag: the broker transports are not built yet, so say whether the broker is even there.
async fn remote_notes(args: &DemoArgs) -> Vec<String> {
    let mut lines = Vec::new();
    for (flag, transport, url, default_port) in [
        ("--amqp", "rabbitmq", args.amqp.as_deref(), 5672),
        ("--redis", "redis", args.redis.as_deref(), 6379),
    ] {
        let Some(url) = url else { continue };
        let reach = match probe(url, default_port).await {
            Ok(addr) => format!("the broker answers at {addr}"),
            Err(e) => format!("the broker is unreachable ({e})"),
        };
        let url = redact(url);
        lines.push(format!(
            "{flag} {url}: remote machines skipped: {reach}, but the `{transport}` transport is not built yet"
        ));
    }
    lines
}

/// The URL without its password, fit to print.
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let sep = if scheme.is_empty() { "" } else { "://" };
            format!("{scheme}{sep}{user}:***@{host}{}", &rest[authority_end..])
        }
        None => url.to_string(),
    }
}

/// Connects to the host and port of a broker URL, with a short timeout.
async fn probe(url: &str, default_port: u16) -> Result<String, String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    if host_port.is_empty() {
        return Err(format!("no host in `{url}`"));
    }
    let target = if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    };
    let addrs = tokio::net::lookup_host(&target)
        .await
        .map_err(|e| format!("cannot resolve {target}: {e}"))?;
    let mut last = format!("no address for {target}");
    for addr in addrs {
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(_)) => return Ok(addr.to_string()),
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: no answer within 1s"),
        }
    }
    Err(last)
}
