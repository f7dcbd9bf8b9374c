//! The original guide's first scenario: a UI process hands work to a worker process.
//!
//! Run: `cargo run --example ipc_ui_worker`
//!
//! This one command starts a bus daemon (in this process, on a fresh socket),
//! then starts the worker as a second process (this program again, with
//! `SWITCHYARD_EXAMPLE_ROLE=worker`). The UI discovers the worker by type,
//! sends `DO_WORK` requests and prints each `WORK_COMPLETE` reply. Against a
//! daemon you run yourself (`switchyard bus`), start the two roles by hand:
//! `SWITCHYARD_SOCKET=/path/bus.sock SWITCHYARD_EXAMPLE_ROLE=worker cargo run --example ipc_ui_worker`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard::ipc::{Daemon, DaemonConfig, IpcBus, IpcConfig, unique_socket_path};
use switchyard::{Envelope, Node};

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Job {
    id: u32,
    numbers: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Done {
    id: u32,
    sum: u64,
    worker_pid: u32,
}

#[tokio::main]
async fn main() -> AnyResult<()> {
    match std::env::var("SWITCHYARD_EXAMPLE_ROLE").as_deref() {
        Ok("worker") => worker(socket_from_env()?).await,
        _ => ui().await,
    }
}

fn socket_from_env() -> AnyResult<PathBuf> {
    Ok(std::env::var_os("SWITCHYARD_SOCKET")
        .map(PathBuf::from)
        .ok_or("set SWITCHYARD_SOCKET to the bus daemon's socket")?)
}

async fn worker(socket: PathBuf) -> AnyResult<()> {
    let bus = IpcBus::connect(IpcConfig::new(&socket).client_id("worker"))?;
    let session = switchyard::builder().ipc(&bus).build()?;
    let _worker = session
        .machine("", "Worker")
        .handler(|node: &Node, ev: Envelope| {
            if ev.name() == "DO_WORK"
                && let Ok(job) = ev.data::<Job>()
            {
                let done = Done {
                    id: job.id,
                    sum: job.numbers.iter().sum(),
                    worker_pid: std::process::id(),
                };
                if let Err(e) = node.post_reply(&ev, "WORK_COMPLETE", done) {
                    eprintln!("worker: cannot reply: {e}");
                }
            }
        })
        .build()
        .await?;
    println!("READY");
    // Work until the UI closes our stdin (or kills us).
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await?;
    Ok(())
}

async fn ui() -> AnyResult<()> {
    let socket = unique_socket_path(&std::env::temp_dir(), "ui-worker");
    let _daemon = Daemon::start(DaemonConfig::new(&socket))?;
    println!("ui: bus daemon on {}", socket.display());

    let mut child = Command::new(std::env::current_exe()?)
        .env("SWITCHYARD_EXAMPLE_ROLE", "worker")
        .env("SWITCHYARD_SOCKET", &socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().ok_or("no worker stdout")?;
    let mut lines = BufReader::new(out).lines();
    match lines.next() {
        Some(Ok(l)) if l == "READY" => {}
        other => return Err(format!("the worker did not start: {other:?}").into()),
    }

    let bus = IpcBus::connect(IpcConfig::new(&socket).client_id("ui"))?;
    let session = switchyard::builder().ipc(&bus).build()?;
    let ui = session.machine("ui", "UI").build().await?;
    let workers = ui.discover("Worker").await?;
    let worker = workers.first().ok_or("no worker registered")?.id.clone();
    let (_, location) = ui.locate(&worker).await?;
    println!("ui: found worker {worker} at {location:?}");
    for id in 1..=3u32 {
        let job = Job {
            id,
            numbers: (1..=id as u64 * 10).collect(),
        };
        let t = Instant::now();
        let reply = ui
            .request(worker.clone(), "DO_WORK", job, Duration::from_secs(5))
            .await?;
        let done: Done = reply.data()?;
        println!(
            "ui: {} for job {} from pid {}: sum {} in {:?} (carried by {})",
            reply.name(),
            done.id,
            done.worker_pid,
            done.sum,
            t.elapsed(),
            reply.carried_by.unwrap_or("?")
        );
    }
    drop(child.stdin.take());
    child.wait()?;
    println!("ui: done");
    Ok(())
}
