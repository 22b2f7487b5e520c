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

/// The most problems collected from one section before giving up: every round removes one
/// offending key, so a section cannot take more rounds than it has keys; this bounds a value
/// that keeps failing in a way the removal does not change.
const MAX_PROBLEMS_PER_SECTION: usize = 256;

impl ConfigLayers {
    /// The top-level tables and keys present in the layers (file and environment), e.g.
    /// `["assets", "gateway", "ranker"]`, sorted: `llamarec config check` reports those no section
    /// reads.
    pub fn top_level_keys(&self) -> Result<Vec<String>, ConfigError> {
        let origin = describe(self.file.as_deref());
        let table = config::Source::collect(&self.config).map_err(|source| ConfigError::Parse { origin, source })?;
        let mut keys: Vec<String> = table.into_keys().collect();
        keys.sort();
        Ok(keys)
    }

    /// Every problem of one section at once, where [`ConfigLayers::section`] stops at the first:
    /// each unknown key (with its full dotted path), each value of the wrong type, then what
    /// `validate` finds. After each problem the offending key is dropped (so it takes its
    /// default) and the section is read again, until it reads and validates cleanly or a
    /// problem cannot be attributed to a key that is present. `validate` is usually
    /// [`Section::validate`]; a caller may pass a narrower check (e.g. one that leaves out what
    /// depends on the build rather than on the configuration). The section's value when there
    /// was no problem, else the problems sorted by key.
    pub fn check_section<T: Section>(&self, validate: impl Fn(&T) -> Result<(), (String, String)>) -> Result<T, Vec<ConfigError>> {
        let origin = describe(self.file.as_deref());
        let mut raw = match self.config.get::<config::Value>(T::NAME) {
            Ok(raw) => Some(raw),
            Err(config::ConfigError::NotFound(_)) => None,
            Err(source) => return Err(vec![ConfigError::Parse { origin, source }]),
        };
        let mut problems: Vec<ConfigError> = Vec::new();
        let invalid = |path: &[String], reason: String| ConfigError::Invalid {
            key: std::iter::once(T::NAME.to_string()).chain(path.iter().cloned()).collect::<Vec<_>>().join("."),
            reason,
            origin: origin.clone(),
        };
        while problems.len() < MAX_PROBLEMS_PER_SECTION {
            let parsed: Result<T, _> = match raw.clone() {
                Some(value) => serde_path_to_error::deserialize(value),
                None => Ok(T::default()),
            };
            let (path, reason) = match parsed {
                Err(e) => {
                    let mut path: Vec<String> = Vec::new();
                    for segment in e.path().iter() {
                        match segment {
                            serde_path_to_error::Segment::Map { key } => path.push(key.clone()),
                            // Inside a list or an enum: the whole value at the key is the problem.
                            _ => break,
                        }
                    }
                    let reason = without_key_suffix(&e.inner().to_string());
                    // serde names an unknown key in its message; the path may stop at the table
                    // that holds it: report (and drop) the key itself.
                    if let Some(field) = unknown_field(&reason) {
                        if path.last() != Some(&field) {
                            path.push(field);
                        }
                    }
                    (path, reason)
                }
                Ok(value) => match validate(&value) {
                    Ok(()) if problems.is_empty() => return Ok(value),
                    Ok(()) => break,
                    Err((key, reason)) => (key.split('.').filter(|k| !k.is_empty()).map(str::to_string).collect(), reason),
                },
            };
            let problem = invalid(&path, reason);
            let repeated = problems.iter().any(|p| p.to_string() == problem.to_string());
            if !repeated {
                problems.push(problem);
            }
            // A problem at a key that is not present (a default, or a rule between keys whose
            // other key was already dropped) cannot be cleared by dropping it: stop here.
            if repeated || !raw.as_mut().is_some_and(|r| remove_path(r, &path)) {
                break;
            }
        }
        problems.sort_by_key(|p| match p {
            ConfigError::Invalid { key, .. } => key.clone(),
            other => other.to_string(),
        });
        Err(problems)
    }
}

