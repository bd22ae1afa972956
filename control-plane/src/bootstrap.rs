//! First start on an empty log: an admin API key (generated and printed once, or taken from
//! `SLUICE_BOOTSTRAP_ADMIN_KEY`) and the SLS app (registered names are the credential).

use sluice_events::{Command, Event, KeyId, Metadata, NewEvent, Policy, Role, Sha256Digest, Timestamp, handle};
use uuid::Uuid;

use crate::store::{EventStore, ExpectedVersion, StoreError};

/// Namespace for deterministic bootstrap event ids, so two instances starting together on an
/// empty log append the bootstrap once (the second append is an idempotent no-op).
const BOOTSTRAP_NS: Uuid = Uuid::from_u128(0x5c1c_e000_0000_4000_8000_0000_0000_0001);

/// What the first start did.
#[derive(Debug)]
pub enum Bootstrap {
    /// The log already had events: nothing done.
    NotNeeded,
    /// Created now. `generated` holds the secret when Sluice made it (print it once).
    Created { key_id: KeyId, generated: Option<String> },
}

/// A new API key secret: `sk` and 43 random letters and digits (256 bits), nothing else, so
/// the tools that pick a key out of SRT Live Server's output with `[A-Za-z0-9]+` get all of it.
pub fn generate_key_secret() -> String {
    use rand::Rng as _;
    let body: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(43).map(char::from).collect();
    format!("sk{body}")
}

pub async fn run(
    store: &EventStore,
    supplied: Option<&str>,
    sls_app: &sluice_events::AppName,
    now: Timestamp,
) -> Result<Bootstrap, StoreError> {
    if store.head().await? != sluice_events::Position::ZERO {
        return Ok(Bootstrap::NotNeeded);
    }
    let key_id = KeyId::parse("bootstrap-admin").map_err(|e| StoreError::InvalidAppend(e.to_string()))?;
    let (secret, generated) = match supplied {
        Some(s) => (s.to_owned(), None),
        None => {
            let s = generate_key_secret();
            (s.clone(), Some(s))
        }
    };
    let empty = sluice_events::AuthState::new();
    let key_events = handle(
        &empty,
        Command::CreateApiKey {
            key_id: key_id.clone(),
            name: "bootstrap admin".into(),
            role: Role::Admin,
            secret_sha256: Sha256Digest::of(secret.as_bytes()),
            cidrs: vec![],
            expires_at: None,
        },
        now,
    )
    .map_err(|e| StoreError::InvalidAppend(e.to_string()))?;
    let app_events = handle(&empty, Command::CreateApp { app: sls_app.clone(), policy: Policy::sls() }, now)
        .map_err(|e| StoreError::InvalidAppend(e.to_string()))?;
    let metadata = Metadata { actor: Some("bootstrap".into()), ..Metadata::default() };
    let key_result = append_fixed(store, key_events, "key", &metadata).await?;
    append_fixed(store, app_events, "app", &metadata).await?;
    if key_result { Ok(Bootstrap::Created { key_id, generated }) } else { Ok(Bootstrap::NotNeeded) }
}

/// Appends with a deterministic id; returns false when another instance got there first.
async fn append_fixed(
    store: &EventStore,
    events: Vec<Event>,
    tag: &str,
    metadata: &Metadata,
) -> Result<bool, StoreError> {
    let Some(first) = events.first() else {
        return Ok(false);
    };
    let stream = first.log_stream();
    let new: Vec<NewEvent> = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| NewEvent { event_id: Uuid::new_v5(&BOOTSTRAP_NS, format!("{tag}/{i}").as_bytes()), event })
        .collect();
    match store.append(&stream, ExpectedVersion::NoStream, new, metadata.clone()).await {
        Ok(a) => Ok(!a.duplicate),
        Err(StoreError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}
