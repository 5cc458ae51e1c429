//! Results: one JSON [`Report`] per run, and for a set of runs a Markdown
//! table, herald/peer ratios and an SVG chart of latency percentiles.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{BenchArgs, Scenario, Transport, tally};

/// Figures measured outside the tally.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Connections that opened.
    pub connected: u64,
    /// Connections that failed to open.
    pub connect_failures: u64,
    /// A few of their errors.
    pub connect_errors: Vec<String>,
    /// Time to open every connection.
    pub connect_seconds: f64,
    /// Publishes the target refused or that failed.
    pub publish_errors: u64,
    /// Time spent publishing.
    pub publish_seconds: f64,
    /// Whole run.
    pub duration_seconds: f64,
    /// Target CPU (user + system) over the run.
    pub cpu_seconds: f64,
    /// Target RSS before connecting.
    pub rss_baseline: u64,
    /// Target RSS with every connection open.
    pub rss_connected: u64,
    /// Highest target RSS seen.
    pub rss_peak: u64,
    /// Target processes measured.
    pub pids_measured: usize,
}

/// One run's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Target name (herald-sse, nchan-ws, ...).
    pub label: String,
    /// Scenario.
    pub scenario: Scenario,
    /// Transport.
    pub transport: Transport,
    /// Subscribers asked for.
    pub subscribers: u64,
    /// Subscribe URLs the subscribers were spread over (cluster nodes).
    #[serde(default = "one")]
    pub nodes: usize,
    /// Messages per connection (fanout), or 1.
    pub messages: u64,
    /// Publish rate (messages/s).
    pub rate: f64,
    /// Payload bytes.
    pub size: usize,
    /// Connections that opened.
    pub connected: u64,
    /// Connections that failed.
    pub connect_failures: u64,
    /// A few connect errors.
    pub connect_errors: Vec<String>,
    /// Time to open every connection, seconds.
    pub connect_seconds: f64,
    /// Messages that should have arrived.
    pub expected: u64,
    /// Unique messages that arrived.
    pub delivered: u64,
    /// Messages lost.
    pub lost: u64,
    /// Messages delivered twice.
    pub duplicates: u64,
    /// Failed publishes.
    pub publish_errors: u64,
    /// Latency p50, ms.
    pub p50_ms: Option<f64>,
    /// Latency p90, ms.
    pub p90_ms: Option<f64>,
    /// Latency p99, ms.
    pub p99_ms: Option<f64>,
    /// Latency max, ms (for burst: until the last subscriber had it).
    pub max_ms: Option<f64>,
    /// Target CPU seconds over the run.
    pub cpu_seconds: f64,
    /// Target RSS before connecting, bytes.
    pub rss_baseline_bytes: u64,
    /// Target RSS with all connections open, bytes.
    pub rss_connected_bytes: u64,
    /// Highest target RSS, bytes.
    pub rss_peak_bytes: u64,
    /// (RSS connected - baseline) / connections, bytes.
    pub rss_per_connection_bytes: Option<f64>,
    /// Publishing time, seconds.
    pub publish_seconds: f64,
    /// Whole run, seconds.
    pub duration_seconds: f64,
    /// Target processes measured (0: no --pid given).
    pub pids_measured: usize,
}

fn one() -> usize {
    1
}

impl Report {
    /// Builds the report of a run.
    pub fn new(args: &BenchArgs, m: Measured, total: tally::Summary) -> Self {
        let p = total.percentiles_ms();
        let per_conn = (m.connected > 0 && m.pids_measured > 0)
            .then(|| (m.rss_connected.saturating_sub(m.rss_baseline)) as f64 / m.connected as f64);
        Self {
            label: args.label.clone(),
            scenario: args.scenario,
            transport: args.transport,
            subscribers: args.subscribers,
            nodes: args.subscribe_url.len(),
            messages: args.expected_per_conn(),
            rate: args.rate,
            size: args.size,
            connected: m.connected,
            connect_failures: m.connect_failures,
            connect_errors: m.connect_errors,
            connect_seconds: m.connect_seconds,
            expected: total.expected,
            delivered: total.delivered,
            lost: total.lost(),
            duplicates: total.duplicates,
            publish_errors: m.publish_errors,
            p50_ms: p.map(|p| p[0]),
            p90_ms: p.map(|p| p[1]),
            p99_ms: p.map(|p| p[2]),
            max_ms: p.map(|p| p[3]),
            cpu_seconds: m.cpu_seconds,
            rss_baseline_bytes: m.rss_baseline,
            rss_connected_bytes: m.rss_connected,
            rss_peak_bytes: m.rss_peak,
            rss_per_connection_bytes: per_conn,
            publish_seconds: m.publish_seconds,
            duration_seconds: m.duration_seconds,
            pids_measured: m.pids_measured,
        }
    }

