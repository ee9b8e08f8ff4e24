//! SQL injection through the public API: hostile strings in every string and array parameter,
//! against a real PostgreSQL (each test in its own schema, see `common`).
//!
//! Where a value is legal (user ids, data and metadata keys and values) it must be stored and read
//! back byte for byte, and filters must match exactly that value (no LIKE wildcards, no SQL).
//! Where the validator refuses it (event types, blank or NUL user ids, NUL in data, enum and UUID
//! fields, identifiers in the configuration) the call must fail with `VALIDATION_FAILED` (or
//! `INVALID_CONFIG`) and write nothing. Each database test ends by checking that `events_v2` and
//! `event_streams` still exist with exactly the rows it wrote.

mod common;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use synap_events::validate::{parse_aggregate_type_arg, parse_event, parse_uuid_arg};
use synap_events::{
    AggregateType, CountFilter, Error, EventRecord, EventRepository, IssueCode, Limits, NewEvent, Result,
    StreamOptions, UserStreamOptions,
};
use uuid::Uuid;

/// Classic and less classic payloads. All are legal user ids (not blank, no U+0000, short) and
/// none is a legal event type, aggregate type, source or UUID.
const PAYLOADS: &[&str] = &[
    "'; DROP TABLE events_v2; --",
    "'); DELETE FROM event_streams; --",
    "' OR '1'='1",
    "' OR 1=1 --",
    "1' OR '1'='1' /*",
    "$1",
    "$1::text",
    "$$; DROP TABLE event_streams; $$",
    "\\",
    "\\'",
    "\\\\'; --",
    "%",
    "_",
    "%%",
    "a%",
    "_%_",
    "*",
    ")) UNION SELECT id, \"timestamp\", aggregate_id FROM events_v2 --",
    "\" OR \"\"=\"",
    "\"; DROP TABLE \"events_v2",
    "E'\\x27'",
    "\\x00",
    "\\u0000",
    "/* */ OR /**/ 1=1",
    "\u{2019} OR \u{2018}1\u{2019}=\u{2019}1",
    "\u{ff07} OR \u{ff07}1\u{ff07}=\u{ff07}1",
    "\u{201c}; DROP TABLE events_v2; \u{201d}",
    "\u{202e}1=1 RO '",
    "🦀' OR ''='",
    "line\r\nbreak; --",
    "null",
    "NULL",
];

const CONTROL_USER: &str = "control-user";

fn assert_refused<T: std::fmt::Debug>(result: Result<T>, want_field: &str, want_reasons: &[IssueCode]) {
    match result {
        Err(
            ref e @ Error::Validation {
                ref field, ref reason, ..
            },
        ) => {
            assert_eq!(e.code(), "VALIDATION_FAILED");
            assert_eq!(field, want_field, "{e}");
            assert!(
                want_reasons.contains(reason),
                "{reason} is not one of {want_reasons:?}: {e}"
            );
        }
        other => panic!("expected VALIDATION_FAILED on {want_field}, got {other:?}"),
    }
}

fn created(aggregate: Uuid, user_id: &str, data: Value) -> NewEvent {
    NewEvent::new(aggregate, AggregateType::Entity, "entity.created", user_id, data, 1)
}

/// Data and metadata that carry the payload as keys and values, at several depths.
fn data_for(payload: &str) -> (Value, Value) {
    let data = json!({
        payload: payload,
        "value": payload,
        "list": [payload, { payload: [payload] }],
        "nested": { payload: { "k": payload } },
    });
    (data, json!({ payload: payload, "tags": [payload] }))
}

