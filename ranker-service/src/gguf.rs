//! Reading GGUF files: metadata lookups and tensors, shared by the weight loader and the
//! tokenizer builder.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::error::{RankerError, Result};

/// An open GGUF file: its parsed header plus a reader positioned anywhere for tensor reads.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.exists() {
            return Err(RankerError::ModelNotFound { path });
        }
        let file = File::open(&path).map_err(|source| RankerError::Io {
            path: path.clone(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| RankerError::InvalidModel(format!("{}: {e}", path.display())))?;
        Ok(Self {
            path,
            content,
            reader,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header (metadata and tensor table).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// A metadata value, or `None` when the key is absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| RankerError::InvalidModel(format!("GGUF metadata key {key} missing")))
    }

    /// A required integer metadata value (any integer width).
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        value_to_usize(self.required(key)?).ok_or_else(|| {
            RankerError::InvalidModel(format!("GGUF metadata {key} is not an integer"))
        })
    }

    /// An optional integer metadata value.
    pub fn get_usize_opt(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(value_to_usize)
    }

    /// An optional float metadata value.
    pub fn get_f64_opt(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            _ => None,
        }
    }

    /// A required string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.required(key)? {
            Value::String(s) => Ok(s),
            _ => Err(RankerError::InvalidModel(format!(
                "GGUF metadata {key} is not a string"
            ))),
        }
    }

    /// A required array-of-strings metadata value.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        match self.required(key)? {
            Value::Array(vs) => vs
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(RankerError::InvalidModel(format!(
                        "GGUF {key}: non-string element"
                    ))),
                })
                .collect(),
            _ => Err(RankerError::InvalidModel(format!(
                "GGUF metadata {key} is not an array"
            ))),
        }
    }

    /// An optional array-of-integers metadata value.
    pub fn get_int_array_opt(&self, key: &str) -> Option<Vec<i64>> {
        match self.get(key)? {
            Value::Array(vs) => vs.iter().map(value_to_i64).collect(),
            _ => None,
        }
    }

    /// True when the file holds a tensor with this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads one tensor as stored (quantized or not) onto `device`.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| RankerError::InvalidModel(format!("GGUF tensor {name}: {e}")))
    }
}

fn value_to_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => *x as i64,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn value_to_usize(v: &Value) -> Option<usize> {
    value_to_i64(v).and_then(|x| usize::try_from(x).ok())
}
