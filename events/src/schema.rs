//! JSON Schema of every event, generated from the types. `schemas/events.schema.json` holds
//! the committed copy; a test fails when the two drift.

use crate::event::{Event, Metadata};

/// The schema document: the tagged `Event` union plus the metadata stored beside it.
pub fn events_schema() -> serde_json::Value {
    let event = schemars::schema_for!(Event);
    let metadata = schemars::schema_for!(Metadata);
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Sluice events",
        "description": "Every event in the Sluice log: {type, data} with the metadata stored beside it. Types are never renamed; fields only grow.",
        "event_types": Event::TYPES,
        "event": event,
        "metadata": metadata,
    })
}

/// The schema as committed: pretty JSON with a trailing newline.
pub fn events_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&events_schema()).unwrap_or_default();
    s.push('\n');
    s
}
