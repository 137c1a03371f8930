//! Versioned settings, scoped global → environment → cluster.
//!
//! # Guarantees
//! - Every write (set, delete, rollback) adds an immutable version recording
//!   who, why and when; nothing is updated in place.
//! - Compare-and-set: a write that names the version it read fails with
//!   [`Error::VersionMismatch`] if another write came first.
//! - Secret values are sealed with XChaCha20-Poly1305 before they reach the
//!   store, bound to their scope, key and version (the associated data), so a
//!   ciphertext cannot be moved to another setting. They are opened only to
//!   reveal them to a caller allowed to, or to hand them to a provider.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use chrono::Utc;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::kinds::{cluster, environment, is_name};
use crate::model::*;
use crate::ports::{SettingsStore, Store};

/// Where a setting applies. Narrower scopes override wider ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Global,
    Environment(String),
    /// A cluster, by id (names can be reused after a delete).
    Cluster(Uuid),
}

impl Scope {
    /// The stored form: `global`, `environment:qa`, `cluster:<id>`.
    pub fn key(&self) -> String {
        match self {
            Scope::Global => "global".into(),
            Scope::Environment(e) => format!("environment:{e}"),
            Scope::Cluster(id) => format!("cluster:{id}"),
        }
    }
}

/// The 32-byte key that seals secret values.
pub struct SecretKey(XChaCha20Poly1305);

impl SecretKey {
    /// From 64 hex digits.
    pub fn from_hex(hex_key: &str) -> Result<SecretKey> {
        let bytes =
            hex::decode(hex_key.trim()).map_err(|_| Error::invalid("DROVER_SECRET_KEY", "must be 64 hex digits"))?;
        if bytes.len() != 32 {
            return Err(Error::invalid("DROVER_SECRET_KEY", "must be 64 hex digits (32 bytes)"));
        }
        Ok(SecretKey(XChaCha20Poly1305::new_from_slice(&bytes).expect("32-byte key")))
    }

    /// Reads the key file, creating it (mode 0600) with a new random key on
    /// first start.
    pub fn load_or_create(path: &Path) -> Result<SecretKey> {
        match std::fs::read_to_string(path) {
            Ok(k) => SecretKey::from_hex(&k),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Two v4 uuids carry 244 random bits; hashing spreads them over 32 bytes.
                let seed = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
                let key = hex::encode(sha2_256(seed.as_bytes()));
                write_private(path, &key)
                    .map_err(|e| Error::Internal(format!("cannot write key file {}: {e}", path.display())))?;
                SecretKey::from_hex(&key)
            }
            Err(e) => Err(Error::Internal(format!("cannot read key file {}: {e}", path.display()))),
        }
    }

    fn seal(&self, plaintext: &str, aad: &str) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        nonce[..16].copy_from_slice(Uuid::new_v4().as_bytes());
        nonce[16..].copy_from_slice(&Uuid::new_v4().as_bytes()[..8]);
        let ct = self
            .0
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext.as_bytes(), aad: aad.as_bytes() })
            .expect("encryption does not fail");
        [nonce.as_slice(), &ct].concat()
    }

    fn open(&self, sealed: &[u8], aad: &str) -> Result<String> {
        if sealed.len() < 24 {
            return Err(Error::Internal("sealed value is truncated".into()));
        }
        let (nonce, ct) = sealed.split_at(24);
        let pt = self.0.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: aad.as_bytes() }).map_err(|_| {
            Error::Internal("a secret setting does not open with this key (was DROVER_SECRET_KEY changed?)".into())
        })?;
        String::from_utf8(pt).map_err(|_| Error::Internal("a secret setting is not UTF-8".into()))
    }
}

fn sha2_256(b: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(b).to_vec()
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(content.as_bytes())
}

fn aad(scope: &str, key: &str, version: i64) -> String {
    format!("drover-setting\0{scope}\0{key}\0{version}")
}

/// A setting as the service hands it out: the value is there only when it
/// is not secret or was explicitly opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub version: SettingVersion,
    pub value: Option<String>,
}

/// One entry of a cluster's effective settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub key: String,
    pub scope: String,
    pub version: i64,
    pub secret: bool,
    pub value: Option<String>,
}

/// A write to a setting.
pub struct Write<'a> {
    pub value: Option<&'a str>,
    pub secret: bool,
    pub reason: Option<&'a str>,
    pub actor: &'a str,
    pub if_match: Option<i64>,
}

pub struct Settings {
    store: Arc<dyn Store>,
    settings: Arc<dyn SettingsStore>,
    key: SecretKey,
}

pub fn validate_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && key.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then_some(()).ok_or_else(|| {
        Error::invalid("key", "letters, digits and '_', not starting with a digit (it becomes an environment variable)")
    })
}

impl Settings {
    pub fn new(store: Arc<dyn Store>, settings: Arc<dyn SettingsStore>, key: SecretKey) -> Settings {
        Settings { store, settings, key }
    }

