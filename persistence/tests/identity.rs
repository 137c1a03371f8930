//! Conformance of the token and settings stores on both backends.

mod common;

use chrono::Utc;
use common::*;
use drover_domain::model::*;
use drover_domain::Error;
use serde_json::json;
use uuid::Uuid;

both_backends!(
    tokens_are_found_by_hash_and_revoked_once,
    setting_versions_are_append_only_and_fenced,
    reads_use_a_recent_principal_for_a_second_at_most,
    built_in_roles_of_an_earlier_version_are_brought_up_to_date,
    dashboard_sessions_end_once_and_are_swept,
    a_dashboard_session_is_its_token
);

fn token(user: Uuid, hash: &str) -> NewToken {
    NewToken {
        id: Uuid::now_v7(),
        user_id: user,
        name: "ci".into(),
        prefix: "drv_1234abcd".into(),
        hash: hash.into(),
        expires_at: None,
        created_by: "admin".into(),
        now: Utc::now(),
    }
}

async fn tokens_are_found_by_hash_and_revoked_once(s: Stores) {
    let user = cluster(&s.store, "someone").await; // any resource row will do as the owner
    let t = s.tokens.insert_token(&token(user.id, "h1")).await.unwrap();
    assert_eq!(s.tokens.token_by_hash("h1").await.unwrap().unwrap().id, t.id);
    assert!(s.tokens.token_by_hash("h2").await.unwrap().is_none());
    let dup = s.tokens.insert_token(&token(user.id, "h1")).await;
    assert!(dup.is_err(), "hashes are unique");
    s.tokens.touch_token(t.id, Utc::now()).await.unwrap();
    assert!(s.tokens.list_tokens(user.id).await.unwrap()[0].last_used_at.is_some());
    let first = s.tokens.revoke_token(user.id, t.id, "alice", Utc::now()).await.unwrap().unwrap();
    let again = s.tokens.revoke_token(user.id, t.id, "bob", Utc::now()).await.unwrap().unwrap();
    assert_eq!((first.revoked_by.as_deref(), again.revoked_by.as_deref()), (Some("alice"), Some("alice")));
    assert_eq!(first.revoked_at, again.revoked_at);
    assert!(s.tokens.revoke_token(Uuid::now_v7(), t.id, "x", Utc::now()).await.unwrap().is_none(), "only the owner's");
}

fn version(scope: &str, key: &str, version: i64, value: Option<&str>) -> NewSettingVersion {
    NewSettingVersion {
        id: Uuid::now_v7(),
        scope: scope.into(),
        key: key.into(),
        version,
        value: value.map(str::to_string),
        sealed: None,
        secret: false,
        deleted: value.is_none(),
        actor: "alice".into(),
        reason: Some("test".into()),
        now: Utc::now(),
    }
}

async fn setting_versions_are_append_only_and_fenced(s: Stores) {
    let st = &s.settings;
    st.insert_setting(&version("global", "A", 1, Some("1"))).await.unwrap();
    st.insert_setting(&version("global", "A", 2, Some("2"))).await.unwrap();
    st.insert_setting(&version("global", "B", 1, Some("b"))).await.unwrap();
    st.insert_setting(&version("environment:qa", "A", 1, Some("qa"))).await.unwrap();
    st.insert_setting(&version("global", "B", 2, None)).await.unwrap();
    // A writer that read version 1 loses to the one that wrote 2.
    let late = st.insert_setting(&version("global", "A", 2, Some("late"))).await;
    assert!(matches!(late, Err(Error::VersionMismatch { expected: 1, current: 2 })), "{late:?}");
    assert_eq!(st.setting("global", "A", None).await.unwrap().unwrap().value.as_deref(), Some("2"));
    assert_eq!(st.setting("global", "A", Some(1)).await.unwrap().unwrap().value.as_deref(), Some("1"));
    let history: Vec<_> = st.setting_history("global", "A").await.unwrap().into_iter().map(|v| v.version).collect();
    assert_eq!(history, [1, 2]);
    let current = st.current_settings(&["global".into(), "environment:qa".into()]).await.unwrap();
    let got: Vec<_> = current.iter().map(|v| (v.scope.as_str(), v.key.as_str(), v.version, v.deleted)).collect();
    assert_eq!(got, [("environment:qa", "A", 1, false), ("global", "A", 2, false), ("global", "B", 2, true)]);
}

