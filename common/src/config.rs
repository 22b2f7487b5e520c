//! One layered configuration for every process: compiled-in defaults, then a TOML file, then
//! `LLAMAREC_<SECTION>__<KEY>` environment variables. Each service and the CLI read only their
//! own section (`[retriever]`, `[ranker]`, `[gateway]`, `[data]`, `[assets]`, ...), so a section
//! type lives next to the code that uses it.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Prefix of environment overrides: `LLAMAREC_RANKER__THREADS=2` sets `ranker.threads`.
pub const ENV_PREFIX: &str = "LLAMAREC";
/// Environment variable naming the TOML file when no `--config` is given.
pub const CONFIG_PATH_ENV: &str = "LLAMAREC_CONFIG";
/// The configuration the local cluster ships with, relative to the repository root.
pub const SHIPPED_CONFIG: &str = "deploy/local/llamarec.toml";

/// A configuration value that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file or an environment value does not parse or has the wrong type.
    #[error("configuration {origin}: {source}")]
    Parse {
        /// Where the layers came from.
        origin: String,
        /// The `config` crate's error, which names the key.
        source: config::ConfigError,
    },
    /// The configuration file that was asked for is not there.
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    /// A value parsed but is out of range or inconsistent.
    #[error("configuration key `{key}`: {reason} ({origin})")]
    Invalid {
        /// Full dotted key, e.g. `ranker.threads`.
        key: String,
        /// What is wrong and what is allowed.
        reason: String,
        /// Where the layers came from.
        origin: String,
    },
}

/// A section that can check its values after parsing.
pub trait Section: DeserializeOwned + Default {
    /// The table name in the TOML file and in environment variables.
    const NAME: &'static str;

    /// Checks ranges and consistency; returns the offending key (relative to the section) and
    /// the reason.
    fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}

/// The layered source: an optional TOML file plus the process environment.
#[derive(Debug, Clone)]
pub struct ConfigLayers {
    file: Option<PathBuf>,
    config: config::Config,
}

impl ConfigLayers {
    /// Loads `file` (if any) and the environment. A missing file is an error: a path that was
    /// asked for must exist.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, None)
    }

    /// Like [`ConfigLayers::load`] with an explicit environment (for tests); `None` reads the
    /// process environment.
    pub fn load_with_env(file: Option<&Path>, env: Option<Vec<(String, String)>>) -> Result<Self, ConfigError> {
        let origin = describe(file);
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.to_path_buf()));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let vars: Vec<(String, String)> = env.unwrap_or_else(|| std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect());
        let (arrays, scalars): (Vec<_>, Vec<_>) = vars.into_iter().partition(|(_, v)| is_array(v));
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(scalars.into_iter().collect()));
        builder = builder.add_source(environment);
        if let Some(toml) = env_arrays_as_toml(&arrays) {
            builder = builder.add_source(config::File::from_str(&toml, config::FileFormat::Toml));
        }
        let config = builder.build().map_err(|source| ConfigError::Parse { origin, source })?;
        Ok(Self { file: file.map(Path::to_path_buf), config })
    }

    /// Resolves the file to use: an explicit path, else `$LLAMAREC_CONFIG`, else the shipped
    /// local configuration when it exists under the current directory, else none (defaults).
    pub fn discover(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let from_env = std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from);
        let shipped = Path::new(SHIPPED_CONFIG);
        let file = explicit
            .map(Path::to_path_buf)
            .or(from_env)
            .or_else(|| shipped.exists().then(|| shipped.to_path_buf()));
        Self::load(file.as_deref())
    }

    /// The TOML file in use, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Reads and validates one section; an absent section yields its defaults.
    pub fn section<T: Section>(&self) -> Result<T, ConfigError> {
        let origin = describe(self.file.as_deref());
        let value: T = match self.config.get::<config::Value>(T::NAME) {
            // serde_path_to_error finds the key inside the section that failed; the `config`
            // crate alone would only name the section.
            Ok(raw) => serde_path_to_error::deserialize(raw).map_err(|e| ConfigError::Invalid {
                key: format!("{}.{}", T::NAME, e.path()),
                reason: e.inner().to_string(),
                origin: origin.clone(),
            })?,
            Err(config::ConfigError::NotFound(_)) => T::default(),
            Err(source) => return Err(ConfigError::Parse { origin, source }),
        };
        value.validate().map_err(|(key, reason)| ConfigError::Invalid {
            key: format!("{}.{}", T::NAME, key),
            reason,
            origin,
        })?;
        Ok(value)
    }
}

/// Whether an environment value is a list: `[...]`, written as a TOML array
/// (`LLAMAREC_GATEWAY__RANKERS__ADDRESSES='["10.0.0.1:50052", "10.0.0.2:50052"]'`). The
/// environment layer alone has no way to express lists.
fn is_array(value: &str) -> bool {
    let v = value.trim();
    v.starts_with('[') && v.ends_with(']')
}

