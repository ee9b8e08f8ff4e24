//! Property tests over validation, the merge patch and the replay fold, and the replay of the
//! regression corpus in `tests/regressions/`.
//!
//! Failure persistence: proptest's own seed files are off (`failure_persistence: None`). A seed
//! only reproduces a case for the exact strategy code that drew it, and CI runs in a fresh clone
//! where a written file is lost anyway. When a property fails, proptest prints the shrunk input:
//! copy it into a `tests/regressions/*.json` file (format in [`corpus_replays_every_file`]),
//! where it is plain data that survives strategy changes and every run checks.

use std::collections::BTreeSet;
use std::path::Path;

use chrono::{DateTime, FixedOffset, SecondsFormat, TimeZone, Utc};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Map, Number, Value};
use synap_events::validate::{self, parse_batch, parse_event};
use synap_events::{
    apply_merge_patch, fold_events, fold_records, parse_fold_options, AggregateType, Error, EventRecord, EventSource,
    FoldOptions, FoldResult, IssueCode, Limits, NewEvent,
};
use uuid::Uuid;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Arbitrary JSON
// ---------------------------------------------------------------------------------------------

const SPECIAL_STRINGS: &[&str] = &[
    "",
    " ",
    "\u{3000}",
    "\u{0}",
    "a\u{0}b",
    "__proto__",
    "constructor",
    "updatedFields",
    "previousTitle",
    "title",
    "😀",
    "\u{202e}gnp.exe",
    "\u{feff}",
    "\u{ffff}",
    "\u{10ffff}",
    "'; DROP TABLE events_v2; --",
    "\\",
    "\\u0000",
    "2024-01-01T00:00:00Z",
    "00000000-0000-0000-0000-000000000001",
    "entity.created",
];

/// Keys that have meaning somewhere: JavaScript prototypes, bookkeeping, `previousX`/`x` pairs
/// (including ones whose lowercasing changes length), NUL.
const SPECIAL_KEYS: &[&str] = &[
    "__proto__",
    "constructor",
    "prototype",
    "hasOwnProperty",
    "title",
    "previousTitle",
    "x",
    "previousX",
    "previous",
    "previousÉtat",
    "état",
    "previousİ",
    "i\u{307}",
    "updatedFields",
    "",
    "\u{0}",
    "a\u{0}",
    "version",
    "data",
];

const SPECIAL_FLOATS: &[f64] = &[
    0.0,
    -0.0,
    1e308,
    -1e308,
    f64::MAX,
    f64::MIN_POSITIVE,
    5e-324,
    0.5,
    1.5,
    2147483647.0,
    2147483648.0,
    9007199254740993.0,
    8.64e15,
    9.0e15,
    1e18,
    9.223372036854776e18,
];

const SPECIAL_INTS: &[i64] = &[
    i64::MIN,
    -1,
    0,
    1,
    2,
    i32::MAX as i64,
    i32::MAX as i64 + 1,
    9_007_199_254_740_993,
    i64::MAX,
];

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::collection::vec(any::<char>(), 0..10).prop_map(String::from_iter),
        2 => select(SPECIAL_STRINGS).prop_map(str::to_owned),
        2 => "[a-z]{0,6}",
    ]
    .boxed()
}

fn key() -> BoxedStrategy<String> {
    prop_oneof![3 => select(SPECIAL_KEYS).prop_map(str::to_owned), 1 => text()].boxed()
}

fn number() -> BoxedStrategy<Number> {
    prop_oneof![
        any::<i64>().prop_map(Number::from),
        any::<u64>().prop_map(Number::from),
        any::<f64>().prop_filter_map("JSON has no NaN or infinity", Number::from_f64),
        select(SPECIAL_FLOATS).prop_filter_map("finite", Number::from_f64),
        select(SPECIAL_INTS).prop_map(Number::from),
        Just(Number::from(1u64 << 63)),
        Just(Number::from(u64::MAX)),
    ]
    .boxed()
}

fn leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number().prop_map(Value::Number),
        text().prop_map(Value::String),
    ]
    .boxed()
}

fn object_of(entries: Vec<(String, Value)>) -> Value {
    Value::Object(entries.into_iter().collect())
}

fn tree(depth: u32, size: u32) -> BoxedStrategy<Value> {
    leaf()
        .prop_recursive(depth, size, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..6).prop_map(object_of),
            ]
        })
        .boxed()
}

/// `leaf` under `depth` levels, each an array or a one-key object as the bits of `shape` say.
fn nest(depth: usize, shape: u64, leaf: Value, key: &str) -> Value {
    (0..depth).fold(leaf, |inner, level| {
        if shape >> (level % 64) & 1 == 1 {
            Value::Array(vec![inner])
        } else {
            json!({ key: inner })
        }
    })
}

/// Nesting past serde_json's parse limit (127 levels), as Node or wasm callers can build.
fn deep() -> BoxedStrategy<Value> {
    (1..300usize, any::<u64>(), leaf(), key())
        .prop_map(|(depth, shape, leaf, key)| nest(depth, shape, leaf, &key))
        .boxed()
}

/// Any JSON value: mostly small trees, sometimes very deep ones.
fn json() -> BoxedStrategy<Value> {
    prop_oneof![8 => tree(5, 48), 1 => deep()].boxed()
}

fn json_object() -> BoxedStrategy<Value> {
    prop::collection::vec((key(), json()), 0..6).prop_map(object_of).boxed()
}

/// The value made storable: no U+0000 in strings or keys, and every number one that a double
/// holds exactly (the others become their nearest double, as JavaScript would read them).
fn strip_nul(value: Value) -> Value {
    match value {
        Value::Number(n) if !synap_events::numbers::number_is_carried(&n) => {
            n.as_f64().and_then(Number::from_f64).map_or(Value::Null, Value::Number)
        }
        Value::String(s) => Value::String(s.replace('\0', "")),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_nul).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k.replace('\0', ""), strip_nul(v)))
                .collect(),
        ),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the properties and the corpus replay
// ---------------------------------------------------------------------------------------------

fn limits() -> Limits {
    Limits::default()
}

