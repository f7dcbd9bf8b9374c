//! The bus daemon's socket, handshake and health, in process.
#![cfg(all(feature = "ipc", unix))]

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use switchyard::ipc::frame::{self, ErrorMsg, Hello, kind};
use switchyard::ipc::{Daemon, DaemonConfig, IpcBus, IpcConfig, IpcError, unique_socket_path};

fn path(tag: &str) -> std::path::PathBuf {
    unique_socket_path(&std::env::temp_dir(), tag)
}

/// Sends a HELLO with `protocol` and returns the first frame's kind and body.
fn raw_hello(socket: &std::path::Path, protocol: u32) -> (u8, Vec<u8>) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let hello = frame::msg_frame(
        kind::HELLO,
        &Hello {
            protocol,
            client_id: "raw".into(),
            token: None,
            watch: false,
            max_frame: None,
            acks: false,
        },
    )
    .unwrap();
    s.write_all(&hello).unwrap();
    read_frame(&mut s)
}

/// Reads one frame (kind, body) from a raw client connection.
fn read_frame(s: &mut std::os::unix::net::UnixStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let mut body = vec![0u8; len - 1];
    s.read_exact(&mut body).unwrap();
    (head[4], body)
}

/// A raw client that has said HELLO and got WELCOME.
fn raw_client(socket: &std::path::Path) -> std::os::unix::net::UnixStream {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let hello = Hello {
        protocol: frame::PROTOCOL_VERSION,
        client_id: "raw".into(),
        token: None,
        watch: false,
        max_frame: None,
        acks: false,
    };
    s.write_all(&frame::msg_frame(kind::HELLO, &hello).unwrap())
        .unwrap();
    assert_eq!(read_frame(&mut s).0, kind::WELCOME);
    s
}

