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
