//! The item catalog a checkpoint serves: dense index ↔ external id, titles, and training
//! popularity for the empty-history fallback.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One item as stored in `items.json` (the entry at index 0 is the padding item).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogItem {
    /// The item's id in the source data set.
    pub id: String,
    /// Display title.
    pub title: String,
    /// Occurrences in the training sequences (validation and test items excluded).
    pub train_count: u32,
}

/// Items by dense index and by external id, plus the popularity order.
#[derive(Debug, Clone)]
pub struct Catalog {
    items: Vec<CatalogItem>,
    by_id: HashMap<String, u32>,
    popular: Vec<u32>,
    fingerprint: u64,
}

impl Catalog {
    /// A catalog from `items` (index 0 = padding).
    pub fn new(items: Vec<CatalogItem>) -> Self {
        let by_id = items.iter().enumerate().skip(1).map(|(i, item)| (item.id.clone(), i as u32)).collect();
        let mut popular: Vec<u32> = (1..items.len() as u32).collect();
        // Most trained-on first; the index breaks ties so the order is deterministic.
        popular.sort_by(|&a, &b| items[b as usize].train_count.cmp(&items[a as usize].train_count).then(a.cmp(&b)));
        let fingerprint = llamarec_common::data::catalog_fingerprint(items.iter().skip(1).map(|item| item.id.as_str()));
        Self { items, by_id, popular, fingerprint }
    }

    /// Identifies the items and their dense order (see `RetrieverInfo.catalog_fingerprint`).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Number of real items.
    pub fn num_items(&self) -> usize {
        self.items.len().saturating_sub(1)
    }

    /// The item at dense `index` (0 is the padding entry).
    pub fn item(&self, index: u32) -> Option<&CatalogItem> {
        self.items.get(index as usize)
    }

    /// Dense index of the item with external id `id`.
    pub fn index_of(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// All real items, most popular in training first.
    pub fn popular(&self) -> &[u32] {
        &self.popular
    }

    /// The entries as written to `items.json`.
    pub fn items(&self) -> &[CatalogItem] {
        &self.items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, count: u32) -> CatalogItem {
        CatalogItem { id: id.into(), title: format!("Title {id}"), train_count: count }
    }

    #[test]
    fn popularity_orders_by_count_then_index_and_ids_map_back() {
        let catalog = Catalog::new(vec![item("", 0), item("a", 3), item("b", 7), item("c", 3)]);
        assert_eq!(catalog.popular(), &[2, 1, 3]);
        assert_eq!(catalog.index_of("c"), Some(3));
        assert_eq!(catalog.index_of(""), None, "padding has no id");
        assert_eq!(catalog.item(2).unwrap().title, "Title b");
        assert_eq!(catalog.num_items(), 3);
        assert_eq!(catalog.fingerprint(), llamarec_common::data::catalog_fingerprint(["a", "b", "c"]), "padding is not fingerprinted");
    }
}
