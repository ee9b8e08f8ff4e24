//! Pure benchmarks: validation of one event, the fold, merge patch. `cargo bench --bench pure`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;
use std::hint::black_box;
use synap_events::validate::{parse_event, report};
use synap_events::{apply_merge_patch, fold_events, FoldOptions, Limits};
use synap_events_benches::{delta_stream, sample_event_json};

fn validation(c: &mut Criterion) {
    let event = sample_event_json();
    let limits = Limits::default();
    c.bench_function("validate/parse_event", |b| {
        b.iter(|| parse_event(black_box(&event), &limits).unwrap())
    });
    let mut bad = event.clone();
    bad["aggregateId"] = json!("entity-123");
    bad["eventType"] = json!("Bad Type");
    c.bench_function("validate/report_invalid", |b| {
        b.iter(|| report(black_box(&bad), &limits))
    });
}

fn fold(c: &mut Criterion) {
    let mut group = c.benchmark_group("fold");
    group.sample_size(20);
    for n in [10_000usize, 100_000] {
        let events = delta_stream(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("deltas", n), &events, |b, events| {
            b.iter(|| fold_events(black_box(events), &FoldOptions::default()).unwrap())
        });
    }
    // The shape of the comparison harness's fold input, as JSON text (what foldEventsJson gets).
    let text = serde_json::to_string(&harness_fold_input(100_000)).unwrap();
    group.throughput(Throughput::Elements(100_000));
    group.bench_function("json_text/100000", |b| {
        b.iter(|| synap_events::interop::fold_events_json_text(black_box(&text), &serde_json::Value::Null).unwrap())
    });
    group.finish();
}

/// The events `benches/compare/compare.mjs` folds: one aggregate, a title change with its
/// bookkeeping companions and a nested object per event.
fn harness_fold_input(n: usize) -> serde_json::Value {
    let start = chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap();
    serde_json::Value::Array(
        (0..n)
            .map(|i| {
                let data = if i == 0 {
                    json!({ "title": "Task", "status": "todo", "meta": { "p": 1 } })
                } else {
                    json!({ "title": format!("Task {i}"), "previousTitle": format!("Task {}", i - 1),
                            "updatedFields": ["title"], "meta": { "p": i % 5, "t": if i % 3 != 0 { json!(i) } else { json!(null) } } })
                };
                json!({
                    "aggregateId": "0190c6d2-5a4e-7c1b-9a51-3f2d8e7b6a10",
                    "eventType": if i == 0 { "task.created" } else { "task.updated" },
                    "version": i + 1,
                    "timestamp": synap_events::format_timestamp(&(start + chrono::Duration::seconds(i as i64))),
                    "data": data,
                })
            })
            .collect(),
    )
}

fn merge_patch(c: &mut Criterion) {
    let target = json!({ "title": "Goodbye!", "author": { "givenName": "John", "familyName": "Doe" },
                         "tags": ["example", "sample"], "content": "This will be unchanged" });
    let patch = json!({ "title": "Hello!", "phoneNumber": "+01-123-456-7890",
                        "author": { "familyName": null }, "tags": ["example"] });
    c.bench_function("merge_patch/rfc7396_example", |b| {
        b.iter(|| {
            let mut t = target.clone();
            apply_merge_patch(&mut t, black_box(&patch));
            t
        })
    });
}

criterion_group!(benches, validation, fold, merge_patch);
criterion_main!(benches);
