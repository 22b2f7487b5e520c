//! JSON-lines capture files shared by traffic recording and shadow ranking: each opened file
//! keeps an earlier non-empty one under a new name, a dedicated thread writes the records, and
//! the request path only hashes a counter or an id ([`fnv1a`]) to decide what is sampled.

use serde::Serialize;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Creates `path` (and its directory) for a capture, keeping a non-empty earlier file as
/// `<path>.<unix seconds>`.
pub fn open_capture_file(path: &Path) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut kept = path.as_os_str().to_owned();
        kept.push(format!(".{secs}"));
        std::fs::rename(path, &kept).with_context(|| format!("keeping the earlier capture {}", path.display()))?;
        tracing::info!(kept = %PathBuf::from(kept).display(), "kept the earlier capture");
    }
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// Starts a thread named `name` that writes the records from `rx` to `file` as JSON lines until
/// every sender is gone, counting failed writes in the counter `errors`.
pub fn spawn_jsonl_writer<T: Serialize + Send + 'static>(
    name: &str,
    rx: mpsc::Receiver<T>,
    file: std::fs::File,
    path: PathBuf,
    errors: &'static str,
) -> std::io::Result<()> {
    std::thread::Builder::new().name(name.into()).spawn(move || writer(rx, BufWriter::new(file), &path, errors))?;
    Ok(())
}

/// FNV-1a, 64 bits: a stable hash of an id (std's hasher is seeded per process), the same in
/// every process and every release. Shadow ranking samples request ids with it, the canary split
/// ([`crate::canary`]) places user ids with it; both mix it further with
/// [`llamarec_common::rng::splitmix64`].
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn write_line<T: Serialize>(out: &mut impl Write, record: &T) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, record)?;
    out.write_all(b"\n")
}

/// Writes records until every sender is gone; flushes whenever the queue runs empty, so the file
/// is current within one record of the last arrival.
fn writer<T: Serialize>(mut rx: mpsc::Receiver<T>, mut out: impl Write, path: &Path, errors: &'static str) {
    let mut failed = false;
    while let Some(record) = rx.blocking_recv() {
        let mut result = write_line(&mut out, &record);
        while let Ok(more) = rx.try_recv() {
            result = result.and_then(|()| write_line(&mut out, &more));
        }
        result = result.and_then(|()| out.flush());
        if let Err(e) = result {
            metrics::counter!(errors).increment(1);
            if !failed {
                tracing::error!(path = %path.display(), error = %e, "writing the capture failed");
                failed = true;
            }
        }
    }
}