    fn key(&self) -> String {
        let scenario = format!("{:?}", self.scenario).to_lowercase();
        match self.scenario {
            Scenario::Fanout => format!(
                "{scenario}: {} subscribers, {} messages at {} msg/s",
                self.subscribers, self.messages, self.rate
            ),
            Scenario::Cluster => format!(
                "{scenario}: {} subscribers over {} nodes, {} messages at {} msg/s published on one",
                self.subscribers, self.nodes, self.messages, self.rate
            ),
            _ => format!("{scenario}: {} subscribers", self.subscribers),
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// A Markdown table of the reports, grouped by scenario, with herald/peer
/// ratios (below 1 means herald used less / was faster).
pub fn markdown(reports: &[Report]) -> String {
    let mut out = String::new();
    let mut groups: BTreeMap<String, Vec<&Report>> = BTreeMap::new();
    for r in reports {
        groups.entry(r.key()).or_default().push(r);
    }
    for (key, rs) in groups {
        let _ = writeln!(out, "### {key}\n");
        let _ = writeln!(
            out,
            "| target | connected | connect s | delivered / expected | lost | dup | p50 ms | p90 ms | p99 ms | max ms | CPU s | peak RSS MiB | RSS/conn B |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &rs {
            let _ = writeln!(
                out,
                "| {} | {}/{} | {:.2} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.label,
                r.connected,
                r.subscribers,
                r.connect_seconds,
                r.delivered,
                r.expected,
                r.lost,
                r.duplicates,
                opt(r.p50_ms, 1),
                opt(r.p90_ms, 1),
                opt(r.p99_ms, 1),
                opt(r.max_ms, 1),
                measured(r, format!("{:.2}", r.cpu_seconds)),
                measured(
                    r,
                    format!("{:.1}", r.rss_peak_bytes as f64 / (1024.0 * 1024.0))
                ),
                measured(r, opt(r.rss_per_connection_bytes, 0)),
            );
        }
        let ratios = ratios(&rs);
        if !ratios.is_empty() {
            let _ = writeln!(
                out,
                "\nherald / peer (same transport): {}\n",
                ratios.join("; ")
            );
        } else {
            out.push('\n');
        }
    }
    out
}

fn ratios(rs: &[&Report]) -> Vec<String> {
    let mut out = vec![];
    for h in rs.iter().filter(|r| r.label.starts_with("herald")) {
        for p in rs
            .iter()
            .filter(|r| !r.label.starts_with("herald") && r.transport == h.transport)
        {
            let mut parts = vec![];
            let mut ratio = |name: &str, a: Option<f64>, b: Option<f64>| {
                if let (Some(a), Some(b)) = (a, b)
                    && b > 0.0
                {
                    parts.push(format!("{name} {:.2}", a / b));
                }
            };
            ratio("p99", h.p99_ms, p.p99_ms);
            ratio("max", h.max_ms, p.max_ms);
            let cpu = |r: &Report| (r.pids_measured > 0).then_some(r.cpu_seconds);
            ratio("CPU", cpu(h), cpu(p));
            ratio(
                "RSS/conn",
                h.rss_per_connection_bytes,
                p.rss_per_connection_bytes,
            );
            if !parts.is_empty() {
                out.push(format!("{} vs {}: {}", h.label, p.label, parts.join(", ")));
            }
        }
    }
    out
}

/// Draws grouped bars of p50/p90/p99 latency per target for each scenario
/// into an SVG file.
pub fn chart(reports: &[Report], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let with_latency: Vec<&Report> = reports.iter().filter(|r| r.p99_ms.is_some()).collect();
    let n = with_latency.len().max(1);
    let height = 120 + 40 * n as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = with_latency
        .iter()
        .filter_map(|r| r.p99_ms)
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("delivery latency (ms): p50 / p90 / p99", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max, 0.0..n as f64)?;
    let labels: Vec<String> = with_latency
        .iter()
        .map(|r| format!("{} · {}", r.label, r.key()))
        .collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("ms")
        .draw()?;
    // Labels drawn at each bar group's centre (axis ticks would not land there).
    let style = TextStyle::from(("sans-serif", 12).into_font()).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Right,
            plotters::style::text_anchor::VPos::Center,
        ),
    );
    for (i, label) in labels.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(0.0, i as f64 + 0.5));
        root.draw(&Text::new(label.clone(), (x - 6, y), style.clone()))?;
    }
    let colors = [
        RGBColor(120, 170, 220),
        RGBColor(60, 120, 190),
        RGBColor(20, 60, 130),
    ];
    for (i, r) in with_latency.iter().enumerate() {
        let values = [r.p50_ms, r.p90_ms, r.p99_ms];
        for (j, v) in values.iter().enumerate() {
            let Some(v) = v else { continue };
            let y0 = i as f64 + 0.15 + j as f64 * 0.23;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, y0), (*v, y0 + 0.2)],
                colors[j].filled(),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

