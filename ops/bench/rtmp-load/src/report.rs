//! The JSON line both loads print at the end.

use serde_json::{Value, json};

/// Per-player byte rates over `elapsed` seconds (from each player's byte count `before` and
/// `after` the window), their total and quantiles, when players were closed by the server
/// (Unix ms), and the fields of `extra`.
pub fn report(failed: u64, elapsed: f64, before: &[u64], after: &[u64], closed: Vec<u64>, extra: Value) -> Value {
    let mut rates: Vec<f64> = after.iter().zip(before).map(|(a, b)| (a - b) as f64 / elapsed).collect();
    rates.sort_by(f64::total_cmp);
    let total: f64 = rates.iter().sum();
    let at = |q: f64| rates.get(((rates.len() as f64 - 1.0) * q) as usize).copied().unwrap_or(0.0);
    let mut out = json!({
        "players": rates.len(),
        "failed": failed,
        "seconds": elapsed,
        "delivered_bits_per_sec": total * 8.0,
        "player_bytes_per_sec_min": at(0.0),
        "player_bytes_per_sec_p5": at(0.05),
        "player_bytes_per_sec_median": at(0.5),
        "closed_at_ms": closed,
    });
    if let (Some(o), Value::Object(e)) = (out.as_object_mut(), extra) {
        o.extend(e);
    }
    out["rates"] = json!(rates);
    out
}
