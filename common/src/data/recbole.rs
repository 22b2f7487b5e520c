//! RecBole atomic files: a `.inter` file (user, item, rating, timestamp) and an `.item` file
//! (item id, title, year, ...), tab-separated with typed headers such as `item_id:token`.

use super::{clean_title, DataError, RawInteraction, RawInteractions};
use std::collections::HashMap;
use std::path::Path;

/// Reads `inter_path` and `item_path`. Columns are found by header name (the part before ':'),
/// so extra columns and other orders work; `rating` is ignored (the paper uses no threshold).
pub fn load_recbole(inter_path: &Path, item_path: &Path) -> Result<RawInteractions, DataError> {
    let inter = read_tsv(inter_path)?;
    let user_col = column(&inter, inter_path, "user_id")?;
    let item_col = column(&inter, inter_path, "item_id")?;
    let ts_col = column(&inter, inter_path, "timestamp")?;
    let mut interactions = Vec::with_capacity(inter.rows.len());
    for (line, row) in inter.rows.iter() {
        let ts_text = field(row, ts_col, inter_path, *line)?;
        let timestamp = ts_text.parse::<f64>().map_err(|e| DataError::Parse {
            path: inter_path.to_path_buf(),
            line: *line,
            reason: format!("timestamp {ts_text:?}: {e}"),
        })? as i64;
        interactions.push(RawInteraction {
            user: field(row, user_col, inter_path, *line)?.to_string(),
            item: field(row, item_col, inter_path, *line)?.to_string(),
            timestamp,
        });
    }

    let items = read_tsv(item_path)?;
    let id_col = column(&items, item_path, "item_id")?;
    let title_col = ["movie_title", "title"]
        .iter()
        .find_map(|name| items.columns.get(*name).copied())
        .ok_or_else(|| missing(item_path, "movie_title or title"))?;
    let year_col = items.columns.get("release_year").copied();
    let mut titles = HashMap::with_capacity(items.rows.len());
    for (line, row) in items.rows.iter() {
        let id = field(row, id_col, item_path, *line)?;
        let title = row.get(title_col).map(|s| s.as_str()).unwrap_or("");
        let year = year_col.and_then(|c| row.get(c)).map(|s| s.as_str());
        if !title.trim().is_empty() {
            titles.insert(id.to_string(), clean_title(title, year));
        }
    }
    Ok(RawInteractions { interactions, titles })
}

struct Table {
    columns: HashMap<String, usize>,
    rows: Vec<(usize, Vec<String>)>,
}

fn read_tsv(path: &Path) -> Result<Table, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, h)| h).unwrap_or("");
    let columns = header
        .split('\t')
        .enumerate()
        .map(|(i, name)| (name.split(':').next().unwrap_or(name).trim().to_string(), i))
        .collect();
    let rows = lines
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.split('\t').map(str::to_string).collect()))
        .collect();
    Ok(Table { columns, rows })
}

fn column(table: &Table, path: &Path, name: &str) -> Result<usize, DataError> {
    table.columns.get(name).copied().ok_or_else(|| missing(path, name))
}

fn missing(path: &Path, name: &str) -> DataError {
    DataError::Parse { path: path.to_path_buf(), line: 1, reason: format!("header has no column {name:?}") }
}

fn field<'a>(row: &'a [String], col: usize, path: &Path, line: usize) -> Result<&'a str, DataError> {
    row.get(col).map(|s| s.as_str()).ok_or_else(|| DataError::Parse {
        path: path.to_path_buf(),
        line,
        reason: format!("expected at least {} tab-separated fields, found {}", col + 1, row.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_atomic_files_by_header_name() {
        let dir = tempfile::tempdir().unwrap();
        let inter = dir.path().join("x.inter");
        let item = dir.path().join("x.item");
        std::fs::write(&inter, "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t3\t881250949\n2\t11\t1\t8.5e8\n").unwrap();
        std::fs::write(&item, "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tGodfather, The\t1972\tDrama\n11\t\t\tDrama\n").unwrap();
        let raw = load_recbole(&inter, &item).unwrap();
        assert_eq!(raw.interactions.len(), 2);
        assert_eq!(raw.interactions[0], RawInteraction { user: "1".into(), item: "10".into(), timestamp: 881250949 });
        assert_eq!(raw.interactions[1].timestamp, 850_000_000);
        assert_eq!(raw.titles["10"], "The Godfather (1972)");
        assert!(!raw.titles.contains_key("11"), "an empty title means untitled");
    }

    #[test]
    fn bad_timestamp_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let inter = dir.path().join("x.inter");
        let item = dir.path().join("x.item");
        std::fs::write(&inter, "user_id:token\titem_id:token\ttimestamp:float\n1\t10\tyesterday\n").unwrap();
        std::fs::write(&item, "item_id:token\ttitle:token_seq\n10\tX\n").unwrap();
        let err = load_recbole(&inter, &item).unwrap_err().to_string();
        assert!(err.contains("x.inter:2") && err.contains("yesterday"), "{err}");
    }
}
