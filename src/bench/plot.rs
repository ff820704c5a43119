//! Sweeps (one run per value of the offered rate or of the number of clients) and their
//! plot, an SVG a reader can look at instead of reading a table (plotters, SVG backend: no
//! fonts or system libraries needed).

use std::path::Path;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::Report;
use crate::error::{Error, Result};

/// What a sweep varies.
#[derive(Debug, Clone, PartialEq)]
pub enum Sweep {
    /// The offered rate, messages per second across all clients.
    Rate(Vec<f64>),
    /// The number of clients.
    Clients(Vec<usize>),
}

impl std::str::FromStr for Sweep {
    type Err = String;
    /// `rate=1000,5000,10000` or `clients=10,100,1000`.
    fn from_str(s: &str) -> std::result::Result<Sweep, String> {
        let usage = || "use rate=R1,R2,... or clients=N1,N2,...".to_string();
        let (what, values) = s.split_once('=').ok_or_else(usage)?;
        let values: Vec<&str> = values.split(',').map(str::trim).collect();
        if values.is_empty() || values.len() > 20 {
            return Err("a sweep has 1 to 20 values".into());
        }
        let sweep = match what {
            "rate" => Sweep::Rate(
                values
                    .iter()
                    .map(|v| v.parse::<f64>().ok().filter(|r| *r > 0.0 && r.is_finite()))
                    .collect::<Option<_>>()
                    .ok_or("rates are positive numbers")?,
            ),
            "clients" => Sweep::Clients(
                values
                    .iter()
                    .map(|v| v.parse::<usize>().ok().filter(|n| *n >= 2))
                    .collect::<Option<_>>()
                    .ok_or("client counts are whole numbers of at least 2")?,
            ),
            _ => return Err(usage()),
        };
        Ok(sweep)
    }
}

impl Sweep {
    /// How many runs.
    pub fn len(&self) -> usize {
        match self {
            Sweep::Rate(v) => v.len(),
            Sweep::Clients(v) => v.len(),
        }
    }

    /// Whether it has no runs (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The label of run `i`: `rate=5000`.
    pub fn label(&self, i: usize) -> String {
        match self {
            Sweep::Rate(v) => format!("rate={}", v[i]),
            Sweep::Clients(v) => format!("clients={}", v[i]),
        }
    }
}

/// Writes the plot of a sweep's reports: latency percentiles against the offered rate, or
/// delivered messages per second against the number of clients.
pub fn write_svg(path: &Path, sweep: &Sweep, reports: &[Report]) -> Result<()> {
    let Some(first) = reports.first() else {
        return Err(Error::Invalid("nothing to plot".into()));
    };
    let workload = workload(first, sweep, true);
    let ms = |us: u64| us as f64 / 1000.0;
    let line = |name: &str, color, pick: &dyn Fn(&Report) -> f64| Line {
        name: name.to_string(),
        color,
        width: 2,
        ys: reports.iter().map(pick).collect(),
    };
    let plot = match sweep {
        Sweep::Rate(rates) => Plot {
            caption: format!("latency against offered rate ({workload})"),
            x_desc: "offered messages/s",
            y_desc: "send to delivery, ms",
            xs: rates.clone(),
            lines: vec![
                line("p50", BLUE, &|r| ms(r.latency.p50)),
                line("p90", GREEN, &|r| ms(r.latency.p90)),
                line("p99", RED, &|r| ms(r.latency.p99)),
            ],
            log_y: false,
        },
        Sweep::Clients(clients) => Plot {
            caption: format!("throughput against clients ({workload})"),
            x_desc: "clients",
            y_desc: "delivered messages/s",
            xs: clients.iter().map(|n| *n as f64).collect(),
            lines: vec![line("delivered/s", BLUE, &|r| r.throughput)],
            log_y: false,
        },
    };
    plot.draw(path)
        .map_err(|e| Error::Local(format!("cannot draw {}: {e}", path.display())))
}

/// Writes the plot of the same sweep run against several servers (`--against`), one colour
/// each: for a rate, each server's p99 (thick) and p50 (thin) against the offered rate; for
/// clients, each server's delivered messages per second.
pub fn write_comparison_svg(
    path: &Path,
    sweep: &Sweep,
    series: &[(String, Vec<Report>)],
) -> Result<()> {
    let Some(first) = series.first().and_then(|(_, reports)| reports.first()) else {
        return Err(Error::Invalid("nothing to plot".into()));
    };
    let workload = workload(first, sweep, false);
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let ms = |us: u64| us as f64 / 1000.0;
    let mut lines = Vec::new();
    for ((name, reports), color) in series.iter().zip(colors.iter().cycle()) {
        let line = |suffix: &str, width, pick: &dyn Fn(&Report) -> f64| Line {
            name: format!("{name}{suffix}"),
            color: *color,
            width,
            ys: reports.iter().map(pick).collect(),
        };
        match sweep {
            Sweep::Rate(_) => {
                lines.push(line(" p99", 3, &|r| ms(r.latency.p99)));
                lines.push(line(" p50", 1, &|r| ms(r.latency.p50)));
            }
            Sweep::Clients(_) => lines.push(line("", 2, &|r| r.throughput)),
        }
    }
    let plot = match sweep {
        Sweep::Rate(rates) => Plot {
            caption: format!("p99 and p50 against offered rate ({workload})"),
            x_desc: "offered messages/s",
            y_desc: "send to delivery, ms (log scale)",
            xs: rates.clone(),
            lines,
            log_y: true,
        },
        Sweep::Clients(clients) => Plot {
            caption: format!("throughput against clients ({workload})"),
            x_desc: "clients",
            y_desc: "delivered messages/s",
            xs: clients.iter().map(|n| *n as f64).collect(),
            lines,
            log_y: false,
        },
    };
    plot.draw(path)
        .map_err(|e| Error::Local(format!("cannot draw {}: {e}", path.display())))
}

