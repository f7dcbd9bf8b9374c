//! The RabbitMQ transport over TLS (`amqps://`): the shared broker behind a TLS-terminating
//! proxy of the test's own (`tests/support/tls_proxy.py`, Python's `ssl`), with a
//! certificate signed by a CA made for the test (`openssl`). The transport must check the
//! certificate against that CA, and refuse it without.
//!
//! Run: `cargo test --features rabbitmq-tls --test rabbitmq_tls`.
#![cfg(feature = "rabbitmq-tls")]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use switchyard::rabbitmq::{RabbitConfig, RabbitTransport, ready_for_tests};
use switchyard::{Envelope, Error, Location, Node};

#[path = "support/certs.rs"]
mod certs;
use certs::TestCa;

const WAIT: Duration = Duration::from_secs(10);

/// The proxy and its certificate files, stopped and removed on drop.
struct TlsProxy {
    child: Child,
    ca: TestCa,
    port: u16,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes a CA and a certificate for 127.0.0.1, then starts the proxy in front of the broker
/// at `host:port`.
fn start(host: &str, port: u16) -> Option<TlsProxy> {
    let ca = TestCa::make("amqp-tls", &["python3"])?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/tls_proxy.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(ca.dir.join("server.crt"))
        .arg(ca.dir.join("server.key"))
        .arg(port.to_string())
        .arg(host)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the proxy starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("the proxy prints its port");
    let port = line.trim().parse().expect("a port number");
    Some(TlsProxy { child, ca, port })
}

/// Two hosts reach each other through the broker over TLS; a certificate from an unknown
/// CA is refused, and a CA file that is not there is a configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_works_over_tls_and_checks_the_certificate() {
    if !ready_for_tests() {
        return;
    }
    // The broker of SWITCHYARD_AMQP_URL (credentials, vhost), reached through the proxy.
    let plain = RabbitConfig::from_env().url;
    let uri: lapin::uri::AMQPUri = plain.parse().expect("the broker URL parses");
    let (host, port) = (uri.authority.host.clone(), uri.authority.port);
    let Some(proxy) = start(&host, port) else {
        return;
    };
    let url = plain.replacen("amqp://", "amqps://", 1).replacen(
        &format!("{host}:{port}"),
        &format!("127.0.0.1:{}", proxy.port),
        1,
    );
    assert!(
        url.contains(&format!(":{}", proxy.port)),
        "{url} names the proxy"
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let ns = format!("sy-tls-{}-{nanos:x}", std::process::id());
    let cfg = RabbitConfig::new(&url)
        .namespace(ns)
        .tls_ca_file(proxy.ca.ca_cert());
    let a = RabbitTransport::connect(cfg.clone())
        .await
        .expect("connects over TLS");
    let b = RabbitTransport::connect(cfg.clone())
        .await
        .expect("connects over TLS");
    let sa = switchyard::builder()
        .selector(|s| s.prefer(Location::Remote, ["rabbitmq"]))
        .rabbitmq(&a)
        .session(|s| s.host_id("tls-host-a"))
        .build()
        .unwrap();
    let registry = sa.registry().clone();
    let sb = switchyard::builder()
        .selector(|s| s.prefer(Location::Remote, ["rabbitmq"]))
        .rabbitmq(&b)
        .session(move |s| s.host_id("tls-host-b").registry(registry))
        .build()
        .unwrap();
    let _pong = sb
        .machine("pong", "Pong")
        .handler(|n: &Node, ev: Envelope| {
            let _ = n.post_reply(&ev, "PONG", ev.data::<u32>().unwrap_or(0));
        })
        .build()
        .await
        .unwrap();
    let ping = sa.machine("ping", "Ping").build().await.unwrap();
    for i in 0..10u32 {
        let r = ping.request("pong", "PING", i, WAIT).await.unwrap();
        assert_eq!((r.name(), r.data::<u32>().unwrap()), ("PONG", i));
        assert_eq!(r.carried_by, Some("rabbitmq"));
    }
    // Without the test CA the broker's certificate is not trusted.
    let untrusted = RabbitConfig::new(&url).connect_timeout(Duration::from_secs(3));
    let err = RabbitTransport::connect(untrusted).await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err}");
    let pw = &uri.authority.userinfo.password;
    assert!(
        !err.to_string().contains(&format!(":{pw}@")),
        "no password: {err}"
    );
    assert!(
        err.to_string().contains("tls_ca_file"),
        "says what to do: {err}"
    );
    // A CA file that is not there is a configuration error naming it.
    let missing = cfg.tls_ca_file(proxy.ca.dir.join("nope.pem"));
    let err = RabbitTransport::connect(missing).await.unwrap_err();
    assert!(
        matches!(&err, Error::Config(m) if m.contains("nope.pem")),
        "{err}"
    );
}
