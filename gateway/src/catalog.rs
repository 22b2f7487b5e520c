//! The item catalog the gateway validates ids against and takes history titles from: the same
//! preprocessed data set the retriever was trained on.

use llamarec_common::data::{Dataset, Item};
use std::collections::HashMap;

/// External item id -> title.
pub struct Catalog {
    items: Vec<Item>,
    by_id: HashMap<String, usize>,
}

impl Catalog {
    /// Builds the catalog from a data set (index 0, the padding item, is skipped).
    pub fn from_dataset(dataset: &Dataset) -> Self {
        let items: Vec<Item> = dataset.items.iter().skip(1).cloned().collect();
        let by_id = items.iter().enumerate().map(|(i, item)| (item.id.clone(), i)).collect();
        Self { items, by_id }
    }

    /// The item's title, or None for an unknown id.
    pub fn title(&self, item_id: &str) -> Option<&str> {
        self.by_id.get(item_id).map(|&i| self.items[i].title.as_str())
    }

    /// True when the id is in the catalog.
    pub fn contains(&self, item_id: &str) -> bool {
        self.by_id.contains_key(item_id)
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
