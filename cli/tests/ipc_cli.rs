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
        Self::start_env(args, &[])
    }

    fn start_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .envs(env.iter().copied())
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

#[test]
fn send_and_listen_fail_at_once_without_a_socket_and_listen_checks_its_pattern_first() {
    let missing = std::env::temp_dir().join(format!("sy-none-{}.sock", std::process::id()));
    let m = missing.to_str().expect("utf-8 path");
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["send", "someone", "X", "--socket", m])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no bus daemon socket at"), "{err}");
    assert!(
        err.contains("switchyard bus --socket"),
        "says what to do: {err}"
    );
    // The pattern is checked before anything else, so its error wins over the missing socket.
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["listen", "orders..new", "--socket", m])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid pattern"), "{err}");
}

#[test]
fn the_socket_and_the_token_come_from_the_environment_or_a_file() {
    let sock = std::env::temp_dir().join(format!("sy-env-{}.sock", std::process::id()));
    let token = std::env::temp_dir().join(format!("sy-token-{}", std::process::id()));
    std::fs::write(&token, "s3cret\n").unwrap();
    let s = sock.to_str().expect("utf-8 path");
    let t = token.to_str().expect("utf-8 path");
    let bus = Proc::start_env(&["bus", "--token-file", t], &[("SWITCHYARD_SOCKET", s)]);
    bus.expect("listening on");
    let status = |env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        c.args(["bus", "--status"]).env_remove("SWITCHYARD_TOKEN");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let ok = status(&[("SWITCHYARD_SOCKET", s), ("SWITCHYARD_TOKEN", "s3cret")]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains(s));
    let refused = status(&[("SWITCHYARD_SOCKET", s)]);
    assert!(!refused.status.success(), "no token, no service");
    drop(bus);
    let _ = std::fs::remove_file(&token);
    let _ = std::fs::remove_file(&sock);
}