/// A revocation made elsewhere (another replica: this process is not told)
/// reaches reads within `RECENT_FOR`, and at once once this process forgets.
async fn reads_use_a_recent_principal_for_a_second_at_most(s: Stores) {
    use drover_domain::auth::{Auth, RECENT_FOR};
    assert!(RECENT_FOR <= std::time::Duration::from_secs(1), "the promise: revoked elsewhere, refused within 1 s");
    let auth = Auth::new(s.store.clone(), s.tokens.clone());
    let token = auth.bootstrap(None).await.unwrap().expect("a new installation's token");
    let me = auth.authenticate_read(&token).await.unwrap();
    assert_eq!(me.user, "admin");
    let admin = me.user_id;
    s.tokens.revoke_token(admin, me.token_id, "elsewhere", Utc::now()).await.unwrap().unwrap();
    // Writes never use what was remembered.
    assert!(matches!(auth.authenticate(&token).await, Err(Error::Unauthenticated(_))));
    // Reads may, for a moment (the revocation happened behind its back).
    assert_eq!(auth.authenticate_read(&token).await.unwrap(), me);
    auth.forget_recent();
    assert!(matches!(auth.authenticate_read(&token).await, Err(Error::Unauthenticated(_))));

    // And without being told: a second token, seen, revoked elsewhere, and
    // refused once RECENT_FOR has passed.
    let (_, second) = auth.create_token("admin", "second", None, "admin").await.unwrap();
    let p = auth.authenticate_read(&second).await.unwrap();
    s.tokens.revoke_token(admin, p.token_id, "elsewhere", Utc::now()).await.unwrap().unwrap();
    tokio::time::sleep(RECENT_FOR + std::time::Duration::from_millis(100)).await;
    assert!(matches!(auth.authenticate_read(&second).await, Err(Error::Unauthenticated(_))));
}

