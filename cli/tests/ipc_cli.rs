//! `switchyard bus`, `send` and `listen` run as a user runs them: real processes on a temp socket.
#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn start(args: &[&str]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the switchyard binary runs");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    fn expect(&self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(WAIT) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => continue,
                Err(e) => panic!("no line containing {needle}: {e}"),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn socket() -> PathBuf {
    std::env::temp_dir().join(format!("sy-cli-{}.sock", std::process::id()))
}

#[test]
fn bus_send_listen_and_clean_shutdown() {
    let sock = socket();
    let s = sock.to_str().expect("utf-8 path");
    let mut bus = Proc::start(&["bus", "--socket", s]);
    bus.expect("listening on");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the socket is private to its user");
    }
    let listen = Proc::start(&["listen", "orders.#", "--socket", s, "--count", "1"]);
    listen.expect("listening on orders.#");
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "send",
            "topic:orders.new",
            "ORDER",
            r#"{"n":1}"#,
            "--socket",
            s,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 subscriber"));
    let line = listen.expect("ORDER");
    assert!(
        line.contains(r#"{"n":1}"#) && line.contains("topic:orders.new"),
        "{line}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["send", "nobody", "X", "--socket", s])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a send to an unknown machine fails");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no machine `nobody`"));

    let status = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["bus", "--status", "--socket", s])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(report.contains("messages routed"), "{report}");
    assert!(
        report.contains("messages routed      1"),
        "the one topic event; the send to nobody failed at the sender: {report}"
    );

    let term = Command::new("kill")
        .args(["-TERM", &bus.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    bus.expect("switchyard bus stopped");
    let status = bus.child.wait().unwrap();
    assert!(status.success());
    assert!(!sock.exists(), "SIGTERM removes the socket file");
}
