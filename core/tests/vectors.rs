//! The shared JSON test vectors in `vectors/`, which the Node module and the wasm build run too.

use serde_json::{json, Value};
use synap_events::validate::{parse_timestamp, report};
use synap_events::{
    apply_delta, fold_events, fold_records, parse_fold_options, Error, EventRecord, FoldResult, Limits, Result,
};

fn load(file: &str, text: &str) -> Vec<Value> {
    let doc: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
    match doc.get("cases") {
        Some(Value::Array(cases)) => cases.clone(),
        _ => panic!("{file} has no \"cases\" array"),
    }
}

fn name(case: &Value) -> &str {
    case.get("name").and_then(Value::as_str).expect("every case has a name")
}

/// What a fold gave, in the vector's terms: the serialized result or `{ code, index }`.
fn outcome(result: Result<impl serde::Serialize>) -> std::result::Result<Value, Value> {
    match result {
        Ok(r) => Ok(serde_json::to_value(&r).expect("a fold result serializes")),
        Err(Error::Fold { index, ref reason, .. }) => Err(json!({ "code": reason.code(), "index": index })),
        Err(other) => panic!("not a fold error: {other:?}"),
    }
}

/// The event as a stored record, when the vector's JSON can be one (UUIDs, integer version).
fn as_record(event: &Value) -> Option<EventRecord> {
    let mut event = event.as_object()?.clone();
    let timestamp = parse_timestamp(event.get("timestamp")?)?;
    event.insert("timestamp".into(), json!(timestamp.to_rfc3339()));
    for (key, default) in [
        ("id", json!("00000000-0000-0000-0000-0000000000ff")),
        ("aggregateType", json!("entity")),
        ("userId", json!("vector-user")),
        ("source", json!("api")),
    ] {
        event.entry(key).or_insert(default);
    }
    serde_json::from_value(Value::Object(event)).ok()
}

#[test]
fn fold_vectors() {
    let cases = load(
        "fold.json",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../vectors/fold.json")),
    );
    assert!(
        cases.len() >= 40,
        "fold.json has {} cases, want at least 40",
        cases.len()
    );
    let mut failures = Vec::new();
    let mut records_checked = 0;
    for case in &cases {
        let name = name(case);
        let events = case["events"].as_array().expect("events is an array");
        let expected = match (case.get("expect"), case.get("expectError")) {
            (Some(e), None) => Ok(e.clone()),
            (None, Some(e)) => Err(e.clone()),
            _ => panic!("{name}: needs exactly one of expect and expectError"),
        };
        let (got, options) = match parse_fold_options(case.get("options").unwrap_or(&Value::Null)) {
            Ok(options) => (outcome(fold_events(events, &options)), Some(options)),
            Err(e) => (outcome(Err::<FoldResult, _>(e)), None),
        };
        if got != expected {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
            continue;
        }
        // The typed entry point must agree wherever the events can be typed.
        let records: Option<Vec<EventRecord>> = events.iter().map(as_record).collect();
        if let (Some(options), Some(records)) = (&options, records) {
            records_checked += 1;
            let typed = outcome(fold_records(&records, options));
            if typed != expected {
                failures.push(format!("{name} (fold_records): expected {expected:?}, got {typed:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing fold vectors:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        records_checked >= 30,
        "only {records_checked} cases ran through fold_records"
    );
}

#[test]
fn merge_patch_vectors() {
    let cases = load(
        "merge_patch.json",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../vectors/merge_patch.json")),
    );
    assert!(
        cases.len() >= 10,
        "merge_patch.json has {} cases, want at least 10",
        cases.len()
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            let got = apply_delta(&case["target"], &case["patch"]);
            (got != case["expect"]).then(|| format!("{}: expected {}, got {got}", name(case), case["expect"]))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "failing merge-patch vectors:\n{}",
        failures.join("\n")
    );
}

#[test]
fn validate_vectors() {
    let cases = load(
        "validate.json",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../vectors/validate.json")),
    );
    assert!(
        cases.len() >= 20,
        "validate.json has {} cases, want at least 20",
        cases.len()
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            let r = report(&case["input"], &Limits::default());
            let got = json!({
                "valid": r.valid,
                "codes": r.errors.iter().map(|i| json!({ "path": i.path, "code": i.code.as_str() })).collect::<Vec<_>>(),
            });
            (got != case["expect"]).then(|| format!("{}: expected {}, got {got}", name(case), case["expect"]))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "failing validate vectors:\n{}",
        failures.join("\n")
    );
}

/// `vectors/upcast.json`: each definition is refused with its code, step and reason, or brings
/// the events to the expected ones; and folding the events under the definition gives what
/// folding the expected events does.
#[test]
fn upcast_vectors() {
    use synap_events::interop::upcast_events_json;
    let cases = load(
        "upcast.json",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../vectors/upcast.json")),
    );
    assert!(
        cases.len() >= 25,
        "upcast.json has {} cases, want at least 25",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let name = name(case);
        let upcasters = case.get("upcasters").cloned().unwrap_or(Value::Null);
        if let Some(expected) = case.get("expectError") {
            let got = match upcast_events_json(json!([]), &upcasters) {
                Err(e @ Error::InvalidUpcasters { .. }) => {
                    let mut d = e.details();
                    d.remove("retryable");
                    d.insert("code".into(), json!(e.code()));
                    Value::Object(d)
                }
                other => json!(format!("{other:?}")),
            };
            if &got != expected {
                failures.push(format!("{name}: expected {expected}, got {got}"));
            }
            continue;
        }
        let events = case["events"].clone();
        let expected = &case["expect"];
        match upcast_events_json(events.clone(), &upcasters) {
            Ok(got) if &got == expected => {}
            other => failures.push(format!("{name}: expected {expected}, got {other:?}")),
        }
        let under = parse_fold_options(&json!({ "upcasters": upcasters })).expect("a valid definition");
        let folded = outcome(fold_events(events.as_array().unwrap(), &under));
        let direct = outcome(fold_events(expected.as_array().unwrap(), &Default::default()));
        if folded != direct {
            failures.push(format!(
                "{name} (fold): under upcasters {folded:?}, of the expected events {direct:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing upcast vectors:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
