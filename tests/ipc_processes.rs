//! The ipc transport between real processes.
//!
//! Each test re-executes this test binary with `--exact ipc_child` and an
//! environment variable naming the child's role; `ipc_child` does nothing
//! unless that variable is set. Children report progress as lines on stdout
//! ("READY", "RECEIVED ..."), which the parent awaits; children are killed
//! when their handle drops, so a failing test leaves none behind.
#![cfg(all(feature = "ipc", unix))]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::ipc::frame::{self, Hello, PROTOCOL_VERSION, kind};
use switchyard::ipc::{Daemon, DaemonConfig, DaemonHandle, IpcBus, IpcConfig, unique_socket_path};
use switchyard::{Envelope, Error, Node, Session};
use tokio::sync::mpsc;

const ROLE: &str = "SWITCHYARD_TEST_ROLE";
const SOCKET: &str = "SWITCHYARD_TEST_SOCKET";
const WAIT: Duration = Duration::from_secs(30);

// ---------- parent side ----------

struct Child {
    name: String,
    proc: std::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    stdin: Option<std::process::ChildStdin>,
}

impl Child {
    fn spawn(role: &str, socket: &Path, env: &[(&str, &str)]) -> Child {
        let exe = std::env::current_exe().expect("the test binary path");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", "ipc_child", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env(SOCKET, socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = cmd.spawn().expect("the child process starts");
        let stdout = proc.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = proc.stdin.take();
        Child {
            name: format!("{role} {env:?}"),
            proc,
            lines,
            stdin,
        }
    }