/// Validation never panics, `report` agrees with `parse_event`, a failure names at least one
/// issue, and a batch of the value fails or succeeds with it.
fn check_event(input: &Value) -> Result<NewEvent, Vec<validate::Issue>> {
    let parsed = parse_event(input, &limits());
    let report = validate::report(input, &limits());
    assert_eq!(report.valid, parsed.is_ok(), "report and parse_event disagree");
    match &parsed {
        Ok(event) => {
            assert!(report.errors.is_empty());
            assert!(
                event.validate(&limits()).is_ok(),
                "parse_event accepted what validate rejects"
            );
        }
        Err(issues) => {
            assert!(!issues.is_empty(), "a rejection without an issue");
            assert_eq!(&report.errors, issues);
        }
    }
    serde_json::to_string(&report).expect("a report serializes");
    let batch = parse_batch(&Value::Array(vec![input.clone()]), &limits());
    match (&parsed, batch) {
        (Ok(event), Ok(events)) => assert_eq!(events, vec![event.clone()]),
        (Err(issues), Err(Error::Validation { field, reason, .. })) => {
            assert_eq!(reason, issues[0].code);
            assert!(field.starts_with("events[0]"), "batch path {field}");
        }
        (p, b) => panic!("parse_event gave {p:?} but parse_batch gave {b:?}"),
    }
    // Not an array: always refused as a batch.
    if !input.is_array() {
        let err = parse_batch(input, &limits()).unwrap_err();
        assert_eq!(err.code(), "VALIDATION_FAILED");
    }
    parsed
}

/// The merge-patch laws, for any target and patch; returns the patched value.
fn check_merge_patch(target: &Value, patch: &Value) -> Value {
    let mut once = target.clone();
    apply_merge_patch(&mut once, patch);
    let mut twice = once.clone();
    apply_merge_patch(&mut twice, patch);
    assert_eq!(twice, once, "applying a patch twice differs from applying it once");
    assert_eq!(synap_events::apply_delta(target, patch), once, "apply_delta differs");
    check_patched(target, patch, &once);
    if target.is_object() {
        let mut same = target.clone();
        apply_merge_patch(&mut same, &json!({}));
        assert_eq!(&same, target, "{{}} is not the identity on an object");
    }
    once
}

/// `result` is what patching `target` with `patch` must give, member by member.
fn check_patched(target: &Value, patch: &Value, result: &Value) {
    let Value::Object(patch) = patch else {
        assert_eq!(result, patch, "a non-object patch must replace the target");
        return;
    };
    let Value::Object(result) = result else {
        panic!("an object patch gave a non-object: {result}");
    };
    let empty = Map::new();
    let target = target.as_object().unwrap_or(&empty);
    for (key, value) in patch {
        match result.get(key) {
            None => assert!(value.is_null(), "patch member {key:?} is missing from the result"),
            Some(got) => {
                assert!(!value.is_null(), "a null patch member {key:?} was not removed");
                check_patched(target.get(key).unwrap_or(&Value::Null), value, got);
            }
        }
    }
    for (key, value) in target {
        if !patch.contains_key(key) {
            assert_eq!(result.get(key), Some(value), "untouched key {key:?} changed");
        }
    }
    for key in result.keys() {
        assert!(
            patch.contains_key(key) || target.contains_key(key),
            "key {key:?} came from nowhere"
        );
    }
}

fn fold_code(err: &Error) -> (&'static str, usize) {
    match err {
        Error::Fold { index, .. } => (err.code(), *index),
        other => panic!("the fold failed with a non-fold error: {other:?}"),
    }
}

fn with_history(options: &FoldOptions, history: bool) -> FoldOptions {
    FoldOptions {
        history,
        ..options.clone()
    }
}

/// The fold never panics; on success its result serializes, `history` ends at the result and
/// folding up to any reached version equals folding that prefix.
fn check_fold(events: &[Value], options: &Value) -> Option<FoldResult> {
    let options = match parse_fold_options(options) {
        Ok(o) => o,
        Err(e) => {
            assert_eq!(fold_code(&e), ("INVALID_OPTIONS", 0));
            return None;
        }
    };
    let result = match fold_events(events, &options) {
        Ok(r) => r,
        Err(e) => {
            let (_, index) = fold_code(&e);
            assert!(index < events.len(), "error index {index} past the input");
            return None;
        }
    };
    serde_json::to_value(&result).expect("a fold result serializes");
    let start = options.from.as_ref().map_or(0, |s| s.version);
    assert!(result.version >= start);
    assert_eq!(result.history.is_some(), options.history);

    // History: one step per applied event, the last one being the result.
    let plain = fold_events(events, &with_history(&options, false)).expect("folds without history");
    let full = fold_events(events, &with_history(&options, true)).expect("folds with history");
    let steps = full.history.clone().unwrap();
    assert_eq!(steps.len(), (plain.version - start) as usize);
    assert_eq!(FoldResult { history: None, ..full }, plain);
    if let Some(last) = steps.last() {
        assert_eq!(
            (&last.state, last.version, last.deleted, Some(last.timestamp)),
            (&plain.state, plain.version, plain.deleted, plain.last_timestamp)
        );
    }

    // Folding up to version k is folding the first k - start events (a sample of k for long
    // inputs, which would otherwise cost O(n²)).
    let applied = (plain.version - start) as usize;
    let stride = (applied / 32).max(1);
    for j in (0..=applied).step_by(stride) {
        let k = start + j as i32;
        let cut = FoldOptions {
            to_version: Some(k),
            ..with_history(&options, false)
        };
        let upto = fold_events(events, &cut).expect("a cut of a good fold folds");
        let prefix = fold_events(&events[..j], &with_history(&options, false)).expect("a prefix folds");
        assert_eq!(upto, prefix, "toVersion {k} differs from folding {j} events");
        if j < applied {
            assert_eq!(steps[j].state, fold_events(&events[..=j], &options).unwrap().state);
        }
    }
    Some(result)
}

// ---------------------------------------------------------------------------------------------
// No panic on arbitrary input
// ---------------------------------------------------------------------------------------------

fn uuid_json() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<u128>().prop_map(|u| json!(Uuid::from_u128(u).to_string())),
        Just(json!("00000000-0000-0000-0000-000000000001")),
        text().prop_map(Value::String),
    ]
    .boxed()
}

