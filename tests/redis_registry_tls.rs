//! `RedisRegistry` over TLS (`rediss://`): a private `redis-server` with a TLS port and a
//! certificate signed by a CA made for the test.
//!
//! Run: `cargo test --features redis-tls --test redis_registry_tls` (needs the
//! `redis-server` and `openssl` programs; without them the test says so and returns).

#![cfg(all(feature = "redis", feature = "redis-tls"))]

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard::redis::{RedisConfig, RedisRegistry};
use switchyard::{Error, MachineEntry, MachineId, Registry, RegistryEvent};

#[path = "support/certs.rs"]
mod certs;
use certs::TestCa;

const WAIT: Duration = Duration::from_secs(10);

/// A redis-server of this test's own, stopped (and its files removed) on drop.
struct TlsServer {
    child: Child,
    ca: TestCa,
    port: u16,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes a CA and a server certificate for 127.0.0.1, starts redis-server with TLS only.
fn start() -> Option<TlsServer> {
    let ca = TestCa::make("redis-tls", &["redis-server"])?;
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(&ca.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = TlsServer { child, ca, port };
    // A bounded wait for the listening port.
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < WAIT, "redis-server listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

fn entry(id: &str, t: &str) -> MachineEntry {
    MachineEntry {
        id: MachineId::from(id),
        machine_type: t.into(),
        host_id: "host-tls".into(),
        process_id: "proc-tls".into(),
        context: None,
        version: None,
        accepts: Vec::new(),
        metadata: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_works_over_tls_and_checks_the_server_certificate() {
    let Some(server) = start() else {
        return;
    };
    let url = format!("rediss://127.0.0.1:{}/", server.port);
    let cfg = RedisConfig::default()
        .url(&url)
        .namespace("sy-test-tls")
        .tls_ca_file(server.ca.ca_cert());
    let a = RedisRegistry::connect(cfg.clone()).await.unwrap();
    let b = RedisRegistry::connect(cfg.clone()).await.unwrap();
    let mut wb = b.watch();
    let e = a.register(entry("", "Secure")).await.unwrap();
    assert_eq!(b.discover("Secure").await.unwrap(), vec![e.clone()]);
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(RegistryEvent::Joined(j)) = wb.recv().await {
                break j;
            }
        }
    })
    .await
    .expect("the join arrives over TLS");
    assert_eq!(seen, e);
    // Without the test CA the server's certificate is not trusted.
    let untrusted = RedisConfig::default().url(&url).namespace("sy-test-tls");
    let err = RedisRegistry::connect(untrusted).await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err}");
    // A CA file that is not there is a configuration error naming it.
    let missing = cfg.tls_ca_file(server.ca.dir.join("nope.pem"));
    let err = RedisRegistry::connect(missing).await.unwrap_err();
    assert!(
        matches!(&err, Error::Config(m) if m.contains("nope.pem")),
        "{err}"
    );
}

/// The transport over TLS too: two hosts find each other in the registry and ping-pong
/// through the TLS server; without the CA the transport refuses the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_works_over_tls() {
    use switchyard::redis::{RedisTransport, RedisTransportConfig};
    use switchyard::{Envelope, Location, Node};
    let Some(server) = start() else {
        return;
    };
    let url = format!("rediss://127.0.0.1:{}/", server.port);
    let cfg = RedisConfig::default()
        .url(&url)
        .namespace("sy-test-tls-transport")
        .tls_ca_file(server.ca.ca_cert());
    let registry: std::sync::Arc<dyn Registry> =
        std::sync::Arc::new(RedisRegistry::connect(cfg.clone()).await.unwrap());
    let mut sessions = Vec::new();
    for host in ["tls-host-a", "tls-host-b"] {
        let t = RedisTransport::connect(RedisTransportConfig::new(cfg.clone()))
            .await
            .expect("the transport connects over TLS");
        let r = registry.clone();
        sessions.push(
            switchyard::builder()
                .selector(|s| s.prefer(Location::Remote, ["redis"]))
                .redis(&t)
                .session(move |s| s.registry(r).host_id(host))
                .build()
                .unwrap(),
        );
    }
    let _pong = sessions[1]
        .machine("pong", "Pong")
        .handler(|n: &Node, ev: Envelope| {
            let _ = n.post_reply(&ev, "PONG", ev.data::<u32>().unwrap_or(0));
        })
        .build()
        .await
        .unwrap();
    let ping = sessions[0].machine("ping", "Ping").build().await.unwrap();
    let r = ping.request("pong", "PING", 7u32, WAIT).await.unwrap();
    assert_eq!((r.name(), r.data::<u32>().unwrap()), ("PONG", 7));
    assert_eq!(r.carried_by, Some("redis"));
    let untrusted = RedisConfig::default()
        .url(&url)
        .namespace("sy-test-tls-transport");
    assert!(
        RedisTransport::connect(RedisTransportConfig::new(untrusted))
            .await
            .is_err(),
        "a server whose certificate is not trusted is refused"
    );
}
