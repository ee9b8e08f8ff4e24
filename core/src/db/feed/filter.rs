//! Server-side filters of the feed: which events a filtered `readAll`, subscription or consumer
//! is handed. The server applies them while it scans the global order, and a filtered page ends
//! after [`SCAN_ROWS`] rows scanned, matching or not, with its checkpoint at the last of them:
//! a reader of a rare type moves through history in pages of bounded work and never scans the
//! same stretch twice.
//!
//! The store's notices (`synap.user_erased`, `synap.stream_deleted`) pass every filter: a
//! reader has to forget what it derived from an erased user or a deleted stream, whatever it
//! reads (docs/erasure.md).

use crate::error::{Error, Result};
use crate::model::AggregateType;
use crate::validate::{self, IssueCode, Limits};

/// Rows a filtered page scans at most, matching or not.
pub const SCAN_ROWS: i64 = 20_000;

/// The events a filtered read delivers: those whose event type is one of `event_types` or
/// starts with one of `event_type_prefixes` (when either is given), and whose aggregate type is
/// one of `aggregate_types` (when given); and always the store's notices. An empty filter
/// delivers everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedFilter {
    /// Event types, exactly (`entity.created`).
    pub event_types: Vec<String>,
    /// Beginnings of event types (`entity.`).
    pub event_type_prefixes: Vec<String>,
    /// Aggregate types.
    pub aggregate_types: Vec<AggregateType>,
}

/// The option names of a filter, as JavaScript passes them.
pub const FILTER_OPTIONS: [&str; 3] = ["eventTypes", "eventTypePrefixes", "aggregateTypes"];

/// Most entries of one list of a filter.
const MAX_ENTRIES: usize = 100;

impl FeedFilter {
    /// Whether it delivers everything.
    pub fn is_empty(&self) -> bool {
        self.event_types.is_empty() && self.event_type_prefixes.is_empty() && self.aggregate_types.is_empty()
    }

    /// Whether an event of this type and aggregate type passes (as the server decides).
    pub fn matches(&self, event_type: &str, aggregate_type: &str) -> bool {
        if is_notice(event_type, aggregate_type) {
            return true;
        }
        let typed = self.event_types.is_empty() && self.event_type_prefixes.is_empty()
            || self.event_types.iter().any(|t| t == event_type)
            || self
                .event_type_prefixes
                .iter()
                .any(|p| event_type.starts_with(p.as_str()));
        typed && (self.aggregate_types.is_empty() || self.aggregate_types.iter().any(|a| a.as_str() == aggregate_type))
    }

    /// The filter of a call's options (`eventTypes`, `eventTypePrefixes`, `aggregateTypes`);
    /// the repository checks its entries ([`FeedFilter::check`]) against its limits when it
    /// reads.
    ///
    /// Fails with [`Error::Validation`] naming the option: a list that is empty (leave it out to
    /// read everything) or longer than 100, or an aggregate type that does not exist.
    pub fn from_options(o: &crate::query::Options<'_>) -> Result<FeedFilter> {
        let list = |key: &str| -> Result<Vec<String>> {
            let Some(items) = o.strings(key)? else {
                return Ok(Vec::new());
            };
            if items.is_empty() || items.len() > MAX_ENTRIES {
                return Err(Error::invalid(
                    key,
                    IssueCode::OutOfRange,
                    format!(
                        "{key} lists 1 to {MAX_ENTRIES} entries (leave it out to read every event), not {}",
                        items.len()
                    ),
                ));
            }
            Ok(items)
        };
        let aggregate_types = list("aggregateTypes")?
            .iter()
            .enumerate()
            .map(|(i, a)| validate::parse_aggregate_type_arg(&format!("aggregateTypes[{i}]"), a))
            .collect::<Result<Vec<_>>>()?;
        let filter = FeedFilter {
            event_types: list("eventTypes")?,
            event_type_prefixes: list("eventTypePrefixes")?,
            aggregate_types,
        };
        Ok(filter)
    }

