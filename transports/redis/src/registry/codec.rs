//! The machine hash and the event messages: how an entry is written to and read from Redis.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use switchyard_core::{Error, MachineEntry, MachineId, Result};

/// An entry read back, with the registration sequence number that orders results.
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) entry: MachineEntry,
}

fn bad(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Decode(format!(
        "registry entry in Redis has a bad `{what}` field ({detail}); it was not written by \
         this version of Switchyard (see docs/PROTOCOL.md §14) — deregister it or fix the writer"
    ))
}

/// Decodes the fields of a machine hash (or of a `joined` event's `entry`).
pub(crate) fn entry_from_fields(mut f: HashMap<String, String>) -> Result<Stored> {
    let mut take = |k: &str| f.remove(k);
    let id = take("id").ok_or_else(|| bad("id", "missing"))?;
    let machine_type = take("type").ok_or_else(|| bad("type", "missing"))?;
    let host = take("host").ok_or_else(|| bad("host", "missing"))?;
    let process = take("process").ok_or_else(|| bad("process", "missing"))?;
    let seq = take("seq")
        .ok_or_else(|| bad("seq", "missing"))?
        .parse::<u64>()
        .map_err(|e| bad("seq", e))?;
    let context = match take("context") {
        Some(c) => Some(c.parse::<u64>().map_err(|e| bad("context", e))?),
        None => None,
    };
    let accepts: Vec<String> = match take("accepts") {
        Some(a) => serde_json::from_str(&a).map_err(|e| bad("accepts", e))?,
        None => Vec::new(),
    };
    let metadata: BTreeMap<String, String> = match take("metadata") {
        Some(m) => serde_json::from_str(&m).map_err(|e| bad("metadata", e))?,
        None => BTreeMap::new(),
    };
    let version = take("version");
    Ok(Stored {
        seq,
        entry: MachineEntry {
            id: MachineId::from(id),
            machine_type: machine_type.into(),
            host_id: host.into(),
            process_id: process.into(),
            context,
            version,
            accepts,
            metadata,
        },
    })
}

/// Decodes a flat `field, value, field, value...` list (HGETALL in a script).
pub(crate) fn entry_from_flat(flat: Vec<String>) -> Result<Stored> {
    if !flat.len().is_multiple_of(2) {
        return Err(bad("(hash)", "odd number of fields"));
    }
    let mut map = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        map.insert(k, v);
    }
    entry_from_fields(map)
}

/// Sorts by registration order and drops the sequence numbers.
pub(crate) fn in_order(mut v: Vec<Stored>) -> Vec<MachineEntry> {
    v.sort_by_key(|s| s.seq);
    v.into_iter().map(|s| s.entry).collect()
}

/// A message on the `events` channel.
#[derive(Deserialize)]
pub(crate) struct WireEvent {
    /// Format version (1).
    #[serde(default)]
    pub(crate) v: u32,
    /// `joined`, `left` or `health`.
    pub(crate) kind: String,
    /// Event sequence number: the order in which the server made the changes.
    #[serde(default)]
    pub(crate) seq: Option<u64>,
    /// For `left` and `health`.
    #[serde(default)]
    pub(crate) id: Option<String>,
    /// For `health`.
    #[serde(default)]
    pub(crate) healthy: Option<bool>,
    /// For `left`: `deregistered`, or `expired` (removed by a sweeper).
    #[serde(default)]
    pub(crate) reason: Option<String>,
    /// For `joined`: the hash fields.
    #[serde(default)]
    pub(crate) entry: Option<HashMap<String, String>>,
}

impl WireEvent {
    /// Decodes a channel message; `None` for a message this version does not understand.
    pub(crate) fn parse(bytes: &[u8]) -> Option<WireEvent> {
        serde_json::from_slice(bytes).ok()
    }
}
