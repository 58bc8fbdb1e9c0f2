//! The report: markdown tables of every measurement with min / median / max over the runs,
//! ratios to the direct path taken run by run (side by side), and an SVG bar chart.

use std::{fmt::Write as _, time::Duration};

use super::http::{Mode, Sample};

/// (min, median, max); zeros for no values.
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn median(values: &[f64]) -> f64 {
    spread(values).1
}

/// The samples of one path at one scale in one mode, run by run.
pub struct HttpRow {
    pub path: &'static str,
    pub samples: Vec<Sample>,
}

/// Everything measured over HTTP at one scale.
pub struct HttpScale {
    pub services: usize,
    pub keep_alive: Vec<HttpRow>,
    pub new_connections: Vec<HttpRow>,
}

impl HttpScale {
    pub fn rows(&self, mode: Mode) -> &[HttpRow] {
        match mode {
            Mode::KeepAlive => &self.keep_alive,
            Mode::NewConnections => &self.new_connections,
        }
    }
}

/// Load times of one balancer at each scale.
pub struct ProgramRow {
    pub who: &'static str,
    /// (services, one duration per run).
    pub times: Vec<(usize, Vec<Duration>)>,
}

/// The kernel's time per packet of one program path, one figure per round.
pub struct CostRow {
    pub program: String,
    /// "floor" (the empty program), "forwarding" (plain forwarding, the NAT paths' yardstick),
    /// "nat" or "other".
    pub kind: String,
    pub case: String,
    pub rounds_ns: Vec<f64>,
}

/// One HTTP table (one scale, one mode): per path the rate, its ratio to the direct path in
/// the same round, and latency.
pub fn http_table(scale: &HttpScale, mode: Mode) -> String {
    let unit = match mode {
        Mode::KeepAlive => "requests/s",
        Mode::NewConnections => "connections/s",
    };
    let rows = scale.rows(mode);
    let direct: Vec<f64> = rows.first().map(|r| r.samples.iter().map(|s| s.per_second).collect()).unwrap_or_default();
    let mut out = format!(
        "| path | {unit} min | median | max | x direct (min / median / max) | p50 latency | p99 latency | socket errors |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for row in rows {
        let rates: Vec<f64> = row.samples.iter().map(|s| s.per_second).collect();
        let ratios: Vec<f64> = rates.iter().zip(&direct).map(|(r, d)| r / d).collect();
        let (min, med, max) = spread(&rates);
        let (rmin, rmed, rmax) = spread(&ratios);
        let p50 = median(&row.samples.iter().map(|s| s.p50_us).collect::<Vec<_>>());
        let p99 = median(&row.samples.iter().map(|s| s.p99_us).collect::<Vec<_>>());
        let errors: u64 = row.samples.iter().map(|s| s.errors).sum();
        let _ = writeln!(
            out,
            "| {} | {min:.0} | {med:.0} | {max:.0} | {rmin:.2} / {rmed:.2} / {rmax:.2} | {} | {} | {errors} |",
            row.path,
            latency(p50),
            latency(p99)
        );
    }
    out
}

