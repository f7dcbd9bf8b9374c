//! The SVG bar chart of `switchyard bench --svg`, drawn with plotters' SVG backend.
//!
//! Only the `svg_backend` feature: text is written as SVG `<text>` for the viewer
//! to render, so no font crates are compiled (plotters sizes labels with its
//! built-in estimate).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{Conditions, Row, si};

const OURS: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const RAW: RGBColor = RGBColor(0xb0, 0xb0, 0xb0);

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

type Pick = fn(&Row) -> (f64, f64);

/// Draws throughput (top) and latency (bottom) per (transport, workload), ours beside raw.
pub fn draw(path: &Path, rows: &[Row], cond: &Conditions) -> Result<(), String> {
    let width = (200 + 120 * rows.len() as u32).max(700);
    let root = SVGBackend::new(path, (width, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            &format!(
                "switchyard bench: {} B payloads, {} ms windows, {} round(s), {} CPUs, {}",
                cond.size,
                cond.window_ms,
                cond.rounds,
                cond.cpus,
                if cond.release {
                    "release"
                } else {
                    "debug build"
                }
            ),
            ("sans-serif", 18),
        )
        .map_err(err)?;
    let (top, bottom) = root.split_vertically(380);
    panel(
        &top,
        "throughput: messages received/s (ping-pong: round trips/s), log scale",
        rows,
        |r| (r.msgs_per_sec, r.raw_msgs_per_sec),
        None,
        true,
    )?;
    let load = match cond.rate {
        Some(r) => format!("one-way with producers offering {}/s", si(r)),
        None => "one-way at full load".to_string(),
    };
    panel(
        &bottom,
        &format!(
            "latency p50 in µs, whisker to p99 (ping-pong: round trip; others: {load}), log scale"
        ),
        rows,
        |r| (r.p50_us, r.raw_p50_us),
        Some(|r| (r.p99_us, r.raw_p99_us)),
        false,
    )?;
    root.present().map_err(err)
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    rows: &[Row],
    value: Pick,
    whisker: Option<Pick>,
    ratios: bool,
) -> Result<(), String> {
    let mut vals: Vec<f64> = Vec::new();
    for r in rows {
        let (o, w) = value(r);
        vals.extend([o, w]);
        if let Some(wh) = whisker {
            let (o, w) = wh(r);
            vals.extend([o, w]);
        }
    }
    vals.retain(|v| *v > 0.0 && v.is_finite());
    let (Some(lo), Some(hi)) = (
        vals.iter().copied().reduce(f64::min),
        vals.iter().copied().reduce(f64::max),
    ) else {
        return Ok(());
    };
    // Headroom above the tallest bar keeps the legend clear of it.
    let (lo, hi) = (lo / 3.0, hi * 12.0);
    let n = rows.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 14))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..(n - 0.5), (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len().max(1))
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|v| if *v < 1.0 { format!("{v:.2}") } else { si(*v) })
        .draw()
        .map_err(err)?;

    let bar = |i: usize, left: bool, v: f64, color: RGBColor| {
        let x = i as f64;
        let (a, b) = if left {
            (x - 0.38, x - 0.02)
        } else {
            (x + 0.02, x + 0.38)
        };
        Rectangle::new([(a, lo), (b, v.max(lo))], color.filled())
    };
    chart
        .draw_series(
            rows.iter()
                .enumerate()
                .map(|(i, r)| bar(i, true, value(r).0, OURS)),
        )
        .map_err(err)?
        .label("switchyard")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], OURS.filled()));
    chart
        .draw_series(
            rows.iter()
                .enumerate()
                .map(|(i, r)| bar(i, false, value(r).1, RAW)),
        )
        .map_err(err)?
        .label("raw baseline")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], RAW.filled()));
    if let Some(wh) = whisker {
        chart
            .draw_series(rows.iter().enumerate().flat_map(|(i, r)| {
                let x = i as f64;
                let ((o50, w50), (o99, w99)) = (value(r), wh(r));
                [
                    PathElement::new(vec![(x - 0.2, o50.max(lo)), (x - 0.2, o99.max(lo))], BLACK),
                    PathElement::new(vec![(x + 0.2, w50.max(lo)), (x + 0.2, w99.max(lo))], BLACK),
                ]
            }))
            .map_err(err)?;
    }
    if ratios {
        let style = TextStyle::from(("sans-serif", 12).into_font())
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let top = r.msgs_per_sec.max(r.raw_msgs_per_sec).max(lo);
                Text::new(
                    format!("×{:.2}", r.ratio),
                    (i as f64, top * 1.15),
                    style.clone(),
                )
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        // Throughput is highest on the left (in-process rows), latency on the right (ipc rows).
        .position(if ratios {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::UpperLeft
        })
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;

    // Category labels under each pair of bars, in pixels relative to this panel.
    let (bx, by) = area.get_base_pixel();
    let label = TextStyle::from(("sans-serif", 12).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (i, r) in rows.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64, lo));
        area.draw(&Text::new(
            r.transport,
            (px - bx, py - by + 6),
            label.clone(),
        ))
        .map_err(err)?;
        area.draw(&Text::new(
            r.workload,
            (px - bx, py - by + 21),
            label.clone(),
        ))
        .map_err(err)?;
    }
    Ok(())
}