/// One chart: lines of points over the same x values.
struct Plot {
    caption: String,
    x_desc: &'static str,
    y_desc: &'static str,
    xs: Vec<f64>,
    lines: Vec<Line>,
    /// A logarithmic y axis: latencies of servers a hundred times apart stay readable.
    log_y: bool,
}

/// A line of a chart: a y for each x.
struct Line {
    name: String,
    color: RGBColor,
    /// Stroke width, pixels.
    width: u32,
    ys: Vec<f64>,
}

impl Plot {
    fn draw(&self, path: &Path) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let ys = || self.lines.iter().flat_map(|l| l.ys.iter().copied());
        let right = self.xs.iter().copied().fold(1.0, f64::max) * 1.05;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(&self.caption, ("sans-serif", 20))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(70);
        if self.log_y {
            // Around the values (positive ones: a log scale has no zero), with a decade on
            // top for the legend.
            let top = ys().fold(1.0, f64::max) * 20.0;
            let bottom = ys().filter(|y| *y > 0.0).fold(top, f64::min) / 2.0;
            let chart = builder.build_cartesian_2d(0.0..right, (bottom..top).log_scale())?;
            self.fill(chart, |y| format!("{y}"))?;
        } else {
            let top = ys().fold(1.0, f64::max) * 1.1;
            let chart = builder.build_cartesian_2d(0.0..right, 0.0..top)?;
            self.fill(chart, |y| format!("{y:.0}"))?;
        }
        root.present()?;
        Ok(())
    }

    /// The mesh, the lines and their legend on `chart`, whatever its y scale.
    fn fill<'a, Y>(
        &self,
        mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
        y_label: impl Fn(&f64) -> String,
    ) -> std::result::Result<(), Box<dyn std::error::Error>>
    where
        Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        chart
            .configure_mesh()
            .x_desc(self.x_desc)
            .y_desc(self.y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&y_label)
            .draw()?;
        for line in &self.lines {
            let (color, width) = (line.color, line.width);
            let points: Vec<(f64, f64)> = self
                .xs
                .iter()
                .copied()
                .zip(line.ys.iter().copied())
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(width)))?
                .label(line.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
                });
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        Ok(())
    }
}

/// The workload in a few words, for the caption: `direct spread, 100 clients x 300 messages,
/// 100 B, 3 servers, TLS` (without the clients in a sweep of them, and without the servers
/// when several kinds are compared).
fn workload(r: &Report, sweep: &Sweep, servers: bool) -> String {
    let shape = match r.mode.as_str() {
        "direct" => format!("direct {}", r.pattern),
        "group" => format!("groups of {}", r.group_size),
        other => other.to_string(),
    };
    let mut words = match sweep {
        Sweep::Rate(_) => format!("{shape}, {} clients x {} messages", r.clients, r.messages),
        Sweep::Clients(_) => format!("{shape}, {} messages each", r.messages),
    };
    words.push_str(&format!(", {} B", r.size));
    if servers {
        let plural = if r.servers == 1 { "" } else { "s" };
        words.push_str(&format!(", {} server{plural}", r.servers));
    }
    words.push_str(if r.tls { ", TLS" } else { ", plaintext" });
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_parse_and_refuse_nonsense() {
        assert_eq!(
            "rate=1000,5000".parse::<Sweep>(),
            Ok(Sweep::Rate(vec![1000.0, 5000.0]))
        );
        assert_eq!(
            "clients=10, 100".parse::<Sweep>(),
            Ok(Sweep::Clients(vec![10, 100]))
        );
        assert!("rate=-1".parse::<Sweep>().is_err());
        assert!("clients=1".parse::<Sweep>().is_err());
        assert!("speed=3".parse::<Sweep>().is_err());
        assert!("rate".parse::<Sweep>().is_err());
    }

    #[test]
    fn a_rate_sweep_draws_its_percentiles() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sweep.svg");
        let report = |p99| Report {
            mode: "direct".into(),
            pattern: "spread".into(),
            clients: 100,
            messages: 300,
            servers: 3,
            latency: super::super::Latency {
                p50: p99 / 4,
                p90: p99 / 2,
                p99,
                max: p99,
            },
            ..Report::default()
        };
        let sweep = Sweep::Rate(vec![1000.0, 5000.0]);
        write_svg(&path, &sweep, &[report(2000), report(9000)])?;
        let svg = std::fs::read_to_string(&path)?;
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        for text in [
            "p50",
            "p99",
            "offered messages/s",
            "direct spread, 100 clients x 300 messages",
        ] {
            assert!(svg.contains(text), "{text}");
        }
        Ok(())
    }

    #[test]
    fn a_comparison_draws_every_server_in_its_own_colour() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("rivals.svg");
        let report = |throughput| Report {
            mode: "direct".into(),
            pattern: "spread".into(),
            clients: 100,
            tls: true,
            throughput,
            ..Report::default()
        };
        let series = [
            ("fastchat".to_string(), vec![report(1000.0), report(5000.0)]),
            ("mosquitto".to_string(), vec![report(900.0), report(4000.0)]),
        ];
        write_comparison_svg(&path, &Sweep::Clients(vec![10, 100]), &series)?;
        let svg = std::fs::read_to_string(&path)?;
        for text in ["fastchat", "mosquitto", "throughput against clients", "TLS"] {
            assert!(svg.contains(text), "{text}");
        }
        // Two servers, two colours: blue and red.
        assert!(svg.contains("#0000FF") && svg.contains("#FF0000"), "{svg}");
        Ok(())
    }
}