fn latency(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// Each path's median ratio to direct, per mode and scale: flat or not at a glance.
pub fn ratio_summary(scales: &[HttpScale]) -> String {
    let mut out = String::from("| path |");
    for mode in ["keep-alive", "new connections"] {
        for scale in scales {
            let _ = write!(out, " {mode}, {} services |", scale.services);
        }
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(2 * scales.len()));
    out.push('\n');
    let Some(first) = scales.first() else { return out };
    for (p, row) in first.keep_alive.iter().enumerate() {
        let _ = write!(out, "| {} |", row.path);
        for mode in [Mode::KeepAlive, Mode::NewConnections] {
            for scale in scales {
                let rows = scale.rows(mode);
                let rates = |r: &HttpRow| r.samples.iter().map(|s| s.per_second).collect::<Vec<_>>();
                let ratios: Vec<f64> = rates(&rows[p]).iter().zip(rates(&rows[0])).map(|(r, d)| r / d).collect();
                let _ = write!(out, " {:.2} |", median(&ratios));
            }
        }
        out.push('\n');
    }
    out
}

/// Load times: a row per balancer, a column per scale.
pub fn program_table(rows: &[ProgramRow]) -> String {
    let Some(first) = rows.first() else { return String::new() };
    let mut out = String::from("| balancer |");
    for (services, _) in &first.times {
        let _ = write!(out, " {services} services (min / median / max) |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(first.times.len()));
    out.push('\n');
    for row in rows {
        let _ = write!(out, "| {} |", row.who);
        for (_, times) in &row.times {
            let secs: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
            let (min, med, max) = spread(&secs);
            let _ = write!(out, " {} / {} / {} |", seconds(min), seconds(med), seconds(max));
        }
        out.push('\n');
    }
    out
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

/// Each path's time per packet, what it costs above the empty program's, and that against
/// plain forwarding's (both taken round by round), then how the NAT paths compare.
pub fn cost_table(rows: &[CostRow]) -> String {
    let of_kind = |kind: &str| rows.iter().find(|r| r.kind == kind).map(|r| r.rounds_ns.clone()).unwrap_or_default();
    let (floor, forwarding) = (of_kind("floor"), of_kind("forwarding"));
    let above = |row: &CostRow| -> Vec<f64> { row.rounds_ns.iter().zip(&floor).map(|(ns, f)| ns - f).collect() };
    let forwarding_above: Vec<f64> = forwarding.iter().zip(&floor).map(|(ns, f)| ns - f).collect();
    let mut out = String::from(
        "| program | path | ns/packet min | median | max | above the empty program (median) | x plain forwarding |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut worst_nat: Option<f64> = None;
    for row in rows {
        let (min, med, max) = spread(&row.rounds_ns);
        let net = above(row);
        let ratios: Vec<f64> =
            net.iter().zip(&forwarding_above).filter(|(_, f)| **f > 0.0).map(|(n, f)| n / f).collect();
        let (ratio, floor_cell) = if row.kind == "floor" {
            ("".to_owned(), "".to_owned())
        } else if ratios.is_empty() {
            // No round where plain forwarding cost more than the floor: nothing to compare.
            ("n/a".to_owned(), format!("{:.0}", median(&net)))
        } else {
            (format!("{:.2}", median(&ratios)), format!("{:.0}", median(&net)))
        };
        if row.kind == "nat" && !ratios.is_empty() {
            worst_nat = Some(worst_nat.map_or(median(&ratios), |w: f64| w.max(median(&ratios))));
        }
        let _ = writeln!(
            out,
            "| `{}` | {} | {min:.0} | {med:.0} | {max:.0} | {floor_cell} | {ratio} |",
            row.program, row.case
        );
    }
    if let Some(worst) = worst_nat {
        let _ = writeln!(
            out,
            "\nThe costliest NAT path, above the empty program, is {worst:.2} x plain forwarding's \
             (target: at most 1.5 x)."
        );
    }
    out
}

/// Grouped bars of the median rate per path (x) and scale (colour), one chart per mode,
/// stacked in one SVG.
pub fn chart(scales: &[HttpScale]) -> String {
    const WIDTH: f64 = 960.0;
    const CHART: f64 = 260.0;
    const TOP: f64 = 40.0;
    const LEFT: f64 = 70.0;
    const COLOURS: [&str; 4] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759"];
    let modes = [(Mode::KeepAlive, "HTTP keep-alive requests/s"), (Mode::NewConnections, "new connections/s")];
    let height = TOP + modes.len() as f64 * (CHART + 90.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (s, scale) in scales.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<rect x=\"{}\" y=\"10\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"21\">{} services</text>",
            LEFT + s as f64 * 140.0,
            COLOURS[s % COLOURS.len()],
            LEFT + s as f64 * 140.0 + 16.0,
            scale.services
        );
    }
    for (m, (mode, title)) in modes.iter().enumerate() {
        let base = TOP + m as f64 * (CHART + 90.0) + 20.0 + CHART;
        let paths: Vec<&str> =
            scales.first().map(|s| s.rows(*mode).iter().map(|r| r.path).collect()).unwrap_or_default();
        let max = scales
            .iter()
            .flat_map(|s| {
                s.rows(*mode).iter().map(|r| median(&r.samples.iter().map(|x| x.per_second).collect::<Vec<_>>()))
            })
            .fold(1.0, f64::max);
        let _ = writeln!(
            svg,
            "<text x=\"{LEFT}\" y=\"{}\" font-weight=\"bold\">{title} (median of the runs)</text>",
            base - CHART - 6.0
        );
        let _ =
            writeln!(svg, "<line x1=\"{LEFT}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>", WIDTH - 10.0);
        for tick in 0..=4 {
            let value = max * tick as f64 / 4.0;
            let y = base - CHART * tick as f64 / 4.0;
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}k</text><line x1=\"{LEFT}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/>",
                LEFT - 4.0,
                y + 4.0,
                value / 1000.0,
                WIDTH - 10.0
            );
        }
        let group = (WIDTH - LEFT - 20.0) / paths.len().max(1) as f64;
        let bar = group * 0.8 / scales.len().max(1) as f64;
        for (p, path) in paths.iter().enumerate() {
            let x0 = LEFT + p as f64 * group + group * 0.1;
            for (s, scale) in scales.iter().enumerate() {
                let Some(row) = scale.rows(*mode).iter().find(|r| r.path == *path) else { continue };
                let value = median(&row.samples.iter().map(|x| x.per_second).collect::<Vec<_>>());
                let h = CHART * value / max;
                let _ = writeln!(
                    svg,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>",
                    x0 + s as f64 * bar,
                    base - h,
                    bar - 1.0,
                    COLOURS[s % COLOURS.len()]
                );
            }
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{path}</text>",
                x0 + group * 0.4,
                base + 16.0
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
