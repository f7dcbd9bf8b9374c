//! `RedisRegistry` across a restart of its server, on a private `redis-server` (the shared
//! one is never restarted): the event subscription comes back and reports `Resync`, the
//! scripts are loaded again (the server forgot them), and a machine whose entry the
//! restart lost registers again with its next heartbeat.
//!
//! Run: `cargo test --features redis --test redis_registry_restart` (needs the
//! `redis-server` program; without it the test says so and returns).

#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard::redis::{RedisConfig, RedisRegistry};
use switchyard::{MachineEntry, MachineId, Registry, RegistryEvent};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(10);

/// A redis-server without persistence on `port`, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(port: u16) -> Server {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let server = Server(child);
    // A bounded wait for the listening port.
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < WAIT, "redis-server listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

fn entry(id: &str) -> MachineEntry {
    MachineEntry {
        id: MachineId::from(id),
        machine_type: "Survivor".into(),
        host_id: "host-r".into(),
        process_id: "proc-r".into(),
        context: None,
        version: Some("1".into()),
        accepts: Vec::new(),
        metadata: BTreeMap::new(),
    }
}

async fn next_matching<T>(
    rx: &mut broadcast::Receiver<RegistryEvent>,
    what: &str,
    mut pick: impl FnMut(&RegistryEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ev) = rx.recv().await
                && let Some(v) = pick(&ev)
            {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_a_server_restart() {
    let installed = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !installed {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs `redis-server` installed: this test restarts a server of its own"
        );
        eprintln!("skipped: `redis-server` is not installed (this test restarts its own)");
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = start(port);
    let cfg = RedisConfig::default()
        .url(format!("redis://127.0.0.1:{port}/"))
        .namespace("sy-test-restart");
    let reg = RedisRegistry::builder(cfg.clone())
        .ttl(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let mut w = reg.watch();
    let e = reg.register(entry("survivor")).await.unwrap();
    let g = reg.generation();

    drop(server); // SIGKILL: the data and the loaded scripts are gone
    let _server = start(port);

    next_matching(&mut w, "Resync", |ev| {
        matches!(ev, RegistryEvent::Resync).then_some(())
    })
    .await;
    assert!(reg.generation() > g);
    // The command connection comes back on its own; the first command may still see
    // the old one fail.
    let t = Instant::now();
    while let Err(err) = reg.heartbeat(&e.id).await {
        assert!(t.elapsed() < WAIT, "heartbeats work again: {err}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The heartbeat found the entry gone and registered it again.
    let back = next_matching(&mut w, "the join again", |ev| match ev {
        RegistryEvent::Joined(j) => Some(j.clone()),
        _ => None,
    })
    .await;
    assert_eq!(back, e);
    let fresh = RedisRegistry::connect(cfg).await.unwrap();
    assert_eq!(fresh.discover("Survivor").await.unwrap(), vec![e.clone()]);
    assert!(fresh.is_healthy(&e.id).await.unwrap());
}