async fn tables(repo: &EventRepository) -> BTreeSet<String> {
    let client = common::sql(repo).await;
    client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Both tables still exist, no table disappeared, and they hold exactly the expected rows.
async fn assert_store_intact(repo: &EventRepository, tables_before: &BTreeSet<String>, events: i64, streams: i64) {
    let client = common::sql(repo).await;
    let row = client
        .query_one(
            "SELECT to_regclass('events_v2') IS NOT NULL, to_regclass('event_streams') IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "events_v2 is gone");
    assert!(row.get::<_, bool>(1), "event_streams is gone");
    let now = tables(repo).await;
    assert!(
        tables_before.is_subset(&now),
        "tables disappeared: {:?}",
        tables_before.difference(&now).collect::<Vec<_>>()
    );
    assert_eq!(
        common::count_rows(repo).await,
        (events, streams),
        "(events, streams) rows"
    );
}

/// A few events of another user, which no hostile filter may reach.
async fn control_events(repo: &EventRepository) -> usize {
    let aggregate = Uuid::from_u128(0xC0);
    repo.append(created(aggregate, CONTROL_USER, json!({"n": 1})))
        .await
        .unwrap();
    let mut update = created(aggregate, CONTROL_USER, json!({"n": 2}));
    update.event_type = "entity.updated".into();
    update.version = 2;
    repo.append(update).await.unwrap();
    2
}

fn check_record(record: &EventRecord, user_id: &str, data: &Value, metadata: &Value) {
    assert_eq!(record.user_id.as_bytes(), user_id.as_bytes(), "user id bytes");
    assert_eq!(&record.data, data, "data of {user_id:?}");
    assert_eq!(record.metadata.as_ref(), Some(metadata), "metadata of {user_id:?}");
}

#[tokio::test]
async fn legal_payloads_round_trip_and_filter_exactly() {
    let repo = common::repo("inj_legal").await;
    let tables_before = tables(&repo).await;
    let control = control_events(&repo).await;

    // Single appends through the JSON route (what Node sends), then one batch (the array SQL).
    let mut appended = Vec::new();
    for (i, payload) in PAYLOADS.iter().enumerate() {
        let aggregate = Uuid::from_u128(0x1000 + i as u128);
        let (data, metadata) = data_for(payload);
        let input = json!({
            "aggregateId": aggregate.to_string(),
            "aggregateType": "entity",
            "eventType": "entity.created",
            "userId": payload,
            "data": data,
            "metadata": metadata,
            "version": 1,
        });
        let event = parse_event(&input, &Limits::default()).unwrap_or_else(|e| panic!("{payload:?}: {e:?}"));
        let record = repo.append(event).await.unwrap_or_else(|e| panic!("{payload:?}: {e}"));
        check_record(&record, payload, &data, &metadata);
        appended.push((payload.to_string(), aggregate, record.id, data, metadata));
    }
    let batch: Vec<NewEvent> = PAYLOADS
        .iter()
        .enumerate()
        .map(|(i, payload)| {
            let (data, metadata) = data_for(payload);
            let mut event = created(Uuid::from_u128(0x2000 + i as u128), &format!("{payload}|batch"), data);
            event.metadata = Some(metadata);
            event
        })
        .collect();
    let records = repo.append_batch(batch.clone()).await.unwrap();
    for (event, record) in batch.iter().zip(&records) {
        check_record(record, &event.user_id, &event.data, event.metadata.as_ref().unwrap());
        appended.push((
            event.user_id.clone(),
            event.aggregate_id,
            record.id,
            event.data.clone(),
            event.metadata.clone().unwrap(),
        ));
    }

    for (user_id, aggregate, id, data, metadata) in &appended {
        // Read back through every reader.
        let stream = repo
            .get_aggregate_stream(*aggregate, &StreamOptions::default())
            .await
            .unwrap();
        assert_eq!(stream.len(), 1, "{user_id:?}");
        assert_eq!(stream[0].id, *id);
        check_record(&stream[0], user_id, data, metadata);

        // The user filter matches exactly this user: `%`, `_` and `' OR '1'='1` included.
        let mine = repo
            .get_user_stream(user_id, &UserStreamOptions::default())
            .await
            .unwrap();
        let ids: Vec<Uuid> = mine.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![*id], "get_user_stream({user_id:?})");
        check_record(&mine[0], user_id, data, metadata);

        let filtered = UserStreamOptions {
            event_types: Some(vec!["entity.created".into()]),
            aggregate_types: Some(vec!["entity".into()]),
            ..UserStreamOptions::default()
        };
        assert_eq!(repo.get_user_stream(user_id, &filtered).await.unwrap().len(), 1);
        let other_type = UserStreamOptions {
            event_types: Some(vec!["entity.updated".into()]),
            ..UserStreamOptions::default()
        };
        assert!(repo.get_user_stream(user_id, &other_type).await.unwrap().is_empty());

        let by_user = CountFilter {
            user_id: Some(user_id.clone()),
            ..CountFilter::default()
        };
        assert_eq!(
            repo.count_events(&by_user).await.unwrap(),
            1,
            "count_events({user_id:?})"
        );
        let narrowed = CountFilter {
            event_type: Some("entity.created".into()),
            aggregate_type: Some("entity".into()),
            ..by_user
        };
        assert_eq!(repo.count_events(&narrowed).await.unwrap(), 1);
    }

    // Nothing leaked into the control user's view, and the totals are exact.
    let control_view = repo
        .get_user_stream(CONTROL_USER, &UserStreamOptions::default())
        .await
        .unwrap();
    assert_eq!(control_view.len(), control);
    assert!(control_view.iter().all(|r| r.user_id == CONTROL_USER));
    let total = appended.len() + control;
    assert_eq!(repo.count_events(&CountFilter::default()).await.unwrap(), total as i64);
    let created_events = repo.get_events_by_type("entity.created", 10_000).await.unwrap();
    assert_eq!(created_events.len(), appended.len() + 1);

    assert_store_intact(&repo, &tables_before, total as i64, appended.len() as i64 + 1).await;
    repo.close();
}

#[tokio::test]
async fn like_wildcards_in_event_types_match_literally() {
    let repo = common::repo("inj_like").await;
    let tables_before = tables(&repo).await;
    // `_` is legal in an event type; as a LIKE pattern it would also match `entity.axb`.
    let types = ["entity.a_b", "entity.axb", "entity.a__b", "entity.ab"];
    for (i, t) in types.iter().enumerate() {
        let mut event = created(Uuid::from_u128(0x3000 + i as u128), "like-user", json!({"t": t}));
        event.event_type = (*t).to_owned();
        repo.append(event).await.unwrap();
    }
    for t in types {
        let found = repo.get_events_by_type(t, 100).await.unwrap();
        assert_eq!(found.len(), 1, "get_events_by_type({t})");
        assert_eq!(found[0].event_type, t);
        let filter = CountFilter {
            event_type: Some(t.to_owned()),
            ..CountFilter::default()
        };
        assert_eq!(repo.count_events(&filter).await.unwrap(), 1, "count_events({t})");
        let options = UserStreamOptions {
            event_types: Some(vec![t.to_owned()]),
            ..UserStreamOptions::default()
        };
        let stream = repo.get_user_stream("like-user", &options).await.unwrap();
        assert_eq!(stream.iter().map(|r| r.event_type.as_str()).collect::<Vec<_>>(), [t]);
    }
    // A `%` or `_` user id is no wildcard either: there is no user `%` here.
    for wildcard in ["%", "_", "like%", "like_user", "%user"] {
        assert!(repo
            .get_user_stream(wildcard, &UserStreamOptions::default())
            .await
            .unwrap()
            .is_empty());
        let filter = CountFilter {
            user_id: Some(wildcard.to_owned()),
            ..CountFilter::default()
        };
        assert_eq!(repo.count_events(&filter).await.unwrap(), 0, "count_events({wildcard})");
    }
    assert_store_intact(&repo, &tables_before, types.len() as i64, types.len() as i64).await;
    repo.close();
}

#[tokio::test]
async fn illegal_payloads_are_refused_and_write_nothing() {
    let repo = common::repo("inj_illegal").await;
    let tables_before = tables(&repo).await;
    let control = control_events(&repo).await as i64;
    let known = Uuid::from_u128(0xC0);
    let fresh = Uuid::from_u128(0x4000);
    let bad_type = [IssueCode::InvalidEventType];

    let mut event_types: Vec<String> = PAYLOADS.iter().map(|p| p.to_string()).collect();
    event_types.extend(
        [
            "entity.created'; DROP TABLE events_v2; --",
            "entity.created' OR '1'='1",
            "entity.created%",
            "entity.%",
            "entity._",
            "entity.created OR 1=1",
            "entity.created\u{0}",
            "ENTITY.CREATED",
        ]
        .map(str::to_owned),
    );
    for t in &event_types {
        // Append, typed and through JSON.
        let mut event = created(fresh, "u", json!({}));
        event.event_type = t.clone();
        assert_refused(repo.append(event.clone()).await, "eventType", &bad_type);
        let input = json!({"aggregateId": fresh.to_string(), "aggregateType": "entity", "eventType": t,
                           "userId": "u", "data": {}, "version": 1});
        let issues = parse_event(&input, &Limits::default()).unwrap_err();
        assert_eq!(
            issues.iter().map(|i| (i.path.as_str(), i.code)).collect::<Vec<_>>(),
            [("eventType", IssueCode::InvalidEventType)]
        );
        // A batch with one bad event writes none, not even the good one before it.
        let good = created(Uuid::from_u128(0x4001), "u", json!({}));
        assert_refused(
            repo.append_batch(vec![good, event]).await,
            "events[1].eventType",
            &bad_type,
        );

        // Every event-type filter: a parameter, never SQL, that matches nothing (no stored
        // event has such a type), as in the design.
        let options = UserStreamOptions {
            event_types: Some(vec![t.clone()]),
            ..UserStreamOptions::default()
        };
        assert!(repo.get_user_stream(CONTROL_USER, &options).await.unwrap().is_empty());
        let options = StreamOptions {
            event_types: Some(vec!["entity.created".into(), t.clone()]),
            ..StreamOptions::default()
        };
        let stream = repo.get_aggregate_stream(known, &options).await.unwrap();
        assert!(stream.iter().all(|e| e.event_type == "entity.created"));
        let filter = CountFilter {
            user_id: Some(CONTROL_USER.into()),
            event_type: Some(t.clone()),
            ..CountFilter::default()
        };
        assert_eq!(repo.count_events(&filter).await.unwrap(), 0);
        assert!(repo.get_events_by_type(t, 10).await.unwrap().is_empty());
    }

    // User ids that are blank, hold U+0000 or are too long.
    let bad_user = [IssueCode::InvalidUserId, IssueCode::NulCharacter];
    let user_ids = [
        String::new(),
        " ".into(),
        "\t\r\n".into(),
        "\u{3000}".into(),
        "\0".into(),
        "x\0' OR '1'='1".into(),
        "'; DROP TABLE events_v2; --\0".into(),
        "'".repeat(256),
        "%".repeat(256),
    ];
    for u in &user_ids {
        assert_refused(repo.append(created(fresh, u, json!({}))).await, "userId", &bad_user);
        // As filters they match nothing.
        assert!(repo
            .get_user_stream(u, &UserStreamOptions::default())
            .await
            .unwrap()
            .is_empty());
        let filter = CountFilter {
            user_id: Some(u.clone()),
            ..CountFilter::default()
        };
        assert_eq!(repo.count_events(&filter).await.unwrap(), 0);
    }

    // U+0000 next to a payload, in data and metadata keys and values.
    let nul = [IssueCode::NulCharacter];
    for p in PAYLOADS {
        let key_with_nul = format!("{p}\0");
        let cases = [
            (json!({ *p: format!("{p}\0") }), None, format!("data.{p}")),
            (json!({ &key_with_nul: p }), None, format!("data.{key_with_nul}")),
            (json!({"list": [p, format!("\0{p}")]}), None, "data.list[1]".to_owned()),
            (
                json!({}),
                Some(json!({ *p: [format!("{p}\0")] })),
                format!("metadata.{p}[0]"),
            ),
        ];
        for (data, metadata, path) in cases {
            let mut event = created(fresh, p, data);
            event.metadata = metadata;
            assert_refused(repo.append(event).await, &path, &nul);
        }
    }

    assert_eq!(repo.get_aggregate_version(fresh).await.unwrap(), None);
    assert_eq!(repo.get_aggregate_version(Uuid::from_u128(0x4001)).await.unwrap(), None);
    assert_store_intact(&repo, &tables_before, control, 1).await;
    repo.close();
}

#[test]
fn payloads_in_enum_and_uuid_fields_are_refused() {
    let valid = json!({
        "aggregateId": "00000000-0000-0000-0000-000000000001",
        "aggregateType": "entity",
        "eventType": "entity.created",
        "userId": "u",
        "data": {},
        "version": 1,
    });
    let fields = [
        ("aggregateType", IssueCode::InvalidAggregateType),
        ("source", IssueCode::InvalidSource),
        ("aggregateId", IssueCode::InvalidUuid),
        ("id", IssueCode::InvalidUuid),
        ("causationId", IssueCode::InvalidUuid),
        ("correlationId", IssueCode::InvalidUuid),
    ];
    for p in PAYLOADS {
        for (field, code) in fields {
            let mut input = valid.clone();
            input[field] = json!(p);
            let issues = parse_event(&input, &Limits::default()).unwrap_err();
            assert_eq!(
                issues.iter().map(|i| (i.path.as_str(), i.code)).collect::<Vec<_>>(),
                [(field, code)],
                "{field} = {p:?}"
            );
        }
        assert_refused(
            parse_aggregate_type_arg("aggregateTypes[0]", p),
            "aggregateTypes[0]",
            &[IssueCode::InvalidAggregateType],
        );
        assert_refused(
            parse_uuid_arg("correlationId", p),
            "correlationId",
            &[IssueCode::InvalidUuid],
        );
    }
}

#[test]
fn payloads_in_configured_identifiers_are_refused() {
    let identifier = |s: &str| {
        !s.is_empty()
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let mut names: Vec<&str> = PAYLOADS.to_vec();
    names.extend(["", "Events", "a b", "a-b", "public.events; --", "events\"", "x.y.z"]);
    for name in names {
        let mut config = common::config("inj_config");
        config.schema = Some(name.to_owned());
        let result = EventRepository::new(config);
        if identifier(name) {
            assert!(result.is_ok(), "{name:?} is a plain identifier");
        } else {
            assert_eq!(
                result.err().map(|e| e.code()),
                Some("INVALID_CONFIG"),
                "schema {name:?}"
            );
        }
        let mut config = common::config("inj_config");
        config.dual_write_legacy_table = Some(name.to_owned());
        let result = EventRepository::new(config);
        if name.split('.').count() <= 2 && name.split('.').all(identifier) {
            assert!(result.is_ok(), "{name:?} is a plain table name");
        } else {
            assert_eq!(
                result.err().map(|e| e.code()),
                Some("INVALID_CONFIG"),
                "legacy table {name:?}"
            );
        }
    }
}
