//! Human labels of served models (`ModelVersion.label`): the one rule both model services check
//! a label against, and the default a directory's name gives.

use std::path::Path;

/// Longest model label accepted, in bytes.
pub const MAX_LABEL_LEN: usize = 128;

/// A model label: 1..=128 visible ASCII characters (it becomes a Prometheus label value and is
/// printed in logs, so no control characters or newlines).
pub fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > MAX_LABEL_LEN {
        return Err(format!("is {} bytes; a label must be 1..={MAX_LABEL_LEN} bytes", label.len()));
    }
    if !label.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(format!("{label:?} holds a character other than visible ASCII and spaces"));
    }
    Ok(())
}

/// A checkpoint's or adapter's directory name (the path as given when it has none, e.g. `.`),
/// cut to a valid label.
pub fn default_label(dir: &Path) -> String {
    let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    let label: String = name.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '_' }).take(MAX_LABEL_LEN).collect();
    if label.is_empty() { "checkpoint".into() } else { label }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_visible_ascii_of_bounded_length_and_default_to_the_directory_name() {
        assert!(check_label("2026-12-07 longer run").is_ok());
        assert!(check_label("").unwrap_err().contains("1..=128"));
        assert!(check_label(&"x".repeat(129)).is_err());
        assert!(check_label("a\nb").unwrap_err().contains("visible ASCII"));
        assert_eq!(default_label(Path::new("ranker-service/adapters/ml-100k")), "ml-100k");
        assert_eq!(default_label(Path::new("runs/caf\u{e9}")), "caf_");
    }
}
