//! Upcasting: events stored in an older shape, read in today's.
//!
//! Stored events never change. Each carries the schema version its writer gave it
//! (`schemaVersion`, default 1), and an [`Upcasters`] definition says how to bring an event type
//! from version n to n + 1. The definition is data, not code, so the Rust core, the Node module
//! and the browser's wasm build run one definition and get the same events: the repository
//! applies it on every read, and `foldEvents(events, { upcasters })` in the browser.
//!
//! # The definition
//!
//! A JSON array of steps. A step names an event type and the version it starts from, and lists
//! operations that turn an event of that type and version into version + 1:
//!
//! ```json
//! [
//!   { "eventType": "entity.updated", "fromVersion": 1,
//!     "operations": [{ "op": "rename", "from": "data.title", "to": "data.name" }] },
//!   { "eventType": "entity.updated", "fromVersion": 2,
//!     "operations": [{ "op": "map", "path": "data.status", "values": { "todo": "open" } }] }
//! ]
//! ```
//!
//! A path is a dotted string rooted at `data` or `metadata` (`"data.details.title"`), or an
//! array of keys for keys that hold a dot (`["data", "a.b"]`). The operations, and why each
//! exists:
//!
//! - `rename` `{ from, to }`: a key renamed, or moved to another place (into or out of a nested
//!   object, or between `data` and `metadata`). The commonest change of all. Missing objects on
//!   the way to `to` are created; an existing value at `to` is replaced.
//! - `remove` `{ path }`: a key no longer part of the shape.
//! - `default` `{ path, value }`: a key added since; old events get `value` when the key is
//!   missing (a key present with `null` is kept).
//! - `map` `{ path, values }`: a string value renamed (an enum's member): `{ "todo": "open" }`.
//!   Values that are not strings, or not listed, are kept.
//! - `renameType` `{ to, version?, when? }`: the event becomes another type: an event type
//!   renamed, or split in two when `when` (`{ path, equals }`) picks the events that move. It
//!   continues as `to` at `version` (default: `to`'s latest version in this definition), so `to`'s
//!   own steps from there apply next.
//!
//! Every operation is total: an operation whose path does not exist, or passes through a value
//! that is not an object, leaves the event unchanged. A read never fails because of upcasting.
//!
//! A step without a `renameType` that fired delivers its event at `fromVersion + 1`. The latest
//! version of a type is 1 + its number of steps. An event stored at a version its type has no
//! step from (the latest, or newer: written by a newer writer) is delivered as stored.
//!
//! # Refused definitions
//!
//! [`Upcasters::parse`] refuses a definition with [`Error::InvalidUpcasters`] (code
//! `INVALID_UPCASTERS`), naming the step (`entity.updated@2` is the step from version 2) and
//! the [`UpcasterErrorKind`]: an unknown operation or key, a malformed one, two steps from one
//! version, a gap (a type's steps must run from version 1 without a hole, and a `renameType`
//! cannot go past its target's latest version), or a cycle (steps that could bring an event back
//! to a type and version it has been at).

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::error::{Error, Result, UpcasterErrorKind};
use crate::model::EventRecord;
use crate::validate::{check_event_type, check_not_reserved, json_integer, json_kind as kind, Limits};

/// A validated upcaster definition; see the [module documentation](self).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Upcasters {
    /// Per event type, its steps in order: index i is the step from version i + 1.
    chains: HashMap<String, Vec<Step>>,
    /// The canonical JSON text of the definition (see [`Upcasters::canonical_text`]).
    text: String,
}

#[derive(Debug, Clone, PartialEq)]
struct Step {
    operations: Vec<Operation>,
}