fn timestamp_json() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(|ms| json!(ms % 9_000_000_000_000_000)),
        Just(json!(8.64e15)),
        Just(json!(-8.64e15)),
        Just(json!(8_300_000_000_000_000_i64)),
        Just(json!("2024-02-29T23:59:60Z")),
        Just(json!("9999-12-31T23:59:59.999999999+14:00")),
        Just(json!("0000-01-01T00:00:00-23:59")),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})"
            .prop_map(Value::String),
    ]
    .boxed()
}

fn strings_of(values: &'static [&'static str]) -> BoxedStrategy<Value> {
    select(values).prop_map(|s| json!(s)).boxed()
}

fn version_json() -> BoxedStrategy<Value> {
    prop_oneof![
        (1..5i64).prop_map(|v| json!(v)),
        number().prop_map(Value::Number),
        Just(json!(3.0)),
    ]
    .boxed()
}

/// A field value that is often wrong in an interesting way.
fn field_value() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => json(),
        1 => uuid_json(),
        1 => timestamp_json(),
        1 => version_json(),
        1 => strings_of(&["entity", "Entity", "entity.created", "Task.Created", "x", "api", "API", "%", " "]),
    ]
    .boxed()
}

const EVENT_FIELDS: &[&str] = &[
    "id",
    "timestamp",
    "aggregateId",
    "aggregateType",
    "eventType",
    "userId",
    "data",
    "metadata",
    "version",
    "causationId",
    "correlationId",
    "source",
];

/// A valid event with up to three fields replaced by (or removed for) something else.
fn event_like() -> BoxedStrategy<Value> {
    let edit = (select(EVENT_FIELDS), prop::option::weighted(0.85, field_value()));
    (valid_event(), prop::collection::vec(edit, 0..4))
        .prop_map(|(event, edits)| {
            let mut obj = event.json;
            for (field, value) in edits {
                match value {
                    Some(v) => obj.insert(field.to_owned(), v),
                    None => obj.remove(field),
                };
            }
            Value::Object(obj)
        })
        .boxed()
}

/// How a generated stream is broken before folding.
#[derive(Debug, Clone)]
enum Damage {
    /// Set (or, with `None`, remove) one field of one event.
    Field(usize, &'static str, Option<Value>),
    /// Replace one event by any JSON.
    Replace(usize, Value),
    Duplicate(usize),
    Remove(usize),
    Swap(usize),
}

fn damage() -> BoxedStrategy<Damage> {
    let fields = ["aggregateId", "eventType", "version", "data", "timestamp"];
    prop_oneof![
        4 => (any::<usize>(), select(fields.to_vec()), prop::option::weighted(0.85, field_value()))
            .prop_map(|(i, f, v)| Damage::Field(i, f, v)),
        1 => (any::<usize>(), json()).prop_map(|(i, v)| Damage::Replace(i, v)),
        1 => any::<usize>().prop_map(Damage::Duplicate),
        1 => any::<usize>().prop_map(Damage::Remove),
        1 => any::<usize>().prop_map(Damage::Swap),
    ]
    .boxed()
}

fn apply_damage(events: &mut Vec<Value>, damage: Damage) {
    if events.is_empty() {
        return;
    }
    let n = events.len();
    match damage {
        Damage::Field(i, field, value) => {
            // An event already replaced by a non-object stays as it is.
            if let Value::Object(obj) = &mut events[i % n] {
                match value {
                    Some(v) => obj.insert(field.to_owned(), v),
                    None => obj.remove(field),
                };
            }
        }
        Damage::Replace(i, v) => events[i % n] = v,
        Damage::Duplicate(i) => events.insert(i % n, events[i % n].clone()),
        Damage::Remove(i) => {
            events.remove(i % n);
        }
        Damage::Swap(i) => events.swap(i % n, (i + 1) % n),
    }
}

/// Fold options that mostly fit a stream starting after `base`, with up to two keys replaced by
/// (or removed for) any JSON.
fn options_near(base: i32) -> BoxedStrategy<Value> {
    let valid = (
        prop::option::weighted(0.3, 0..10i32),
        prop::option::weighted(0.3, 0..5_000_000_000_000i64),
        any::<bool>(),
        bookkeeping_json(),
        json(),
        any::<bool>(),
    )
        .prop_map(
            move |(to_version, to_timestamp, history, bookkeeping, state, deleted)| {
                let mut o = json!({
                    "toVersion": to_version.map(|v| i64::from(v) + i64::from(base)),
                    "toTimestamp": to_timestamp,
                    "history": history,
                    "bookkeeping": bookkeeping,
                });
                if base > 0 {
                    o["from"] = json!({"state": state, "version": base, "deleted": deleted});
                }
                o
            },
        );
    let keys = ["toVersion", "toTimestamp", "history", "bookkeeping", "from"];
    let edit = (select(keys.to_vec()), prop::option::weighted(0.85, field_value()));
    (valid, prop::collection::vec(edit, 0..2))
        .prop_map(|(mut o, edits)| {
            for (key, value) in edits {
                match value {
                    Some(v) => o[key] = v,
                    None => {
                        o.as_object_mut().unwrap().remove(key);
                    }
                }
            }
            o
        })
        .boxed()
}

/// A generated stream with up to three kinds of damage, and options that mostly fit it.
fn near_valid_fold() -> BoxedStrategy<(Vec<Value>, Value)> {
    prop_oneof![Just(0), 0..100i32, (i32::MAX - 10)..=i32::MAX]
        .prop_flat_map(|base| {
            (
                Just(base),
                stream(7),
                prop::collection::vec(damage(), 0..3),
                options_near(base),
            )
        })
        .prop_map(|(base, s, damages, options)| {
            let mut events = s.json(base);
            for d in damages {
                apply_damage(&mut events, d);
            }
            (events, options)
        })
        .boxed()
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn validation_never_panics_on_any_json(input in json()) {
        check_event(&input).ok();
    }

    #[test]
    fn validation_never_panics_on_event_shaped_json(input in event_like()) {
        check_event(&input).ok();
    }

    #[test]
    fn batch_validation_never_panics(items in prop::collection::vec(prop_oneof![event_like(), json()], 0..5)) {
        let outcome = parse_batch(&Value::Array(items.clone()), &limits());
        let singles: Vec<_> = items.iter().map(|i| parse_event(i, &limits())).collect();
        match outcome {
            Ok(events) => {
                let expected: Vec<NewEvent> = singles.into_iter().map(Result::unwrap).collect();
                prop_assert_eq!(events, expected);
            }
            Err(Error::Validation { field, reason, .. }) => {
                // The first bad event is the one named.
                let first_bad = singles.iter().position(Result::is_err).expect("a batch failed with every event valid");
                prop_assert!(field.starts_with(&format!("events[{first_bad}]")), "{} names the wrong event", field);
                prop_assert_eq!(reason, singles[first_bad].as_ref().unwrap_err()[0].code);
            }
            Err(other) => prop_assert!(false, "not a validation error: {:?}", other),
        }
    }

    #[test]
    fn fold_never_panics_on_any_json(
        events in prop::collection::vec(json(), 0..6),
        options in prop_oneof![json(), options_near(0)],
    ) {
        check_fold(&events, &options);
    }

    #[test]
    fn fold_never_panics_on_near_valid_streams((events, options) in near_valid_fold()) {
        check_fold(&events, &options);
    }

    #[test]
    fn merge_patch_laws_hold_for_any_json(target in json(), patch in json()) {
        check_merge_patch(&target, &patch);
    }

    #[test]
    fn merge_patch_laws_hold_for_object_patches(target in json_object(), patch in json_object()) {
        let result = check_merge_patch(&target, &patch);
        prop_assert!(result.is_object());
    }
}

// ---------------------------------------------------------------------------------------------
// Valid events, and single-field corruptions of them
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Opt<T> {
    Absent,
    Null,
    Present(T),
}

impl<T> Opt<T> {
    fn value(&self) -> Option<&T> {
        match self {
            Opt::Present(v) => Some(v),
            _ => None,
        }
    }
}

fn opt<T: std::fmt::Debug + Clone + 'static>(s: impl Strategy<Value = T> + 'static) -> BoxedStrategy<Opt<T>> {
    prop_oneof![1 => Just(Opt::Absent), 1 => Just(Opt::Null), 2 => s.prop_map(Opt::Present)].boxed()
}

