//! Sweeps (one run per value of the offered rate or of the number of clients) and their
//! plot, an SVG a reader can look at instead of reading a table (plotters, SVG backend: no
//! fonts or system libraries needed).

use std::path::Path;

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

/// A line of the rate plot: its name, the percentile it draws, its colour.
type Series = (&'static str, fn(&Report) -> u64, RGBColor);

/// Writes the plot of a sweep's reports: latency percentiles against the offered rate, or
/// delivered messages per second (and p99) against the number of clients.
pub fn write_svg(path: &Path, sweep: &Sweep, reports: &[Report]) -> Result<()> {
    let fail =
        |e: &dyn std::fmt::Display| Error::Local(format!("cannot draw {}: {e}", path.display()));
    let Some(first) = reports.first() else {
        return Err(Error::Invalid("nothing to plot".into()));
    };
    let workload = workload(first);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let ms = |us: u64| us as f64 / 1000.0;
    match sweep {
        Sweep::Rate(rates) => {
            let series: [Series; 3] = [
                ("p50", |r| r.latency.p50, BLUE),
                ("p90", |r| r.latency.p90, GREEN),
                ("p99", |r| r.latency.p99, RED),
            ];
            let top = reports
                .iter()
                .map(|r| ms(r.latency.p99))
                .fold(1.0, f64::max)
                * 1.1;
            let right = rates.iter().cloned().fold(1.0, f64::max) * 1.05;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!("latency against offered rate ({workload})"),
                    ("sans-serif", 20),
                )
                .margin(20)
                .x_label_area_size(45)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..right, 0.0..top)
                .map_err(|e| fail(&e))?;
            chart
                .configure_mesh()
                .x_desc("offered messages/s")
                .y_desc("send to delivery, ms")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .draw()
                .map_err(|e| fail(&e))?;
            for (name, pick, color) in series {
                let points: Vec<(f64, f64)> = rates
                    .iter()
                    .zip(reports)
                    .map(|(rate, r)| (*rate, ms(pick(r))))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(|e| fail(&e))?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                    .map_err(|e| fail(&e))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| fail(&e))?;
        }
        Sweep::Clients(clients) => {
            let top = reports.iter().map(|r| r.throughput).fold(1.0, f64::max) * 1.1;
            let right = clients.iter().copied().max().unwrap_or(1) as f64 * 1.05;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!("throughput against clients ({workload})"),
                    ("sans-serif", 20),
                )
                .margin(20)
                .x_label_area_size(45)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..right, 0.0..top)
                .map_err(|e| fail(&e))?;
            chart
                .configure_mesh()
                .x_desc("clients")
                .y_desc("delivered messages/s")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .draw()
                .map_err(|e| fail(&e))?;
            let points: Vec<(f64, f64)> = clients
                .iter()
                .zip(reports)
                .map(|(n, r)| (*n as f64, r.throughput))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2)))
                .map_err(|e| fail(&e))?
                .label("delivered/s")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))
                .map_err(|e| fail(&e))?;
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| fail(&e))?;
        }
    }
    root.present().map_err(|e| fail(&e))
}

/// The workload in a few words, for the caption: `direct spread, 100 clients, 3 servers`.
fn workload(r: &Report) -> String {
    let shape = match r.mode.as_str() {
        "direct" => format!("direct {}", r.pattern),
        "group" => format!("groups of {}", r.group_size),
        other => other.to_string(),
    };
    format!(
        "{shape}, {} clients, {} B, {} server{}",
        r.clients,
        r.size,
        r.servers,
        if r.servers == 1 { "" } else { "s" }
    )
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
            "direct spread, 100 clients",
        ] {
            assert!(svg.contains(text), "{text}");
        }
        Ok(())
    }
}