/// The key named by serde's "unknown field `x`, expected ..." message, if that is the message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// The `config` crate appends " for key `table`" to a value's error; the check names the full
/// key itself, so the suffix only repeats part of it.
fn without_key_suffix(message: &str) -> String {
    match message.rfind(" for key `") {
        Some(at) if message.ends_with('`') => message[..at].to_string(),
        _ => message.to_string(),
    }
}

/// Removes the value at `path` (table keys) from `value`; false when it is not there.
fn remove_path(value: &mut config::Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else { return false };
    let mut table = value;
    for key in parents {
        match &mut table.kind {
            config::ValueKind::Table(t) => match t.get_mut(key) {
                Some(child) => table = child,
                None => return false,
            },
            _ => return false,
        }
    }
    match &mut table.kind {
        config::ValueKind::Table(t) => t.remove(last).is_some(),
        _ => false,
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

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Outer {
        limit: u32,
        inner: Inner,
    }
    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        depth: u32,
    }
    impl Section for Outer {
        const NAME: &'static str = "outer";
        fn validate(&self) -> Result<(), (String, String)> {
            if self.inner.depth > self.limit {
                return Err(("inner.depth".into(), "must be at most limit".into()));
            }
            Ok(())
        }
    }

    fn problems<T: Section + std::fmt::Debug>(text: &str) -> Vec<String> {
        let f = file(text);
        let layers = ConfigLayers::load_with_env(Some(f.path()), env(&[])).unwrap();
        match layers.check_section::<T>(T::validate) {
            Ok(value) => panic!("{text:?} has problems, yet it read as {value:?}"),
            Err(problems) => problems.iter().map(|p| match p {
                ConfigError::Invalid { key, reason, .. } => format!("{key}: {reason}"),
                other => other.to_string(),
            }).collect(),
        }
    }

    #[test]
    fn check_section_reports_every_problem_not_just_the_first() {
        // Two unknown keys, a wrong type and a bad value: section() would stop at one of them.
        let found = problems::<Demo>("[demo]\nthread = 3\nnme = \"x\"\npeers = 3\nthreads = 0\n");
        let keys: Vec<&str> = found.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(keys, ["demo.nme", "demo.peers", "demo.thread", "demo.threads"], "{found:#?}");
        assert!(found[0].contains("unknown field `nme`") && found[1].contains("invalid type") && found[3].contains("at least 1"), "{found:#?}");
        let f = file("[demo]\nthread = 3\n");
        let one = ConfigLayers::load_with_env(Some(f.path()), env(&[])).unwrap().section::<Demo>().unwrap_err().to_string();
        assert!(one.contains("thread"), "section() names the same key: {one}");
    }

    #[test]
    fn check_section_names_nested_keys_and_rules_between_keys() {
        let found = problems::<Outer>("[outer]\nlimit = 1\n[outer.inner]\ndepht = 1\ndepth = 5\n");
        assert_eq!(found, ["outer.inner.depht: unknown field `depht`, expected `depth`", "outer.inner.depth: must be at most limit"]);
        // A rule broken by a default (nothing to drop) is reported once, not looped on.
        let f = file("[outer]\nlimit = 0\n[outer.inner]\ndepth = 2\n");
        let layers = ConfigLayers::load_with_env(Some(f.path()), env(&[])).unwrap();
        let strict = |o: &Outer| if o.limit == 0 { Err(("limit".to_string(), "must be at least 1".to_string())) } else { o.validate() };
        let found = layers.check_section::<Outer>(strict).unwrap_err();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].to_string().contains("outer.limit"), "{found:?}");
    }

    #[test]
    fn check_section_of_a_clean_or_absent_section_is_its_value() {
        let f = file("[demo]\nthreads = 3\n");
        let layers = ConfigLayers::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(layers.check_section::<Demo>(Demo::validate).unwrap().threads, 3);
        assert_eq!(layers.check_section::<Outer>(Outer::validate).unwrap(), Outer::default());
        assert_eq!(layers.top_level_keys().unwrap(), ["demo"]);
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = ConfigLayers::load_with_env(Some(Path::new("/nonexistent/x.toml")), env(&[])).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
