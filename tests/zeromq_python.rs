//! A libzmq peer in another language talks to a Switchyard machine over zeromq:
//! examples/python/zmq_peer.py (pyzmq, written from docs/PROTOCOL.md §12) answers
//! PINGs on its ROUTER, sends an event to our ROUTER and reads our PUB.
//!
//! Runs when python3 with `pyzmq` and `msgpack` is present; in CI (`CI=true`) a
//! missing interpreter or package fails the test instead of skipping it
//! (scripts/test installs them).
#![cfg(all(feature = "zeromq", feature = "ipc", unix))]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use switchyard::ipc::{Daemon, DaemonConfig, IpcBus, IpcConfig, unique_socket_path};
use switchyard::zeromq::{ZmqConfig, ZmqTransport};
use switchyard::{Envelope, Location, Node};

const WAIT: Duration = Duration::from_secs(30);

fn python_with_pyzmq() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import zmq, msgpack"])
        .output()
        .map_err(|e| format!("python3 is not available: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err("the python packages `pyzmq` and `msgpack` are needed (python3 -m pip install pyzmq msgpack)".into())
    }
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pyzmq_peer_sends_to_and_receives_from_a_switchyard_machine() {
    if let Err(why) = python_with_pyzmq() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI must run the pyzmq interop test: {why}");
        }
        eprintln!("skipping the pyzmq interop test: {why}");
        return;
    }
    let socket = unique_socket_path(&std::env::temp_dir(), "pyzmq");
    let _daemon = Daemon::start(DaemonConfig::new(&socket)).expect("the daemon starts");
    let bus = IpcBus::connect(IpcConfig::new(&socket)).unwrap();
    let zmq = ZmqTransport::new(ZmqConfig::default()).unwrap();
    let registry = bus.registry();
    let session = switchyard::builder()
        .zeromq(&zmq)
        .session(|s| s.registry(registry).host_id("rust-host"))
        .build()
        .unwrap();
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel::<Envelope>();
    let rs = session
        .machine("rs", "RustService")
        .handler(move |_: &Node, ev: Envelope| {
            let _ = tx.send(ev);
        })
        .build()
        .await
        .unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/zmq_peer.py");
    let mut child = Kill(
        Command::new("python3")
            .arg(script)
            .arg(&socket)
            .args(["py", "rs", "5"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 starts"),
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (ltx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if ltx.send(line).is_err() {
                break;
            }
        }
    });
    let mut expect = async |want: &str, within: Duration| {
        tokio::time::timeout(within, async {
            while let Some(l) = lines.recv().await {
                if l.starts_with(want) {
                    return Some(l);
                }
            }
            panic!("the Python peer exited before printing {want}");
        })
        .await
        .ok()
        .flatten()
    };
    expect("READY", WAIT)
        .await
        .expect("the Python peer is ready");

    // Python → Switchyard: a plain event through our ROUTER.
    let hello = tokio::time::timeout(WAIT, got.recv())
        .await
        .expect("the Python peer's event arrives")
        .unwrap();
    assert_eq!(hello.name(), "HELLO");
    assert_eq!(hello.source.as_str(), "py");
    assert_eq!(hello.data::<String>().unwrap(), "from python");
    assert_eq!(hello.carried_by, Some("zeromq"));

    // Switchyard → Python and back: requests answered through its DEALER.
    let (_, loc) = rs.locate(&"py".into()).await.unwrap();
    assert_eq!(loc, Location::Remote);
    for i in 0..5u32 {
        let r = rs.request("py", "PING", i, WAIT).await.unwrap();
        assert_eq!((r.name(), r.data::<u32>().unwrap()), ("PONG", i));
        assert_eq!(r.source.as_str(), "py");
        assert_eq!(r.carried_by, Some("zeromq"));
    }

    // Our PUB to its SUB: ZeroMQ's prefix subscription ("news.") on our topic frame. The
    // peer's subscription reaches our PUB on its own time (it announces nothing), so
    // publish until it reports one.
    let topic = tokio::time::timeout(WAIT, async {
        loop {
            rs.emit("news.rust", "NEWS", 1u32).await.unwrap();
            if let Some(l) = expect("TOPIC", Duration::from_millis(100)).await {
                return l;
            }
        }
    })
    .await
    .expect("the Python SUB gets our publish");
    assert_eq!(topic, "TOPIC news.rust NEWS from rust-host");
    assert_eq!(
        expect("ANSWERED", WAIT).await.as_deref(),
        Some("ANSWERED 5")
    );
}
