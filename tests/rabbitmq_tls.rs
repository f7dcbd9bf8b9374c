//! The RabbitMQ transport over TLS (`amqps://`): the shared broker behind a TLS-terminating
//! proxy of the test's own (`tests/support/tls_proxy.py`, Python's `ssl`), with a
//! certificate signed by a CA made for the test (`openssl`). The transport must check the
//! certificate against that CA, and refuse it without.
//!
//! Run: `cargo test --features rabbitmq-tls --test rabbitmq_tls`.
#![cfg(feature = "rabbitmq-tls")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use switchyard::rabbitmq::{RabbitConfig, RabbitTransport, ready_for_tests};
use switchyard::{Envelope, Error, Location, Node};

const WAIT: Duration = Duration::from_secs(10);

/// The proxy and its certificate files, stopped and removed on drop.
struct TlsProxy {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(dir: &Path, program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Makes a CA and a certificate for 127.0.0.1, then starts the proxy in front of the broker
/// at `host:port`.
fn start(host: &str, port: u16) -> Option<TlsProxy> {
    for p in ["openssl", "python3"] {
        if !installed(p) {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI needs `{p}` installed: the TLS test makes its own certificates and proxy"
            );
            eprintln!("skipped: `{p}` is not installed (the TLS test needs it)");
            return None;
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("sy-amqp-tls-{}-{nanos:x}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("writes the extensions file");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = [
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=switchyard-test-ca",
        ],
    ]
    .concat();
    let csr = [
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat();
    let sign = [
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ];
    assert!(
        run(&dir, "openssl", &ca) && run(&dir, "openssl", &csr) && run(&dir, "openssl", &sign),
        "openssl made the test certificates in {}",
        dir.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/tls_proxy.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(dir.join("server.crt"))
        .arg(dir.join("server.key"))
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
    Some(TlsProxy { child, dir, port })
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
        .tls_ca_file(proxy.dir.join("ca.crt"));
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
    let missing = cfg.tls_ca_file(proxy.dir.join("nope.pem"));
    let err = RabbitTransport::connect(missing).await.unwrap_err();
    assert!(
        matches!(&err, Error::Config(m) if m.contains("nope.pem")),
        "{err}"
    );
}
