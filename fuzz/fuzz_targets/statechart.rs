//! Statechart JSON loading: any text gives a chart or a `LoadError`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(chart) = switchyard_machine::Chart::from_json(text) {
        let _ = chart.state_paths().count();
        let _ = chart.id();
    }
});
