//! A metric family: prometheus-client's `Family` (one metric per label set, created on first
//! use), plus `retain`, which prometheus-client's lacks (it removes one exactly known label
//! set at a time). The agent needs it to drop every series of a pod that is gone, whatever
//! its other labels (ports, authorities, statuses) came to be; without it a node's pod churn
//! would grow /metrics and the agent's heap for as long as the agent runs.

use std::{collections::HashMap, fmt, hash::Hash, sync::Arc};

use parking_lot::{MappedRwLockReadGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{MetricType, TypedMetric, family::MetricConstructor},
};

pub struct Family<S, M, C = fn() -> M> {
    metrics: Arc<RwLock<HashMap<S, M>>>,
    constructor: C,
}

impl<S, M: Default> Default for Family<S, M> {
    fn default() -> Self {
        Self::new_with_constructor(M::default)
    }
}

impl<S, M, C> Family<S, M, C> {
    /// A family whose metrics `constructor` makes (histograms need their buckets).
    pub fn new_with_constructor(constructor: C) -> Self {
        Self {
            metrics: Arc::new(RwLock::new(HashMap::new())),
            constructor,
        }
    }
}

impl<S: Clone + Hash + Eq, M, C: MetricConstructor<M>> Family<S, M, C> {
    /// The metric of `label_set`, made if it is new. A read lock in the common case.
    pub fn get_or_create(&self, label_set: &S) -> MappedRwLockReadGuard<'_, M> {
        if let Ok(metric) =
            RwLockReadGuard::try_map(self.metrics.read(), |metrics| metrics.get(label_set))
        {
            return metric;
        }
        let mut metrics = self.metrics.write();
        metrics
            .entry(label_set.clone())
            .or_insert_with(|| self.constructor.new_metric());
        RwLockReadGuard::map(RwLockWriteGuard::downgrade(metrics), |metrics| {
            metrics
                .get(label_set)
                .expect("the metric was inserted under this lock")
        })
    }
}

impl<S, M, C> Family<S, M, C> {
    /// Keeps the series whose label set `keep` accepts and removes the others; returns how
    /// many went. A handle a connection still holds on a removed series goes on counting into
    /// a metric no scrape shows.
    pub fn retain(&self, mut keep: impl FnMut(&S) -> bool) -> usize {
        let mut metrics = self.metrics.write();
        let before = metrics.len();
        metrics.retain(|labels, _| keep(labels));
        before - metrics.len()
    }

    /// Series in the family.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.metrics.read().len()
    }
}

impl<S, M, C: Clone> Clone for Family<S, M, C> {
    fn clone(&self) -> Self {
        Self {
            metrics: Arc::clone(&self.metrics),
            constructor: self.constructor.clone(),
        }
    }
}

impl<S, M, C> fmt::Debug for Family<S, M, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Family")
            .field("series", &self.metrics.read().len())
            .finish()
    }
}

impl<S, M: TypedMetric, C> TypedMetric for Family<S, M, C> {
    const TYPE: MetricType = M::TYPE;
}

impl<S, M, C> EncodeMetric for Family<S, M, C>
where
    S: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (labels, metric) in self.metrics.read().iter() {
            metric.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        metrics::{counter::Counter, histogram::Histogram},
        registry::Registry,
    };

    use super::*;

    #[test]
    fn retain_removes_what_it_rejects_and_the_rest_renders_as_before() {
        let family = Family::<Vec<(String, String)>, Counter>::default();
        let labels = |pod: &str, port: &str| {
            vec![
                ("pod".to_string(), pod.to_string()),
                ("port".to_string(), port.to_string()),
            ]
        };
        family.get_or_create(&labels("a", "80")).inc();
        family.get_or_create(&labels("a", "443")).inc_by(2);
        family.get_or_create(&labels("b", "80")).inc_by(3);
        assert_eq!(family.get_or_create(&labels("b", "80")).get(), 3);

        let removed = family.retain(|labels| labels[0].1 != "a");
        assert_eq!(removed, 2);
        assert_eq!(family.len(), 1);

        let mut registry = Registry::default();
        registry.register("requests", "Requests", family.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"requests_total{pod="b",port="80"} 3"#),
            "{text}"
        );
        assert!(!text.contains(r#"pod="a""#), "{text}");
        // A removed series starts again from zero when its labels come back.
        assert_eq!(family.get_or_create(&labels("a", "80")).get(), 0);
    }

    #[test]
    fn histograms_take_their_buckets_from_the_constructor() {
        let family = Family::<Vec<(String, String)>, Histogram>::new_with_constructor(|| {
            Histogram::new([1.0, 10.0])
        });
        family.get_or_create(&vec![]).observe(5.0);
        let mut registry = Registry::default();
        registry.register("latency", "Latency", family);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"latency_bucket{le="10.0"} 1"#), "{text}");
        assert!(text.contains(r#"latency_bucket{le="1.0"} 0"#), "{text}");
    }
}
