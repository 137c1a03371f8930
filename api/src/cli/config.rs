//! Contexts: the installations the CLI talks to, in
//! `$XDG_CONFIG_HOME/drover/config.toml` (else `~/.config/drover/…`),
//! written with mode 0600. A context holds a URL and where its token is
//! (a file or an environment variable), never the token itself.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CliError;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The context commands use unless told otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// Every mutation needs `--yes` (or the context's name typed on a
    /// terminal) and a `--reason`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protected: bool,
}

/// The config file's path.
pub fn path() -> Result<PathBuf, CliError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".config"),
            None => {
                return Err(CliError::usage("neither XDG_CONFIG_HOME nor HOME is set: no place for the config file"))
            }
        },
    };
    Ok(base.join("drover").join("config.toml"))
}

impl ConfigFile {
    /// The error for a context it does not have, naming those it has.
    pub fn unknown(&self, name: &str) -> CliError {
        let known: Vec<&str> = self.contexts.keys().map(String::as_str).collect();
        CliError::usage(format!(
            "no context named {name:?} (contexts: {})",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        ))
    }

    /// The file at `path`; an empty configuration when there is none.
    pub fn load(path: &Path) -> Result<ConfigFile, CliError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| CliError::usage(format!("{} is not a valid drover config: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
            Err(e) => Err(CliError::usage(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Writes the file atomically, readable by its owner only (its
    /// directory too).
    pub fn save(&self, path: &Path) -> Result<(), CliError> {
        let io = |what: &str, e: std::io::Error| CliError::usage(format!("cannot {what} {}: {e}", path.display()));
        let dir = path.parent().ok_or_else(|| CliError::usage("the config path has no directory"))?;
        std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let text =
            toml::to_string_pretty(self).map_err(|e| CliError::usage(format!("cannot write the config: {e}")))?;
        let tmp = dir.join(format!(".config.toml.{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("write", e))?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| io("write", e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("write", e))
    }
}

/// Where a command goes, resolved.
#[derive(Debug, Clone)]
pub struct Target {
    /// The context's name (`$DROVER_URL` when none).
    pub label: String,
    pub url: String,
    pub token: Option<String>,
    pub protected: bool,
}

/// Picks the installation: the context named by `--context` or
/// `DROVER_CONTEXT`; else `DROVER_URL` (and `DROVER_TOKEN`); else the
/// current context.
pub fn resolve(file: &ConfigFile, named: Option<&str>) -> Result<Target, CliError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let named = named.map(str::to_string).or_else(|| env("DROVER_CONTEXT"));
    if named.is_none() {
        if let Some(url) = env("DROVER_URL") {
            return Ok(Target { label: "$DROVER_URL".into(), url, token: env("DROVER_TOKEN"), protected: false });
        }
    }
    let Some(name) = named.or_else(|| file.current.clone()) else {
        return Err(CliError::usage(
            "no context: add one with `drover context add NAME --url URL --token-file FILE`, \
             or set DROVER_URL (and DROVER_TOKEN)",
        ));
    };
    let Some(c) = file.contexts.get(&name) else { return Err(file.unknown(&name)) };
    let token = match (&c.token_file, &c.token_env) {
        (Some(f), _) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| {
                    CliError::usage(format!("context {name}: cannot read its token file {}: {e}", f.display()))
                })?
                .trim()
                .to_string(),
        ),
        (None, Some(var)) => Some(
            env(var)
                .ok_or_else(|| CliError::usage(format!("context {name}: its token is in ${var}, which is not set")))?,
        ),
        (None, None) => env("DROVER_TOKEN"),
    };
    Ok(Target { label: name, url: c.url.clone(), token, protected: c.protected })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover").join("config.toml");
        assert_eq!(ConfigFile::load(&path).unwrap(), ConfigFile::default(), "no file: nothing yet");
        let mut cfg = ConfigFile::default();
        cfg.contexts.insert(
            "prod".into(),
            Context { url: "https://d.example".into(), token_file: None, token_env: Some("T".into()), protected: true },
        );
        cfg.current = Some("prod".into());
        cfg.save(&path).unwrap();
        assert_eq!(ConfigFile::load(&path).unwrap(), cfg);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, "current = 3").unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a valid drover config"), "{err}");
    }
}
