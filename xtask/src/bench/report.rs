//! Results: medians and spreads over the runs, ratios to the direct connection measured in the
//! same run, written as a Markdown table, a JSON file and a PNG chart of the ratios.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::{env::Setup, scenarios::Metric};

/// Every value measured, per metric (in scenario order) and setup.
#[derive(Default)]
pub struct Results {
    pub metrics: Vec<Metric>,
    pub values: BTreeMap<(usize, Setup), Vec<f64>>,
}

impl Results {
    pub fn metric_index(&mut self, metric: Metric) -> usize {
        if let Some(index) = self.metrics.iter().position(|m| m.name == metric.name) {
            return index;
        }
        self.metrics.push(metric);
        self.metrics.len() - 1
    }

    pub fn record(&mut self, metric: Metric, setup: Setup, value: f64) {
        let index = self.metric_index(metric);
        self.values.entry((index, setup)).or_default().push(value);
    }

    fn summary(&self, index: usize, setup: Setup) -> Option<Summary> {
        Summary::of(self.values.get(&(index, setup))?)
    }

    /// This setup's median over the direct connection's; the table says which way is better.
    fn ratio(&self, index: usize, setup: Setup) -> Option<f64> {
        let direct = self.summary(index, Setup::Direct)?.median;
        let this = self.summary(index, setup)?.median;
        (direct > 0.0).then(|| this / direct)
    }

    fn setups(&self) -> Vec<Setup> {
        let mut setups: Vec<Setup> = self.values.keys().map(|(_, setup)| *setup).collect();
        setups.sort();
        setups.dedup();
        setups
    }

    pub fn markdown(&self, runs: usize) -> String {
        let setups = self.setups();
        let mut out = format!(
            "Median of {runs} alternating runs (min-max in brackets); ratio = setup / direct in the same run.\n\n| metric | unit |"
        );
        for setup in &setups {
            let _ = write!(out, " {} |", setup.name());
        }
        out.push_str("\n|---|---|");
        out.push_str(&"---|".repeat(setups.len()));
        out.push('\n');
        for (index, metric) in self.metrics.iter().enumerate() {
            let better = if metric.higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            };
            let _ = write!(out, "| {} | {} ({better}) |", metric.name, metric.unit);
            for setup in &setups {
                let cell = match (self.summary(index, *setup), self.ratio(index, *setup)) {
                    (Some(s), Some(ratio)) if *setup != Setup::Direct => {
                        format!(
                            "{} [{}-{}] **{ratio:.2}x**",
                            fmt(s.median),
                            fmt(s.min),
                            fmt(s.max)
                        )
                    }
                    (Some(s), _) => format!("{} [{}-{}]", fmt(s.median), fmt(s.min), fmt(s.max)),
                    (None, _) => "-".to_string(),
                };
                let _ = write!(out, " {cell} |");
            }
            out.push('\n');
        }
        out
    }

    pub fn json(&self, runs: usize) -> serde_json::Value {
        let metrics: Vec<serde_json::Value> = self
            .metrics
            .iter()
            .enumerate()
            .map(|(index, metric)| {
                let setups: serde_json::Map<String, serde_json::Value> = self
                    .setups()
                    .into_iter()
                    .filter_map(|setup| {
                        let summary = self.summary(index, setup)?;
                        Some((
                            setup.name().to_string(),
                            serde_json::json!({
                                "median": summary.median,
                                "min": summary.min,
                                "max": summary.max,
                                "values": self.values.get(&(index, setup)),
                                "ratio_to_direct": self.ratio(index, setup),
                            }),
                        ))
                    })
                    .collect();
                serde_json::json!({
                    "metric": metric.name,
                    "unit": metric.unit,
                    "higher_is_better": metric.higher_is_better,
                    "setups": setups,
                })
            })
            .collect();
        serde_json::json!({ "runs": runs, "metrics": metrics })
    }

    /// A bar chart of every setup's ratio to direct: a heading row per metric, a bar per setup.
    pub fn chart(&self, path: &Path) -> Result<()> {
        register_font()?;
        let setups: Vec<Setup> = self
            .setups()
            .into_iter()
            .filter(|s| *s != Setup::Direct)
            .collect();
        // (label, Some((ratio, colour slot))) from top to bottom.
        let mut rows: Vec<(String, Option<(f64, usize)>)> = Vec::new();
        for (index, metric) in self.metrics.iter().enumerate() {
            let bars: Vec<(String, Option<(f64, usize)>)> = setups
                .iter()
                .enumerate()
                .filter_map(|(slot, setup)| {
                    Some((
                        setup.name().to_string(),
                        Some((self.ratio(index, *setup)?, slot)),
                    ))
                })
                .collect();
            if bars.is_empty() {
                continue;
            }
            let better = if metric.higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            };
            rows.push((format!("{} ({better})", metric.name), None));
            rows.extend(bars);
        }
        let count = rows.len() as i32;
        let max_ratio = rows
            .iter()
            .filter_map(|(_, bar)| bar.map(|(ratio, _)| ratio))
            .fold(1.2f64, f64::max);
        let root = BitMapBackend::new(path, (1200, 80 + 18 * count as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "sockmesh benchmark: ratio to a direct connection in the same run",
                ("sans-serif", 20),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(380)
            .build_cartesian_2d(0f64..max_ratio * 1.15, (0..count).into_segmented())?;
        // Row i (from the top) sits in segment count - 1 - i.
        let label_of = |value: &SegmentValue<i32>| match value {
            SegmentValue::CenterOf(y) => rows
                .get((count - 1 - y) as usize)
                .map(|(label, _)| label.clone())
                .unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(count as usize)
            .y_label_formatter(&label_of)
            .x_desc("setup / direct (1.0 = same as direct)")
            .label_style(("sans-serif", 13))
            .draw()?;
        for (i, (_, bar)) in rows.iter().enumerate() {
            let Some((ratio, slot)) = bar else { continue };
            let y = count - 1 - i as i32;
            let colour = Palette99::pick(*slot).filled();
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(y)),
                    (*ratio, SegmentValue::Exact(y + 1)),
                ],
                colour,
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{ratio:.2}"),
                (*ratio + 0.01, SegmentValue::CenterOf(y)),
                ("sans-serif", 12).into_font(),
            )))?;
        }
        chart.draw_series(std::iter::once(PathElement::new(
            vec![
                (1.0, SegmentValue::Exact(0)),
                (1.0, SegmentValue::Exact(count)),
            ],
            BLACK,
        )))?;
        root.present().context("writing the chart")?;
        Ok(())
    }
}

struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

impl Summary {
    fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = match sorted.len() {
            0 => return None,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }
}

fn fmt(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

/// plotters draws text with ab_glyph and a TTF font from Debian's fonts-dejavu-core.
fn register_font() -> Result<()> {
    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes = fs::read(FONT)
        .with_context(|| format!("reading {FONT} (apt-get install fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        let metric = Metric {
            name: "m",
            unit: "u",
            higher_is_better: true,
        };
        let mut results = Results::default();
        for (setup, value) in [
            (Setup::Direct, 10.0),
            (Setup::Direct, 12.0),
            (Setup::Direct, 11.0),
            (Setup::Sockmesh, 8.0),
        ] {
            results.record(metric, setup, value);
        }
        assert_eq!(results.summary(0, Setup::Direct).unwrap().median, 11.0);
        assert!((results.ratio(0, Setup::Sockmesh).unwrap() - 8.0 / 11.0).abs() < 1e-9);
        let table = results.markdown(3);
        assert!(table.contains("| m | u (higher is better) | 11.000 [10.000-12.000] | 8.000 [8.000-8.000] **0.73x** |"), "{table}");
    }

    #[test]
    fn chart_renders_a_png() {
        let metric = Metric {
            name: "iperf3",
            unit: "Gbit/s",
            higher_is_better: true,
        };
        let mut results = Results::default();
        for (setup, value) in [
            (Setup::Direct, 10.0),
            (Setup::Sockmesh, 7.0),
            (Setup::Haproxy, 4.0),
        ] {
            results.record(metric, setup, value);
        }
        let path = std::env::temp_dir().join(format!("sockmesh-chart-{}.png", std::process::id()));
        results.chart(&path).expect("chart");
        let png = fs::read(&path).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 1000);
        let _ = fs::remove_file(path);
    }
}
