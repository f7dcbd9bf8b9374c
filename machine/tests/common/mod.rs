//! Helpers shared by the Node-bound tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use switchyard::ipc::{IpcBus, IpcConfig};
use switchyard::{Envelope, Node, Session};
use switchyard_machine::StateChange;
use tokio::sync::mpsc;

/// How long a test waits for something before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A session whose only transport is `direct` (every machine must share one context).
pub fn direct_session() -> Session {
    switchyard::builder()
        .selector(|s| s.without(["memory"]))
        .build()
        .expect("session builds")
}

/// A session whose only transport is `memory`.
pub fn memory_session() -> Session {
    switchyard::builder()
        .selector(|s| s.without(["direct"]))
        .build()
        .expect("session builds")
}

/// A session that reaches the other processes of this host through the ipc bus daemon at
/// `socket` (its registry is the daemon's), directly between processes when `p2p`.
///
/// Returned with its client so the caller keeps the connection for the session's lifetime.
pub fn ipc_session(socket: &Path, p2p: bool) -> (Session, IpcBus) {
    let cfg = IpcConfig::new(socket);
    let cfg = if p2p { cfg.peer_to_peer() } else { cfg };
    let bus = IpcBus::connect(cfg).expect("the ipc client starts");
    let session = switchyard::builder()
        .ipc(&bus)
        .build()
        .expect("session builds");
    (session, bus)
}

// ---------------------------------------------------------------------------
// Real child processes: the test binary re-executed to run one `#[test]` entry point
// in a role named by an environment variable. The child talks to its parent in lines:
// it prints `CHILD-<WORD> <rest>` on stdout and reads commands from stdin; it exits when
// its stdin closes, so it cannot outlive a parent that died.
// ---------------------------------------------------------------------------

const CHILD_ROLE: &str = "SWITCHYARD_MACHINE_TEST_ROLE";
const CHILD_SOCKET: &str = "SWITCHYARD_MACHINE_TEST_SOCKET";
const CHILD_P2P: &str = "SWITCHYARD_MACHINE_TEST_P2P";

/// A child process; killed (and reaped) when dropped, so a failing test leaves none behind.
pub struct ChildProcess {
    role: String,
    proc: std::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    stdin: Option<std::process::ChildStdin>,
}

impl ChildProcess {
    /// Re-executes this test binary running only the test `entry` as `role`, with the bus
    /// daemon's socket and the ipc mode in its environment.
    pub fn spawn(entry: &str, role: &str, socket: &Path, p2p: bool) -> ChildProcess {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut proc = Command::new(exe)
            .args(["--exact", entry, "--nocapture", "--test-threads=1"])
            .env(CHILD_ROLE, role)
            .env(CHILD_SOCKET, socket)
            .env(CHILD_P2P, if p2p { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the child process starts");
        let stdout = proc.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        // A blocking reader on its own thread; it ends when the child's stdout closes.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = proc.stdin.take();
        ChildProcess {
            role: role.to_owned(),
            proc,
            lines,
            stdin,
        }
    }

    /// Waits (at most [`WAIT`]) for the child to print `CHILD-<word>`; returns the rest of that line.
    pub async fn expect(&mut self, word: &str) -> String {
        let marker = format!("CHILD-{word}");
        let role = self.role.clone();
        tokio::time::timeout(WAIT, async {
            loop {
                match self.lines.recv().await {
                    // libtest may print `test <entry> ... ` before the child's first line.
                    Some(line) => {
                        if let Some(at) = line.find(&marker) {
                            return line[at + marker.len()..].trim().to_owned();
                        }
                    }
                    None => panic!("child `{role}` exited before printing {marker}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "child `{}` did not print {marker} within {WAIT:?}",
                self.role
            )
        })
    }

    /// Sends the child one line on its stdin.
    pub fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the child's stdin is open");
        writeln!(stdin, "{line}").expect("the child reads its stdin");
        stdin.flush().expect("flush the child's stdin");
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

/// In a child process: its role, the daemon's socket and whether to run peer-to-peer.
/// `None` in an ordinary test run.
pub fn child_role() -> Option<(String, PathBuf, bool)> {
    let role = std::env::var(CHILD_ROLE).ok()?;
    let socket = PathBuf::from(std::env::var_os(CHILD_SOCKET).expect("the socket path"));
    let p2p = std::env::var(CHILD_P2P).is_ok_and(|v| v == "1");
    Some((role, socket, p2p))
}

/// In a child process: prints `CHILD-<word> <rest>` for the parent.
pub fn say(word: &str, rest: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "CHILD-{word} {rest}");
    let _ = out.flush();
}

/// In a child process: the parent's commands, one per line; `None` once stdin closes.
pub fn parent_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Published state changes seen by an observer node.
pub struct Observer {
    pub node: Node,
    rx: mpsc::UnboundedReceiver<(String, StateChange)>,
}

impl Observer {
    /// An observer machine subscribed to `pattern` (e.g. `state.light.#`).
    pub async fn new(session: &Session, id: &str, pattern: &str) -> Observer {
        let (tx, rx) = mpsc::unbounded_channel();
        let node = session
            .machine(id, "Observer")
            .handler(move |_n: &Node, env: Envelope| {
                let change: StateChange = env.data().expect("a StateChange");
                assert_eq!(
                    env.name(),
                    format!("state.{}.{}", change.machine, change.state)
                );
                let _ = tx.send((env.name().to_owned(), change));
            })
            .build()
            .await
            .expect("observer builds");
        node.subscribe(pattern).await.expect("subscribe");
        Observer { node, rx }
    }

    /// The next published change; fails the test after [`WAIT`].
    pub async fn next(&mut self) -> (String, StateChange) {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a state change within the wait")
            .expect("observer alive")
    }

    /// Waits for a topic, returning the topics seen before it (inclusive).
    pub async fn until(&mut self, topic: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let (t, _) = self.next().await;
            seen.push(t.clone());
            if t == topic {
                return seen;
            }
        }
    }
}

/// Awaits `fut`, failing the test after [`WAIT`].
pub async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .expect("finished within the wait")
}
