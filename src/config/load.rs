//! Loading: text → [`toml::Table`] → `--set` overrides → typed [`Config`] →
//! [`Config::validate`], and the table machinery under it (parsing, dotted
//! keys, flattening, typing with the bad key named).
//!
//! Overrides are applied to the table, before typing, so that a file value
//! and an override are checked by the same code and a bad one is reported
//! under the same dotted key. A rescue's overrides (`Config::overridden`) go
//! through the same path.

use std::path::Path;

use super::Config;
use super::applicable::kind_in;
use super::model::ModelConfig;
use super::optimizer::OptimizerConfig;
use crate::error::UserError;

/// The built-in experiment that `larslab train` runs without `--config`.
pub const DEFAULT_EXPERIMENT: &str = include_str!("../../experiments/default.toml");

/// The largest config file read: a config is a page of text, and a device
/// (`/dev/zero`) or a wrong path to a data file must not be read whole.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Where config text came from, for error messages.
#[derive(Debug, Clone)]
pub enum Source<'a> {
    File(&'a Path),
    BuiltIn,
}

impl Source<'_> {
    fn describe(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::BuiltIn => "built-in config".into(),
        }
    }
}

impl Config {
    /// Reads a config file, applies `--set` overrides, fills defaults and validates.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config, UserError> {
        Self::load_layers(path, overrides, true)
    }

    /// [`Config::load`] for a run's own `config.toml` (resume, rescue,
    /// compare): its keys are what the run ran with, so keys that do not
    /// apply are not refused there (a config.toml written before they were
    /// left out holds every key); the `--set` overrides are checked as ever.
    pub fn load_run(path: &Path, overrides: &[String]) -> Result<Config, UserError> {
        Self::load_layers(Some(path), overrides, false)
    }

    fn load_layers(
        path: Option<&Path>,
        overrides: &[String],
        check_file: bool,
    ) -> Result<Config, UserError> {
        let (text, source) = match path {
            Some(path) => (read_config_text(path)?, Source::File(path)),
            None => (DEFAULT_EXPERIMENT.to_string(), Source::BuiltIn),
        };
        let mut table = parse_table(&text, &source)?;
        if !table.contains_key("name") {
            let name = match path {
                Some(path) => path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "run".into()),
                None => "default".into(),
            };
            table.insert("name".into(), toml::Value::String(name));
        }
        let file_layer = table.clone();
        let mut set_layer = toml::Table::new();
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
            apply_override(&mut set_layer, assignment)?;
        }
        let mut config = from_table(table)?;
        config.validate()?;
        // Keys the file set for the file's own kinds stay quiet when `--set`
        // switches the kind; keys `--set` gives must apply to the final kinds.
        let file_kinds = (
            kind_in(&file_layer, "optimizer").unwrap_or(OptimizerConfig::default().kind),
            kind_in(&file_layer, "model").unwrap_or(ModelConfig::default().kind),
        );
        let mut file_keys = Vec::new();
        flatten_table("", &file_layer, &mut file_keys);
        let mut set_keys = Vec::new();
        flatten_table("", &set_layer, &mut set_keys);
        file_keys.retain(|(key, _)| !set_keys.iter().any(|(k, _)| k == key));
        if check_file {
            config.check_applicable(&file_keys, Some(file_kinds))?;
        }
        config.check_applicable(&set_keys, None)?;
        config.resolve_paths()?;
        Ok(config)
    }

    /// This config with `divergence.rescue`'s overrides applied: the config of a rescue run.
    pub fn rescued(&self) -> Result<Config, UserError> {
        self.overridden(&dotted(&self.divergence.rescue), "divergence.rescue")
    }

    /// This config with dotted keys set to values (a rescue's changes), each
    /// error named under `source`.
    pub fn overridden(
        &self,
        overrides: &[(String, toml::Value)],
        source: &str,
    ) -> Result<Config, UserError> {
        let within = |e: UserError| match e {
            UserError::ConfigKey { key, message } => {
                UserError::key(format!("{source}: {key}"), message)
            }
            other => other,
        };
        let mut table = toml::Table::try_from(self).expect("a Config always serialises to a table");
        for (key, value) in overrides {
            if key.starts_with("divergence.rescue") {
                return Err(UserError::key(source, "cannot override divergence.rescue"));
            }
            set_dotted(&mut table, key, value.clone()).map_err(within)?;
        }
        let changed = from_table(table).map_err(within)?;
        changed.validate_settings().map_err(within)?;
        changed.check_applicable(overrides, None).map_err(within)?;
        Ok(changed)
    }

    /// Makes every path absolute (relative paths are taken from the current
    /// directory), so that the written `config.toml` reproduces the run from anywhere.
    fn resolve_paths(&mut self) -> Result<(), UserError> {
        let cwd = std::env::current_dir()
            .map_err(|e| UserError::Usage(format!("cannot read the current directory: {e}")))?;
        for path in [
            &mut self.data.images,
            &mut self.data.labels,
            &mut self.data.dir,
            &mut self.data.test_images,
            &mut self.data.test_labels,
            &mut self.model.init_from,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = cwd.join(&*path);
            }
        }
        Ok(())
    }
}