/// A process figure, or "not measured" when no `--pid` was given (a 0
/// there would read as "free").
fn measured(r: &Report, figure: String) -> String {
    if r.pids_measured == 0 {
        "not measured".to_owned()
    } else {
        figure
    }
}

/// Reads every `*.json` report in `dir`, writes `results.md` and
/// `latency.svg` there, and returns the Markdown.
pub fn summarize(dir: &Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let mut reports = vec![];
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the results directory {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    let mut skipped = vec![];
    for path in entries {
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            match serde_json::from_str::<Report>(&text) {
                Ok(r) => reports.push(r),
                Err(_) => skipped.push(path.display().to_string()),
            }
        }
    }
    if reports.is_empty() {
        anyhow::bail!(
            "no herald bench report (*.json written by `herald bench --out`) in {}{}",
            dir.display(),
            if skipped.is_empty() {
                String::new()
            } else {
                format!("; not reports: {}", skipped.join(", "))
            }
        );
    }
    let md = markdown(&reports);
    std::fs::write(dir.join("results.md"), &md)?;
    chart(&reports, &dir.join("latency.svg"))?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_without_a_pid_say_not_measured() {
        let mut r = report("herald", 1.0, Transport::Sse);
        r.pids_measured = 0;
        let md = markdown(&[r]);
        assert_eq!(md.matches("not measured").count(), 3, "{md}");
    }

    #[test]
    fn a_missing_or_empty_directory_is_an_error_that_names_it() {
        let missing = Path::new("/nonexistent/herald-bench-results");
        let e = summarize(missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/herald-bench-results"), "{e}");
        let empty = std::env::temp_dir().join(format!("herald-empty-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let e = summarize(&empty).unwrap_err().to_string();
        assert!(
            e.contains("no herald bench report") && e.contains(&*empty.to_string_lossy()),
            "{e}"
        );
        std::fs::remove_dir_all(&empty).unwrap();
    }

    fn report(label: &str, p99: f64, transport: Transport) -> Report {
        Report {
            label: label.into(),
            scenario: Scenario::Fanout,
            transport,
            subscribers: 10,
            nodes: 1,
            messages: 1,
            rate: 10.0,
            size: 100,
            connected: 10,
            connect_failures: 0,
            connect_errors: vec![],
            connect_seconds: 0.1,
            expected: 10,
            delivered: 10,
            lost: 0,
            duplicates: 0,
            publish_errors: 0,
            p50_ms: Some(p99 / 2.0),
            p90_ms: Some(p99 * 0.9),
            p99_ms: Some(p99),
            max_ms: Some(p99),
            cpu_seconds: 1.0,
            rss_baseline_bytes: 0,
            rss_connected_bytes: 0,
            rss_peak_bytes: 0,
            rss_per_connection_bytes: Some(1000.0),
            publish_seconds: 1.0,
            duration_seconds: 1.0,
            pids_measured: 1,
        }
    }

    #[test]
    fn tables_show_ratios_against_peers_of_the_same_transport() {
        let md = markdown(&[
            report("herald-sse", 10.0, Transport::Sse),
            report("nchan-sse", 40.0, Transport::Sse),
            report("nchan-ws", 5.0, Transport::Ws),
        ]);
        assert!(md.contains("herald-sse vs nchan-sse: p99 0.25"), "{md}");
        assert!(!md.contains("vs nchan-ws"), "{md}");
    }

    #[test]
    fn charts_are_written() {
        let dir = std::env::temp_dir().join(format!("herald-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.svg");
        chart(&[report("herald-sse", 10.0, Transport::Sse)], &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("herald-sse"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