    /// Checks every entry: an event type that is not one, or a prefix that no event type can
    /// start with, is refused (it would match nothing, silently).
    ///
    /// Fails with [`Error::Validation`] naming the entry (`eventTypes[2]`).
    pub fn check(&self, limits: &Limits) -> Result<()> {
        for (i, t) in self.event_types.iter().enumerate() {
            validate::check_event_type_arg(&format!("eventTypes[{i}]"), t, limits)?;
        }
        for (i, p) in self.event_type_prefixes.iter().enumerate() {
            check_prefix(&format!("eventTypePrefixes[{i}]"), p, limits)?;
        }
        Ok(())
    }

    /// The filter as JavaScript passes it: the non-empty lists.
    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        if !self.event_types.is_empty() {
            o.insert("eventTypes".into(), self.event_types.clone().into());
        }
        if !self.event_type_prefixes.is_empty() {
            o.insert("eventTypePrefixes".into(), self.event_type_prefixes.clone().into());
        }
        if !self.aggregate_types.is_empty() {
            let names: Vec<&str> = self.aggregate_types.iter().map(|a| a.as_str()).collect();
            o.insert("aggregateTypes".into(), names.into());
        }
        serde_json::Value::Object(o)
    }

    /// The same filter whatever the order or repetition of its entries.
    pub fn normalized(&self) -> FeedFilter {
        fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
            let mut v = v.to_vec();
            v.sort();
            v.dedup();
            v
        }
        FeedFilter {
            event_types: sorted(&self.event_types),
            event_type_prefixes: sorted(&self.event_type_prefixes),
            aggregate_types: sorted(&self.aggregate_types),
        }
    }

    /// The condition in SQL on `e`, with its lists as parameters numbered from `first` on (in
    /// the order of [`FeedFilter::params`]).
    pub(crate) fn sql(&self, first: usize) -> String {
        let mut n = first;
        let mut next = || {
            let p = n;
            n += 1;
            p
        };
        let mut typed = Vec::new();
        if !self.event_types.is_empty() {
            typed.push(format!("e.event_type = ANY(${}::text[])", next()));
        }
        if !self.event_type_prefixes.is_empty() {
            typed.push(format!("e.event_type LIKE ANY(${}::text[])", next()));
        }
        let mut all = Vec::new();
        if !typed.is_empty() {
            all.push(format!("({})", typed.join(" OR ")));
        }
        if !self.aggregate_types.is_empty() {
            all.push(format!("e.aggregate_type = ANY(${}::text[])", next()));
        }
        let wanted = if all.is_empty() {
            "true".to_owned()
        } else {
            all.join(" AND ")
        };
        format!("(({wanted}) OR {})", notice_sql())
    }

    /// The lists [`FeedFilter::sql`] numbers, in its order; prefixes as LIKE patterns.
    pub(crate) fn params(&self) -> Vec<Vec<String>> {
        let mut params = Vec::new();
        if !self.event_types.is_empty() {
            params.push(self.event_types.clone());
        }
        if !self.event_type_prefixes.is_empty() {
            params.push(
                self.event_type_prefixes
                    .iter()
                    .map(|p| format!("{}%", p.replace('\\', "\\\\").replace('_', "\\_").replace('%', "\\%")))
                    .collect(),
            );
        }
        if !self.aggregate_types.is_empty() {
            params.push(self.aggregate_types.iter().map(|a| a.as_str().to_owned()).collect());
        }
        params
    }
}

/// The condition in SQL on `e` that a row is one of the store's notices ([`is_notice`]).
pub(crate) fn notice_sql() -> String {
    format!(
        "(e.aggregate_type = 'system' AND e.event_type IN ('{}', '{}'))",
        crate::db::erasure::USER_ERASED,
        crate::db::erasure::STREAM_DELETED
    )
}

/// Whether an event is one of the store's notices, which every filter passes.
pub fn is_notice(event_type: &str, aggregate_type: &str) -> bool {
    aggregate_type == "system"
        && (event_type == crate::db::erasure::USER_ERASED || event_type == crate::db::erasure::STREAM_DELETED)
}

