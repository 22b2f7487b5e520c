//! MovieLens CSV releases (`ratings.csv` + `movies.csv`, e.g. ml-latest-small, which the paper
//! calls "ML-100k").

use super::{clean_title, DataError, RawInteraction, RawInteractions};
use std::collections::HashMap;
use std::path::Path;

#[derive(serde::Deserialize)]
struct Rating {
    #[serde(rename = "userId")]
    user: String,
    #[serde(rename = "movieId")]
    item: String,
    timestamp: i64,
}

#[derive(serde::Deserialize)]
struct Movie {
    #[serde(rename = "movieId")]
    item: String,
    title: String,
}

/// Reads `ratings.csv` (userId,movieId,rating,timestamp) and `movies.csv` (movieId,title,genres).
pub fn load_movielens(ratings_path: &Path, movies_path: &Path) -> Result<RawInteractions, DataError> {
    let interactions = read_csv::<Rating>(ratings_path, true)?
        .into_iter()
        .map(|r| RawInteraction { user: r.user, item: r.item, timestamp: r.timestamp })
        .collect();
    let titles: HashMap<String, String> = read_csv::<Movie>(movies_path, true)?
        .into_iter()
        .filter(|m| !m.title.trim().is_empty())
        .map(|m| (m.item, clean_title(&m.title, None)))
        .collect();
    Ok(RawInteractions { interactions, titles })
}

/// Reads a CSV file into records, naming file and line on the first bad row.
pub(super) fn read_csv<T: serde::de::DeserializeOwned>(path: &Path, has_headers: bool) -> Result<Vec<T>, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let mut reader = csv::ReaderBuilder::new().has_headers(has_headers).flexible(true).from_reader(std::io::BufReader::new(file));
    reader
        .deserialize()
        .map(|row| {
            row.map_err(|e| DataError::Parse {
                path: path.to_path_buf(),
                line: e.position().map(|p| p.line() as usize).unwrap_or(0),
                reason: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ratings_and_movies() {
        let dir = tempfile::tempdir().unwrap();
        let ratings = dir.path().join("ratings.csv");
        let movies = dir.path().join("movies.csv");
        std::fs::write(&ratings, "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.0,964981247\n").unwrap();
        std::fs::write(&movies, "movieId,title,genres\n1,Toy Story (1995),Adventure\n3,\"American President, The (1995)\",Comedy|Drama\n").unwrap();
        let raw = load_movielens(&ratings, &movies).unwrap();
        assert_eq!(raw.interactions[1], RawInteraction { user: "1".into(), item: "3".into(), timestamp: 964981247 });
        assert_eq!(raw.titles["3"], "The American President (1995)");
        assert_eq!(raw.titles["1"], "Toy Story (1995)");
    }
}
