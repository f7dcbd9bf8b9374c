//! `switchyard demo`: a small hybrid deployment that shows location-aware selection at work.
//!
//! One `ui` machine talks to machines at every distance the enabled transports
//! reach: pinned to its own single-threaded context (`SameThread`), elsewhere in
//! this process (`SameProcess`), and, when remote flags are given, behind a
//! broker. It sends by id, by type (`send_to_any_of_type`) and by topic; every
//! receiver answers `SEEN` with the transport that carried the event
//! (`Envelope::carried_by`), and the sender prints that beside the location the
//! selector computed (`Node::locate`).

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::{Envelope, Location, MachineId, Node};
use tokio::sync::mpsc;

use crate::CliResult;

/// How long the demo waits for one answer before giving up.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `switchyard demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Also start remote machines through RabbitMQ at this URL (e.g. amqp://127.0.0.1:5672).
    #[arg(long, value_name = "URL")]
    amqp: Option<String>,
    /// Also start remote machines through Redis at this URL (e.g. redis://127.0.0.1:6379).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
}

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

/// Runs `switchyard demo`.
pub async fn run(args: DemoArgs) -> CliResult {
    let session = switchyard::builder().build()?;
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

    let remote = remote_notes(&args).await;
    let worker_count = ui.discover("Worker").await?.len();
    let mut demo = Demo {
        ui: &ui,
        rx: &mut rx,
        seen: BTreeSet::new(),
    };

    println!(
        "switchyard demo: `ui` sends by id, by type and by topic; each receiver answers with the transport that carried it"
    );
    println!();
    demo.by_id("display", "REFRESH").await?;
    demo.by_id("worker-1", "JOB").await?;
    for _ in 0..worker_count {
        demo.by_type("Worker", "JOB").await?;
    }
    demo.by_topic("orders.created", "ORDER_CREATED").await?;
    println!();
    for line in remote {
        println!("{line}");
    }
    let locations: Vec<String> = demo.seen.iter().map(|(l, _)| format!("{l:?}")).collect();
    let transports: BTreeSet<&str> = demo.seen.iter().map(|(_, t)| t.as_str()).collect();
    println!(
        "locations seen: {}; transports used: {}",
        locations.join(", "),
        transports.into_iter().collect::<Vec<_>>().join(", ")
    );
    session.shutdown();
    Ok(())
}

struct Demo<'a> {
    ui: &'a Node,
    rx: &'a mut mpsc::Receiver<Report>,
    seen: BTreeSet<(Location, String)>,
}

impl Demo<'_> {
    async fn by_id(&mut self, to: &str, event: &str) -> CliResult {
        self.ui.send(to, event, ()).await?;
        let r = self.answer(event).await?;
        self.print(&r, "by id".to_string()).await
    }

    async fn by_type(&mut self, machine_type: &str, event: &str) -> CliResult {
        self.ui.send_to_any_of_type(machine_type, event, ()).await?;
        let r = self.answer(event).await?;
        self.print(&r, format!("by type {machine_type}")).await
    }

    async fn by_topic(&mut self, topic: &str, event: &str) -> CliResult {
        let n = self.ui.publish(topic, event, ()).await?;
        if n == 0 {
            return Err(format!("nobody is subscribed to `{topic}`").into());
        }
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
        println!(
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
