//! The original framework's ping-pong pair as two JSON machines with one action map.
//!
//! The scenario is written once ([`start_pong`], [`run_ping`], [`actions`]); each test only
//! changes the session configuration (which transports exist, where the registry lives) and
//! where the machines are placed: one thread, one process, or two processes of this host.

mod common;

use common::{
    ChildProcess, Observer, child_role, direct_session, ipc_session, memory_session, parent_lines,
    say, within,
};
use serde_json::Value;
use switchyard::ipc::{Daemon, DaemonConfig, DaemonHealth, unique_socket_path};
use switchyard::{MachineBuilder, Session};
use switchyard_machine::{ActionContext, Actions, Interpreter, Located, StateMachine};

const PING: &str = include_str!("fixtures/ping.json");
const PONG: &str = include_str!("fixtures/pong.json");

/// The transport that carried the current event (`local` for one made in the process).
fn carrier(ctx: &ActionContext) -> &'static str {
    ctx.event()
        .origin()
        .and_then(|o| o.transport)
        .unwrap_or("local")
}

/// One action map for both machines, whatever carries their events.
fn actions() -> Actions {
    Actions::new()
        .action("locatePong", |ctx| {
            // Where the peer lives, as the selector sees it: answered as `done.locate.pong`,
            // at once by an in-process registry, after a round trip by the bus daemon's.
            ctx.request_location("pong");
            Ok(())
        })
        .action("recordPong", |ctx| {
            let found: Located = ctx.data()?;
            ctx.set("pong_location", format!("{:?}", found.location))?;
            ctx.set("pong_type", found.entry.machine_type.to_string())
        })
        .action("sendPing", |ctx| {
            let round: u64 = ctx.get("rounds")?;
            ctx.send_to_any_of_type("PongService", "PING", round + 1);
            Ok(())
        })
        .action("sendPong", |ctx| {
            let round: u64 = ctx.data()?;
            let via = carrier(ctx);
            let served: u64 = ctx.get("served")?;
            ctx.set("served", served + 1)?;
            ctx.set("via", via)?;
            ctx.reply("PONG", round)
        })
        .action("countRound", |ctx| {
            let round: u64 = ctx.data()?;
            let rounds: u64 = ctx.get("rounds")?;
            if round != rounds + 1 {
                return Err(format!("PONG {round} out of order after {rounds} rounds").into());
            }
            let via = carrier(ctx);
            ctx.set("pong_via", via)?;
            ctx.set("rounds", round)
        })
        .guard("lastRound", |g| {
            let round = g.data::<u64>().unwrap_or(0);
            round >= g.get::<u64>("limit").unwrap_or(u64::MAX)
        })
}

/// Starts the pong machine on `session`.
async fn start_pong(
    session: &Session,
    place: impl Fn(MachineBuilder) -> MachineBuilder,
) -> StateMachine {
    let actions = actions();
    Interpreter::from_json(PONG, &actions)
        .expect("pong loads")
        .bind(session, "pong", "PongService")
        .configure(place)
        .build()
        .await
        .expect("pong starts")
}

/// Starts the ping machine on `session`, plays the rounds and returns ping's final context.
async fn run_ping(session: &Session, place: impl Fn(MachineBuilder) -> MachineBuilder) -> Value {
    let actions = actions();
    let ping = Interpreter::from_json(PING, &actions)
        .expect("ping loads")
        .bind(session, "ping", "PingService")
        .configure(place)
        .build()
        .await
        .expect("ping starts");
    assert!(ping.matches("idle"));
    ping.send("START", ()).await.expect("ping takes START");
    let done = within(ping.wait_for_state("finished")).await;
    assert!(ping.is_done());
    done.context
}

/// What both machines recorded.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Rounds ping counted (PONGs, in order).
    rounds: u64,
    /// PINGs pong answered.
    served: u64,
    /// The transport that carried the PINGs (seen by pong).
    ping_via: String,
    /// The transport that carried the PONGs (seen by ping).
    pong_via: String,
    /// Where ping found pong.
    pong_location: String,
    /// Pong's service type in the registry, as ping found it.
    pong_type: String,
}

impl Outcome {
    fn new(ping: &Value, pong: &Value) -> Outcome {
        let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
        Outcome {
            rounds: ping["rounds"].as_u64().expect("rounds"),
            served: pong["served"].as_u64().expect("served"),
            ping_via: text(&pong["via"]),
            pong_via: text(&ping["pong_via"]),
            pong_location: text(&ping["pong_location"]),
            pong_type: text(&ping["pong_type"]),
        }
    }

