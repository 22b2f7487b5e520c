//! What a served ranker reports as its version: the base model's name and a content hash of the
//! base weights and the adapter, with a human label.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use llamarec_proto::v1::ModelVersion;
use sha2::{Digest, Sha256};

/// The base weights' name and the hash state after their bytes. Hashing the base (~100 MB to
/// several GB) once at start and cloning the state for each adapter makes a reload read only
/// the adapter's files, and gives the same version as hashing everything again would.
#[derive(Clone)]
pub struct BaseDigest {
    name: String,
    hash: Sha256,
}

impl BaseDigest {
    /// Hashes `model`: a GGUF file, or an HF directory's `*.safetensors` in name order.
    pub fn of(model: &Path) -> anyhow::Result<Self> {
        let mut hash = Sha256::new();
        for path in weight_files(model)? {
            hash_file(&mut hash, &path)?;
        }
        let name = model.file_name().map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string()).unwrap_or_default();
        Ok(Self { name, hash })
    }

    /// The version of the base with `adapter` (None: alone): name `base+adapter-dir`, the first
    /// 12 hex digits of the SHA-256 of the base's bytes then the adapter's config and weights.
    pub fn version(&self, adapter: Option<&Path>, label: &str) -> anyhow::Result<ModelVersion> {
        let mut hash = self.hash.clone();
        let mut name = self.name.clone();
        if let Some(adapter) = adapter {
            hash_file(&mut hash, &adapter.join(crate::peft::CONFIG_FILE))?;
            hash_file(&mut hash, &adapter.join(crate::peft::WEIGHTS_FILE))?;
            name = format!("{name}+{}", adapter.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        }
        Ok(ModelVersion { name, version: hex::encode(&hash.finalize()[..6]), label: label.to_string() })
    }
}

fn hash_file(hash: &mut Sha256, path: &Path) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        hash.update(&buf[..n]);
    }
}

/// The files whose bytes are the model: a GGUF file, or an HF directory's `*.safetensors`.
fn weight_files(model: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !model.is_dir() {
        return Ok(vec![model.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(model)
        .with_context(|| format!("listing {}", model.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// The default label of a served model: the adapter directory's name, "base" without one.
pub fn default_label(adapter: Option<&Path>) -> String {
    adapter.map_or_else(|| "base".to_string(), llamarec_common::model_label::default_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_hashes_base_then_adapter_and_changes_with_either() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("tiny.gguf");
        std::fs::write(&base, b"base weights").unwrap();
        let adapter = dir.path().join("run-7");
        std::fs::create_dir(&adapter).unwrap();
        std::fs::write(adapter.join(crate::peft::CONFIG_FILE), b"{}").unwrap();
        std::fs::write(adapter.join(crate::peft::WEIGHTS_FILE), b"adapter weights").unwrap();
        let digest = BaseDigest::of(&base).unwrap();
        let alone = digest.version(None, "base").unwrap();
        assert_eq!(alone.name, "tiny");
        assert_eq!(alone.version, hex::encode(&Sha256::digest(b"base weights")[..6]));
        let tuned = digest.version(Some(&adapter), "run 7").unwrap();
        assert_eq!((tuned.name.as_str(), tuned.label.as_str()), ("tiny+run-7", "run 7"));
        assert_eq!(tuned.version, hex::encode(&Sha256::digest(b"base weights{}adapter weights")[..6]));
        std::fs::write(adapter.join(crate::peft::WEIGHTS_FILE), b"other weights").unwrap();
        assert_ne!(digest.version(Some(&adapter), "x").unwrap().version, tuned.version);
        assert!(digest.version(Some(&dir.path().join("missing")), "x").is_err());
        assert_eq!(default_label(Some(&adapter)), "run-7");
        assert_eq!(default_label(None), "base");
    }
}