fn put<T>(obj: &mut Map<String, Value>, key: &str, value: &Opt<T>, render: impl Fn(&T) -> Value) {
    match value {
        Opt::Absent => {}
        Opt::Null => {
            obj.insert(key.to_owned(), Value::Null);
        }
        Opt::Present(v) => {
            obj.insert(key.to_owned(), render(v));
        }
    }
}

/// Every spelling `Uuid::parse_str` accepts.
fn uuid_text(u: Uuid, form: u8) -> String {
    match form % 5 {
        0 => u.hyphenated().to_string(),
        1 => u.hyphenated().to_string().to_uppercase(),
        2 => u.simple().to_string(),
        3 => u.braced().to_string(),
        _ => u.urn().to_string(),
    }
}

fn any_uuid() -> BoxedStrategy<(Uuid, u8)> {
    (any::<u128>(), 0..5u8)
        .prop_map(|(u, f)| (Uuid::from_u128(u), f))
        .boxed()
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn ymd(year: i32) -> i64 {
    millis(Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap())
}

const OFFSETS_MINUTES: &[i32] = &[0, 60, 120, 330, -300, -570, 14 * 60, -12 * 60, 23 * 60 + 59];

/// PostgreSQL's earliest instant, 4714-11-24 BC, in milliseconds: the store's first.
const EARLIEST_MS: i64 = -210_866_803_200_000;

/// A timestamp and one of its accepted JSON spellings: integer or float milliseconds, or the ISO
/// string JavaScript writes (six-digit signed years outside 0000..9999), over the store's whole
/// range (PostgreSQL's earliest instant to chrono's last millisecond), or an RFC 3339 string (any
/// offset, up to nanoseconds) in years 2..9998.
fn valid_timestamp() -> BoxedStrategy<(DateTime<Utc>, Value)> {
    let max = millis(DateTime::<Utc>::MAX_UTC);
    prop_oneof![
        (EARLIEST_MS..=max, any::<bool>()).prop_map(|(ms, float)| {
            let t = Utc.timestamp_millis_opt(ms).single().unwrap();
            (t, if float { json!(ms as f64) } else { json!(ms) })
        }),
        (EARLIEST_MS..=max).prop_map(|ms| {
            let t = Utc.timestamp_millis_opt(ms).single().unwrap();
            (t, json!(synap_events::fold::format_timestamp(&t)))
        }),
        (ymd(2)..ymd(9998), 0..1_000_000u32, select(OFFSETS_MINUTES)).prop_map(|(ms, nanos, offset)| {
            let t = Utc.timestamp_millis_opt(ms).single().unwrap() + chrono::Duration::nanoseconds(nanos.into());
            let local = t.with_timezone(&FixedOffset::east_opt(offset * 60).unwrap());
            (t, json!(local.to_rfc3339_opts(SecondsFormat::AutoSi, true)))
        }),
    ]
    .boxed()
}

fn nul_free_object() -> BoxedStrategy<Map<String, Value>> {
    prop::collection::vec((key(), tree(3, 16)), 0..5)
        .prop_map(|entries| match strip_nul(object_of(entries)) {
            Value::Object(map) => map,
            _ => unreachable!(),
        })
        .boxed()
}

fn valid_user_id() -> BoxedStrategy<String> {
    prop_oneof![
        prop::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 1..30)
            .prop_map(String::from_iter)
            .prop_filter("not blank", |s| !s.trim().is_empty()),
        select(vec!["%", "_", "' OR '1'='1", "$1", "\\", "user-1"]).prop_map(str::to_owned),
    ]
    .boxed()
}

const EVENT_TYPE_REGEX: &str = "[a-z][a-z0-9_]{0,8}(\\.[a-z][a-z0-9_]{0,8}){1,3}";

#[derive(Debug, Clone)]
struct ValidEvent {
    json: Map<String, Value>,
    expected: NewEvent,
}

