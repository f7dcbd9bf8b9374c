//! `switchyard demo` run as a user runs it: the real binary, its real output.

use std::process::Command;

fn switchyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("the switchyard binary runs")
}

/// The `(location, transport)` pairs of the exchange lines (`ui -> X ... location=L transport=T`).
fn exchanges(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter(|l| l.starts_with("ui -> "))
        .filter_map(|l| {
            let loc = l.split("location=").nth(1)?.split_whitespace().next()?;
            let via = l.split("transport=").nth(1)?.split_whitespace().next()?;
            Some((loc.to_string(), via.to_string()))
        })
        .collect()
}

#[test]
fn demo_shows_each_location_with_the_transport_that_carried_it() {
    let out = switchyard(&["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = exchanges(&stdout);
    assert!(
        seen.contains(&("SameThread".into(), "direct".into())),
        "{stdout}"
    );
    assert!(
        seen.contains(&("SameProcess".into(), "memory".into())),
        "{stdout}"
    );
    // The second process the demo starts itself, reached through the bus daemon.
    assert!(
        seen.contains(&("SameMachine".into(), "ipc".into())),
        "{stdout}"
    );
    // The third process, with a host id of its own, reached over zeromq tcp: the selector
    // computed Remote from the registry entries, nothing forced.
    assert!(
        seen.contains(&("Remote".into(), "zeromq".into())),
        "{stdout}"
    );
    assert!(
        stdout.contains("share the bus daemon's registry") && stdout.contains("zeromq tcp"),
        "the output says how the remote process is found and reached: {stdout}"
    );
    let mut locations: Vec<&str> = seen.iter().map(|(l, _)| l.as_str()).collect();
    locations.sort();
    locations.dedup();
    assert_eq!(
        locations,
        ["Remote", "SameMachine", "SameProcess", "SameThread"],
        "all four locations: {stdout}"
    );
    // Every location is carried by the transport of its rung, and no other.
    for (loc, via) in &seen {
        let expected = match loc.as_str() {
            "SameThread" => "direct",
            "SameProcess" => "memory",
            "SameMachine" => "ipc",
            "Remote" => "zeromq",
            other => panic!("unexpected location {other}"),
        };
        assert_eq!(via, expected, "{loc}: {stdout}");
    }
    // The topic reached one subscriber at each distance (logger, audit, archive), once each.
    let topic_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("ui -> ") && l.contains("by topic"))
        .collect();
    assert_eq!(topic_lines.len(), 3, "{stdout}");
    // Every exchange is by id, by type or by topic, and all three appear.
    for how in ["by id", "by type", "by topic"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ui -> ") && l.contains(how)),
            "{how}: {stdout}"
        );
    }
}

#[test]
fn demo_with_an_unreachable_broker_says_so_in_one_line() {
    // Port 1 on loopback: nothing listens there.
    let out = switchyard(&["demo", "--redis", "redis://user:secret@127.0.0.1:1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    let notes: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("--redis"))
        .collect();
    assert_eq!(notes.len(), 1, "{stdout}");
    assert!(notes[0].contains("unreachable"), "{}", notes[0]);
    assert!(
        !stdout.contains("secret"),
        "the password is printed: {stdout}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn demo_rejects_unknown_arguments_with_a_usage_error() {
    let out = switchyard(&["demo", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Usage:"), "{stderr}");
}
