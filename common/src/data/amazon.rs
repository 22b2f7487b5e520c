//! Amazon reviews 2014 (McAuley et al.): a ratings CSV without header (user, item, rating,
//! timestamp) and a metadata file with one object per line carrying `asin` and `title`.
//!
//! The original metadata dumps are Python dict literals (single quotes), not JSON; each line is
//! tried as JSON first and as JSON5 (which accepts single quotes) second.

use super::movielens::read_csv;
use super::{clean_title, DataError, RawInteraction, RawInteractions};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

#[derive(serde::Deserialize)]
struct Rating(String, String, #[allow(dead_code)] f64, i64);

#[derive(serde::Deserialize)]
struct Meta {
    asin: String,
    #[serde(default)]
    title: Option<String>,
}

/// Reads `ratings_path` (CSV) and `meta_path` (JSON lines or Python-literal lines).
pub fn load_amazon(ratings_path: &Path, meta_path: &Path) -> Result<RawInteractions, DataError> {
    let interactions = read_csv::<Rating>(ratings_path, false)?
        .into_iter()
        .map(|Rating(user, item, _, timestamp)| RawInteraction { user, item, timestamp })
        .collect();
    let file = std::fs::File::open(meta_path).map_err(|source| DataError::Io { path: meta_path.to_path_buf(), source })?;
    let mut titles = HashMap::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| DataError::Io { path: meta_path.to_path_buf(), source })?;
        if line.trim().is_empty() {
            continue;
        }
        let meta: Meta = serde_json::from_str(&line).or_else(|_| json5::from_str(&line)).map_err(|e| DataError::Parse {
            path: meta_path.to_path_buf(),
            line: i + 1,
            reason: format!("not a JSON or Python-literal object with an \"asin\": {e}"),
        })?;
        if let Some(title) = meta.title.filter(|t| !t.trim().is_empty()) {
            titles.insert(meta.asin, clean_title(&title, None));
        }
    }
    Ok(RawInteractions { interactions, titles })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ratings_and_both_metadata_dialects() {
        let dir = tempfile::tempdir().unwrap();
        let ratings = dir.path().join("ratings_Beauty.csv");
        let meta = dir.path().join("meta_Beauty.json");
        std::fs::write(&ratings, "A39HTATAQ9V7YF,0205616461,5.0,1369699200\nA3JM6GV9MNOF9X,0558925278,3.0,1355443200\n").unwrap();
        std::fs::write(
            &meta,
            "{\"asin\": \"0205616461\", \"title\": \"Bath &amp; Body Wash\"}\n{'asin': '0558925278', 'title': 'Eye Liner', 'price': 6.99}\n{'asin': 'B0000', 'categories': [['Beauty']]}\n",
        )
        .unwrap();
        let raw = load_amazon(&ratings, &meta).unwrap();
        assert_eq!(raw.interactions[0], RawInteraction { user: "A39HTATAQ9V7YF".into(), item: "0205616461".into(), timestamp: 1369699200 });
        assert_eq!(raw.titles["0205616461"], "Bath & Body Wash");
        assert_eq!(raw.titles["0558925278"], "Eye Liner");
        assert!(!raw.titles.contains_key("B0000"));
    }

    #[test]
    fn garbage_metadata_line_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let ratings = dir.path().join("r.csv");
        let meta = dir.path().join("m.json");
        std::fs::write(&ratings, "u,i,5.0,1\n").unwrap();
        std::fs::write(&meta, "{\"asin\": \"i\"}\nnot json at all\n").unwrap();
        let err = load_amazon(&ratings, &meta).unwrap_err().to_string();
        assert!(err.contains("m.json:2"), "{err}");
    }
}