    /// Five rounds, every event carried by `transport`, pong found at `location`.
    fn expected(transport: &str, location: &str) -> Outcome {
        Outcome {
            rounds: 5,
            served: 5,
            ping_via: transport.into(),
            pong_via: transport.into(),
            pong_location: location.into(),
            pong_type: "PongService".into(),
        }
    }
}

/// Both machines in one session.
async fn ping_pong(
    session: &Session,
    place: impl Fn(MachineBuilder) -> MachineBuilder + Copy,
) -> Outcome {
    let pong = start_pong(session, place).await;
    let ping = run_ping(session, place).await;
    Outcome::new(&ping, &pong.snapshot().context)
}

#[tokio::test]
async fn ping_pong_over_direct() {
    let session = direct_session();
    let ctx = session.context();
    // One single-threaded context: the selector picks `direct`.
    let outcome = ping_pong(&session, move |b| b.context(ctx)).await;
    assert_eq!(outcome, Outcome::expected("direct", "SameThread"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_over_memory() {
    let session = memory_session();
    let mut states = Observer::new(&session, "observer", "state.#").await;
    let outcome = ping_pong(&session, |b| b).await;
    assert_eq!(outcome, Outcome::expected("memory", "SameProcess"));
    // Every state change of both machines was published; ping's end with `finished`.
    let seen = states.until("state.ping.finished").await;
    assert!(seen.contains(&"state.pong.ready".to_owned()), "{seen:?}");
    assert!(seen.contains(&"state.ping.idle".to_owned()), "{seen:?}");
    assert_eq!(
        seen.iter()
            .filter(|t| t.starts_with("state.ping."))
            .collect::<Vec<_>>(),
        [
            "state.ping.idle",
            "state.ping.locating",
            "state.ping.waiting",
            "state.ping.finished"
        ],
        "the rounds are targetless: no state change"
    );
}

// ---------------------------------------------------------------------------
// Across two processes: pong runs in a child process (this test binary re-executed to run
// only `ipc_child`), ping in the test; both sessions are `switchyard::builder().ipc(..)`
// against a bus daemon on a fresh socket, whose registry they share.
// ---------------------------------------------------------------------------

/// Ping here, pong in a child process; returns the outcome and the daemon's counters.
async fn ping_pong_across_processes(p2p: bool) -> (Outcome, DaemonHealth) {
    let socket = unique_socket_path(&std::env::temp_dir(), "machine-ping-pong");
    let daemon = Daemon::start(DaemonConfig::new(&socket)).expect("the bus daemon starts");
    let mut child = ChildProcess::spawn("ipc_child", "pong", &socket, p2p);
    // Pong is registered with the daemon once the child says so.
    child.expect("READY").await;

    let (session, _bus) = ipc_session(&socket, p2p);
    let ping = run_ping(&session, |b| b).await;

    child.tell("CONTEXT");
    let pong: Value =
        serde_json::from_str(&child.expect("CONTEXT").await).expect("pong's context as JSON");
    child.tell("QUIT");
    child.expect("BYE").await;
    (Outcome::new(&ping, &pong), daemon.health())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_over_ipc() {
    let (outcome, daemon) = ping_pong_across_processes(false).await;
    assert_eq!(outcome, Outcome::expected("ipc", "SameMachine"));
    assert!(
        daemon.routed >= 10,
        "the 5 PINGs and 5 PONGs went through the daemon: {daemon:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_over_ipc_peer_to_peer() {
    let (outcome, daemon) = ping_pong_across_processes(true).await;
    assert_eq!(outcome, Outcome::expected("ipc", "SameMachine"));
    assert_eq!(
        daemon.routed, 0,
        "peer-to-peer events bypass the daemon: {daemon:?}"
    );
}

/// The child side of the ipc tests; does nothing in an ordinary test run.
#[test]
fn ipc_child() {
    let Some((role, socket, p2p)) = child_role() else {
        return;
    };
    assert_eq!(role, "pong", "the only role of this binary");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut parent = parent_lines();
        let (session, _bus) = ipc_session(&socket, p2p);
        let pong = start_pong(&session, |b| b).await;
        say("READY", "");
        while let Some(line) = parent.recv().await {
            match line.as_str() {
                "CONTEXT" => say("CONTEXT", &pong.snapshot().context.to_string()),
                "QUIT" => break,
                other => panic!("unknown command {other:?}"),
            }
        }
        pong.stop().await.expect("pong stops");
        session.shutdown();
        say("BYE", "");
    });
}
