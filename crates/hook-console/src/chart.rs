//! Charts drawn on the server as inline SVG: no script, no image request. Colours come from the
//! stylesheet (classes), since the policy allows no inline style.

use maud::{html, Markup};

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 140.0;
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 18.0;

/// A round upper bound for an axis: 1, 2 or 5 times a power of ten, at least `max`.
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|v| *v >= max).unwrap_or(10.0 * magnitude)
}

fn label(value: f64, unit: &str) -> String {
    if unit == "s" {
        if value < 1.0 {
            format!("{:.0} ms", value * 1000.0)
        } else {
            format!("{value:.0} s")
        }
    } else {
        format!("{value:.0}")
    }
}

/// The frame: axis, top label, and the time labels (an hour ago on the left, now on the right).
fn frame(top: f64, unit: &str) -> Markup {
    let plot_h = HEIGHT - BOTTOM;
    html! {
        line class="axis" x1=(LEFT) y1="0" x2=(LEFT) y2=(plot_h) {}
        line class="axis" x1=(LEFT) y1=(plot_h) x2=(WIDTH) y2=(plot_h) {}
        text class="tick" x=(LEFT - 4.0) y="10" text-anchor="end" { (label(top, unit)) }
        text class="tick" x=(LEFT - 4.0) y=(plot_h) text-anchor="end" { "0" }
        text class="tick" x=(LEFT) y=(HEIGHT - 4.0) { "60 min ago" }
        text class="tick" x=(WIDTH) y=(HEIGHT - 4.0) text-anchor="end" { "now" }
    }
}

/// Per-minute counts as bars (`values[0]` is the current minute, drawn on the right), with a
/// second series drawn as a line over them.
pub(crate) fn bars(title: &str, values: &[u64; 60], line: &[u64; 60], line_name: &str) -> Markup {
    let max = values.iter().chain(line.iter()).copied().max().unwrap_or(0) as f64;
    let top = nice_max(max);
    let plot_w = WIDTH - LEFT;
    let plot_h = HEIGHT - BOTTOM;
    let step = plot_w / 60.0;
    let x = |minute: usize| LEFT + (59 - minute) as f64 * step;
    let y = |v: u64| plot_h - (v as f64 / top) * plot_h;
    let points: Vec<String> =
        (0..60).rev().map(|m| format!("{:.1},{:.1}", x(m) + step / 2.0, y(line[m]))).collect();
    html! {
        svg class="chart" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(title) {
            title { (title) }
            (frame(top, ""))
            @for m in 0..60 {
                @let h = plot_h - y(values[m]);
                rect class="bar" x=(format!("{:.1}", x(m) + 0.5)) y=(format!("{:.1}", y(values[m])))
                    width=(format!("{:.1}", (step - 1.0).max(0.5))) height=(format!("{h:.1}")) {
                    title { (m) " min ago: " (values[m]) " processed, " (line[m]) " " (line_name) }
                }
            }
            polyline class="line" points=(points.join(" ")) {}
        }
    }
}

/// Per-minute latencies, seconds, as two lines (mean and max); minutes without events are gaps.
pub(crate) fn latency(title: &str, avg: &[Option<f64>; 60], max: &[Option<f64>; 60]) -> Markup {
    let peak = max.iter().flatten().copied().fold(0.0f64, f64::max);
    let top = nice_max(peak);
    let plot_w = WIDTH - LEFT;
    let plot_h = HEIGHT - BOTTOM;
    let step = plot_w / 60.0;
    let x = |minute: usize| LEFT + (59 - minute) as f64 * step + step / 2.0;
    let y = |v: f64| plot_h - (v / top).min(1.0) * plot_h;
    let dots = |series: &[Option<f64>; 60]| -> Vec<(f64, f64, usize, f64)> {
        (0..60).rev().filter_map(|m| series[m].map(|v| (x(m), y(v), m, v))).collect()
    };
    html! {
        svg class="chart" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(title) {
            title { (title) }
            (frame(top, "s"))
            @for (cx, cy, m, v) in dots(max) {
                circle class="dot-max" cx=(format!("{cx:.1}")) cy=(format!("{cy:.1}")) r="2.5" {
                    title { (m) " min ago: max " (label(v, "s")) }
                }
            }
            @for (cx, cy, m, v) in dots(avg) {
                circle class="dot-avg" cx=(format!("{cx:.1}")) cy=(format!("{cy:.1}")) r="2.5" {
                    title { (m) " min ago: mean " (format!("{:.1} ms", v * 1000.0)) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_round_up() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(120.0), 200.0);
        assert_eq!(nice_max(0.03), 0.05);
        let svg = bars("t", &[1; 60], &[2; 60], "received").into_string();
        assert_eq!(svg.matches("<rect").count(), 60);
        assert!(!svg.contains("style="), "no inline style under the CSP");
    }
}
