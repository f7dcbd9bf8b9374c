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
    let mut locations: Vec<&str> = seen.iter().map(|(l, _)| l.as_str()).collect();
    locations.sort();
    locations.dedup();
    assert!(locations.len() >= 3, "{locations:?}\n{stdout}");
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