    /// Waits for a line starting with `prefix`; returns the rest of it.
    async fn expect(&mut self, prefix: &str) -> String {
        let name = self.name.clone();
        tokio::time::timeout(WAIT, async {
            loop {
                match self.lines.recv().await {
                    // libtest may print "test ipc_child ... " before the child's first line.
                    Some(l) if l.contains(prefix) => {
                        let at = l.find(prefix).unwrap_or(0) + prefix.len();
                        return l[at..].trim().to_string();
                    }
                    Some(_) => continue,
                    None => panic!("child {name} exited before printing {prefix}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("child {} did not print {prefix} in time", self.name))
    }

    fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").expect("the child reads its stdin");
        stdin.flush().expect("flush");
    }

    fn kill(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private directory for one test's sockets (the daemon's and every peer's), removed at the end
/// even when a killed child could not remove its own socket file.
struct SocketDir(PathBuf);

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn socket_path(tag: &str) -> (SocketDir, PathBuf) {
    let dir = unique_socket_path(&std::env::temp_dir(), tag).with_extension("d");
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let socket = dir.join("bus.sock");
    (SocketDir(dir), socket)
}

fn start_daemon(tag: &str) -> (SocketDir, DaemonHandle, PathBuf) {
    let (dir, socket) = socket_path(tag);
    let d = Daemon::start(DaemonConfig::new(&socket)).expect("the daemon starts");
    (dir, d, socket)
}

fn config(socket: &Path, p2p: bool) -> IpcConfig {
    let cfg = IpcConfig::new(socket);
    if p2p { cfg.peer_to_peer() } else { cfg }
}

fn session(socket: &Path, p2p: bool) -> (Session, IpcBus) {
    let bus = IpcBus::connect(config(socket, p2p)).expect("the ipc client starts");
    let s = switchyard::builder()
        .ipc(&bus)
        .build()
        .expect("a session builds");
    (s, bus)
}

fn mode(p2p: bool) -> &'static str {
    if p2p { "p2p" } else { "bus" }
}

async fn ping_pong(p2p: bool) {
    let (_dir, daemon, socket) = start_daemon("pp");
    let mut pong = Child::spawn("pong", &socket, &[("ID", "pong-1"), ("MODE", mode(p2p))]);
    pong.expect("READY").await;
    let (s, _bus) = session(&socket, p2p);
    let ping = s.machine("ping", "PingService").build().await.unwrap();
    let (_, loc) = ping.locate(&"pong-1".into()).await.unwrap();
    assert_eq!(loc, switchyard::Location::SameMachine);
    let mut pongs = 0;
    for i in 0..5u32 {
        let r = ping.request("pong-1", "PING", i, WAIT).await.unwrap();
        assert_eq!((r.name(), r.data::<u32>().unwrap()), ("PONG", i));
        assert_eq!(r.carried_by, Some("ipc"));
        pongs += 1;
    }
    assert_eq!(pongs, 5, "5/5 PONGs");
    let routed = daemon.health().routed;
    if p2p {
        assert_eq!(
            routed, 0,
            "peer-to-peer traffic does not pass through the daemon"
        );
    } else {
        assert!(
            routed >= 10,
            "bus traffic is routed by the daemon ({routed})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_between_two_processes_bus() {
    ping_pong(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_between_two_processes_p2p() {
    ping_pong(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_clients_broadcast_to_each_other() {
    let (_dir, _daemon, socket) = start_daemon("bc");
    let ids: Vec<String> = (1..=5).map(|i| format!("client-{i}")).collect();
    let mut kids: Vec<Child> = ids
        .iter()
        .map(|id| Child::spawn("caster", &socket, &[("ID", id.as_str()), ("MODE", "bus")]))
        .collect();
    for k in &mut kids {
        k.expect("READY").await;
    }
    for k in &mut kids {
        k.tell("GO");
    }
    let mut total = 0;
    for (k, id) in kids.iter_mut().zip(&ids) {
        let from: BTreeSet<String> = k
            .expect("DONE")
            .await
            .split(',')
            .map(str::to_string)
            .collect();
        let others: BTreeSet<String> = ids.iter().filter(|o| *o != id).cloned().collect();
        assert_eq!(from, others, "{id} hears each other client once");
        total += from.len();
    }
    for k in &mut kids {
        k.tell("END");
    }
    for (k, id) in kids.iter_mut().zip(&ids) {
        assert_eq!(k.expect("TOTAL").await, "4", "{id} got nothing more");
    }
    assert_eq!(total, 20);
}

async fn hundred_thousand(p2p: bool) {
    const N: u64 = 100_000;
    let (_dir, _daemon, socket) = start_daemon("100k");
    let n = N.to_string();
    let mut sink = Child::spawn(
        "sink",
        &socket,
        &[("ID", "sink"), ("MODE", mode(p2p)), ("N", n.as_str())],
    );
    sink.expect("READY").await;
    let (s, _bus) = session(&socket, p2p);
    let src = s.machine("source", "Source").build().await.unwrap();
    for i in 0..N {
        src.send("sink", "SEQ", i).await.unwrap();
    }
    assert_eq!(
        sink.expect("RECEIVED").await,
        format!("{N} in-order"),
        "all received, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_messages_in_order_bus() {
    hundred_thousand(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_messages_in_order_p2p() {
    hundred_thousand(true).await;
}

async fn killed_client(p2p: bool) {
    let (_dir, daemon, socket) = start_daemon("kill");
    let mut victim = Child::spawn("pong", &socket, &[("ID", "victim"), ("MODE", mode(p2p))]);
    let mut survivor = Child::spawn("pong", &socket, &[("ID", "survivor"), ("MODE", mode(p2p))]);
    victim.expect("READY").await;
    survivor.expect("READY").await;
    let (s, _bus) = session(&socket, p2p);
    let src = s.machine("source", "Source").build().await.unwrap();
    for i in 0..1000u32 {
        src.send("victim", "TICK", i).await.unwrap();
        src.send("survivor", "TICK", i).await.unwrap();
    }
    victim.kill();
    // Keep streaming to the dead machine: the sender must get an error, not silence.
    let err = tokio::time::timeout(WAIT, async {
        let mut i = 0u32;
        loop {
            if let Err(e) = src.send("victim", "TICK", i).await {
                break e;
            }
            i += 1;
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a send to the dead machine fails");
    assert!(
        matches!(
            err,
            Error::UnknownTarget(_) | Error::TargetGone(_) | Error::Transport { .. }
        ),
        "{err}"
    );
    for i in 0..5u32 {
        let r = src.request("survivor", "PING", i, WAIT).await.unwrap();
        assert_eq!(r.data::<u32>().unwrap(), i, "the other client goes on");
    }
    survivor.tell("COUNT");
    assert_eq!(survivor.expect("TICKS").await, "1000");
    let h = daemon.health();
    assert_eq!(
        h.connections, 2,
        "the parent and the survivor remain: {h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_does_not_stop_the_others_bus() {
    killed_client(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_does_not_stop_the_others_p2p() {
    killed_client(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restart_clients_reconnect() {
    let (_dir, socket) = socket_path("restart");
    let mut daemon = Child::spawn("daemon", &socket, &[]);
    daemon.expect("READY").await;
    let mut pong = Child::spawn("pong", &socket, &[("ID", "pong-r"), ("MODE", "bus")]);
    pong.expect("READY").await;
    let (s, bus) = session(&socket, false);
    let ping = s.machine("ping-r", "PingService").build().await.unwrap();
    let r = ping.request("pong-r", "PING", 1u32, WAIT).await.unwrap();
    assert_eq!(r.name(), "PONG");

    daemon.kill();
    let mut daemon = Child::spawn("daemon", &socket, &[]);
    daemon.expect("READY").await;
    bus.wait_connected(WAIT).await.unwrap();
    // Both clients re-register their machines by themselves; wait for the daemon to see them.
    tokio::time::timeout(WAIT, async {
        loop {
            let found = s
                .registry()
                .discover("PongService")
                .await
                .unwrap_or_default();
            let me = s.registry().get(&"ping-r".into()).await.ok().flatten();
            if found.len() == 1 && me.is_some() {
                break;
            }
            // Polling the daemon's registry: each lookup is a round trip, not a sleep.
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("both machines are registered again");
    for i in 0..5u32 {
        let r = ping.request("pong-r", "PING", i, WAIT).await.unwrap();
        assert_eq!(r.data::<u32>().unwrap(), i, "traffic resumes");
    }
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_are_dropped_and_others_unaffected() {
    let (_dir, daemon, socket) = start_daemon("bad");
    let mut sink = Child::spawn(
        "sink",
        &socket,
        &[("ID", "sink"), ("MODE", "bus"), ("N", "3000")],
    );
    sink.expect("READY").await;
    let (s, _bus) = session(&socket, false);
    let src = s.machine("source", "Source").build().await.unwrap();
    for i in 0..1000u64 {
        src.send("sink", "SEQ", i).await.unwrap();
    }
    for (j, k) in ["garbage", "oversized", "unknown", "truncated"]
        .into_iter()
        .enumerate()
    {
        let mut bad = Child::spawn("bad", &socket, &[("KIND", k)]);
        let code = bad.expect("CLOSED").await;
        let want = match k {
            "garbage" => "malformed",
            "oversized" => "frame_too_large",
            "unknown" => "unknown_frame",
            _ => "eof",
        };
        assert_eq!(code, want, "{k}");
        for i in 0..500u64 {
            src.send("sink", "SEQ", 1000 + 500 * j as u64 + i)
                .await
                .unwrap();
        }
    }
    assert_eq!(
        sink.expect("RECEIVED").await,
        "3000 in-order",
        "nothing the good clients sent was lost"
    );
    tokio::time::timeout(WAIT, async {
        while daemon.health().rejected < 4 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("each bad client was dropped");
    assert_eq!(daemon.health().connections, 2);
}

// ---------- child side ----------

#[test]
fn ipc_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let socket = PathBuf::from(std::env::var(SOCKET).expect("the socket path"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(child_main(&role, socket));
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_default()
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Lines from stdin, read on a thread.
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

async fn child_main(role: &str, socket: PathBuf) {
    let p2p = env("MODE") == "p2p";
    let id = env("ID");
    let mut stdin = stdin_lines();
    match role {
        "daemon" => {
            let _d = Daemon::start(DaemonConfig::new(&socket)).expect("the daemon starts");
            say("READY");
            while stdin.recv().await.is_some() {}
        }
        "pong" => {
            let (s, _bus) = session(&socket, p2p);
            let ticks = Arc::new(Mutex::new(0u64));
            let t = ticks.clone();
            let _n = s
                .machine(id.as_str(), "PongService")
                .handler(move |node: &Node, ev: Envelope| match ev.name() {
                    "PING" => {
                        let v = ev.data::<u32>().unwrap_or(0);
                        let _ = node.post_reply(&ev, "PONG", v);
                    }
                    _ => *t.lock().unwrap_or_else(|p| p.into_inner()) += 1,
                })
                .build()
                .await
                .expect("the machine registers");
            say("READY");
            while let Some(line) = stdin.recv().await {
                if line == "COUNT" {
                    let n = *ticks.lock().unwrap_or_else(|p| p.into_inner());
                    say(&format!("TICKS {n}"));
                }
            }
        }
        "sink" => {
            let n: u64 = env("N").parse().expect("N");
            let (s, _bus) = session(&socket, p2p);
            let state = Arc::new(Mutex::new((0u64, true)));
            let st = state.clone();
            let _n = s
                .machine(id.as_str(), "Sink")
                .handler(move |_: &Node, ev: Envelope| {
                    let v = ev.data::<u64>().unwrap_or(u64::MAX);
                    let mut g = st.lock().unwrap_or_else(|p| p.into_inner());
                    if v != g.0 {
                        g.1 = false;
                    }
                    g.0 += 1;
                    if g.0 == n {
                        say(&format!(
                            "RECEIVED {} {}",
                            g.0,
                            if g.1 { "in-order" } else { "out-of-order" }
                        ));
                    }
                })
                .build()
                .await
                .expect("the machine registers");
            say("READY");
            while stdin.recv().await.is_some() {}
        }
        "caster" => {
            let (s, _bus) = session(&socket, p2p);
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            let node = s
                .machine(id.as_str(), "Caster")
                .handler(move |_: &Node, ev: Envelope| {
                    let _ = tx.send(ev.data::<String>().unwrap_or_default());
                })
                .build()
                .await
                .expect("the machine registers");
            say("READY");
            while stdin.recv().await.as_deref() != Some("GO") {}
            let sent = node
                .broadcast_to_same_type("HELLO", id.clone())
                .await
                .unwrap();
            assert_eq!(sent, 4);
            let mut from = BTreeSet::new();
            let mut count = 0;
            while count < 4 {
                from.insert(rx.recv().await.expect("the machine is alive"));
                count += 1;
            }
            say(&format!(
                "DONE {}",
                from.into_iter().collect::<Vec<_>>().join(",")
            ));
            while stdin.recv().await.as_deref() != Some("END") {}
            while rx.try_recv().is_ok() {
                count += 1;
            }
            say(&format!("TOTAL {count}"));
            while stdin.recv().await.is_some() {}
        }
        "bad" => bad_client(&socket, &env("KIND")),
        other => panic!("unknown role {other}"),
    }
}

/// A raw client that completes the handshake and then breaks the protocol.
fn bad_client(socket: &Path, what: &str) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connects");
    let hello = frame::msg_frame(
        kind::HELLO,
        &Hello {
            protocol: PROTOCOL_VERSION,
            client_id: format!("bad-{what}"),
            token: None,
            watch: false,
            max_frame: None,
            acks: false,
        },
    )
    .expect("encodes");
    s.write_all(&hello).expect("writes");
    let mut head = [0u8; 5];
    s.read_exact(&mut head).expect("a WELCOME frame");
    let mut rest = vec![0u8; u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize - 1];
    s.read_exact(&mut rest).expect("the WELCOME body");
    assert_eq!(head[4], kind::WELCOME);
    match what {
        "garbage" => {
            // A SEND whose body is not a MessagePack array.
            s.write_all(&[0, 0, 0, 4, kind::SEND, 0xc1, 0xc1, 0xc1])
                .unwrap();
        }
        "oversized" => {
            let mut f = (64u32 * 1024 * 1024).to_be_bytes().to_vec();
            f.push(kind::SEND);
            // The daemon may close as soon as it has read the length: ignore a broken pipe.
            let _ = s.write_all(&f);
        }
        "unknown" => {
            let _ = s.write_all(&[0, 0, 0, 2, 0x7f, 0x90]);
        }
        _ => {
            // Announce 100 bytes, send 10, and vanish.
            s.write_all(&[0, 0, 0, 100, kind::SEND]).unwrap();
            s.write_all(&[0x92; 9]).unwrap();
            say("CLOSED eof");
            std::process::exit(0);
        }
    }
    // The daemon answers with a typed ERROR frame, then closes.
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let code = if buf.len() > 5 && buf[4] == kind::ERROR {
        frame::decode_msg::<frame::ErrorMsg>(&buf[5..])
            .map(|e| e.code)
            .unwrap_or_else(|e| format!("undecodable: {e}"))
    } else {
        format!("no error frame ({} bytes)", buf.len())
    };
    say(&format!("CLOSED {code}"));
}