/// An installation bootstrapped by an earlier version has its built-in
/// roles without the permissions added since (`metrics:read`); the next
/// start adds them.
async fn built_in_roles_of_an_earlier_version_are_brought_up_to_date(s: Stores) {
    use drover_domain::auth::Auth;
    let old = json!({"permissions": ["image:read", "cluster:read", "transitions:read", "kinds:read", "settings:read"],
        "description": "Reads everything but secrets."});
    s.store
        .insert_resource(&NewResource {
            id: Uuid::now_v7(),
            kind: drover_domain::kinds::role::KIND,
            name: "viewer".into(),
            state: drover_domain::kinds::role::KIND.initial_state().into(),
            spec: drover_domain::kinds::role::KIND.validate_spec(&old).unwrap(),
            actor: "drover".into(),
            reason: None,
            applied: false,
            now: Utc::now(),
        })
        .await
        .unwrap();
    let auth = Auth::new(s.store.clone(), s.tokens.clone());
    auth.bootstrap(None).await.unwrap();
    let viewer = s
        .store
        .get_resource(drover_domain::kinds::role::KIND, &ResourceKey::Name("viewer".into()))
        .await
        .unwrap()
        .unwrap();
    let perms: Vec<&str> = viewer.spec["permissions"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(perms.contains(&"metrics:read"), "{perms:?}");
    assert_eq!((viewer.version, viewer.updated_by.as_str()), (2, "drover"));
    // Up to date: a second start changes nothing.
    auth.bootstrap(None).await.unwrap();
    let again = s
        .store
        .get_resource(drover_domain::kinds::role::KIND, &ResourceKey::Name("viewer".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.version, 2);
}

/// A dashboard session is found by its hash and names its token; ending it
/// twice keeps the first end; the sweep removes only what expired or ended
/// before its cut-off.
async fn dashboard_sessions_end_once_and_are_swept(stores: Stores) {
    use chrono::SubsecRound;
    let tokens = stores.tokens.clone();
    let owner = cluster(&stores.store, "session-owner").await;
    let now = Utc::now().trunc_subsecs(3);
    let token = tokens.insert_token(&token(owner.id, "browser")).await.unwrap();
    assert_eq!(tokens.token_by_id(token.id).await.unwrap().map(|t| t.id), Some(token.id));
    assert!(tokens.token_by_id(Uuid::now_v7()).await.unwrap().is_none());
    let hour = chrono::Duration::hours(1);
    let session = |hash: &str, expires_at| Session {
        hash: hash.into(),
        token_id: token.id,
        created_at: now,
        expires_at,
        last_seen_at: now,
        ended_at: None,
    };
    tokens.insert_session(&session("live", now + hour)).await.unwrap();
    tokens.insert_session(&session("old", now - hour * 25)).await.unwrap();
    assert_eq!(tokens.session_by_hash("live").await.unwrap(), Some(session("live", now + hour)));
    assert!(tokens.session_by_hash("nothing").await.unwrap().is_none());
    tokens.touch_session("live", now + chrono::Duration::minutes(5)).await.unwrap();
    tokens.end_session("live", now + chrono::Duration::minutes(10)).await.unwrap();
    tokens.end_session("live", now + chrono::Duration::minutes(20)).await.unwrap();
    let live = tokens.session_by_hash("live").await.unwrap().unwrap();
    assert_eq!(live.last_seen_at, now + chrono::Duration::minutes(5));
    assert_eq!(live.ended_at, Some(now + chrono::Duration::minutes(10)), "the first end stands");
    assert_eq!(tokens.sweep_sessions(now - hour * 24).await.unwrap(), 1, "only the one that expired a day ago");
    assert!(tokens.session_by_hash("old").await.unwrap().is_none());
    assert!(tokens.session_by_hash("live").await.unwrap().is_some());
}

/// A session acts as the token it was signed in with: same user and
/// permissions, never outliving the token's expiry, ended by revoking the
/// token or by signing out.
async fn a_dashboard_session_is_its_token(s: Stores) {
    use drover_domain::auth::{Auth, SESSION_FOR};
    let auth = Auth::new(s.store.clone(), s.tokens.clone());
    let token = auth.bootstrap(None).await.unwrap().expect("a new installation's token");
    let me = auth.authenticate(&token).await.unwrap();
    let (secret, principal, session) = auth.sign_in(&token).await.unwrap();
    assert_eq!(principal, me);
    assert!(secret.starts_with("drs_") && secret != token);
    assert_ne!(session.hash, secret, "only the secret's hash is kept");
    assert_eq!(session.expires_at - session.created_at, SESSION_FOR);
    assert_eq!(auth.session(&secret, false).await.unwrap(), me);
    assert_eq!(auth.session(&secret, true).await.unwrap(), me);
    assert!(matches!(auth.session("drs_forged", false).await, Err(Error::Unauthenticated(_))));
    assert!(matches!(auth.sign_in("drv_forged").await, Err(Error::Unauthenticated(_))));

    // A token that expires in an hour gives a session of an hour.
    let soon = Utc::now() + chrono::Duration::hours(1);
    let (_, short) = auth.create_token("admin", "short", Some(soon), "admin").await.unwrap();
    let (short_secret, _, short_session) = auth.sign_in(&short).await.unwrap();
    assert!(short_session.expires_at <= soon);

    // Revoking the token ends its sessions; signing out ends one.
    let p = auth.authenticate(&short).await.unwrap();
    auth.revoke_token("admin", p.token_id, "admin").await.unwrap();
    assert!(matches!(auth.session(&short_secret, false).await, Err(Error::Unauthenticated(_))));
    auth.sign_out(&secret).await.unwrap();
    match auth.session(&secret, true).await {
        Err(Error::Unauthenticated(why)) => assert_eq!(why, "signed out"),
        other => panic!("a session signed out of still works: {other:?}"),
    }
    assert!(auth.authenticate(&token).await.is_ok(), "signing out leaves the token alone");
}