#[derive(Debug, Clone, PartialEq)]
enum Operation {
    Rename {
        from: Path,
        to: Path,
    },
    Remove {
        path: Path,
    },
    Default {
        path: Path,
        value: Value,
    },
    Map {
        path: Path,
        values: Map<String, Value>,
    },
    RenameType {
        to: String,
        version: i32,
        when: Option<(Path, Value)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Path {
    metadata: bool,
    keys: Vec<String>,
}

/// The parts of an event an upcaster reads and changes.
#[derive(Debug, Clone, PartialEq)]
pub struct EventShape {
    /// The event type.
    pub event_type: String,
    /// The schema version.
    pub schema_version: i32,
    /// The event's data.
    pub data: Value,
    /// The event's metadata (`None` when it has none).
    pub metadata: Option<Value>,
}

/// The largest schema version an event can carry (a PostgreSQL `integer`).
pub const MAX_SCHEMA_VERSION: i32 = i32::MAX;

impl Upcasters {
    /// No steps: every event is delivered as stored.
    pub fn none() -> Upcasters {
        Upcasters::default()
    }

    /// Reads and validates a definition (an array of steps; `null` is none). Fails with
    /// [`Error::InvalidUpcasters`].
    pub fn parse(definition: &Value) -> Result<Upcasters> {
        let steps = match definition {
            Value::Null => return Ok(Upcasters::none()),
            Value::Array(steps) => steps,
            other => {
                return Err(invalid(
                    "",
                    UpcasterErrorKind::InvalidDefinition,
                    format!("upcasters must be an array of steps, not {}", kind(other)),
                ))
            }
        };
        let mut parsed: Vec<(String, i32, Step, String)> = Vec::with_capacity(steps.len());
        for (index, raw) in steps.iter().enumerate() {
            parsed.push(parse_step(index, raw)?);
        }
        // Steps per type, in version order.
        let mut by_type: HashMap<String, Vec<(i32, Step, String)>> = HashMap::new();
        for (event_type, from, step, name) in parsed {
            by_type.entry(event_type).or_default().push((from, step, name));
        }
        let mut chains = HashMap::with_capacity(by_type.len());
        for (event_type, mut steps) in by_type {
            steps.sort_by_key(|s| s.0);
            for (i, (from, _, name)) in steps.iter().enumerate() {
                let expected = i as i32 + 1;
                if *from == expected {
                    continue;
                }
                if i > 0 && *from == steps[i - 1].0 {
                    return Err(invalid(
                        name,
                        UpcasterErrorKind::DuplicateStep,
                        format!("{name} is defined twice: a version has one step"),
                    ));
                }
                return Err(invalid(
                    name,
                    UpcasterErrorKind::Gap,
                    format!("{name} has no step before it from version {expected}: a type's steps start at version 1 and leave no version out"),
                ));
            }
            chains.insert(
                event_type,
                steps.into_iter().map(|(_, step, _)| step).collect::<Vec<_>>(),
            );
        }
        let mut upcasters = Upcasters {
            chains,
            text: String::new(),
        };
        upcasters.resolve_renames()?;
        upcasters.check_cycles()?;
        upcasters.text = upcasters.canonical();
        Ok(upcasters)
    }

    /// Whether the definition has no step.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// The latest version of an event type: 1 + its number of steps.
    pub fn latest_version(&self, event_type: &str) -> i32 {
        self.chains.get(event_type).map_or(1, |c| c.len() as i32 + 1)
    }

    /// The definition as canonical JSON text (steps sorted by type and version, paths as arrays,
    /// defaults filled in): two definitions that upcast alike in every case but the order of
    /// their steps have the same text. Snapshots are keyed by it.
    pub fn canonical_text(&self) -> &str {
        &self.text
    }

    /// Whether an event of this type stored at this version has a step to run.
    pub fn applies_to(&self, event_type: &str, schema_version: i32) -> bool {
        !self.chains.is_empty() && self.step(event_type, schema_version).is_some()
    }

    fn step(&self, event_type: &str, version: i32) -> Option<&Step> {
        let chain = self.chains.get(event_type)?;
        chain.get(usize::try_from(version).ok()?.checked_sub(1)?)
    }

    /// Runs the steps that apply to `event` until none does. Returns whether anything ran.
    /// A key an operation adds goes at the end of its object.
    pub fn upcast(&self, event: &mut EventShape) -> bool {
        self.upcast_in(event, false)
    }

    /// [`Upcasters::upcast`]; with `jsonb`, a key an operation adds goes where jsonb orders it
    /// (shorter keys first, then by bytes), so an object read back from the store stays in the
    /// order every read gives.
    fn upcast_in(&self, event: &mut EventShape, jsonb: bool) -> bool {
        let mut ran = false;
        // Validation rules out cycles; the bound keeps a read finite whatever happens.
        let mut budget: usize = self.chains.values().map(Vec::len).sum();
        while budget > 0 {
            let Some(step) = self.step(&event.event_type, event.schema_version) else {
                break;
            };
            budget -= 1;
            ran = true;
            let mut next = None;
            for operation in &step.operations {
                if let Some(to) = operation.apply(event, jsonb) {
                    next = Some(to);
                }
            }
            match next {
                Some((to, version)) => {
                    event.event_type = to;
                    event.schema_version = version;
                }
                None => event.schema_version += 1,
            }
        }
        ran
    }

    /// Upcasts a stored record in place: its type, schema version, data and metadata become the
    /// delivered ones, and [`EventRecord::upcast_from`] keeps what was stored. A record whose
    /// row could not be read back is left alone. Keys an operation adds take their place in
    /// jsonb's order, the order of every record the store reads back.
    pub fn upcast_record(&self, record: &mut EventRecord) {
        if record.unreadable.is_some() || !self.applies_to(&record.event_type, record.schema_version) {
            return;
        }
        let mut shape = EventShape {
            event_type: std::mem::take(&mut record.event_type),
            schema_version: record.schema_version,
            data: std::mem::take(&mut record.data),
            metadata: record.metadata.take(),
        };
        let stored = crate::model::StoredShape {
            event_type: shape.event_type.clone(),
            schema_version: shape.schema_version,
        };
        self.upcast_in(&mut shape, true);
        record.event_type = shape.event_type;
        record.schema_version = shape.schema_version;
        record.data = shape.data;
        record.metadata = shape.metadata;
        if record.upcast_from.is_none() {
            record.upcast_from = Some(stored);
        }
    }

    /// Upcasts an event given as JSON in the record shape (`eventType`, `schemaVersion`
    /// (default 1), `data`, `metadata`), in place. A record that says what it was stored as
    /// (`storedEventType`, `storedSchemaVersion`) keeps that; otherwise they are added when a
    /// step runs. Events without a string `eventType`, or with a `schemaVersion` that is not an
    /// integer from 1, are left as they are (a fold then reports them).
    pub fn upcast_json(&self, event: &mut Value) -> bool {
        let Value::Object(obj) = event else {
            return false;
        };
        let (Some(stored_type), Some(stored_version)) = (
            obj.get("eventType").and_then(Value::as_str),
            json_schema_version(obj.get("schemaVersion")),
        ) else {
            return false;
        };
        if !self.applies_to(stored_type, stored_version) {
            return false;
        }
        let stored_type = stored_type.to_owned();
        self.upcast_fields(obj);
        if !obj.contains_key("storedSchemaVersion") {
            obj.insert("storedSchemaVersion".into(), Value::from(stored_version));
        }
        if obj.get("eventType").and_then(Value::as_str) != Some(stored_type.as_str())
            && !obj.contains_key("storedEventType")
        {
            obj.insert("storedEventType".into(), Value::String(stored_type));
        }
        true
    }

    /// Upcasts an event given as JSON in the record shape in place, adding nothing: its own
    /// slots take the delivered type, version, data and metadata (a missing `metadata` is added
    /// only when an operation writes to it). What a fold needs, and the core of
    /// [`Upcasters::upcast_json`].
    pub(crate) fn upcast_fields(&self, obj: &mut Map<String, Value>) {
        let Some(version) = json_schema_version(obj.get("schemaVersion")) else {
            return;
        };
        let Some(Value::String(slot)) = obj.get_mut("eventType") else {
            return;
        };
        if !self.applies_to(slot, version) {
            return;
        }
        let event_type = std::mem::take(slot);
        let take = |obj: &mut Map<String, Value>, key: &str| obj.get_mut(key).map(std::mem::take);
        let mut shape = EventShape {
            event_type,
            schema_version: version,
            data: take(obj, "data").unwrap_or(Value::Null),
            metadata: take(obj, "metadata").filter(|m| !m.is_null()),
        };
        self.upcast(&mut shape);
        let mut put = |key: &str, value: Value| match obj.get_mut(key) {
            Some(slot) => *slot = value,
            None => {
                obj.insert(key.to_owned(), value);
            }
        };
        put("eventType", Value::String(shape.event_type));
        put("schemaVersion", Value::from(shape.schema_version));
        put("data", shape.data);
        if let Some(m) = shape.metadata {
            put("metadata", m);
        }
    }

    /// Fills in each `renameType`'s default version and checks explicit ones.
    fn resolve_renames(&mut self) -> Result<()> {
        let latest: HashMap<String, i32> = self
            .chains
            .iter()
            .map(|(t, c)| (t.clone(), c.len() as i32 + 1))
            .collect();
        for (event_type, chain) in &mut self.chains {
            for (i, step) in chain.iter_mut().enumerate() {
                let name = step_name(event_type, i as i32 + 1);
                for operation in &mut step.operations {
                    if let Operation::RenameType { to, version, .. } = operation {
                        let to_latest = latest.get(to.as_str()).copied().unwrap_or(1);
                        if *version == 0 {
                            *version = to_latest;
                        } else if *version > to_latest {
                            return Err(invalid(
                                &name,
                                UpcasterErrorKind::Gap,
                                format!(
                                    "{name} renames the event to {to} at version {version}, but {to}'s latest version in this definition is {to_latest}"
                                ),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses steps that could bring an event back to a type and version it has been at.
    fn check_cycles(&self) -> Result<()> {
        // Depth-first search over (type, version) nodes that have a step.
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Open,
            Done,
        }
        let mut marks: HashMap<(&str, i32), Mark> = HashMap::new();
        let mut types: Vec<&String> = self.chains.keys().collect();
        types.sort();
        for event_type in types {
            for start in 1..=self.chains[event_type].len() as i32 {
                if marks.contains_key(&(event_type.as_str(), start)) {
                    continue;
                }
                // An explicit stack of (node, next edge index).
                let mut stack: Vec<((&str, i32), usize)> = vec![((event_type.as_str(), start), 0)];
                marks.insert((event_type.as_str(), start), Mark::Open);
                while let Some(&mut ((t, v), ref mut edge)) = stack.last_mut() {
                    let edges = self.edges(t, v);
                    if *edge >= edges.len() {
                        marks.insert((t, v), Mark::Done);
                        stack.pop();
                        continue;
                    }
                    let next = edges[*edge];
                    *edge += 1;
                    if self.step(next.0, next.1).is_none() {
                        continue;
                    }
                    match marks.get(&next) {
                        Some(Mark::Open) => {
                            let name = step_name(t, v);
                            return Err(invalid(
                                &name,
                                UpcasterErrorKind::Cycle,
                                format!(
                                    "{name} can bring an event back to {}@{}, where it has been: the steps would never end",
                                    next.0, next.1
                                ),
                            ));
                        }
                        Some(Mark::Done) => {}
                        None => {
                            marks.insert(next, Mark::Open);
                            stack.push((next, 0));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Where the step from (type, version) can take an event.
    fn edges<'a>(&'a self, event_type: &'a str, version: i32) -> Vec<(&'a str, i32)> {
        let Some(step) = self.step(event_type, version) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut unconditional_rename = false;
        for operation in &step.operations {
            if let Operation::RenameType { to, version, when } = operation {
                out.push((to.as_str(), *version));
                unconditional_rename |= when.is_none();
            }
        }
        if !unconditional_rename {
            out.push((event_type, version + 1));
        }
        out
    }

    fn canonical(&self) -> String {
        let mut types: Vec<&String> = self.chains.keys().collect();
        types.sort();
        let mut steps = Vec::new();
        for event_type in types {
            for (i, step) in self.chains[event_type].iter().enumerate() {
                let operations: Vec<Value> = step.operations.iter().map(Operation::to_json).collect();
                steps.push(serde_json::json!({
                    "eventType": event_type,
                    "fromVersion": i + 1,
                    "operations": operations,
                }));
            }
        }
        Value::Array(steps).to_string()
    }
}

/// `entity.updated@2`: the step of `entity.updated` from version 2.
fn step_name(event_type: &str, from: i32) -> String {
    format!("{event_type}@{from}")
}

fn invalid(step: &str, reason: UpcasterErrorKind, message: String) -> Error {
    Error::InvalidUpcasters {
        step: step.to_owned(),
        reason,
        message,
    }
}

/// A `schemaVersion` as JSON gives it: absent or null is 1.
pub fn json_schema_version(value: Option<&Value>) -> Option<i32> {
    match value {
        None | Some(Value::Null) => Some(1),
        Some(Value::Number(n)) => json_integer(n).and_then(|v| i32::try_from(v).ok()).filter(|v| *v >= 1),
        Some(_) => None,
    }
}

fn parse_step(index: usize, raw: &Value) -> Result<(String, i32, Step, String)> {
    let here = format!("upcasters[{index}]");
    let Value::Object(obj) = raw else {
        return Err(invalid(
            &here,
            UpcasterErrorKind::InvalidDefinition,
            format!(
                "{here} must be an object {{ eventType, fromVersion, operations }}, not {}",
                kind(raw)
            ),
        ));
    };
    let event_type = match obj.get("eventType") {
        Some(Value::String(s)) => s.clone(),
        other => {
            return Err(invalid(
                &here,
                UpcasterErrorKind::InvalidDefinition,
                format!("{here}.eventType must be an event type, not {}", describe(other)),
            ))
        }
    };
    if let Err(issue) = check_event_type(&event_type, &Limits::default()).and_then(|()| check_not_reserved(&event_type))
    {
        return Err(invalid(
            &here,
            UpcasterErrorKind::InvalidDefinition,
            format!("{here}.eventType: {}", issue.message),
        ));
    }
    let from = match obj.get("fromVersion").and_then(Value::as_i64) {
        Some(v) if (1..i64::from(MAX_SCHEMA_VERSION)).contains(&v) => v as i32,
        _ => {
            return Err(invalid(
                &here,
                UpcasterErrorKind::InvalidDefinition,
                format!(
                    "{here}.fromVersion must be an integer from 1 to 2147483646, not {}",
                    describe(obj.get("fromVersion"))
                ),
            ))
        }
    };
    let name = step_name(&event_type, from);
    for key in obj.keys() {
        if !["eventType", "fromVersion", "operations"].contains(&key.as_str()) {
            return Err(invalid(
                &name,
                UpcasterErrorKind::InvalidDefinition,
                format!("{name} has an unknown key \"{key}\" (a step has eventType, fromVersion and operations)"),
            ));
        }
    }
    let Some(Value::Array(raw_ops)) = obj.get("operations") else {
        return Err(invalid(
            &name,
            UpcasterErrorKind::InvalidDefinition,
            format!(
                "{name}.operations must be an array, not {}",
                describe(obj.get("operations"))
            ),
        ));
    };
    let mut operations = Vec::with_capacity(raw_ops.len());
    for (i, raw_op) in raw_ops.iter().enumerate() {
        operations.push(parse_operation(&name, i, raw_op)?);
    }
    Ok((event_type, from, Step { operations }, name))
}

fn parse_operation(name: &str, index: usize, raw: &Value) -> Result<Operation> {
    let at = format!("{name} operation {index}");
    let bad = |message: String| invalid(name, UpcasterErrorKind::InvalidOperation, format!("{at}: {message}"));
    let Value::Object(obj) = raw else {
        return Err(bad(format!("an operation must be an object, not {}", kind(raw))));
    };
    let op = match obj.get("op") {
        Some(Value::String(s)) => s.as_str(),
        other => return Err(bad(format!("op must be a string, not {}", describe(other)))),
    };
    let keys: &[&str] = match op {
        "rename" => &["op", "from", "to"],
        "remove" => &["op", "path"],
        "default" => &["op", "path", "value"],
        "map" => &["op", "path", "values"],
        "renameType" => &["op", "to", "version", "when"],
        other => {
            return Err(invalid(
                name,
                UpcasterErrorKind::UnknownOperation,
                format!("{at}: unknown op \"{other}\" (rename, remove, default, map or renameType)"),
            ))
        }
    };
    for key in obj.keys() {
        if !keys.contains(&key.as_str()) {
            return Err(bad(format!(
                "{op} has no key \"{key}\" (it takes {})",
                keys[1..].join(", ")
            )));
        }
    }
    let path = |key: &str| -> Result<Path> { parse_path(obj.get(key)).map_err(|m| bad(format!("{op}.{key} {m}"))) };
    Ok(match op {
        "rename" => {
            let from = path("from")?;
            let to = path("to")?;
            let (shorter, longer) = if from.keys.len() <= to.keys.len() {
                (&from, &to)
            } else {
                (&to, &from)
            };
            if shorter.metadata == longer.metadata && longer.keys.starts_with(&shorter.keys) {
                return Err(bad(
                    "from and to must not be the same key, nor one inside the other".to_owned()
                ));
            }
            Operation::Rename { from, to }
        }
        "remove" => Operation::Remove { path: path("path")? },
        "default" => Operation::Default {
            path: path("path")?,
            value: obj
                .get("value")
                .cloned()
                .ok_or_else(|| bad("default.value is missing".to_owned()))?,
        },
        "map" => Operation::Map {
            path: path("path")?,
            values: match obj.get("values") {
                Some(Value::Object(m)) if !m.is_empty() => m.clone(),
                other => {
                    return Err(bad(format!(
                        "map.values must be an object of old string values to new values, not {}",
                        describe(other)
                    )))
                }
            },
        },
        _ => {
            let to = match obj.get("to") {
                Some(Value::String(s)) => s.clone(),
                other => {
                    return Err(bad(format!(
                        "renameType.to must be an event type, not {}",
                        describe(other)
                    )))
                }
            };
            if let Err(issue) = check_event_type(&to, &Limits::default()).and_then(|()| check_not_reserved(&to)) {
                return Err(bad(format!("renameType.to: {}", issue.message)));
            }
            let version = match obj.get("version") {
                None | Some(Value::Null) => 0,
                Some(v) => match v.as_i64() {
                    Some(n) if (1..=i64::from(MAX_SCHEMA_VERSION)).contains(&n) => n as i32,
                    _ => {
                        return Err(bad(format!(
                            "renameType.version must be an integer from 1, not {}",
                            describe(Some(v))
                        )))
                    }
                },
            };
            let when = match obj.get("when") {
                None | Some(Value::Null) => None,
                Some(Value::Object(w)) => {
                    if let Some(key) = w.keys().find(|k| !["path", "equals"].contains(&k.as_str())) {
                        return Err(bad(format!(
                            "renameType.when has no key \"{key}\" (it takes path, equals)"
                        )));
                    }
                    let path = parse_path(w.get("path")).map_err(|m| bad(format!("renameType.when.path {m}")))?;
                    let equals = w
                        .get("equals")
                        .cloned()
                        .ok_or_else(|| bad("renameType.when.equals is missing".to_owned()))?;
                    Some((path, equals))
                }
                Some(other) => {
                    return Err(bad(format!(
                        "renameType.when must be an object {{ path, equals }}, not {}",
                        kind(other)
                    )))
                }
            };
            Operation::RenameType { to, version, when }
        }
    })
}

/// A path: `"data.a.b"` or `["data", "a", "b"]`, rooted at `data` or `metadata`, with at least
/// one key below the root.
fn parse_path(value: Option<&Value>) -> std::result::Result<Path, String> {
    let keys: Vec<String> = match value {
        Some(Value::String(s)) => s.split('.').map(str::to_owned).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|k| k.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "must be an array of strings".to_owned())?,
        other => {
            return Err(format!(
                "must be a path such as \"data.title\" or [\"data\", \"title\"], not {}",
                describe(other)
            ))
        }
    };
    let (root, rest) = keys.split_first().ok_or_else(|| "must not be empty".to_owned())?;
    let metadata = match root.as_str() {
        "data" => false,
        "metadata" => true,
        other => return Err(format!("must start at data or metadata, not \"{other}\"")),
    };
    if rest.is_empty() {
        return Err("must name a key inside data or metadata, not the whole of it".to_owned());
    }
    if rest.iter().any(String::is_empty) {
        return Err("has an empty key".to_owned());
    }
    Ok(Path {
        metadata,
        keys: rest.to_vec(),
    })
}

impl Path {
    fn to_json(&self) -> Value {
        let mut keys = vec![Value::from(if self.metadata { "metadata" } else { "data" })];
        keys.extend(self.keys.iter().map(|k| Value::from(k.as_str())));
        Value::Array(keys)
    }

    fn root<'a>(&self, event: &'a EventShape) -> Option<&'a Value> {
        if self.metadata {
            event.metadata.as_ref()
        } else {
            Some(&event.data)
        }
    }

    fn get<'a>(&self, event: &'a EventShape) -> Option<&'a Value> {
        let mut at = self.root(event)?;
        for key in &self.keys {
            at = at.as_object()?.get(key)?;
        }
        Some(at)
    }

    /// The object that holds the last key, if every object on the way exists.
    fn parent_mut<'a>(&self, event: &'a mut EventShape) -> Option<&'a mut Map<String, Value>> {
        let mut at = if self.metadata {
            event.metadata.as_mut()?
        } else {
            &mut event.data
        };
        for key in &self.keys[..self.keys.len() - 1] {
            at = at.as_object_mut()?.get_mut(key)?;
        }
        at.as_object_mut()
    }

    /// Whether a value could be put at this path: every existing value on the way is an object.
    fn placeable(&self, event: &EventShape) -> bool {
        let mut at = match self.root(event) {
            Some(v) => v,
            None => return self.metadata,
        };
        for key in &self.keys[..self.keys.len() - 1] {
            match at {
                Value::Object(m) => match m.get(key) {
                    Some(next) => at = next,
                    None => return true,
                },
                _ => return false,
            }
        }
        at.is_object()
    }

    /// Puts a value here, creating the objects on the way; false (and nothing changed) when a
    /// value on the way is not an object.
    fn put(&self, event: &mut EventShape, value: Value, jsonb: bool) -> bool {
        if !self.placeable(event) {
            return false;
        }
        let mut at = if self.metadata {
            event.metadata.get_or_insert_with(|| Value::Object(Map::new()))
        } else {
            &mut event.data
        };
        for key in &self.keys[..self.keys.len() - 1] {
            let Value::Object(m) = at else { return false };
            if !m.contains_key(key) {
                insert(m, key, Value::Object(Map::new()), jsonb);
            }
            at = m.get_mut(key).expect("just inserted");
        }
        let Value::Object(m) = at else { return false };
        insert(m, self.last(), value, jsonb);
        true
    }

    fn last(&self) -> &str {
        &self.keys[self.keys.len() - 1]
    }
}

/// Inserts or replaces `key`; a new key goes at the end, or with `jsonb` where jsonb orders it.
fn insert(map: &mut Map<String, Value>, key: &str, value: Value, jsonb: bool) {
    if let Some(slot) = map.get_mut(key) {
        *slot = value;
    } else if jsonb {
        let at = map
            .keys()
            .position(|k| (k.len(), k.as_str()) > (key.len(), key))
            .unwrap_or(map.len());
        map.shift_insert(at, key.to_owned(), value);
    } else {
        map.insert(key.to_owned(), value);
    }
}

impl Operation {
    /// Applies the operation; a `renameType` that fires returns the type and version the event
    /// continues as.
    fn apply(&self, event: &mut EventShape, jsonb: bool) -> Option<(String, i32)> {
        match self {
            Operation::Rename { from, to } => {
                if from.get(event).is_some() && to.placeable(event) {
                    let value = from.parent_mut(event).and_then(|m| m.shift_remove(from.last()));
                    if let Some(value) = value {
                        to.put(event, value, jsonb);
                    }
                }
            }
            Operation::Remove { path } => {
                if let Some(m) = path.parent_mut(event) {
                    m.shift_remove(path.last());
                }
            }
            Operation::Default { path, value } => {
                if path.get(event).is_none() {
                    path.put(event, value.clone(), jsonb);
                }
            }
            Operation::Map { path, values } => {
                if let Some(m) = path.parent_mut(event) {
                    if let Some(slot) = m.get_mut(path.last()) {
                        if let Some(new) = slot.as_str().and_then(|s| values.get(s)) {
                            *slot = new.clone();
                        }
                    }
                }
            }
            Operation::RenameType { to, version, when } => {
                let fires = match when {
                    None => true,
                    Some((path, equals)) => path.get(event) == Some(equals),
                };
                if fires {
                    return Some((to.clone(), *version));
                }
            }
        }
        None
    }

    fn to_json(&self) -> Value {
        use serde_json::json;
        match self {
            Operation::Rename { from, to } => json!({ "op": "rename", "from": from.to_json(), "to": to.to_json() }),
            Operation::Remove { path } => json!({ "op": "remove", "path": path.to_json() }),
            Operation::Default { path, value } => json!({ "op": "default", "path": path.to_json(), "value": value }),
            Operation::Map { path, values } => json!({ "op": "map", "path": path.to_json(), "values": values }),
            Operation::RenameType { to, version, when } => match when {
                None => json!({ "op": "renameType", "to": to, "version": version }),
                Some((path, equals)) => json!({
                    "op": "renameType", "to": to, "version": version,
                    "when": { "path": path.to_json(), "equals": equals },
                }),
            },
        }
    }
}

fn describe(v: Option<&Value>) -> String {
    match v {
        None => "missing".to_owned(),
        Some(v) => {
            let text = v.to_string();
            if text.len() > 60 {
                kind(v).to_owned()
            } else {
                text
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape(event_type: &str, version: i32, data: Value) -> EventShape {
        EventShape {
            event_type: event_type.to_owned(),
            schema_version: version,
            data,
            metadata: None,
        }
    }

    fn reason(definition: Value) -> (UpcasterErrorKind, String) {
        match Upcasters::parse(&definition) {
            Err(Error::InvalidUpcasters { reason, step, .. }) => (reason, step),
            other => panic!("expected INVALID_UPCASTERS, got {other:?}"),
        }
    }

    #[test]
    fn a_two_step_chain_runs_in_order() {
        let u = Upcasters::parse(&json!([
            { "eventType": "entity.updated", "fromVersion": 2,
              "operations": [{ "op": "map", "path": "data.status", "values": { "todo": "open" } }] },
            { "eventType": "entity.updated", "fromVersion": 1,
              "operations": [{ "op": "rename", "from": "data.title", "to": "data.details.name" }] },
        ]))
        .unwrap();
        let mut e = shape("entity.updated", 1, json!({ "title": "a", "status": "todo" }));
        assert!(u.upcast(&mut e));
        assert_eq!(e.schema_version, 3);
        assert_eq!(e.data, json!({ "status": "open", "details": { "name": "a" } }));
        let mut latest = shape("entity.updated", 3, json!({ "status": "todo" }));
        assert!(!u.upcast(&mut latest));
        assert_eq!(latest.data, json!({ "status": "todo" }));
    }

    #[test]
    fn a_split_moves_only_the_matching_events() {
        let u = Upcasters::parse(&json!([
            { "eventType": "task.changed", "fromVersion": 1, "operations": [
                { "op": "renameType", "to": "task.completed", "when": { "path": "data.status", "equals": "done" } },
                { "op": "remove", "path": "data.status" } ] },
        ]))
        .unwrap();
        let mut done = shape("task.changed", 1, json!({ "status": "done", "at": 1 }));
        u.upcast(&mut done);
        assert_eq!((done.event_type.as_str(), done.schema_version), ("task.completed", 1));
        assert_eq!(done.data, json!({ "at": 1 }));
        let mut other = shape("task.changed", 1, json!({ "status": "doing" }));
        u.upcast(&mut other);
        assert_eq!((other.event_type.as_str(), other.schema_version), ("task.changed", 2));
    }

    #[test]
    fn operations_never_fail_on_odd_shapes() {
        let u = Upcasters::parse(&json!([
            { "eventType": "a.b", "fromVersion": 1, "operations": [
                { "op": "rename", "from": "data.x", "to": "data.y.z" },
                { "op": "default", "path": "metadata.tag", "value": 1 },
                { "op": "map", "path": "data.n", "values": { "1": 2 } } ] },
        ]))
        .unwrap();
        // data.y is a number: the rename cannot place x, so x stays.
        let mut e = shape("a.b", 1, json!({ "x": 1, "y": 5, "n": 1 }));
        u.upcast(&mut e);
        assert_eq!(e.data, json!({ "x": 1, "y": 5, "n": 1 }));
        assert_eq!(e.metadata, Some(json!({ "tag": 1 })));
    }

    #[test]
    fn bad_definitions_name_their_step() {
        assert_eq!(
            reason(json!([{ "eventType": "a.b", "fromVersion": 1, "operations": [{ "op": "renam" }] }])),
            (UpcasterErrorKind::UnknownOperation, "a.b@1".into())
        );
        assert_eq!(
            reason(
                json!([{ "eventType": "a.b", "fromVersion": 1, "operations": [{ "op": "remove", "paht": "data.x" }] }])
            ),
            (UpcasterErrorKind::InvalidOperation, "a.b@1".into())
        );
        assert_eq!(
            reason(json!([
                { "eventType": "a.b", "fromVersion": 1, "operations": [] },
                { "eventType": "a.b", "fromVersion": 3, "operations": [] }])),
            (UpcasterErrorKind::Gap, "a.b@3".into())
        );
        assert_eq!(
            reason(json!([
                { "eventType": "a.b", "fromVersion": 1, "operations": [] },
                { "eventType": "a.b", "fromVersion": 1, "operations": [] }])),
            (UpcasterErrorKind::DuplicateStep, "a.b@1".into())
        );
        assert_eq!(
            reason(json!([
                { "eventType": "a.b", "fromVersion": 1, "operations": [{ "op": "renameType", "to": "c.d", "version": 1 }] },
                { "eventType": "c.d", "fromVersion": 1, "operations": [{ "op": "renameType", "to": "a.b", "version": 1 }] }])),
            (UpcasterErrorKind::Cycle, "c.d@1".into())
        );
        assert_eq!(
            reason(
                json!([{ "eventType": "a.b", "fromVersion": 1, "operations": [{ "op": "renameType", "to": "c.d", "version": 2 }] }])
            ),
            (UpcasterErrorKind::Gap, "a.b@1".into())
        );
        assert_eq!(
            reason(json!({ "a.b": [] })),
            (UpcasterErrorKind::InvalidDefinition, String::new())
        );
    }

    #[test]
    fn keys_added_to_a_stored_record_take_their_jsonb_place() {
        let u = Upcasters::parse(&json!([
            { "eventType": "a.b", "fromVersion": 1, "operations": [
                { "op": "rename", "from": "data.title", "to": "data.name" },
                { "op": "default", "path": "data.z", "value": 0 },
                { "op": "default", "path": "data.abcdefgh", "value": 0 } ] },
        ]))
        .unwrap();
        let mut stored = shape("a.b", 1, json!({ "n": 1, "title": "b", "status": "todo" }));
        u.upcast_in(&mut stored, true);
        let keys: Vec<&String> = stored.data.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["n", "z", "name", "status", "abcdefgh"]);
        let mut given = shape("a.b", 1, json!({ "n": 1, "title": "b", "status": "todo" }));
        u.upcast(&mut given);
        let keys: Vec<&String> = given.data.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["n", "status", "name", "z", "abcdefgh"]);
    }

    #[test]
    fn the_canonical_text_ignores_step_order() {
        let one = json!([
            { "eventType": "a.b", "fromVersion": 1, "operations": [{ "op": "remove", "path": "data.x" }] },
            { "eventType": "a.b", "fromVersion": 2, "operations": [{ "op": "remove", "path": ["data", "y"] }] }]);
        let two = json!([
            { "eventType": "a.b", "fromVersion": 2, "operations": [{ "op": "remove", "path": "data.y" }] },
            { "eventType": "a.b", "fromVersion": 1, "operations": [{ "op": "remove", "path": "data.x" }] }]);
        assert_eq!(
            Upcasters::parse(&one).unwrap().canonical_text(),
            Upcasters::parse(&two).unwrap().canonical_text()
        );
    }
}