fn valid_event() -> BoxedStrategy<ValidEvent> {
    let required = (
        any_uuid(),
        select(AggregateType::ALL.to_vec()),
        EVENT_TYPE_REGEX,
        valid_user_id(),
        nul_free_object(),
        opt(nul_free_object()),
        (1..=i32::MAX, any::<bool>()),
    );
    let optional = (
        opt(any_uuid()),
        opt(valid_timestamp()),
        opt(any_uuid()),
        opt(any_uuid()),
        opt(select(EventSource::ALL.to_vec())),
        prop::collection::vec(("x-[a-z]{1,5}", json()), 0..3),
        opt(1..=i32::MAX),
    );
    (required, optional)
        .prop_map(|(r, o)| {
            let ((aggregate, form), aggregate_type, event_type, user_id, data, metadata, (version, float)) = r;
            let (id, timestamp, causation, correlation, source, extra, schema_version) = o;
            let mut obj: Map<String, Value> = extra.into_iter().collect();
            let uuid = |(u, f): &(Uuid, u8)| json!(uuid_text(*u, *f));
            obj.insert("aggregateId".into(), json!(uuid_text(aggregate, form)));
            obj.insert("aggregateType".into(), json!(aggregate_type.as_str()));
            obj.insert("eventType".into(), json!(event_type));
            obj.insert("userId".into(), json!(user_id));
            obj.insert("data".into(), Value::Object(data.clone()));
            put(&mut obj, "metadata", &metadata, |m| Value::Object(m.clone()));
            obj.insert(
                "version".into(),
                if float {
                    json!(f64::from(version))
                } else {
                    json!(version)
                },
            );
            put(&mut obj, "id", &id, uuid);
            put(&mut obj, "timestamp", &timestamp, |(_, v)| v.clone());
            put(&mut obj, "causationId", &causation, uuid);
            put(&mut obj, "correlationId", &correlation, uuid);
            put(&mut obj, "source", &source, |s| json!(s.as_str()));
            put(&mut obj, "schemaVersion", &schema_version, |v| json!(v));
            let expected = NewEvent {
                id: id.value().map(|u| u.0),
                timestamp: timestamp.value().map(|t| t.0),
                aggregate_id: aggregate,
                aggregate_type,
                event_type,
                user_id,
                data: Value::Object(data),
                metadata: metadata.value().cloned().map(Value::Object),
                version,
                causation_id: causation.value().map(|u| u.0),
                correlation_id: correlation.value().map(|u| u.0),
                source: source.value().copied().unwrap_or(EventSource::Api),
                schema_version: schema_version.value().copied().unwrap_or(1),
            };
            ValidEvent { json: obj, expected }
        })
        .boxed()
}