    /// Parses an API scope: `global`, `environment:NAME`, `cluster:NAME-OR-ID`.
    pub async fn scope(&self, s: &str) -> Result<Scope> {
        match s.split_once(':') {
            None if s == "global" => Ok(Scope::Global),
            Some(("environment", e)) if is_name(e) => {
                // Settings belong to environments that exist.
                let env = self.store.get_resource(environment::KIND, &ResourceKey::Name(e.into())).await?;
                match env {
                    Some(env) if env.state != environment::KIND.final_state() => Ok(Scope::Environment(e.into())),
                    _ => Err(Error::NotFound { kind: "environment", key: e.to_string() }),
                }
            }
            Some(("cluster", c)) => {
                let cluster = self
                    .store
                    .get_resource(cluster::KIND, &ResourceKey::parse(c))
                    .await?
                    .ok_or_else(|| Error::NotFound { kind: "cluster", key: c.to_string() })?;
                Ok(Scope::Cluster(cluster.id))
            }
            _ => Err(Error::invalid("scope", "global, environment:NAME or cluster:NAME")),
        }
    }

    pub async fn write(&self, scope: &Scope, key: &str, w: Write<'_>) -> Result<Setting> {
        validate_key(key)?;
        if w.reason.is_some_and(|r| r.chars().count() > 2000) {
            return Err(Error::invalid("reason", "at most 2000 characters"));
        }
        if w.value.is_some_and(|v| v.len() > 32 * 1024) {
            return Err(Error::invalid("value", "at most 32 KiB"));
        }
        let scope_key = scope.key();
        let current = self.settings.setting(&scope_key, key, None).await?;
        let current_version = current.as_ref().map_or(0, |c| c.version);
        if let Some(expected) = w.if_match {
            if expected != current_version {
                return Err(Error::VersionMismatch { expected, current: current_version });
            }
        }
        if w.value.is_none() {
            match current {
                None => return Err(Error::NotFound { kind: "setting", key: format!("{scope_key}/{key}") }),
                // Deleting what is deleted changes nothing and says so: the
                // version that deleted it, not a new one (a retried or
                // repeated delete is not an error).
                Some(c) if c.deleted => return self.shown(c, false),
                Some(_) => {}
            }
        }
        let version = current_version + 1;
        let (plain, sealed) = match (w.value, w.secret) {
            (Some(v), true) => (None, Some(self.key.seal(v, &aad(&scope_key, key, version)))),
            (Some(v), false) => (Some(v.to_string()), None),
            (None, _) => (None, None),
        };
        let new = NewSettingVersion {
            id: Uuid::now_v7(),
            scope: scope_key,
            key: key.to_string(),
            version,
            value: plain,
            sealed,
            secret: w.secret && w.value.is_some(),
            deleted: w.value.is_none(),
            actor: w.actor.to_string(),
            reason: w.reason.map(str::to_string),
            now: Utc::now(),
        };
        let saved = self.settings.insert_setting(&new).await?;
        self.shown(saved, false)
    }

    /// A version (the current one by default), opened if `reveal`.
    pub async fn get(&self, scope: &Scope, key: &str, version: Option<i64>, reveal: bool) -> Result<Setting> {
        let v = self
            .settings
            .setting(&scope.key(), key, version)
            .await?
            .filter(|v| version.is_some() || !v.deleted)
            .ok_or_else(|| {
                let key = match version {
                    Some(n) => format!("{}/{key} version {n}", scope.key()),
                    None => format!("{}/{key}", scope.key()),
                };
                Error::NotFound { kind: "setting", key }
            })?;
        self.shown(v, reveal)
    }

    pub async fn history(&self, scope: &Scope, key: &str, reveal: bool) -> Result<Vec<Setting>> {
        let versions = self.settings.setting_history(&scope.key(), key).await?;
        if versions.is_empty() {
            return Err(Error::NotFound { kind: "setting", key: format!("{}/{key}", scope.key()) });
        }
        versions.into_iter().map(|v| self.shown(v, reveal)).collect()
    }

    /// The current settings of one scope.
    pub async fn list(&self, scope: &Scope, reveal: bool) -> Result<Vec<Setting>> {
        self.list_scopes(std::slice::from_ref(scope), reveal).await
    }

    /// The current settings of several scopes, in one read.
    pub async fn list_scopes(&self, scopes: &[Scope], reveal: bool) -> Result<Vec<Setting>> {
        let keys: Vec<String> = scopes.iter().map(Scope::key).collect();
        let current = self.settings.current_settings(&keys).await?;
        current.into_iter().filter(|v| !v.deleted).map(|v| self.shown(v, reveal)).collect()
    }

    /// Writes a new version equal to an old one.
    pub async fn rollback(
        &self,
        scope: &Scope,
        key: &str,
        to: i64,
        reason: Option<&str>,
        actor: &str,
        if_match: Option<i64>,
    ) -> Result<Setting> {
        let old = self.get(scope, key, Some(to), true).await?;
        let reason = reason.map(str::to_string).unwrap_or_else(|| format!("rollback to version {to}"));
        self.write(
            scope,
            key,
            Write { value: old.value.as_deref(), secret: old.version.secret, reason: Some(&reason), actor, if_match },
        )
        .await
    }

