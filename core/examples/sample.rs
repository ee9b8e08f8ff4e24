//! The design document's sample script, in Rust: append an event, read its aggregate stream and
//! its user's stream.
//!
//!     DATABASE_URL=postgres://... cargo run -p synap-events --example sample

use serde_json::json;
use synap_events::{AggregateType, EventRepository, EventSource, NewEvent, StreamOptions, UserStreamOptions};
use uuid::Uuid;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repo = EventRepository::from_env()?;
    repo.migrate().await?;

    // A fresh aggregate each run, so the sample can run again on the same database.
    let aggregate_id = Uuid::now_v7();
    let mut event = NewEvent::new(
        aggregate_id,
        AggregateType::Entity,
        "test.event",
        "test-user",
        json!({ "message": "Hello TimescaleDB!" }),
        1,
    );
    event.source = EventSource::Api;
    let stored = repo.append(event).await?;
    println!("Event appended: {}", stored.id);

    let stream = repo
        .get_aggregate_stream(aggregate_id, &StreamOptions::default())
        .await?;
    println!("Stream has {} events", stream.len());

    let user_events = repo
        .get_user_stream(
            "test-user",
            &UserStreamOptions {
                days: 1,
                ..Default::default()
            },
        )
        .await?;
    println!("User has {} events", user_events.len());
    Ok(())
}