/// Registers machine `id` on a raw connection (the daemon only routes events whose source the
/// connection registered) and returns the reply's `ok`.
fn raw_register(s: &mut std::os::unix::net::UnixStream, req: u64, id: &str) -> bool {
    let entry = switchyard::MachineEntry {
        id: id.into(),
        machine_type: "Raw".into(),
        host_id: "h".into(),
        process_id: "p".into(),
        context: None,
        version: None,
        accepts: Vec::new(),
        metadata: Default::default(),
    };
    let msg = frame::RequestMsg {
        req,
        op: "register".into(),
        entry: Some(entry),
        ..frame::RequestMsg::default()
    };
    s.write_all(&frame::msg_frame(kind::REQUEST, &msg).unwrap())
        .unwrap();
    loop {
        let (k, body) = read_frame(s);
        if k == kind::REPLY {
            let r: frame::ReplyMsg = frame::decode_msg(&body).unwrap();
            assert_eq!(r.req, req);
            return r.ok;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_private_and_a_live_daemon_is_not_displaced() {
    let socket = path("perm");
    let d = Daemon::start(DaemonConfig::new(&socket)).unwrap();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(matches!(
        Daemon::start(DaemonConfig::new(&socket)),
        Err(IpcError::AlreadyRunning(_))
    ));
    d.shutdown().await;
    assert!(!socket.exists(), "shutdown removes the socket file");

    // A group makes it 0660 and owned by that group.
    let gid = std::fs::metadata(std::env::temp_dir()).unwrap().gid();
    let mut cfg = DaemonConfig::new(&socket);
    cfg.group = Some(gid);
    let d = Daemon::start(cfg).unwrap();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.gid()),
        (0o660, gid)
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_is_reclaimed() {
    let socket = path("stale");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists(), "a socket file nobody listens on");
    let _d = Daemon::start(DaemonConfig::new(&socket)).expect("the stale file is replaced");
    let bus = IpcBus::connect(IpcConfig::new(&socket)).unwrap();
    bus.wait_connected(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_version_gets_a_typed_error() {
    let socket = path("ver");
    let d = Daemon::start(DaemonConfig::new(&socket)).unwrap();
    let (k, body) = raw_hello(&socket, 99);
    assert_eq!(k, kind::ERROR);
    let e: ErrorMsg = frame::decode_msg(&body).unwrap();
    assert_eq!(e.code, "handshake");
    assert!(e.message.contains("protocol version 99"), "{}", e.message);
    let (k, _) = raw_hello(&socket, frame::PROTOCOL_VERSION);
    assert_eq!(k, kind::WELCOME);
    assert_eq!(d.health().rejected, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_when_configured() {
    let socket = path("tok");
    let mut cfg = DaemonConfig::new(&socket);
    cfg.token = Some("s3cret".into());
    let d = Daemon::start(cfg).unwrap();
    let (k, body) = raw_hello(&socket, frame::PROTOCOL_VERSION);
    assert_eq!(k, kind::ERROR);
    assert!(
        frame::decode_msg::<ErrorMsg>(&body)
            .unwrap()
            .message
            .contains("token")
    );
    let mut good = IpcConfig::new(&socket);
    good.token = Some("s3cret".into());
    let bus = IpcBus::connect(good).unwrap();
    bus.wait_connected(Duration::from_secs(10)).await.unwrap();
    let h = bus.daemon_health().await.unwrap();
    assert_eq!((h.connections, h.rejected), (1, 1));
    assert!(h.last_activity_us > 0);
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_with_request_id_zero_gets_no_reply() {
    let socket = path("noreply");
    let _d = Daemon::start(DaemonConfig::new(&socket)).unwrap();
    let sock = socket.clone();
    let (first_reply, ok) = tokio::task::spawn_blocking(move || {
        let mut s = raw_client(&sock);
        assert!(raw_register(&mut s, 1, "raw"));
        let env = switchyard::Envelope::new(
            1,
            "raw".into(),
            switchyard::Address::Topic("t.x".into()),
            "E".into(),
            switchyard::Payload::Empty,
        );
        let mut out = Vec::new();
        for req in [frame::NO_REPLY, 7] {
            frame::write_frame(&mut out, kind::PUBLISH, usize::MAX, |w| {
                frame::write_array(w, 3)?;
                frame::write_uint(w, req)?;
                frame::write_str(w, "t.x")?;
                frame::write_envelope(w, &env)
            })
            .unwrap();
        }
        s.write_all(&out).unwrap();
        let (k, body) = read_frame(&mut s);
        assert_eq!(k, kind::REPLY);
        let r: frame::ReplyMsg = frame::decode_msg(&body).unwrap();
        (r.req, r.ok)
    })
    .await
    .unwrap();
    assert_eq!(
        (first_reply, ok),
        (7, true),
        "the publish with req 0 was not answered; the next one was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_sends_are_forwarded_in_order_and_unknown_targets_nacked() {
    let socket = path("runs");
    let _d = Daemon::start(DaemonConfig::new(&socket)).unwrap();
    let bus = IpcBus::connect(IpcConfig::new(&socket)).unwrap();
    let session = switchyard::builder().ipc(&bus).build().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let _sink = session
        .machine("sink", "Sink")
        .handler(move |_, ev| {
            let _ = tx.send(ev.id);
        })
        .build()
        .await
        .unwrap();
    let sock = socket.clone();
    // One write holding runs to an unknown machine and to the sink, interleaved.
    let plan: Vec<(&str, u64)> = (1..=3)
        .map(|i| ("ghost", i))
        .chain((10..110).map(|i| ("sink", i)))
        .chain([("ghost", 200)])
        .chain((300..305).map(|i| ("sink", i)))
        .collect();
    let to_sink: Vec<u64> = plan
        .iter()
        .filter(|(to, _)| *to == "sink")
        .map(|p| p.1)
        .collect();
    let nacked = tokio::task::spawn_blocking(move || {
        let mut s = raw_client(&sock);
        assert!(raw_register(&mut s, 1, "raw"));
        let mut out = Vec::new();
        for (to, id) in &plan {
            let env = switchyard::Envelope::new(
                *id,
                "raw".into(),
                switchyard::Address::Machine((*to).into()),
                "E".into(),
                switchyard::Payload::Empty,
            );
            frame::write_send(&mut out, usize::MAX, to, &env).unwrap();
        }
        s.write_all(&out).unwrap();
        (0..4)
            .map(|_| {
                let (k, body) = read_frame(&mut s);
                assert_eq!(k, kind::NACK);
                frame::decode_msg::<frame::NackMsg>(&body).unwrap().id
            })
            .collect::<Vec<u64>>()
    })
    .await
    .unwrap();
    assert_eq!(
        nacked,
        vec![1, 2, 3, 200],
        "one nack per unknown-target send, in order"
    );
    let mut got = Vec::new();
    while got.len() < to_sink.len() {
        got.push(rx.recv().await.expect("the sink is alive"));
    }
    assert_eq!(got, to_sink, "every send to the sink, in order");
}