/// The list-valued `LLAMAREC_*` variables as one TOML document of dotted keys
/// (`gateway.rankers.addresses = [...]`), or none.
fn env_arrays_as_toml(arrays: &[(String, String)]) -> Option<String> {
    let prefix = format!("{ENV_PREFIX}_");
    let lines: Vec<String> = arrays
        .iter()
        .filter_map(|(name, value)| {
            let key = name.strip_prefix(&prefix)?.split("__").map(|part| format!("\"{}\"", part.to_lowercase())).collect::<Vec<_>>().join(".");
            Some(format!("{key} = {}", value.trim()))
        })
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

fn describe(file: Option<&Path>) -> String {
    match file {
        Some(p) => format!("from {} and {ENV_PREFIX}_* environment variables", p.display()),
        None => format!("from defaults and {ENV_PREFIX}_* environment variables"),
    }
}

/// The `[assets]` section: where `llamarec fetch` puts the data set and the model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssetsConfig {
    /// Cache directory (git-ignored). Relative paths resolve against the working directory.
    pub dir: PathBuf,
}

impl Default for AssetsConfig {
    fn default() -> Self {
        Self { dir: PathBuf::from("assets") }
    }
}

impl Section for AssetsConfig {
    const NAME: &'static str = "assets";
}

impl Section for crate::data::DataConfig {
    const NAME: &'static str = "data";

    fn validate(&self) -> Result<(), (String, String)> {
        if self.name.trim().is_empty() {
            return Err(("name".into(), "must not be empty".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        threads: u32,
        name: String,
        enabled: bool,
        peers: Vec<String>,
    }
    impl Default for Demo {
        fn default() -> Self {
            Self { threads: 2, name: "default".into(), enabled: false, peers: vec!["default:1".into()] }
        }
    }
    impl Section for Demo {
        const NAME: &'static str = "demo";
        fn validate(&self) -> Result<(), (String, String)> {
            if self.threads == 0 {
                return Err(("threads".into(), "must be at least 1".into()));
            }
            Ok(())
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn env(pairs: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let f = file("[demo]\nthreads = 4\nname = \"file\"\n");
        let none = ConfigLayers::load_with_env(None, env(&[])).unwrap().section::<Demo>().unwrap();
        assert_eq!(none, Demo::default());
        let from_file = ConfigLayers::load_with_env(Some(f.path()), env(&[])).unwrap().section::<Demo>().unwrap();
        assert_eq!(from_file, Demo { threads: 4, name: "file".into(), ..Demo::default() });
        let layered = ConfigLayers::load_with_env(Some(f.path()), env(&[("LLAMAREC_DEMO__THREADS", "8"), ("LLAMAREC_DEMO__ENABLED", "true")]))
            .unwrap()
            .section::<Demo>()
            .unwrap();
        assert_eq!(layered, Demo { threads: 8, name: "file".into(), enabled: true, ..Demo::default() });
    }

    #[test]
    fn lists_come_from_the_environment_as_toml_arrays() {
        let f = file("[demo]\npeers = [\"file:1\"]\n");
        let vars = env(&[("LLAMAREC_DEMO__PEERS", r#"["a:1", "b:2"]"#), ("LLAMAREC_DEMO__NAME", "[not] a list")]);
        let demo = ConfigLayers::load_with_env(Some(f.path()), vars).unwrap().section::<Demo>().unwrap();
        assert_eq!(demo.peers, vec!["a:1".to_string(), "b:2".to_string()]);
        assert_eq!(demo.name, "[not] a list");
        let err = ConfigLayers::load_with_env(None, env(&[("LLAMAREC_DEMO__PEERS", "[a:1]")])).unwrap_err().to_string();
        assert!(err.contains("LLAMAREC_"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = ConfigLayers::load_with_env(None, env(&[("LLAMAREC_DEMO__THREADS", "many")])).unwrap().section::<Demo>().unwrap_err();
        assert!(err.to_string().contains("`demo.threads`"), "{err}");
    }

    #[test]
    fn out_of_range_names_the_key_and_reason() {
        let f = file("[demo]\nthreads = 0\n");
        let err = ConfigLayers::load_with_env(Some(f.path()), env(&[])).unwrap().section::<Demo>().unwrap_err().to_string();
        assert!(err.contains("demo.threads") && err.contains("at least 1"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let f = file("[demo]\nthread = 3\n");
        let err = ConfigLayers::load_with_env(Some(f.path()), env(&[])).unwrap().section::<Demo>().unwrap_err().to_string();
        assert!(err.contains("unknown field `thread`"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = ConfigLayers::load_with_env(Some(Path::new("/nonexistent/x.toml")), env(&[])).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