/// A prefix some event type can start with: the beginning of a dotted lowercase type
/// (`entity`, `entity.`, `entity.title_`), at most as long as an event type.
fn check_prefix(field: &str, prefix: &str, limits: &Limits) -> Result<()> {
    let ok = prefix.len() <= limits.max_event_type_len
        && matches!(prefix.chars().next(), Some('a'..='z'))
        && !prefix.contains("..")
        && prefix
            .split('.')
            .skip(1)
            .all(|seg| seg.is_empty() || seg.starts_with(|c: char| c.is_ascii_lowercase()))
        && prefix.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            IssueCode::InvalidEventType,
            format!(
                "\"{}\" is not the beginning of a dotted lowercase event type such as entity.",
                prefix.chars().take(64).collect::<String>()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<FeedFilter> {
        let o = crate::query::Options::of(&v, &FILTER_OPTIONS)?;
        let filter = FeedFilter::from_options(&o)?;
        filter.check(&Limits::default())?;
        Ok(filter)
    }

    fn field(e: Error) -> String {
        match e {
            Error::Validation { field, .. } => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lists_combine_types_or_prefixes_and_aggregate_types() {
        let f = parse(json!({ "eventTypes": ["entity.created"], "eventTypePrefixes": ["relation."], "aggregateTypes": ["entity", "relation"] })).unwrap();
        assert!(f.matches("entity.created", "entity"));
        assert!(f.matches("relation.added", "relation"));
        assert!(!f.matches("relation.added", "user"));
        assert!(!f.matches("entity.updated", "entity"));
        assert!(f.matches("synap.user_erased", "system"), "notices pass");
        assert!(f.matches("synap.stream_deleted", "system"), "notices pass");
        assert!(!f.matches("synap.other", "system"));
        let only_aggregates = parse(json!({ "aggregateTypes": ["user"] })).unwrap();
        assert!(
            only_aggregates.matches("user.renamed", "user") && !only_aggregates.matches("entity.created", "entity")
        );
        assert!(parse(json!({})).unwrap().is_empty());
    }

    #[test]
    fn bad_lists_are_refused_naming_the_entry() {
        assert_eq!(field(parse(json!({ "eventTypes": [] })).unwrap_err()), "eventTypes");
        assert_eq!(
            field(parse(json!({ "eventTypes": ["Entity.Created"] })).unwrap_err()),
            "eventTypes[0]"
        );
        assert_eq!(
            field(parse(json!({ "eventTypePrefixes": ["entity", "Entity."] })).unwrap_err()),
            "eventTypePrefixes[1]"
        );
        assert_eq!(
            field(parse(json!({ "eventTypePrefixes": ["entity.%"] })).unwrap_err()),
            "eventTypePrefixes[0]"
        );
        assert_eq!(
            field(parse(json!({ "aggregateTypes": ["entities"] })).unwrap_err()),
            "aggregateTypes[0]"
        );
        assert_eq!(
            field(parse(json!({ "eventTypes": "entity.created" })).unwrap_err()),
            "eventTypes"
        );
        let many: Vec<String> = (0..101).map(|i| format!("entity.t{i}")).collect();
        assert_eq!(field(parse(json!({ "eventTypes": many })).unwrap_err()), "eventTypes");
        for ok in ["entity", "entity.", "entity.title_", "e"] {
            parse(json!({ "eventTypePrefixes": [ok] })).unwrap();
        }
    }

    #[test]
    fn prefixes_become_like_patterns_with_underscores_escaped() {
        let f = parse(json!({ "eventTypePrefixes": ["entity.title_"] })).unwrap();
        assert_eq!(f.params(), vec![vec!["entity.title\\_%".to_owned()]]);
        assert!(f.sql(7).contains("LIKE ANY($7::text[])"));
    }

    #[test]
    fn normalized_filters_compare_equal() {
        let a = parse(json!({ "eventTypes": ["b.x", "a.x", "a.x"] }))
            .unwrap()
            .normalized();
        let b = parse(json!({ "eventTypes": ["a.x", "b.x"] })).unwrap().normalized();
        assert_eq!(a, b);
        assert_eq!(a.to_json(), json!({ "eventTypes": ["a.x", "b.x"] }));
    }
}