/// Breaks one field of a valid event; returns the path and code that must be reported.
fn corrupt(event: &mut Map<String, Value>, kind: u8, n: u32, junk: &str) -> (String, IssueCode) {
    let set = |event: &mut Map<String, Value>, key: &str, value: Value| {
        event.insert(key.to_owned(), value);
    };
    let at = |s: &str| s.to_owned();
    match kind {
        0 => {
            set(event, "version", json!(0));
            (at("version"), IssueCode::InvalidVersion)
        }
        1 => {
            set(event, "version", json!(-1 - i64::from(n)));
            (at("version"), IssueCode::InvalidVersion)
        }
        2 => {
            set(event, "version", json!(i64::from(i32::MAX) + 1 + i64::from(n)));
            (at("version"), IssueCode::InvalidVersion)
        }
        3 => {
            set(event, "version", json!(f64::from(n % 1000) + 0.5));
            (at("version"), IssueCode::InvalidVersion)
        }
        4 => {
            set(event, "version", json!(n.to_string()));
            (at("version"), IssueCode::InvalidType)
        }
        5 => {
            let bad = format!("{junk}-not-a-uuid");
            set(event, "aggregateId", json!(bad));
            (at("aggregateId"), IssueCode::InvalidUuid)
        }
        6 => {
            let id = event["aggregateId"].as_str().unwrap().to_owned();
            let i = id
                .char_indices()
                .filter(|(_, c)| c.is_ascii_hexdigit())
                .nth(n as usize % 32)
                .unwrap()
                .0;
            set(event, "aggregateId", json!(format!("{}{}", &id[..i], &id[i + 1..])));
            (at("aggregateId"), IssueCode::InvalidUuid)
        }
        7 => {
            event.remove("aggregateId");
            (at("aggregateId"), IssueCode::Required)
        }
        8 => {
            let t = event["eventType"].as_str().unwrap();
            let letters: Vec<usize> = t
                .char_indices()
                .filter(|(_, c)| c.is_ascii_lowercase())
                .map(|(i, _)| i)
                .collect();
            let i = letters[n as usize % letters.len()];
            let upper = format!("{}{}{}", &t[..i], t[i..=i].to_uppercase(), &t[i + 1..]);
            set(event, "eventType", json!(upper));
            (at("eventType"), IssueCode::InvalidEventType)
        }
        9 => {
            set(
                event,
                "eventType",
                json!(format!("a.{}", "b".repeat(127 + (n % 100) as usize))),
            );
            (at("eventType"), IssueCode::InvalidEventType)
        }
        10 => {
            let t = event["eventType"].as_str().unwrap().replace('.', "");
            set(event, "eventType", json!(t));
            (at("eventType"), IssueCode::InvalidEventType)
        }
        11 => {
            let blank = [" ", "", "\t\n", "\u{3000}", "\u{a0}\u{2003}"][n as usize % 5];
            set(event, "userId", json!(blank));
            (at("userId"), IssueCode::InvalidUserId)
        }
        12 => {
            let u = event["userId"].as_str().unwrap();
            let cut = u
                .char_indices()
                .map(|(i, _)| i)
                .nth(n as usize % u.chars().count())
                .unwrap();
            set(event, "userId", json!(format!("{}\0{}", &u[..cut], &u[cut..])));
            (at("userId"), IssueCode::NulCharacter)
        }
        13 => {
            set(event, "userId", json!("u".repeat(256 + (n % 100) as usize)));
            (at("userId"), IssueCode::InvalidUserId)
        }
        14 => {
            // One NUL somewhere new in the (NUL-free) data, at a known path.
            let key = format!("k{n}");
            let data = event.get_mut("data").unwrap().as_object_mut().unwrap();
            let (value, path) = match n % 3 {
                0 => (json!(format!("{junk}\0")), format!("data.{key}")),
                1 => (json!({"inner": ["ok", "\0"]}), format!("data.{key}.inner[1]")),
                _ => (json!([[{"deep": "a\0b"}]]), format!("data.{key}[0][0].deep")),
            };
            data.insert(key, value);
            (path, IssueCode::NulCharacter)
        }
        15 => {
            let key = format!("{junk}\0");
            event
                .get_mut("data")
                .unwrap()
                .as_object_mut()
                .unwrap()
                .insert(key.clone(), json!(1));
            (format!("data.{key}"), IssueCode::NulCharacter)
        }
        16 => {
            let not_object = [json!([]), json!("{}"), json!(1), json!(true)][n as usize % 4].clone();
            set(event, "data", not_object);
            (at("data"), IssueCode::InvalidData)
        }
        17 => {
            set(event, "data", Value::Null);
            (at("data"), IssueCode::Required)
        }
        18 => {
            let bad = ["API", "web", "", " api"][n as usize % 4];
            set(event, "source", json!(bad));
            (at("source"), IssueCode::InvalidSource)
        }
        19 => {
            let bad = ["Entity", "entities", "", "entity "][n as usize % 4];
            set(event, "aggregateType", json!(bad));
            (at("aggregateType"), IssueCode::InvalidAggregateType)
        }
        20 => {
            set(event, "id", json!(format!("{junk}!")));
            (at("id"), IssueCode::InvalidUuid)
        }
        21 => {
            let bad = [
                json!("yesterday"),
                json!(1.5),
                json!(9e15),
                json!(true),
                json!(EARLIEST_MS - 1),
                json!("+262143-01-01T00:00:00.000Z"),
                json!("+262142-12-31T23:59:59.999999Z"),
            ][n as usize % 7]
                .clone();
            set(event, "timestamp", bad);
            (at("timestamp"), IssueCode::InvalidTimestamp)
        }
        22 => {
            set(event, "metadata", json!([1]));
            (at("metadata"), IssueCode::InvalidMetadata)
        }
        23 => {
            set(event, "metadata", json!({ "k": "\0" }));
            (at("metadata.k"), IssueCode::NulCharacter)
        }
        _ => {
            set(event, "correlationId", json!(n));
            (at("correlationId"), IssueCode::InvalidType)
        }
    }
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn valid_events_always_parse_to_what_they_say(event in valid_event()) {
        let json = Value::Object(event.json.clone());
        let parsed = check_event(&json);
        prop_assert_eq!(parsed, Ok(event.expected));
    }

    #[test]
    fn a_single_corrupted_field_is_rejected_with_its_code(
        good in valid_event(),
        other in valid_event(),
        kind in 0..25u8,
        n in any::<u32>(),
        junk in "[a-z0-9 ']{0,12}",
    ) {
        let mut bad = good.json.clone();
        let (path, code) = corrupt(&mut bad, kind, n, &junk);
        let bad = Value::Object(bad);
        let issues = check_event(&bad).expect_err("a corrupted event was accepted");
        let got: Vec<(&str, IssueCode)> = issues.iter().map(|i| (i.path.as_str(), i.code)).collect();
        prop_assert_eq!(got, vec![(path.as_str(), code)]);

        // In a batch behind a good event, the batch names it with its index.
        let batch = Value::Array(vec![Value::Object(other.json), bad]);
        match parse_batch(&batch, &limits()) {
            Err(Error::Validation { field, reason, .. }) => {
                prop_assert_eq!(field, format!("events[1].{path}"));
                prop_assert_eq!(reason, code);
            }
            other => prop_assert!(false, "batch gave {:?}", other),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fold laws over generated valid streams
// ---------------------------------------------------------------------------------------------

const STREAM_TYPES: &[&str] = &[
    "task.updated",
    "task.updated",
    "task.renamed",
    "task.created",
    "task.deleted",
    "note.created",
    ".created",
    "created",
    "task.created.later",
    "task.undeleted",
    "Task.Created",
];

#[derive(Debug, Clone)]
struct Step {
    event_type: String,
    data: Map<String, Value>,
    gap_ms: i64,
    form: u8,
    offset_minutes: i32,
}

/// One aggregate's events, versions `base + 1 ..`, strictly increasing timestamps.
#[derive(Debug, Clone)]
struct Stream {
    aggregate: Uuid,
    start_ms: i64,
    steps: Vec<Step>,
}

fn step() -> BoxedStrategy<Step> {
    (
        select(STREAM_TYPES).prop_map(str::to_owned),
        prop::collection::vec((key(), tree(3, 16)), 0..5),
        1..86_400_000_000i64,
        0..3u8,
        select(OFFSETS_MINUTES),
    )
        .prop_map(|(event_type, data, gap_ms, form, offset_minutes)| Step {
            event_type,
            data: data.into_iter().collect(),
            gap_ms,
            form,
            offset_minutes,
        })
        .boxed()
}

fn stream(max: usize) -> BoxedStrategy<Stream> {
    (
        any::<u128>(),
        0..4_000_000_000_000i64,
        prop::collection::vec(step(), 0..max),
    )
        .prop_map(|(u, start_ms, steps)| Stream {
            aggregate: Uuid::from_u128(u),
            start_ms,
            steps,
        })
        .boxed()
}

impl Stream {
    fn timestamps(&self) -> Vec<DateTime<Utc>> {
        let mut ms = self.start_ms;
        self.steps
            .iter()
            .map(|s| {
                ms += s.gap_ms;
                Utc.timestamp_millis_opt(ms).single().unwrap()
            })
            .collect()
    }

    fn json(&self, base: i32) -> Vec<Value> {
        self.steps
            .iter()
            .zip(self.timestamps())
            .enumerate()
            .map(|(i, (s, t))| {
                let timestamp = match s.form {
                    0 => json!(t.timestamp_millis()),
                    1 => json!(t.timestamp_millis() as f64),
                    _ => {
                        let local = t.with_timezone(&FixedOffset::east_opt(s.offset_minutes * 60).unwrap());
                        json!(local.to_rfc3339_opts(SecondsFormat::Millis, true))
                    }
                };
                json!({
                    "aggregateId": self.aggregate.to_string(),
                    "eventType": s.event_type,
                    "version": i64::from(base) + 1 + i as i64,
                    "data": s.data,
                    "timestamp": timestamp,
                    "userId": "u",
                })
            })
            .collect()
    }

    fn records(&self, base: i32) -> Vec<EventRecord> {
        self.steps
            .iter()
            .zip(self.timestamps())
            .enumerate()
            .map(|(i, (s, timestamp))| EventRecord {
                id: Uuid::from_u128(i as u128 + 1),
                timestamp,
                aggregate_id: self.aggregate,
                aggregate_type: AggregateType::Entity,
                event_type: s.event_type.clone(),
                user_id: "u".into(),
                data: Value::Object(s.data.clone()),
                metadata: None,
                version: base + 1 + i as i32,
                causation_id: None,
                correlation_id: None,
                source: EventSource::Api,
                position: i as i64,
                unreadable: None,
                schema_version: 1,
                upcast_from: None,
            })
            .collect()
    }
}

fn bookkeeping_json() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!({"ignoreKeys": [], "dropPreviousCompanions": false})),
        Just(json!({"ignoreKeys": ["title", "x", "__proto__"]})),
        Just(json!({"dropPreviousCompanions": false})),
    ]
    .boxed()
}

