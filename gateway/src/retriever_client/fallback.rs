//! The gateway's own answer when the retriever cannot be reached: the catalog's most popular
//! items (interaction counts of the data set the catalog is loaded from, computed at start, so
//! the list is there even when the retriever never was), minus the user's history. A Recommend
//! answered from it is `degraded` with `DEGRADED_REASON_RETRIEVER_FALLBACK`: a usable answer
//! rather than UNAVAILABLE, flagged so that callers and dashboards can tell.

use crate::catalog::Catalog;
use crate::merge::Retrieved;
use llamarec_common::data::Dataset;
use llamarec_proto::v1::ModelVersion;
use std::collections::HashSet;
use tonic::Code;

/// The popular items, most popular first.
pub struct PopularFallback {
    /// `(catalog index, log of the item's share of all interactions)`.
    items: Vec<(u32, f32)>,
}

impl PopularFallback {
    /// The `n` most interacted-with items of `dataset` (ties: lower index first); None when `n`
    /// is 0 (the fallback is off) or the data set has no interactions.
    pub fn from_dataset(dataset: &Dataset, n: usize) -> Option<Self> {
        let mut counts = vec![0u64; dataset.items.len()];
        for user in &dataset.users {
            for &i in &user.items {
                counts[i as usize] += 1;
            }
        }
        let total: u64 = counts.iter().sum();
        if n == 0 || total == 0 {
            return None;
        }
        let mut order: Vec<u32> = (1..counts.len() as u32).filter(|&i| counts[i as usize] > 0).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(counts[i as usize]));
        order.truncate(n);
        let items = order.into_iter().map(|i| (i, (counts[i as usize] as f64 / total as f64).ln() as f32)).collect();
        Some(Self { items })
    }

    /// Whether a failed Retrieve with this code should be answered from the fallback: the
    /// retriever unreachable, too slow or overloaded, not a request it rejected.
    pub fn covers(code: Code) -> bool {
        matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Unknown | Code::Cancelled)
    }

    /// The `want` most popular items not in `history`.
    pub fn answer(&self, catalog: &Catalog, history: &[&str], want: usize) -> Vec<Retrieved> {
        let seen: HashSet<&str> = history.iter().copied().collect();
        self.items
            .iter()
            .filter_map(|&(i, score)| catalog.item(i).map(|item| (item, score)))
            .filter(|(item, _)| !seen.contains(item.id.as_str()))
            .take(want)
            .map(|(item, score)| Retrieved { item_id: item.id.clone(), title: item.title.clone(), score })
            .collect()
    }

    /// What Recommend reports as the retriever model of a fallback answer.
    pub fn version() -> ModelVersion {
        ModelVersion { name: "popularity-fallback".into(), ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llamarec_common::data::{Item, UserHistory};

    fn dataset() -> Dataset {
        let item = |id: &str| Item { id: id.into(), title: format!("title {id}") };
        let user = |items: Vec<u32>| UserHistory { id: "u".into(), timestamps: vec![0; items.len()], items };
        Dataset {
            name: "t".into(),
            items: vec![item("pad"), item("a"), item("b"), item("c"), item("d")],
            users: vec![user(vec![3, 2, 3]), user(vec![3, 2, 1])],
        }
    }

    #[test]
    fn most_popular_first_without_the_history_and_off_at_zero() {
        let data = dataset();
        let catalog = Catalog::from_dataset(&data);
        let fallback = PopularFallback::from_dataset(&data, 10).unwrap();
        let ids = |r: Vec<Retrieved>| r.into_iter().map(|x| x.item_id).collect::<Vec<_>>();
        assert_eq!(ids(fallback.answer(&catalog, &[], 10)), ["c", "b", "a"], "d was never seen");
        assert_eq!(ids(fallback.answer(&catalog, &["c"], 1)), ["b"], "history excluded, k honoured");
        let top = fallback.answer(&catalog, &[], 1);
        assert!((top[0].score - (3.0f32 / 6.0).ln()).abs() < 1e-6);
        assert!(PopularFallback::from_dataset(&data, 0).is_none());
        assert!(PopularFallback::covers(Code::Unavailable) && !PopularFallback::covers(Code::InvalidArgument));
    }
}
