//! Identity and access: bearer tokens, principals, permissions, and the
//! bootstrap of the first admin.
//!
//! # Guarantees
//! - Token secrets are never stored: only their SHA-256 (tokens carry 244
//!   random bits, so a fast hash is enough) and a short visible prefix.
//! - A token works only while it is unexpired, unrevoked, and its user is
//!   `active`; permissions are read from the user's roles on every request
//!   that changes anything, so disabling a user or changing a role takes
//!   effect at once for them. Reads may use what this process read of the
//!   token in the last [`RECENT_FOR`]; any change made through this process
//!   forgets that, so on one replica a revocation applies to the very next
//!   request, and on the others within two seconds.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::kinds::role::builtin_roles;
use crate::kinds::{role, user, Kind};
use crate::model::*;
use crate::ports::{Store, TokenStore};

/// Who is calling, and what they may do.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub user_id: Uuid,
    pub user: String,
    pub token_id: Uuid,
    pub permissions: Vec<String>,
}

impl Principal {
    pub fn can(&self, wanted: &str) -> bool {
        self.permissions.iter().any(|g| permits(g, wanted))
    }

    pub fn require(&self, wanted: &str) -> Result<()> {
        if self.can(wanted) {
            Ok(())
        } else {
            Err(Error::Forbidden { permission: wanted.to_string() })
        }
    }
}

pub use crate::kinds::role::{is_builtin_role, permits, valid_permission};