fn options(value: Value) -> FoldOptions {
    parse_fold_options(&value).expect("generated options parse")
}

/// The state a `.created` event with this data gives under the default bookkeeping rule:
/// bookkeeping keys gone, `null` members dropped at every object level (arrays kept as they are).
fn created_state(data: &Map<String, Value>) -> Value {
    fn drop_nulls(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), drop_nulls(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    let bookkeeping = |key: &str| {
        key == "updatedFields"
            || key.strip_prefix("previous").is_some_and(|rest| {
                let mut chars = rest.chars();
                chars.next().filter(|c| c.is_uppercase()).is_some_and(|first| {
                    let companion: String = first.to_lowercase().chain(chars).collect();
                    data.contains_key(&companion)
                })
            })
    };
    Value::Object(
        data.iter()
            .filter(|(k, v)| !bookkeeping(k) && !v.is_null())
            .map(|(k, v)| (k.clone(), drop_nulls(v)))
            .collect(),
    )
}

fn fold_ok(events: &[Value], options: &FoldOptions) -> FoldResult {
    fold_events(events, options).unwrap_or_else(|e| panic!("a valid stream failed to fold: {e}"))
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn created_resets_the_state(
        s in stream(6),
        snapshot_state in json(),
        base in prop_oneof![Just(0), 0..1000i32, (i32::MAX - 20)..(i32::MAX - 8)],
        deleted in any::<bool>(),
        created_type in select(vec!["task.created", "note.created", ".created", "a.b.created"]),
        created_data in prop::collection::vec((key(), tree(3, 16)), 0..6),
    ) {
        let created_data: Map<String, Value> = created_data.into_iter().collect();
        let mut events = s.json(base);
        let version = base + 1 + events.len() as i32;
        let created = json!({
            "aggregateId": s.aggregate.to_string(),
            "eventType": created_type,
            "version": version,
            "data": created_data,
            "timestamp": "2030-01-01T00:00:00Z",
        });
        events.push(created.clone());
        let from = options(json!({"from": {"state": snapshot_state, "version": base, "deleted": deleted}}));
        let r = fold_ok(&events, &from);
        prop_assert_eq!(&r.state, &created_state(&created_data));
        prop_assert!(!r.deleted);
        prop_assert_eq!(r.version, version);

        let mut alone = created;
        alone["version"] = json!(1);
        let single = fold_ok(&[alone], &FoldOptions::default());
        prop_assert_eq!(r.state, single.state);
    }

    #[test]
    fn history_ends_at_the_result(s in stream(8), bookkeeping in bookkeeping_json()) {
        let events = s.json(0);
        let plain = fold_ok(&events, &options(json!({"bookkeeping": bookkeeping})));
        let full = fold_ok(&events, &options(json!({"bookkeeping": bookkeeping, "history": true})));
        let steps = full.history.clone().unwrap();
        prop_assert_eq!(steps.len(), events.len());
        for (i, step) in steps.iter().enumerate() {
            prop_assert_eq!(step.version, i as i32 + 1);
            prop_assert_eq!(&step.event_type, &s.steps[i].event_type);
        }
        if let Some(last) = steps.last() {
            prop_assert_eq!(&last.state, &plain.state);
            prop_assert_eq!(last.deleted, plain.deleted);
            prop_assert_eq!(Some(last.timestamp), plain.last_timestamp);
        } else {
            prop_assert_eq!(&plain.state, &Value::Null);
        }
        prop_assert_eq!(FoldResult { history: None, ..full }, plain);
    }

    #[test]
    fn folding_to_version_k_is_folding_k_events(
        s in stream(8),
        k in 0..9usize,
        garbage in prop::collection::vec(json(), 0..3),
    ) {
        let events = s.json(0);
        let k = k.min(events.len());
        let prefix = fold_ok(&events[..k], &FoldOptions::default());
        prop_assert_eq!(prefix.version, k as i32);
        let cut = options(json!({"toVersion": k}));
        prop_assert_eq!(&fold_ok(&events, &cut), &prefix);
        // Events past the cut are never read.
        let mut tail = events[..k].to_vec();
        tail.extend(garbage);
        prop_assert_eq!(&fold_ok(&tail, &cut), &prefix);
    }

    #[test]
    fn folding_up_to_a_timestamp_stops_at_the_first_later_event(
        s in stream(8),
        k in 1..9usize,
        before_next in 0.0..1.0f64,
        as_string in any::<bool>(),
        garbage in prop::collection::vec(json(), 0..3),
    ) {
        let mut events = s.json(0);
        let times = s.timestamps();
        prop_assume!(!events.is_empty());
        let k = k.min(events.len());
        let prefix = fold_ok(&events[..k], &FoldOptions::default());
        // A cut at or after event k - 1 and before event k.
        let last = times[k - 1].timestamp_millis();
        let cut_ms = match times.get(k) {
            Some(next) => last + ((next.timestamp_millis() - last - 1) as f64 * before_next) as i64,
            None => last + 1_000,
        };
        let cut = Utc.timestamp_millis_opt(cut_ms).single().unwrap();
        let cut_json = if as_string { json!(cut.to_rfc3339()) } else { json!(cut_ms) };
        let opts = options(json!({"toTimestamp": cut_json}));
        if k < events.len() {
            // The first later event must be well-formed, but nothing else about it is checked,
            // and nothing after it is read.
            events[k]["aggregateId"] = json!(Uuid::nil().to_string());
            events[k]["version"] = json!(999);
            events.truncate(k + 1);
            events.extend(garbage);
        }
        prop_assert_eq!(fold_ok(&events, &opts), prefix);
    }

    #[test]
    fn a_snapshot_then_the_rest_is_the_full_fold(
        s in stream(8),
        k in 0..9usize,
        bookkeeping in bookkeeping_json(),
    ) {
        let events = s.json(0);
        let k = k.min(events.len());
        let full = fold_ok(&events, &options(json!({"bookkeeping": bookkeeping})));
        let head = fold_ok(&events[..k], &options(json!({"bookkeeping": bookkeeping})));
        let snapshot = json!({"state": head.state, "version": head.version, "deleted": head.deleted});
        let rest = fold_ok(&events[k..], &options(json!({"bookkeeping": bookkeeping, "from": snapshot})));
        prop_assert_eq!(&rest.state, &full.state);
        prop_assert_eq!(rest.version, full.version);
        prop_assert_eq!(rest.deleted, full.deleted);
        if k < events.len() {
            prop_assert_eq!(rest.last_timestamp, full.last_timestamp);
        } else {
            prop_assert_eq!(rest.last_timestamp, None);
        }
    }

    #[test]
    fn json_and_typed_folds_agree(
        s in stream(8),
        base in prop_oneof![Just(0), 0..1000i32],
        snapshot_state in json(),
        to_version in prop::option::of(0..12i32),
        to_timestamp in prop::option::of(0..5_000_000_000_000i64),
        history in any::<bool>(),
        bookkeeping in bookkeeping_json(),
        disorder in (0..4u8, 0..8usize),
    ) {
        let mut events = s.json(base);
        let mut records = s.records(base);
        let mut opts = json!({
            "history": history,
            "bookkeeping": bookkeeping,
            "toVersion": to_version.map(|v| i64::from(v) + i64::from(base)),
            "toTimestamp": to_timestamp,
        });
        if base > 0 {
            opts["from"] = json!({"state": snapshot_state, "version": base});
        }
        // Sometimes break the version order the same way in both inputs.
        let (how, at) = disorder;
        if !events.is_empty() {
            let i = at % events.len();
            match how {
                1 => { events.insert(i, events[i].clone()); records.insert(i, records[i].clone()); }
                2 => { events.remove(i); records.remove(i); }
                3 if i + 1 < events.len() => { events.swap(i, i + 1); records.swap(i, i + 1); }
                _ => {}
            }
        }
        let opts = options(opts);
        let untyped = fold_events(&events, &opts);
        let typed = fold_records(&records, &opts);
        match (untyped, typed) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) => prop_assert_eq!(fold_code(&a), fold_code(&b)),
            (a, b) => prop_assert!(false, "fold_events gave {:?}, fold_records {:?}", a, b),
        }
        if how == 0 {
            prop_assert!(fold_events(&events, &opts).is_ok(), "an in-order stream failed");
        }
        // The streaming fold of the same events as text: the same result whenever the fold
        // succeeds, and no result (the caller's full parse then reports) whenever it fails.
        let text = serde_json::to_string(&events).unwrap();
        let streamed = synap_events::fold::fold_events_text_streaming(&text, &opts);
        match fold_events(&events, &opts) {
            Ok(a) => prop_assert_eq!(streamed, Some(a)),
            Err(_) => prop_assert!(streamed.is_none()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The regression corpus
// ---------------------------------------------------------------------------------------------

/// Replays `tests/regressions/*.json`. Each file is an object with a `kind` and a `description`:
///
/// - `"event"`: `input` (any JSON) goes through [`check_event`]; optional `expect`:
///   `{ "valid": bool, "issues": [{ "path", "code" }] }` (issues compared exactly, in order).
/// - `"fold"`: `events` (an array) and `options` (any JSON) go through [`check_fold`]; optional
///   `expect`: either members of the serialized result (`state`, `version`, `deleted`,
///   `lastTimestamp`) or `{ "error": { "code", "index" } }`.
/// - `"merge_patch"`: `target` and `patch` go through [`check_merge_patch`]; optional `expect`:
///   the patched value.
#[test]
fn corpus_replays_every_file() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
    let files: BTreeSet<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert!(
        files.len() >= 10,
        "the corpus has {} files, want at least 10",
        files.len()
    );
    let mut kinds = BTreeSet::new();
    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(file).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
        let kind = doc["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no kind"))
            .to_owned();
        assert!(doc["description"].is_string(), "{name} has no description");
        kinds.insert(kind.clone());
        let outcome = std::panic::catch_unwind(|| replay(&kind, &doc));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{name}: {message}"));
        }
    }
    assert_eq!(
        kinds,
        ["event", "fold", "merge_patch"].map(str::to_owned).into(),
        "every kind is in the corpus"
    );
    assert!(failures.is_empty(), "corpus failures:\n{}", failures.join("\n"));
}

