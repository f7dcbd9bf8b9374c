//! Invalid input is a typed error at load time that names the JSON path, before anything starts.

use switchyard_machine::{Actions, Chart, Interpreter, LoadError};

fn load(json: &str, actions: &Actions) -> LoadError {
    Interpreter::from_json(json, actions).expect_err("must not load")
}

fn no_actions(json: &str) -> LoadError {
    load(json, &Actions::new())
}

#[test]
fn text_that_is_not_json() {
    let e = no_actions(r#"{"id": "x", "states": {"#);
    assert!(matches!(e, LoadError::Json(_)), "{e:?}");
    assert!(e.to_string().contains("line 1"), "{e}");
}

#[test]
fn json_that_is_not_a_statechart() {
    for (json, path) in [
        ("[1, 2, 3]", "$"),
        ("42", "$"),
        (r#"{"name": "not a machine"}"#, "$"),
        (r#"{"id": "m"}"#, "$"),
        (r#"{"id": "m", "states": 5}"#, "$.states"),
        (r#"{"id": "m", "states": {}}"#, "$.states"),
        (
            r#"{"id": "m", "initial": "a", "states": {"a": 7}}"#,
            "$.states.a",
        ),
        (
            r#"{"id": "m", "initial": "a", "states": {"a": {"entyr": "x"}}}"#,
            "$.states.a.entyr",
        ),
        (
            r#"{"id": "m", "initial": "a", "states": {"a": {"on": ["X"]}}}"#,
            "$.states.a.on",
        ),
        (
            r#"{"id": "m", "initial": "a", "states": {"a": {"on": {"X": 3}}}}"#,
            "$.states.a.on.X",
        ),
        (
            r#"{"id": "m", "initial": "a", "states": {"a": {"type": "weird"}}}"#,
            "$.states.a.type",
        ),
        (
            r#"{"id": "m", "initial": "a", "states": {"a": {"type": "final", "on": {"X": "a"}}}}"#,
            "$.states.a.on",
        ),
        (
            r#"{"id": "m", "initial": "a", "states": {"a": {"after": {"soon": "a", "1.5": "a"}}}}"#,
            "$.states.a.after.soon",
        ),
        (
            r#"{"id": "m", "initial": "a", "states": {"a": {"on": {"X": {"target": "a", "guard": "g", "cond": "g"}}}}}"#,
            "$.states.a.on.X",
        ),
    ] {
        let e = no_actions(json);
        match &e {
            LoadError::NotAStatechart { .. } | LoadError::Unsupported { .. } => {}
            other => panic!("{json}: expected NotAStatechart, got {other:?}"),
        }
        assert_eq!(e.path(), path, "{json}: {e}");
    }
}

#[test]
fn transition_to_an_unknown_state() {
    let e = no_actions(
        r#"{"id": "light", "initial": "green", "states": {
            "green": {"on": {"TIMER": "purple"}},
            "red": {}}}"#,
    );
    assert_eq!(
        e,
        LoadError::UnknownTarget {
            path: "$.states.green.on.TIMER".into(),
            target: "purple".into()
        }
    );
    assert!(e.to_string().contains("purple"), "{e}");

    for (json, path) in [
        (
            r#"{"id":"m","initial":"a","states":{"a":{"on":{"X":[{"target":"a"},{"target":"nowhere"}]}}}}"#,
            "$.states.a.on.X[1].target",
        ),
        (
            r##"{"id":"m","initial":"a","states":{"a":{"on":{"X":"#m.b"}}}}"##,
            "$.states.a.on.X",
        ),
        (
            r#"{"id":"m","initial":"a","states":{"a":{"on":{"X":".child"}}}}"#,
            "$.states.a.on.X",
        ),
        (
            r#"{"id":"m","initial":"a","states":{"a":{"after":{"100":"b"}}}}"#,
            "$.states.a.after.100",
        ),
        (
            r#"{"id":"m","initial":"a","states":{"a":{"always":{"target":"zz"}}}}"#,
            "$.states.a.always.target",
        ),
        (
            r#"{"id":"m","initial":"a","states":{"a":{"on":{"X":{"target":["a","q"]}}}}}"#,
            "$.states.a.on.X.target[1]",
        ),
    ] {
        let e = no_actions(json);
        assert!(
            matches!(e, LoadError::UnknownTarget { .. }),
            "{json}: {e:?}"
        );
        assert_eq!(e.path(), path, "{json}");
    }
}

#[test]
fn initial_state_that_does_not_exist() {
    let e = no_actions(r#"{"id": "m", "initial": "nope", "states": {"a": {}}}"#);
    assert_eq!(
        e,
        LoadError::UnknownInitial {
            path: "$.initial".into(),
            initial: "nope".into()
        }
    );
    let e = no_actions(
        r#"{"id": "m", "initial": "a", "states": {"a": {"initial": "x", "states": {"y": {}}}}}"#,
    );
    assert_eq!(e.path(), "$.states.a.initial");
    // `initial` on a state without children names nothing.
    let e = no_actions(r#"{"id": "m", "initial": "a", "states": {"a": {"initial": "x"}}}"#);
    assert!(matches!(e, LoadError::UnknownInitial { .. }), "{e:?}");
}

#[test]
fn action_missing_from_the_map() {
    let json = r#"{"id": "m", "initial": "a", "states": {
        "a": {"entry": ["known", {"type": "unknownEntry"}]},
        "b": {}}}"#;
    let actions = Actions::new().action("known", |_| Ok(()));
    let e = load(json, &actions);
    assert_eq!(
        e,
        LoadError::MissingAction {
            path: "$.states.a.entry[1]".into(),
            name: "unknownEntry".into()
        }
    );
    assert!(
        e.to_string()
            .contains("Actions::action(\"unknownEntry\", ..)"),
        "{e}"
    );
    let e = no_actions(
        r#"{"id":"m","initial":"a","states":{"a":{"on":{"X":{"target":"a","actions":"go"}}}}}"#,
    );
    assert_eq!(e.path(), "$.states.a.on.X.actions");
    // The chart alone loads; only binding the actions fails.
    assert!(Chart::from_json(json).is_ok());
}

#[test]
fn guard_missing_from_the_map() {
    let e = no_actions(
        r#"{"id":"m","initial":"a","states":{"a":{"on":{"X":[{"target":"a","guard":"isReady"}]}}}}"#,
    );
    assert_eq!(
        e,
        LoadError::MissingGuard {
            path: "$.states.a.on.X[0].guard".into(),
            name: "isReady".into()
        }
    );
    let e = no_actions(
        r#"{"id":"m","initial":"a","states":{"a":{"on":{"X":{"target":"a","cond":{"type":"old"}}}}}}"#,
    );
    assert!(matches!(&e, LoadError::MissingGuard { name, .. } if name == "old"));
    assert_eq!(e.path(), "$.states.a.on.X.cond");
}

#[test]
fn unsupported_features_are_named() {
    let e = no_actions(r#"{"id":"m","initial":"a","states":{"a":{"invoke":{"src":"x"}}}}"#);
    assert!(matches!(e, LoadError::Unsupported { .. }), "{e:?}");
    assert_eq!(e.path(), "$.states.a.invoke");
    let e = no_actions(r#"{"id":"m","initial":"a","states":{"a":{},"h":{"type":"history"}}}"#);
    assert!(matches!(e, LoadError::Unsupported { .. }), "{e:?}");
    assert_eq!(e.path(), "$.states.h.type");
}

#[test]
fn duplicate_ids_and_bad_keys() {
    let e = no_actions(r#"{"id":"m","initial":"a","states":{"a":{"id":"x"},"b":{"id":"x"}}}"#);
    assert_eq!(e.path(), "$.states.b.id");
    let e = no_actions(r#"{"id":"m","initial":"a","states":{"a.b":{}}}"#);
    assert!(matches!(e, LoadError::NotAStatechart { .. }));
    let e = no_actions(r#"{"id":"m","initial":"a","states":{"a":{},"a":{}}}"#);
    assert!(matches!(e, LoadError::Json(_)), "duplicate keys: {e:?}");
}

/// Mutated fixtures load or fail with an error; the ones that load run without panicking.
#[test]
fn mangled_charts_never_panic() {
    use switchyard_machine::{Event, TimerCommand};
    let fixtures = [
        include_str!("fixtures/traffic_light.json"),
        include_str!("fixtures/media_player.json"),
        include_str!("fixtures/text_editor.json"),
        include_str!("fixtures/door.json"),
        include_str!("fixtures/ping.json"),
        include_str!("fixtures/ingester.json"),
    ];
    let alphabet: Vec<char> = r##"{}[]",:0123 aT.#*-_"##.chars().collect();
    let events = [
        "T",
        "PLAY",
        "PAUSE",
        "STOP",
        "NEXT",
        "RESTART",
        "TOGGLE_BOLD",
        "RESET",
        "UNLOCK",
        "START",
        "PONG",
        "EMERGENCY",
        "FILE_COMPLETE",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let (mut loaded, mut rejected) = (0, 0);
    for _ in 0..3000 {
        let mut text: Vec<char> = fixtures[next(fixtures.len())].chars().collect();
        for _ in 0..=next(3) {
            let at = next(text.len());
            match next(3) {
                0 => text[at] = alphabet[next(alphabet.len())],
                1 => {
                    let end = (at + next(12)).min(text.len());
                    text.drain(at..end);
                }
                _ => text.insert(at, alphabet[next(alphabet.len())]),
            }
            if text.is_empty() {
                break;
            }
        }
        let text: String = text.into_iter().collect();
        let chart = match Chart::from_json(&text) {
            Ok(c) => c,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                rejected += 1;
                continue;
            }
        };
        let mut actions = Actions::new();
        let names: Vec<String> = chart.action_names().map(str::to_owned).collect();
        for n in &names {
            actions = actions.action(n, |_| Ok(()));
        }
        let guards: Vec<String> = chart.guard_names().map(str::to_owned).collect();
        for (i, g) in guards.iter().enumerate() {
            actions = actions.guard(g, move |_| i % 2 == 0);
        }
        let interp = Interpreter::new(chart, &actions).expect("every name is in the map");
        let mut st = interp.new_state();
        interp.start(&mut st);
        for e in events {
            interp.send(&mut st, &Event::new(e));
            if st.is_started() {
                check_configuration(&interp, &st);
            }
            for t in st.take_timers() {
                if let TimerCommand::Start(id, _) = t {
                    interp.fire(&mut st, id);
                }
            }
        }
        if st.is_started() {
            check_configuration(&interp, &st);
        }
        let _ = interp.snapshot(&st);
        loaded += 1;
    }
    assert!(
        loaded > 100 && rejected > 100,
        "loaded {loaded}, rejected {rejected}"
    );
}

/// A legal SCXML configuration: ancestors of active states are active, an active compound state
/// has exactly one active child, an active parallel state has all its children active.
fn check_configuration(interp: &Interpreter, st: &switchyard_machine::MachineState) {
    use switchyard_machine::StateKind;
    let chart = interp.chart();
    let paths: Vec<&str> = chart.state_paths().collect();
    let children = |p: &str| -> Vec<&str> {
        paths
            .iter()
            .copied()
            .filter(|c| match p {
                "" => !c.contains('.'),
                _ => c
                    .strip_prefix(p)
                    .and_then(|r| r.strip_prefix('.'))
                    .is_some_and(|r| !r.contains('.')),
            })
            .collect()
    };
    let check = |p: &str, kind: Option<StateKind>| {
        let active: Vec<&str> = children(p)
            .into_iter()
            .filter(|c| interp.matches(st, c))
            .collect();
        match kind {
            Some(StateKind::Compound) => assert_eq!(active.len(), 1, "compound `{p}`: {active:?}"),
            Some(StateKind::Parallel) => {
                assert_eq!(active.len(), children(p).len(), "parallel `{p}`")
            }
            _ => assert!(active.is_empty(), "leaf `{p}` has active children"),
        }
    };
    // The root is the state at the empty path.
    check("", chart.state_kind(""));
    for p in &paths {
        if interp.matches(st, p) {
            if let Some((parent, _)) = p.rsplit_once('.') {
                assert!(
                    interp.matches(st, parent),
                    "`{p}` active without `{parent}`"
                );
            }
            check(p, chart.state_kind(p));
        }
    }
}
