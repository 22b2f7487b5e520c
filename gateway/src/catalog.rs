//! The item catalog the gateway validates ids against and takes titles from: the same
//! preprocessed data set the retriever was trained on, in the same dense order, so that the two
//! can exchange dense item indices when their fingerprints agree.

use llamarec_common::data::{catalog_fingerprint, Dataset, Item};
use std::collections::HashMap;

/// External item id <-> dense index (1..=len, as in the data set) -> title.
pub struct Catalog {
    /// `items[i - 1]` is the item at dense index `i`.
    items: Vec<Item>,
    by_id: HashMap<String, u32>,
    fingerprint: u64,
}

impl Catalog {
    /// Builds the catalog from a data set (index 0, the padding item, is skipped).
    pub fn from_dataset(dataset: &Dataset) -> Self {
        let items: Vec<Item> = dataset.items.iter().skip(1).cloned().collect();
        let by_id = items.iter().enumerate().map(|(i, item)| (item.id.clone(), i as u32 + 1)).collect();
        let fingerprint = catalog_fingerprint(items.iter().map(|item| item.id.as_str()));
        Self { items, by_id, fingerprint }
    }

    /// The item's title, or None for an unknown id.
    pub fn title(&self, item_id: &str) -> Option<&str> {
        self.index_of(item_id).and_then(|i| self.item(i)).map(|item| item.title.as_str())
    }

    /// True when the id is in the catalog.
    pub fn contains(&self, item_id: &str) -> bool {
        self.by_id.contains_key(item_id)
    }

    /// Dense index (1-based) of the item with external id `item_id`.
    pub fn index_of(&self, item_id: &str) -> Option<u32> {
        self.by_id.get(item_id).copied()
    }

    /// The item at dense index `index` (1-based); None for 0 or beyond the catalog.
    pub fn item(&self, index: u32) -> Option<&Item> {
        self.items.get((index as usize).checked_sub(1)?)
    }

    /// Identifies the items and their order; equal to the retriever's when both serve the same
    /// data set (`RetrieverInfo.catalog_fingerprint`).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True for an empty catalog.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_indices_start_at_one_and_map_both_ways() {
        let item = |id: &str| Item { id: id.into(), title: format!("Title {id}") };
        let catalog = Catalog::from_dataset(&Dataset { name: "t".into(), items: vec![item(""), item("a"), item("b")], users: Vec::new() });
        assert_eq!((catalog.index_of("a"), catalog.index_of("b"), catalog.index_of("")), (Some(1), Some(2), None));
        assert_eq!(catalog.item(2).map(|i| i.id.as_str()), Some("b"));
        assert!(catalog.item(0).is_none() && catalog.item(3).is_none());
        assert_eq!(catalog.title("a"), Some("Title a"));
        assert_eq!(catalog.fingerprint(), catalog_fingerprint(["a", "b"]), "the padding item is not part of the fingerprint");
    }
}
