//! The operator CLI (`sluice-control keys|apps|streams|tokens …`): thin calls to the REST
//! API, so an operator never needs curl and every change goes through the same commands,
//! checks and audit as any API client. The key comes from `--key` or `SLUICE_API_KEY`
//! (never echoed); the API from `--api` or `SLUICE_API_URL`.

use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct Remote {
    /// Base URL of the control plane's API.
    #[arg(long, env = "SLUICE_API_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub api: String,
    /// API key (or API JWT) to authenticate with.
    #[arg(long, env = "SLUICE_API_KEY", hide_env_values = true, global = true)]
    pub key: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Keys {
    /// Create a key; its secret is printed once.
    Create {
        /// A name for people (who or what uses the key).
        #[arg(long)]
        name: String,
        /// admin, write or read.
        #[arg(long)]
        role: String,
        /// Client CIDRs the key may be used from (repeat).
        #[arg(long = "cidr")]
        cidrs: Vec<String>,
        /// Unix seconds after which the key stops working.
        #[arg(long)]
        expires_at: Option<i64>,
    },
    /// List the keys (never their secrets).
    List,
    /// Revoke a key: it stops working at once.
    Revoke {
        /// The key's id (from `keys list`).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum Apps {
    /// Create an app (open policy unless --policy-file is given).
    Create {
        /// The app's name (letters, digits, '_', '-').
        name: String,
        /// A JSON file with the policy.
        #[arg(long)]
        policy_file: Option<std::path::PathBuf>,
    },
    /// List the apps.
    List,
    /// Show an app: its policy, streams and secrets (never their values).
    Get {
        /// The app's name.
        name: String,
    },
    /// Delete an app and everything in it (admin).
    Delete {
        /// The app's name.
        name: String,
    },
    /// Replace the policy from a JSON file.
    SetPolicy {
        /// The app's name.
        name: String,
        /// A JSON file with the policy.
        file: std::path::PathBuf,
    },
    /// Rotate the hash, jwt or webhook secret; the new secret is printed once.
    RotateSecret {
        /// The app's name.
        name: String,
        /// hash, jwt, webhook or srt_passphrase.
        kind: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum Streams {
    /// Register a stream in an app.
    Create {
        /// The app's name.
        app: String,
        /// The stream's public name (what players use).
        name: String,
        /// A secret name the publisher must use instead (a stream key).
        #[arg(long)]
        publish_name: Option<String>,
        /// A note for people.
        #[arg(long)]
        description: Option<String>,
    },
    /// List an app's streams.
    List {
        /// The app's name.
        app: String,
    },
    /// Show a stream.
    Get {
        /// The app's name.
        app: String,
        /// The stream's name.
        name: String,
    },
    /// Unregister a stream.
    Delete {
        /// The app's name.
        app: String,
        /// The stream's name.
        name: String,
    },
    /// List a stream's one-time tokens (ids and status, never the tokens).
    Tokens {
        /// The app's name.
        app: String,
        /// The stream's name.
        name: String,
    },
    /// Revoke one of a stream's one-time tokens.
    RevokeToken {
        /// The app's name.
        app: String,
        /// The stream's name.
        name: String,
        /// The token's id (from `streams tokens`).
        id: String,
    },
    /// List a stream's TOTP subscribers.
    Subscribers {
        /// The app's name.
        app: String,
        /// The stream's name.
        name: String,
    },
    /// End a stream's live sessions on every worker (all, or only publishers or players, or
    /// only those from one address). New attempts are decided as usual: revoke the
    /// credential too to keep someone out.
    Kick {
        /// The app's name.
        app: String,
        /// The name the clients used (public, publish or player name).
        name: String,
        /// Only `publish` or only `play`; both when left out.
        #[arg(long)]
        action: Option<String>,
        /// Only sessions from this address.
        #[arg(long)]
        client_ip: Option<String>,
    },
    /// Block a subscriber for a while (0 seconds unblocks).
    BlockSubscriber {
        /// The app's name.
        app: String,
        /// The stream's name.
        name: String,
        /// The subscriber's id.
        id: String,
        /// How long, in seconds.
        #[arg(long)]
        seconds: i64,
        /// Only `publish` or only `play`; both when left out.
        #[arg(long)]
        action: Option<String>,
    },
    /// Issue a one-time token (printed once, with the RTMP URL and SRT streamid).
    Token {
        /// The app's name.
        app: String,
        /// The stream's name.
        name: String,
        /// publish or play.
        #[arg(long)]
        action: String,
        /// Seconds until it expires.
        #[arg(long)]
        expires_in: Option<i64>,
    },
}

/// The audit: decisions, one at a time or by filter.
#[derive(Subcommand, Debug)]
pub enum Decisions {
    /// Decisions newest first, filtered.
    List {
        /// Only this app.
        #[arg(long)]
        app: Option<String>,
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
        /// Only from this address or CIDR.
        #[arg(long)]
        ip: Option<String>,
        /// allow or deny.
        #[arg(long)]
        outcome: Option<String>,
        /// Only this reason (e.g. token_not_found).
        #[arg(long)]
        reason: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One decision as recorded.
    Get {
        /// The decision's id.
        id: String,
    },
    /// Every decision as it reaches the log (one JSON line each), until interrupted.
    Tail {
        /// Start after this log position (0: from the beginning of the log).
        #[arg(long)]
        after: Option<u64>,
    },
}

pub fn decisions(cmd: Decisions) -> Result<Call, String> {
    use reqwest::Method as M;
    Ok(match cmd {
        Decisions::List { app, stream, ip, outcome, reason, limit } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("limit", &limit.to_string());
            for (k, v) in [("app", app), ("stream", stream), ("ip", ip), ("outcome", outcome), ("reason", reason)] {
                if let Some(v) = v {
                    query.append_pair(k, &v);
                }
            }
            (M::GET, format!("/v1/decisions?{}", query.finish()), None)
        }
        Decisions::Get { id } => (M::GET, format!("/v1/decisions/{id}"), None),
        Decisions::Tail { .. } => return Err("decisions tail streams; see `tail`".into()),
    })
}

/// Follows the log (`/v1/events/stream`, Server-Sent Events) from `after`, printing each
/// event (only those of `only` when given: their `data`) as one JSON line, until the stream
/// ends or the process is interrupted. `after: None` starts at the log's head.
pub async fn tail(remote: &Remote, after: Option<u64>, only: Option<&str>) -> Result<(), String> {
    use std::io::Write as _;
    let key = remote.key.as_deref().ok_or("no API key: pass --key or set SLUICE_API_KEY")?;
    let base = remote.api.trim_end_matches('/');
    let http = reqwest::Client::new();
    let after = match after {
        Some(a) => a,
        None => {
            let head: Value = http
                .get(format!("{base}/ready"))
                .send()
                .await
                .map_err(|e| format!("cannot reach {}: {e}", remote.api))?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            head["log_head"].as_u64().unwrap_or(0)
        }
    };
    let res = http
        .get(format!("{base}/v1/events/stream?after={after}"))
        .bearer_auth(key)
        .send()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", remote.api))?;
    if !res.status().is_success() {
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        return Err(format!("{} {}: {text}", status.as_u16(), status.canonical_reason().unwrap_or("")));
    }
    let mut res = res;
    // Bytes until a whole event is in: a character may straddle two chunks.
    let mut pending: Vec<u8> = Vec::new();
    let mut out = std::io::stdout();
    while let Some(chunk) = res.chunk().await.map_err(|e| e.to_string())? {
        pending.extend_from_slice(&chunk);
        // One SSE event ends with a blank line; its `data:` line is the event as JSON.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let raw: Vec<u8> = pending.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&raw);
            let kind = block.lines().find_map(|l| l.strip_prefix("event:")).map(str::trim);
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim) else { continue };
            if kind == Some("error") {
                return Err(format!("the log stream ended: {data}"));
            }
            let line = match only {
                Some(t) if kind != Some(t) => continue,
                Some(_) => serde_json::from_str::<Value>(data).map_or(data.to_owned(), |v| v["data"].to_string()),
                None => data.to_owned(),
            };
            writeln!(out, "{line}").and_then(|()| out.flush()).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// What to send: method, path, body.
pub type Call = (reqwest::Method, String, Option<Value>);

fn read_json(path: &std::path::Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
}

pub fn keys(cmd: Keys) -> Result<Call, String> {
    use reqwest::Method as M;
    Ok(match cmd {
        Keys::Create { name, role, cidrs, expires_at } => {
            let mut body = json!({"name": name, "role": role, "cidrs": cidrs});
            if let Some(t) = expires_at {
                body["expires_at"] = json!(t);
            }
            (M::POST, "/v1/keys".into(), Some(body))
        }
        Keys::List => (M::GET, "/v1/keys".into(), None),
        Keys::Revoke { id } => (M::DELETE, format!("/v1/keys/{id}"), None),
    })
}

pub fn apps(cmd: Apps) -> Result<Call, String> {
    use reqwest::Method as M;
    Ok(match cmd {
        Apps::Create { name, policy_file } => {
            let mut body = json!({"name": name});
            if let Some(p) = policy_file {
                body["policy"] = read_json(&p)?;
            }
            (M::POST, "/v1/apps".into(), Some(body))
        }
        Apps::List => (M::GET, "/v1/apps".into(), None),
        Apps::Get { name } => (M::GET, format!("/v1/apps/{name}"), None),
        Apps::Delete { name } => (M::DELETE, format!("/v1/apps/{name}"), None),
        Apps::SetPolicy { name, file } => (M::PUT, format!("/v1/apps/{name}/policy"), Some(read_json(&file)?)),
        Apps::RotateSecret { name, kind } => (M::POST, format!("/v1/apps/{name}/secrets/{kind}"), None),
    })
}

pub fn streams(cmd: Streams) -> Result<Call, String> {
    use reqwest::Method as M;
    Ok(match cmd {
        Streams::Create { app, name, publish_name, description } => {
            let mut body = json!({"name": name});
            if let Some(p) = publish_name {
                body["publish_name"] = json!(p);
            }
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            (M::POST, format!("/v1/apps/{app}/streams"), Some(body))
        }
        Streams::List { app } => (M::GET, format!("/v1/apps/{app}/streams?limit=1000"), None),
        Streams::Get { app, name } => (M::GET, format!("/v1/apps/{app}/streams/{name}"), None),
        Streams::Delete { app, name } => (M::DELETE, format!("/v1/apps/{app}/streams/{name}"), None),
        Streams::Tokens { app, name } => (M::GET, format!("/v1/apps/{app}/streams/{name}/tokens"), None),
        Streams::RevokeToken { app, name, id } => {
            (M::DELETE, format!("/v1/apps/{app}/streams/{name}/tokens/{id}"), None)
        }
        Streams::Subscribers { app, name } => (M::GET, format!("/v1/apps/{app}/streams/{name}/subscribers"), None),
        Streams::Kick { app, name, action, client_ip } => {
            let mut body = json!({});
            if let Some(a) = action {
                body["action"] = json!(a);
            }
            if let Some(ip) = client_ip {
                body["client_ip"] = json!(ip);
            }
            (M::POST, format!("/v1/apps/{app}/streams/{name}/kick"), Some(body))
        }
        Streams::BlockSubscriber { app, name, id, seconds, action } => {
            let mut body = json!({"seconds": seconds});
            if let Some(a) = action {
                body["action"] = json!(a);
            }
            (M::POST, format!("/v1/apps/{app}/streams/{name}/subscribers/{id}/block"), Some(body))
        }
        Streams::Token { app, name, action, expires_in } => {
            let mut body = json!({"action": action});
            if let Some(s) = expires_in {
                body["expires_in"] = json!(s);
            }
            (M::POST, format!("/v1/apps/{app}/streams/{name}/tokens"), Some(body))
        }
    })
}

/// Sends the call and prints the answer; Err carries the problem's detail.
pub async fn send(remote: &Remote, (method, path, body): Call) -> Result<(), String> {
    let key = remote.key.as_deref().ok_or("no API key: pass --key or set SLUICE_API_KEY")?;
    let url = format!("{}{path}", remote.api.trim_end_matches('/'));
    let mut req = reqwest::Client::new().request(method, &url).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.map_err(|e| format!("cannot reach {}: {e}", remote.api))?;
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    let value: Option<Value> = serde_json::from_str(&text).ok();
    if status.is_success() {
        match value {
            Some(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or(text)),
            None => println!("ok ({})", status.as_u16()),
        }
        Ok(())
    } else {
        let detail = value
            .as_ref()
            .and_then(|v| v.get("detail").or_else(|| v.get("message")))
            .and_then(Value::as_str)
            .map_or(text.clone(), str::to_owned);
        Err(format!("{} {}: {detail}", status.as_u16(), status.canonical_reason().unwrap_or("")))
    }
}
