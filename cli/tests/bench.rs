//! `switchyard bench` run as a user runs it; only the shape of the results is checked, never the timing.

use std::process::Command;

fn switchyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("the switchyard binary runs")
}

const FIELDS: [&str; 10] = [
    "transport",
    "workload",
    "size",
    "msgs_per_sec",
    "p50_us",
    "p99_us",
    "p999_us",
    "raw_msgs_per_sec",
    "raw_p50_us",
    "ratio",
];

#[test]
fn quick_bench_writes_one_json_object_per_transport_and_workload() {
    let path = std::env::temp_dir().join(format!("switchyard-bench-{}.json", std::process::id()));
    let path_str = path.to_str().expect("temp path is UTF-8");
    let svg = path.with_extension("svg");
    let svg_str = svg.to_str().expect("temp path is UTF-8");
    let out = switchyard(&[
        "bench", "--quick", "--size", "32", "--json", path_str, "--svg", svg_str,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).expect("the JSON file was written");
    let _ = std::fs::remove_file(&path);
    let chart = std::fs::read_to_string(&svg).expect("the SVG file was written");
    let _ = std::fs::remove_file(&svg);
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    // One bar label per row, under the bars.
    assert!(
        chart.contains(">\nipc-p2p\n<") || chart.contains(">ipc-p2p<"),
        "{chart:.400}"
    );
    let rows: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let rows = rows.as_array().expect("a JSON array");

    let mut pairs = Vec::new();
    for row in rows {
        for f in FIELDS {
            assert!(row.get(f).is_some(), "field `{f}` missing in {row}");
        }
        let transport = row["transport"].as_str().expect("transport is a string");
        let workload = row["workload"].as_str().expect("workload is a string");
        assert_eq!(row["size"].as_u64(), Some(32), "{row}");
        for f in ["msgs_per_sec", "raw_msgs_per_sec", "ratio"] {
            let v = row[f].as_f64().expect("a number");
            assert!(v > 0.0 && v.is_finite(), "{f} = {v} in {row}");
        }
        for f in ["p50_us", "p99_us", "p999_us", "raw_p50_us"] {
            let v = row[f].as_f64().expect("a number");
            assert!(v >= 0.0 && v.is_finite(), "{f} = {v} in {row}");
        }
        assert!(
            row["p50_us"].as_f64() <= row["p99_us"].as_f64()
                && row["p99_us"].as_f64() <= row["p999_us"].as_f64(),
            "percentiles out of order in {row}"
        );
        // In-process transports with waiting mailboxes lose nothing.
        if transport == "direct" || transport == "memory" {
            assert_eq!(row["lost"].as_u64(), Some(0), "{row}");
        }
        pairs.push((transport.to_string(), workload.to_string()));
    }
    for t in ["direct", "memory"] {
        for w in ["one-way", "one-way send", "ping-pong", "any-of-type"] {
            assert!(
                pairs.contains(&(t.into(), w.into())),
                "no row for {t} {w}: {pairs:?}"
            );
        }
    }
    for t in ["memory", "ipc", "ipc-p2p", "zeromq"] {
        for w in [
            "one-way",
            "one-way send",
            "ping-pong",
            "fan-out",
            "any-of-type",
        ] {
            assert!(
                pairs.contains(&(t.into(), w.into())),
                "no row for {t} {w}: {pairs:?}"
            );
        }
    }
    let mut unique = pairs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        pairs.len(),
        "one object per (transport, workload)"
    );
    // The table names each measured transport.
    for t in ["| direct", "| memory", "| ipc", "| ipc-p2p", "| zeromq"] {
        assert!(stdout.contains(t), "{t}: {stdout}");
    }
}

#[test]
fn bench_rejects_bad_arguments_with_a_usage_error() {
    for args in [
        &["bench", "--size", "lots"][..],
        &["bench", "--duration", "forever"],
        &["bench", "--transports", "carrier-pigeon"],
        &["bench", "--no-such-flag"],
    ] {
        let out = switchyard(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        // clap's own error: one `error:` line, then usage or a pointer to --help.
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("Usage:") || stderr.contains("--help"),
            "{args:?}: {stderr}"
        );
    }
    let out = switchyard(&["bench", "--transports", "carrier-pigeon"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("direct, memory"),
        "lists the known transports: {stderr}"
    );
}

#[test]
fn a_transport_that_cannot_run_is_skipped_with_one_line() {
    // A broker URL nothing answers on (or, in a build without the rabbitmq rows, a name
    // this binary does not measure): either way one line says why it was skipped.
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["bench", "--quick", "--transports", "rabbitmq"])
        .env("SWITCHYARD_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .expect("the switchyard binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let skipped: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("rabbitmq: skipped"))
        .collect();
    assert_eq!(skipped.len(), 1, "{stdout}");
    // Nothing else to measure: a one-line error, no panic.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_offered_rate_is_recorded_with_each_paced_row() {
    let path =
        std::env::temp_dir().join(format!("switchyard-bench-rate-{}.json", std::process::id()));
    let path_str = path.to_str().expect("temp path is UTF-8");
    let out = switchyard(&[
        "bench",
        "--quick",
        "--transports",
        "memory",
        "--rate",
        "5000",
        "--json",
        path_str,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).expect("the JSON file was written");
    let _ = std::fs::remove_file(&path);
    let rows: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let rows = rows.as_array().expect("a JSON array");
    assert_eq!(rows.len(), 5, "{text}");
    for row in rows {
        let rate = row["rate"].as_f64();
        if row["workload"] == "ping-pong" {
            assert_eq!(rate, None, "ping-pong is closed-loop: {row}");
        } else {
            assert_eq!(rate, Some(5000.0), "{row}");
        }
        assert!(row["ratio"].as_f64().is_some_and(|r| r > 0.0), "{row}");
    }
}