fn replay(kind: &str, doc: &Value) {
    let expect = doc.get("expect");
    match kind {
        "event" => {
            let parsed = check_event(&doc["input"]);
            if let Some(expect) = expect {
                assert_eq!(expect["valid"].as_bool(), Some(parsed.is_ok()), "valid");
                if let Some(issues) = expect.get("issues") {
                    let got: Vec<Value> = parsed
                        .err()
                        .unwrap_or_default()
                        .iter()
                        .map(|i| json!({"path": i.path, "code": i.code}))
                        .collect();
                    assert_eq!(&Value::Array(got), issues, "issues");
                }
            }
        }
        "fold" => {
            let events = doc["events"].as_array().expect("events is an array");
            let options = doc.get("options").unwrap_or(&Value::Null);
            let result = check_fold(events, options);
            match expect {
                None => {}
                Some(e) if e.get("error").is_some() => {
                    let err = parse_fold_options(options)
                        .and_then(|o| fold_events(events, &o))
                        .expect_err("expected a fold error");
                    let (code, index) = fold_code(&err);
                    assert_eq!(json!({"code": code, "index": index}), e["error"]);
                }
                Some(e) => {
                    let got = serde_json::to_value(result.expect("expected the fold to succeed")).unwrap();
                    for (key, want) in e.as_object().expect("expect is an object") {
                        assert_eq!(&got[key], want, "{key}");
                    }
                }
            }
        }
        "merge_patch" => {
            let result = check_merge_patch(&doc["target"], &doc["patch"]);
            if let Some(expect) = expect {
                assert_eq!(&result, expect);
            }
        }
        other => panic!("unknown kind {other:?}"),
    }
}