/// A new token: `drv_` and 64 hex digits (244 random bits).
pub fn new_token() -> String {
    format!("drv_{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// What may be shown of a token: enough to recognise it, not to use it.
pub fn token_prefix(token: &str) -> String {
    token.chars().take(12).collect()
}

pub struct Auth {
    store: Arc<dyn Store>,
    tokens: Arc<dyn TokenStore>,
    /// Principals by token hash, as read for a recent request.
    recent: Mutex<HashMap<String, (Principal, Instant)>>,
}

/// How long a read may use a principal read for an earlier request: so a
/// token revoked (or a user disabled, a role changed) through another
/// replica stops working for reads here within a second.
pub const RECENT_FOR: Duration = Duration::from_secs(1);

/// Past this many remembered tokens, forget them all rather than grow.
const RECENT_MAX: usize = 10_000;

/// The actor recorded for what drover does on its own.
pub const SYSTEM_ACTOR: &str = "drover";

impl Auth {
    pub fn new(store: Arc<dyn Store>, tokens: Arc<dyn TokenStore>) -> Auth {
        Auth { store, tokens, recent: Mutex::default() }
    }

    /// For a request that only reads: the principal read for this token
    /// within [`RECENT_FOR`], else [`Auth::authenticate`]. Three queries
    /// fewer for most of a dashboard's requests.
    pub async fn authenticate_read(&self, bearer: &str) -> Result<Principal> {
        self.remembered(hash_token(bearer), self.authenticate(bearer)).await
    }

    /// The principal remembered under `key` within [`RECENT_FOR`], else
    /// what `read` says (remembered when it is one).
    async fn remembered(&self, key: String, read: impl Future<Output = Result<Principal>>) -> Result<Principal> {
        if let Some((p, at)) = self.recent.lock().expect("not poisoned").get(&key) {
            if at.elapsed() < RECENT_FOR {
                return Ok(p.clone());
            }
        }
        let p = read.await?;
        let mut recent = self.recent.lock().expect("not poisoned");
        if recent.len() >= RECENT_MAX {
            recent.clear();
        }
        recent.insert(key, (p.clone(), Instant::now()));
        Ok(p)
    }

    /// Forgets every remembered principal: called around every request that
    /// may change tokens, users or roles.
    pub fn forget_recent(&self) {
        self.recent.lock().expect("not poisoned").clear();
    }

    pub async fn authenticate(&self, bearer: &str) -> Result<Principal> {
        let token = self
            .tokens
            .token_by_hash(&hash_token(bearer))
            .await?
            .ok_or_else(|| Error::Unauthenticated("unknown token".into()))?;
        self.principal_of(token).await
    }

    /// Who a token stands for, if it may be used now.
    async fn principal_of(&self, token: Token) -> Result<Principal> {
        let now = Utc::now();
        if token.revoked_at.is_some() {
            return Err(Error::Unauthenticated("token revoked".into()));
        }
        if token.expires_at.is_some_and(|t| t <= now) {
            return Err(Error::Unauthenticated("token expired".into()));
        }
        let user = self
            .store
            .get_resource_by_id(token.user_id)
            .await?
            .filter(|u| u.kind == user::KIND)
            .ok_or_else(|| Error::Unauthenticated("the token's user no longer exists".into()))?;
        if user.state != user::State::Active.as_str() {
            return Err(Error::Unauthenticated(format!("user {} is {}", user.name, user.state)));
        }
        // Stored specs as they are: a permission a newer version no longer
        // knows grants nothing, but does not lock its holders out.
        let spec: user::Spec = serde_json::from_value(user.spec.clone())
            .map_err(|e| Error::Internal(format!("stored spec of user {} does not read: {e}", user.name)))?;
        let mut permissions = Vec::new();
        for name in &spec.roles {
            let role = self.store.get_resource(role::KIND, &ResourceKey::Name(name.clone())).await?;
            if let Some(r) = role.filter(|r| r.state == role::State::Active.as_str()) {
                let spec: role::Spec = serde_json::from_value(r.spec.clone())
                    .map_err(|e| Error::Internal(format!("stored spec of role {} does not read: {e}", r.name)))?;
                permissions.extend(spec.permissions);
            }
        }
        if token.last_used_at.is_none_or(|t| now - t > chrono::Duration::seconds(60)) {
            // Recorded at most once a minute, so reads do not all write.
            self.tokens.touch_token(token.id, now).await?;
        }
        Ok(Principal { user_id: user.id, user: user.name, token_id: token.id, permissions })
    }

    /// Creates the built-in roles, and on an empty installation the first
    /// admin with a token: `preset` if given, else a new one, returned so
    /// that it can be shown once.
    pub async fn bootstrap(&self, preset: Option<&str>) -> Result<Option<String>> {
        for (name, description, perms) in builtin_roles() {
            let spec = serde_json::json!({ "permissions": perms, "description": description });
            self.ensure_builtin_role(name, spec).await?;
        }
        let any_user = self
            .store
            .list_resources(user::KIND, &ResourceFilter::default(), PageRequest { after: None, limit: 1 })
            .await?;
        if !any_user.is_empty() {
            return Ok(None);
        }
        if let Some(t) = preset {
            if t.len() < 32 {
                return Err(Error::invalid("DROVER_BOOTSTRAP_TOKEN", "must be at least 32 characters"));
            }
        }
        let Some(admin) =
            self.insert_if_missing(user::KIND, "admin", serde_json::json!({ "roles": ["admin"] })).await?
        else {
            return Ok(None); // another replica bootstrapped at the same moment
        };
        let secret = preset.map(str::to_string).unwrap_or_else(new_token);
        self.tokens.insert_token(&new_token_record(admin.id, "bootstrap", &secret, None, SYSTEM_ACTOR)).await?;
        Ok(if preset.is_some() { None } else { Some(secret) })
    }

    /// Creates a built-in role, or brings one an earlier version created up
    /// to this version's definition (nobody else can change them: any
    /// difference is an upgrade's, such as a permission added since).
    async fn ensure_builtin_role(&self, name: &str, spec: serde_json::Value) -> Result<()> {
        let spec = role::KIND.validate_spec(&spec)?;
        let Some(role) = self.store.get_resource(role::KIND, &ResourceKey::Name(name.into())).await? else {
            self.insert_if_missing(role::KIND, name, spec).await?;
            return Ok(());
        };
        if role.spec == spec {
            return Ok(());
        }
        let change = SpecChange {
            resource: role.id,
            from_version: role.spec_version,
            patch: crate::merge::diff(&role.spec, &spec),
            spec,
            actor: SYSTEM_ACTOR.into(),
            reason: Some(format!("built-in role brought up to drover {}", env!("CARGO_PKG_VERSION"))),
            applied: true,
            now: Utc::now(),
        };
        match self.store.update_spec(&change).await {
            // Another replica starting at the same moment got there first;
            // or a run holds the role now: the next start tries again.
            Ok(_) | Err(Error::VersionMismatch { .. } | Error::Busy { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn insert_if_missing(&self, kind: Kind, name: &str, spec: serde_json::Value) -> Result<Option<Resource>> {
        if self.store.get_resource(kind, &ResourceKey::Name(name.into())).await?.is_some() {
            return Ok(None);
        }
        let new = NewResource {
            id: Uuid::now_v7(),
            kind,
            name: name.into(),
            state: kind.initial_state().into(),
            spec: kind.validate_spec(&spec)?,
            actor: SYSTEM_ACTOR.into(),
            reason: Some("created by drover".into()),
            applied: kind.applied_on_write(),
            now: Utc::now(),
        };
        match self.store.insert_resource(&new).await {
            Ok(r) => Ok(Some(r)),
            Err(Error::AlreadyExists { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn user(&self, key: &str) -> Result<Resource> {
        self.store
            .get_resource(user::KIND, &ResourceKey::parse(key))
            .await?
            .ok_or_else(|| Error::NotFound { kind: "user", key: key.to_string() })
    }

    /// A new token for a user; the secret is returned once and never again.
    pub async fn create_token(
        &self,
        user: &str,
        name: &str,
        expires_at: Option<Time>,
        actor: &str,
    ) -> Result<(Token, String)> {
        let user = self.user(user).await?;
        if name.is_empty() || name.len() > 100 {
            return Err(Error::invalid("name", "1 to 100 characters"));
        }
        if expires_at.is_some_and(|t| t <= Utc::now()) {
            return Err(Error::invalid("expires_at", "must be in the future"));
        }
        if user.state != user::State::Active.as_str() {
            return Err(Error::UserNotActive { name: user.name, state: user.state });
        }
        let secret = new_token();
        let token = self.tokens.insert_token(&new_token_record(user.id, name, &secret, expires_at, actor)).await?;
        Ok((token, secret))
    }

    pub async fn list_tokens(&self, user: &str) -> Result<Vec<Token>> {
        let user = self.user(user).await?;
        self.tokens.list_tokens(user.id).await
    }

    pub async fn revoke_token(&self, user: &str, id: Uuid, actor: &str) -> Result<Token> {
        let user = self.user(user).await?;
        self.tokens
            .revoke_token(user.id, id, actor, Utc::now())
            .await?
            .ok_or_else(|| Error::NotFound { kind: "token", key: id.to_string() })
    }
}

/// How long a dashboard session lasts at most (its token's expiry may end
/// it sooner).
pub const SESSION_FOR: chrono::Duration = chrono::Duration::hours(12);

/// Dashboard sessions: a browser signs in with an API token and holds a
/// cookie secret instead. A session is its token: it ends when the token
/// is revoked or expires, or its user is disabled, and it has the token's
/// permissions, read the same way.
impl Auth {
    /// Signs in with an API token: a new session's cookie secret, and who.
    pub async fn sign_in(&self, bearer: &str) -> Result<(String, Principal, Session)> {
        let token = self
            .tokens
            .token_by_hash(&hash_token(bearer))
            .await?
            .ok_or_else(|| Error::Unauthenticated("unknown token".into()))?;
        let expires = token.expires_at;
        let principal = self.principal_of(token).await?;
        let secret = format!("drs_{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        let now = Utc::now();
        let session = Session {
            hash: hash_token(&secret),
            token_id: principal.token_id,
            created_at: now,
            expires_at: expires.map_or(now + SESSION_FOR, |t| t.min(now + SESSION_FOR)),
            last_seen_at: now,
            ended_at: None,
        };
        self.tokens.insert_session(&session).await?;
        // Ended and expired sessions are kept a day (for the record), then go.
        self.tokens.sweep_sessions(now - chrono::Duration::days(1)).await?;
        Ok((secret, principal, session))
    }

    /// The principal of a session's cookie secret. `reads_only`: a read may
    /// use what was read of it in the last [`RECENT_FOR`].
    pub async fn session(&self, secret: &str, reads_only: bool) -> Result<Principal> {
        let hash = hash_token(secret);
        match reads_only {
            true => self.remembered(format!("session:{hash}"), self.read_session(&hash)).await,
            false => self.read_session(&hash).await,
        }
    }

    async fn read_session(&self, hash: &str) -> Result<Principal> {
        let s =
            self.tokens.session_by_hash(hash).await?.ok_or_else(|| Error::Unauthenticated("unknown session".into()))?;
        let now = Utc::now();
        if s.ended_at.is_some() {
            return Err(Error::Unauthenticated("signed out".into()));
        }
        if s.expires_at <= now {
            return Err(Error::Unauthenticated("session expired".into()));
        }
        let token = self
            .tokens
            .token_by_id(s.token_id)
            .await?
            .ok_or_else(|| Error::Unauthenticated("the session's token no longer exists".into()))?;
        let principal = self.principal_of(token).await?;
        if now - s.last_seen_at > chrono::Duration::seconds(60) {
            self.tokens.touch_session(hash, now).await?;
        }
        Ok(principal)
    }

    /// Ends a session (signing out twice is signing out once).
    pub async fn sign_out(&self, secret: &str) -> Result<()> {
        self.forget_recent();
        self.tokens.end_session(&hash_token(secret), Utc::now()).await
    }
}

fn new_token_record(user: Uuid, name: &str, secret: &str, expires_at: Option<Time>, actor: &str) -> NewToken {
    NewToken {
        id: Uuid::now_v7(),
        user_id: user,
        name: name.to_string(),
        prefix: token_prefix(secret),
        hash: hash_token(secret),
        expires_at,
        created_by: actor.to_string(),
        now: Utc::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("drv_") && a.len() == 68);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
        assert_eq!(token_prefix(&a).len(), 12);
    }
}
