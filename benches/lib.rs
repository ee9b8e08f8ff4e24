//! Inputs shared by the benchmarks in this folder.

use serde_json::{json, Value};

/// One event as the TypeScript API sends it.
pub fn sample_event_json() -> Value {
    json!({
        "aggregateId": "00000000-0000-0000-0000-000000000001",
        "aggregateType": "entity",
        "eventType": "entity.updated",
        "userId": "user-456",
        "data": { "title": "New title", "updatedFields": ["title"], "tags": ["a", "b"], "n": 5 },
        "version": 5,
        "correlationId": "7d3c1a52-1b7e-4f7e-9d59-4f7b8f5d8c11",
        "source": "api"
    })
}

/// A stream of `n` events of one aggregate: a `.created` then updates touching a few keys.
pub fn delta_stream(n: usize) -> Vec<Value> {
    let mut events = Vec::with_capacity(n);
    for v in 1..=n {
        let data = if v == 1 {
            json!({ "title": "Task", "status": "todo", "tags": ["a"], "meta": { "priority": 1 } })
        } else {
            json!({
                "title": format!("Task {v}"),
                "previousTitle": format!("Task {}", v - 1),
                "updatedFields": ["title", "meta"],
                "meta": { "priority": v % 5, "touched": if v % 3 == 0 { Value::Null } else { json!(v) } },
            })
        };
        events.push(json!({
            "aggregateId": "00000000-0000-0000-0000-000000000001",
            "eventType": if v == 1 { "task.created" } else { "task.updated" },
            "version": v,
            "timestamp": 1_767_225_600_000i64 + v as i64 * 1000,
            "data": data,
        }));
    }
    events
}
