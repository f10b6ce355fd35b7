//! A small reader for the agent's text exposition: sums the samples of a metric whose labels
//! include the given ones.

pub struct Metrics {
    samples: Vec<Sample>,
}

struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(parse_sample)
            .collect();
        Self { samples }
    }

    /// Sum of every sample of `name` carrying all of `labels`; 0 when there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|sample| sample.name == name)
            .filter(|sample| {
                labels
                    .iter()
                    .all(|(key, value)| sample.labels.iter().any(|(k, v)| k == key && v == value))
            })
            .map(|sample| sample.value)
            .sum()
    }

    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.value(name, labels) as u64
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), Vec::new()),
        Some((name, rest)) => (name.to_string(), parse_labels(rest.strip_suffix('}')?)),
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    text.split("\",")
        .filter_map(|pair| {
            let (key, value) = pair.split_once("=\"")?;
            Some((
                key.trim().to_string(),
                value.trim_end_matches('"').to_string(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_series() {
        let metrics = Metrics::parse(
            "# TYPE tcp_open counter\n\
             tcp_open_total{direction=\"outbound\",target_port=\"80\"} 2\n\
             tcp_open_total{direction=\"outbound\",target_port=\"81\"} 3\n\
             tcp_close_total{direction=\"outbound\",target_port=\"80\",errno=\"\"} 1\n\
             sockmesh_kernel_errors_total 0\n# EOF\n",
        );
        assert_eq!(metrics.count("tcp_open_total", &[]), 5);
        assert_eq!(metrics.count("tcp_open_total", &[("target_port", "81")]), 3);
        assert_eq!(metrics.count("tcp_close_total", &[("errno", "")]), 1);
        assert_eq!(metrics.count("missing", &[]), 0);
    }
}