    /// The settings a cluster gets: global, then its environment, then its
    /// own, the narrowest winning.
    pub async fn effective(&self, cluster: &Resource, reveal: bool) -> Result<Vec<Effective>> {
        let mut scopes = vec![Scope::Global.key()];
        if let Some(env) = cluster.spec.get("environment").and_then(Value::as_str) {
            scopes.push(Scope::Environment(env.into()).key());
        }
        scopes.push(Scope::Cluster(cluster.id).key());
        let current = self.settings.current_settings(&scopes).await?;
        let mut merged: BTreeMap<String, SettingVersion> = BTreeMap::new();
        for scope in &scopes {
            for v in current.iter().filter(|v| &v.scope == scope) {
                if v.deleted {
                    merged.remove(&v.key);
                } else {
                    merged.insert(v.key.clone(), v.clone());
                }
            }
        }
        merged
            .into_values()
            .map(|v| {
                let shown = self.shown(v, reveal)?;
                let v = shown.version;
                Ok(Effective { key: v.key, scope: v.scope, version: v.version, secret: v.secret, value: shown.value })
            })
            .collect()
    }

    /// What a run records of the settings it was asked with.
    pub async fn refs_for(&self, cluster: &Resource) -> Result<Value> {
        let refs: Vec<Value> = self
            .effective(cluster, false)
            .await?
            .into_iter()
            .map(|e| json!({ "scope": e.scope, "key": e.key, "version": e.version }))
            .collect();
        Ok(Value::Array(refs))
    }

    /// Opens the exact versions a run recorded, for its provider.
    pub async fn resolve(&self, refs: &Value) -> Result<BTreeMap<String, String>> {
        Ok(self.resolve_marking_secrets(refs).await?.0)
    }

    /// [`Settings::resolve`], and the values of the secret ones among them
    /// (for providers to mask in what they report).
    pub async fn resolve_marking_secrets(&self, refs: &Value) -> Result<(BTreeMap<String, String>, Vec<String>)> {
        let mut out = BTreeMap::new();
        let mut secrets = Vec::new();
        for r in refs.as_array().into_iter().flatten() {
            let (Some(scope), Some(key), Some(version)) =
                (r["scope"].as_str(), r["key"].as_str(), r["version"].as_i64())
            else {
                continue;
            };
            let v = self
                .settings
                .setting(scope, key, Some(version))
                .await?
                .ok_or_else(|| Error::Internal(format!("setting {scope}/{key} v{version} is missing")))?;
            let secret = v.secret;
            if let Some(value) = self.shown(v, true)?.value {
                if secret {
                    secrets.push(value.clone());
                }
                out.insert(key.to_string(), value);
            }
        }
        Ok((out, secrets))
    }

    fn shown(&self, v: SettingVersion, reveal: bool) -> Result<Setting> {
        let value = match (&v.value, &v.sealed) {
            (Some(plain), _) => Some(plain.clone()),
            (None, Some(sealed)) if reveal => Some(self.key.open(sealed, &aad(&v.scope, &v.key, v.version))?),
            _ => None,
        };
        Ok(Setting { version: v, value })
    }
}

/// Whether two versions hold the same value, without opening secrets: for
/// a diff that must not reveal.
pub fn same_value(a: &Setting, b: &Setting) -> Option<bool> {
    match (&a.value, &b.value) {
        (Some(x), Some(y)) => Some(x == y && a.version.secret == b.version.secret),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_binds_the_value_to_its_place() {
        let k = SecretKey::from_hex(&"11".repeat(32)).unwrap();
        let sealed = k.seal("hunter2", &aad("global", "DB_PASSWORD", 1));
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"), "ciphertext is not the plaintext");
        assert_eq!(k.open(&sealed, &aad("global", "DB_PASSWORD", 1)).unwrap(), "hunter2");
        assert!(k.open(&sealed, &aad("global", "DB_PASSWORD", 2)).is_err(), "not movable to another version");
        assert!(k.open(&sealed, &aad("global", "OTHER", 1)).is_err());
        let other = SecretKey::from_hex(&"22".repeat(32)).unwrap();
        assert!(other.open(&sealed, &aad("global", "DB_PASSWORD", 1)).is_err());
        assert_ne!(sealed, k.seal("hunter2", &aad("global", "DB_PASSWORD", 1)), "fresh nonce each time");
    }

    #[test]
    fn keys_are_environment_names() {
        assert!(validate_key("DB_URL").is_ok());
        assert!(validate_key("_x1").is_ok());
        for bad in ["", "1A", "A-B", "A.B", "A B"] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
        assert!(SecretKey::from_hex("abc").is_err());
    }

    #[test]
    fn key_file_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("drover-key-{}", Uuid::new_v4()));
        let path = dir.join("secret.key");
        let a = SecretKey::load_or_create(&path).unwrap();
        let sealed = a.seal("x", "ad");
        let b = SecretKey::load_or_create(&path).unwrap();
        assert_eq!(b.open(&sealed, "ad").unwrap(), "x");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
