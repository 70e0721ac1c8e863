//! `--config file.toml` plus `--set key=value` overrides, one validation path: overrides edit
//! the parsed TOML table before it is deserialized into [`TrainConfig`].

use std::path::Path;

use anyhow::{Context, Result, bail};
use dpo_trainer::TrainConfig;

/// Reads `path`, applies `overrides` (`key=value`, the value parsed as TOML, else taken as a
/// string; `key=` with nothing after it removes the key, so its default applies, as TOML has
/// no null: `--set max_steps=` trains by `num_train_epochs`), and deserializes; unknown keys
/// are errors naming the key.
pub fn load(path: &Path, overrides: &[String]) -> Result<TrainConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let mut table: toml::Table = text.parse().with_context(|| format!("{}: invalid TOML", path.display()))?;
    for o in overrides {
        let (key, value) = o.split_once('=').with_context(|| format!("--set {o}: expected key=value"))?;
        let (key, value) = (key.trim().to_string(), value.trim());
        if value.is_empty() {
            table.remove(&key);
        } else {
            table.insert(key, parse_value(value));
        }
    }
    from_table(table).with_context(|| format!("{}: invalid config", path.display()))
}

/// A TOML value (`4`, `1e-3`, `true`, `"text"`), or the raw text as a string.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

pub fn from_table(table: toml::Table) -> Result<TrainConfig> {
    let cfg: TrainConfig = table.try_into()?;
    if let Err(msg) = cfg.validate() {
        bail!(msg);
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = from_table(table("model = 'm'\ntrain_file = 't'\nlearning_rat = 1e-3")).unwrap_err();
        assert!(format!("{err:#}").contains("learning_rat"), "{err:#}");
    }

    #[test]
    fn overrides_are_typed() {
        assert_eq!(parse_value("4"), toml::Value::Integer(4));
        assert_eq!(parse_value("1e-3"), toml::Value::Float(1e-3));
        assert_eq!(parse_value("true"), toml::Value::Boolean(true));
        assert_eq!(parse_value("runs/x"), toml::Value::String("runs/x".into()));
        assert_eq!(parse_value("\"cuda:1\""), toml::Value::String("cuda:1".into()));
    }

    #[test]
    fn set_overrides_file_values() {
        let dir = std::env::temp_dir().join(format!("dpo-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "model = 'm'\ntrain_file = 't'\nmax_steps = 100\n").unwrap();
        let cfg =
            load(&path, &["max_steps=4".into(), "beta=0.5".into(), "output_dir=runs/x".into()]).unwrap();
        assert_eq!((cfg.max_steps, cfg.beta), (Some(4), 0.5));
        assert_eq!(cfg.output_dir, std::path::PathBuf::from("runs/x"));
        let err = load(&path, &["max_steps=-1".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("max_steps"), "{err:#}");
        // `key=` unsets a key of the file: its default applies.
        assert_eq!(load(&path, &["max_steps=".into()]).unwrap().max_steps, None);
    }
}