/// Reads a config file as UTF-8 text, at most [`MAX_CONFIG_BYTES`].
fn read_config_text(path: &Path) -> Result<String, UserError> {
    use std::io::Read;
    let fail = |message: String| UserError::ConfigFile {
        source_name: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(fail("cannot read: is a directory".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(fail(format!(
            "larger than {} MiB: not a config file",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        return Err(fail(
            "is UTF-16 text; a config must be UTF-8 (save it as UTF-8)".into(),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        fail(format!(
            "line {line}: byte 0x{:02X} is not UTF-8 (Latin-1 or another encoding?); a config must be UTF-8",
            bytes[at]
        ))
    })
}

pub(super) fn parse_table(text: &str, source: &Source) -> Result<toml::Table, UserError> {
    text.parse::<toml::Table>()
        .map_err(|e| UserError::ConfigFile {
            source_name: match e.span() {
                Some(span) => format!("{}: line {}", source.describe(), line_of(text, span.start)),
                None => source.describe(),
            },
            message: out_of_range(e.message().trim()),
        })
}

/// toml's message for an integer past 64 bits names its own i128 parse;
/// the user needs to hear that the number is too large.
fn out_of_range(message: &str) -> String {
    match message.strip_prefix("invalid type: integer `") {
        Some(rest) if rest.contains("` as i128") => format!(
            "integer {} is out of range (TOML integers are 64-bit: at most {})",
            rest.split('`').next().unwrap_or_default(),
            i64::MAX
        ),
        _ => message.to_string(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A table with its keys sorted at every level.
fn sorted(table: &toml::Table) -> toml::Table {
    let mut entries: Vec<(&String, &toml::Value)> = table.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                toml::Value::Table(inner) => toml::Value::Table(sorted(inner)),
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// Types a table, reporting the first bad value under its dotted key. The
/// free-form tables (`divergence.rescue`, `sweep.grid`) come out with their
/// keys sorted, as they always iterated (toml keeps insertion order only so
/// that `to_toml` can write the struct's order).
pub(super) fn from_table(table: toml::Table) -> Result<Config, UserError> {
    from_table_unsorted(table).map(|mut config| {
        config.divergence.rescue = sorted(&config.divergence.rescue);
        config.sweep.grid = sorted(&config.sweep.grid);
        config
    })
}

fn from_table_unsorted(table: toml::Table) -> Result<Config, UserError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().message().trim().to_string();
        // Name an unknown key itself, not only the table it sits in.
        let key = match unknown_field(&message) {
            Some(field) if path == "." => field.to_string(),
            Some(field) if !path.ends_with(field) => format!("{path}.{field}"),
            _ => path,
        };
        UserError::key(key, message)
    })
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// Every leaf of `table` as a dotted key and its value, keys sorted.
pub fn dotted(table: &toml::Table) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    flatten_table("", table, &mut out);
    out
}

/// Every leaf of `table` as a dotted key (a key may itself hold dots, e.g.
/// `"optimizer.kind"`), keys sorted at every level (the order compare's
/// columns and the hparams have always had).
pub(super) fn flatten_table(
    prefix: &str,
    table: &toml::Table,
    out: &mut Vec<(String, toml::Value)>,
) {
    let mut entries: Vec<(&String, &toml::Value)> = table.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (key, value) in entries {
        let key = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => flatten_table(&key, inner, out),
            leaf => out.push((key, leaf.clone())),
        }
    }
}

/// Parses the value of a `--set` or a grid entry: a TOML value, or a bare word taken as a string.
pub fn parse_value(text: &str) -> toml::Value {
    match format!("v = {text}").parse::<toml::Table>() {
        Ok(mut table) => table.remove("v").expect("the key was just written"),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

/// Applies one `KEY=VALUE` assignment with a dotted key to a config table.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), UserError> {
    let Some((key, value)) = assignment.split_once('=') else {
        return Err(UserError::Usage(format!(
            "--set `{assignment}`: expected KEY=VALUE, e.g. optimizer.lr=0.1"
        )));
    };
    let key = key.trim();
    if key.split('.').any(|p| p.is_empty()) {
        return Err(UserError::Usage(format!(
            "--set `{assignment}`: `{key}` is not a dotted config key"
        )));
    }
    let value = value.trim();
    let parsed = parse_value(value);
    if matches!(parsed, toml::Value::String(_)) && looks_numeric(value) {
        return Err(UserError::key(
            key,
            format!(
                "`{value}` is not a TOML number: out of range (integers are 64-bit, at most {}; floats are f64) or malformed (leading zeros); quote it for a string",
                i64::MAX
            ),
        ));
    }
    set_dotted(table, key, parsed)
}

/// Text that reads as a number (digits, an optional sign, point and exponent)
/// although TOML could not take it: a number out of range, not a word.
fn looks_numeric(text: &str) -> bool {
    static NUMBER: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"^[+-]?[0-9][0-9_]*(\.[0-9_]+)?([eE][+-]?[0-9_]+)?$")
            .expect("a valid pattern")
    });
    NUMBER.is_match(text)
}

/// Sets the value at a dotted key, creating the tables on the way.
pub(super) fn set_dotted(
    table: &mut toml::Table,
    key: &str,
    value: toml::Value,
) -> Result<(), UserError> {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().expect("split never yields nothing");
    let mut node = table;
    for (depth, part) in parents.iter().enumerate() {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(inner) => inner,
            _ => {
                return Err(UserError::key(
                    parts[..=depth].join("."),
                    "is a value, not a table of keys",
                ));
            }
        };
    }
    node.insert(last.to_string(), value);
    Ok(())
}
