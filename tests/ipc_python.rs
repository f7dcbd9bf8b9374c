//! docs/PROTOCOL.md is enough to write a client: the Python client in examples/python answers PINGs.
//!
//! Runs when python3 with the `msgpack` package is present; in CI (`CI=true`) a
//! missing interpreter or package fails the test instead of skipping it.
#![cfg(all(feature = "ipc", unix))]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use switchyard::ipc::{Daemon, DaemonConfig, IpcBus, IpcConfig, unique_socket_path};

const WAIT: Duration = Duration::from_secs(30);

fn python_with_msgpack() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import msgpack"])
        .output()
        .map_err(|e| format!("python3 is not available: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err("the python package `msgpack` is missing (python3 -m pip install msgpack)".into())
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
async fn python_client_answers_ping_with_pong() {
    if let Err(why) = python_with_msgpack() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI must run the Python protocol test: {why}");
        }
        eprintln!("skipping the Python protocol test: {why}");
        return;
    }
    let socket = unique_socket_path(&std::env::temp_dir(), "py");
    let daemon = Daemon::start(DaemonConfig::new(&socket)).expect("the daemon starts");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/pong.py");
    let mut child = Kill(
        Command::new("python3")
            .arg(script)
            .arg(&socket)
            .args(["py-pong", "5"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 starts"),
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut expect = async |want: &str| {
        tokio::time::timeout(WAIT, async {
            while let Some(l) = lines.recv().await {
                if l.starts_with(want) {
                    return l;
                }
            }
            panic!("the Python client exited before printing {want}");
        })
        .await
        .unwrap_or_else(|_| panic!("the Python client did not print {want} in time"))
    };
    expect("READY").await;

    let bus = IpcBus::connect(IpcConfig::new(&socket)).unwrap();
    let session = switchyard::builder().ipc(&bus).build().unwrap();
    let ping = session
        .machine("ping", "PingService")
        .build()
        .await
        .unwrap();
    let found = ping.discover("PongService").await.unwrap();
    assert_eq!(found.len(), 1, "the Python machine is in the host registry");
    let mut pongs = 0;
    for i in 0..5u32 {
        let r = ping.request("py-pong", "PING", i, WAIT).await.unwrap();
        assert_eq!((r.name(), r.data::<u32>().unwrap()), ("PONG", i));
        assert_eq!(r.source.as_str(), "py-pong");
        pongs += 1;
    }
    assert_eq!(pongs, 5);
    assert_eq!(expect("ANSWERED").await, "ANSWERED 5");
    drop(daemon);
}
