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

/// This host's id as docs/PROTOCOL.md defines it.
fn host_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "localhost".into())
}

fn raw_entry(id: &str) -> switchyard::MachineEntry {
    switchyard::MachineEntry {
        id: id.into(),
        machine_type: "Raw".into(),
        host_id: "h".into(),
        process_id: "p".into(),
        context: None,
        version: None,
        accepts: Vec::new(),
        metadata: Default::default(),
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_limit_is_agreed_and_too_large_is_refused_at_the_sender() {
    let socket = path("limit");
    let mut cfg = DaemonConfig::new(&socket);
    cfg.max_frame = 1 << 20;
    let d = Daemon::start(cfg).unwrap();
    let bus = IpcBus::connect(IpcConfig::new(&socket)).unwrap();
    let session = switchyard::builder().ipc(&bus).build().unwrap();
    // The sink is a raw client (another "process"), so the send goes over ipc.
    let sock = socket.clone();
    let mut sink = tokio::task::spawn_blocking(move || {
        let mut s = raw_client(&sock);
        let mut entry = raw_entry("sink");
        entry.host_id = host_id().into();
        let msg = frame::RequestMsg {
            req: 1,
            op: "register".into(),
            entry: Some(entry),
            ..frame::RequestMsg::default()
        };
        s.write_all(&frame::msg_frame(kind::REQUEST, &msg).unwrap())
            .unwrap();
        assert_eq!(read_frame(&mut s).0, kind::REPLY);
        s
    })
    .await
    .unwrap();
    let src = session.machine("src", "Src").build().await.unwrap();
    let big = serde_bytes::ByteBuf::from(vec![7u8; 2 << 20]);
    let err = src.send("sink", "BIG", big).await.unwrap_err();
    match err {
        switchyard::Error::TooLarge { size, limit, .. } => {
            // The payload is the byte string plus its 5-byte bin32 header.
            assert_eq!(size, (2 << 20) + 5, "the payload's size, not the frame's");
            assert!(limit < 1 << 20 && limit > (1 << 20) - 200, "{limit}");
        }
        other => panic!("expected TooLarge, got {other}"),
    }
    // Nothing was sent, the connection is fine, and an event that fits goes through.
    let ok = serde_bytes::ByteBuf::from(vec![7u8; 1000]);
    src.send("sink", "OK", ok).await.unwrap();
    let (k, body) = tokio::task::spawn_blocking(move || read_frame(&mut sink))
        .await
        .unwrap();
    assert_eq!(k, kind::SEND);
    let mut b = frame::Body::array(&body, 2).unwrap();
    assert_eq!(b.str().unwrap(), "sink");
    let env = b.envelope().unwrap();
    assert_eq!(
        (
            env.name(),
            env.data::<serde_bytes::ByteBuf>().unwrap().len()
        ),
        ("OK", 1000)
    );
    assert_eq!(d.health().rejected, 0);
    assert!(bus.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_drops_an_undecodable_event_and_keeps_its_connection() {
    // A fake daemon that answers every request and then sends one bad event and one good one.
    let socket = path("fake");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let bus = IpcBus::connect(IpcConfig::new(&socket)).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        assert_eq!(read_frame(&mut s).0, kind::HELLO);
        let welcome = frame::Welcome {
            protocol: frame::PROTOCOL_VERSION,
            server_id: "fake".into(),
            max_frame: frame::DEFAULT_MAX_FRAME as u64,
            idle_timeout_ms: None,
            frame_timeout_ms: None,
            queue_limit: None,
        };
        s.write_all(&frame::msg_frame(kind::WELCOME, &welcome).unwrap())
            .unwrap();
        loop {
            let (k, body) = read_frame(&mut s);
            assert_eq!(k, kind::REQUEST);
            let req: frame::RequestMsg = frame::decode_msg(&body).unwrap();
            // The test asks for health once its machine is bound: then the events come.
            let go = req.op == "health";
            let reply = frame::ReplyMsg {
                entry: req.entry.clone(),
                ..frame::ReplyMsg::ok(req.req)
            };
            s.write_all(&frame::msg_frame(kind::REPLY, &reply).unwrap())
                .unwrap();
            if go {
                break;
            }
        }
        let good = switchyard::Envelope::new(
            2,
            "x".into(),
            switchyard::Address::Machine("m".into()),
            "GOOD".into(),
            switchyard::Payload::Empty,
        );
        let mut bad = Vec::new();
        frame::write_frame(&mut bad, kind::SEND, usize::MAX, |w| {
            w.extend_from_slice(&[0x92, 0xa1, b'm', 0x81, 0xa2, b'i', b'd', 0xc1]);
            Ok(())
        })
        .unwrap();
        frame::write_send(&mut bad, usize::MAX, "m", &good).unwrap();
        s.write_all(&bad).unwrap();
        // Keep the connection open (answering heartbeats and the like) until the client closes it.
        loop {
            let mut head = [0u8; 5];
            if s.read_exact(&mut head).is_err() {
                break;
            }
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let mut body = vec![0u8; len - 1];
            if s.read_exact(&mut body).is_err() {
                break;
            }
            if head[4] == kind::REQUEST
                && let Ok(req) = frame::decode_msg::<frame::RequestMsg>(&body)
            {
                let reply = frame::ReplyMsg::ok(req.req);
                let _ = s.write_all(&frame::msg_frame(kind::REPLY, &reply).unwrap());
            }
        }
    });
    let session = switchyard::builder().ipc(&bus).build().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let _m = session
        .machine("m", "M")
        .handler(move |_, ev| {
            let _ = tx.send(ev.name().to_string());
        })
        .build()
        .await
        .unwrap();
    bus.daemon_health().await.unwrap();
    assert_eq!(rx.recv().await.as_deref(), Some("GOOD"));
    assert_eq!(bus.stats().undecodable, 1);
    assert!(
        bus.is_connected(),
        "one bad event does not cost the connection"
    );
    bus.close();
    let _ = fake.join();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_type_id_counter_goes_with_the_types_last_machine() {
    use switchyard::Registry;
    let socket = path("pertype");
    let _d = Daemon::start(DaemonConfig::new(&socket)).unwrap();
    let bus = IpcBus::connect(IpcConfig::new(&socket)).unwrap();
    let reg = bus.registry();
    let entry = || switchyard::MachineEntry {
        id: "".into(),
        machine_type: "Counted".into(),
        host_id: "h".into(),
        process_id: "p".into(),
        context: None,
        version: None,
        accepts: Vec::new(),
        metadata: Default::default(),
    };
    let a = reg.register(entry()).await.unwrap();
    let b = reg.register(entry()).await.unwrap();
    assert!(a.id.as_str().starts_with("Counted-1-"), "{}", a.id);
    assert!(b.id.as_str().starts_with("Counted-2-"), "{}", b.id);
    reg.deregister(&a.id).await.unwrap();
    reg.deregister(&b.id).await.unwrap();
    let c = reg.register(entry()).await.unwrap();
    assert!(
        c.id.as_str().starts_with("Counted-1-"),
        "the counter restarts once the type is gone: {}",
        c.id
    );
}
