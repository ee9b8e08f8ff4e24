//! Database benchmarks against DATABASE_URL (`scripts/db.sh start` prints one), each run in a
//! fresh schema: `DATABASE_URL=... cargo bench --bench database`.

use std::sync::atomic::{AtomicI32, Ordering};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;
use synap_events::{
    AggregateType, CountFilter, EventRepository, NewEvent, RepositoryConfig, StreamOptions, UserStreamOptions,
};
use tokio::runtime::Runtime;
use uuid::Uuid;

fn setup(rt: &Runtime) -> EventRepository {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL: run scripts/db.sh start");
    let schema = format!("bench_{}", std::process::id());
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .await
            .expect("schema");
        let mut config = RepositoryConfig::new(url);
        config.schema = Some(schema);
        let repo = EventRepository::new(config).expect("repository");
        repo.migrate().await.expect("migrate");
        repo
    })
}

fn event(aggregate: Uuid, version: i32, user: &str) -> NewEvent {
    NewEvent::new(
        aggregate,
        AggregateType::Entity,
        if version == 1 {
            "entity.created"
        } else {
            "entity.updated"
        },
        user,
        json!({ "title": format!("v{version}"), "updatedFields": ["title"] }),
        version,
    )
}

fn database(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let repo = setup(&rt);

    // Single append: the next version of one aggregate each iteration.
    let aggregate = Uuid::now_v7();
    let version = AtomicI32::new(0);
    c.bench_function("db/append", |b| {
        b.iter(|| {
            let v = version.fetch_add(1, Ordering::SeqCst) + 1;
            rt.block_on(repo.append(event(aggregate, v, "bench-user"))).unwrap()
        })
    });

    let mut group = c.benchmark_group("db/append_batch");
    group.sample_size(10);
    for n in [100usize, 1_000, 10_000] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let events: Vec<NewEvent> = (0..n).map(|_| event(Uuid::now_v7(), 1, "batch-user")).collect();
                rt.block_on(repo.append_batch(events)).unwrap()
            })
        });
    }
    group.finish();

    // Reads: a 1,000-event stream, a user stream and a count.
    let stream = Uuid::now_v7();
    let events: Vec<NewEvent> = (1..=1000).map(|v| event(stream, v, "reader")).collect();
    rt.block_on(repo.append_batch(events)).unwrap();
    c.bench_function("db/aggregate_stream_1000", |b| {
        b.iter(|| {
            rt.block_on(repo.get_aggregate_stream(stream, &StreamOptions::default()))
                .unwrap()
        })
    });
    // Replay of that stream folded in Rust as the rows arrive, without a snapshot; then the
    // latest state of a 10,000-event stream with a snapshot 1,000 events behind.
    let folding = synap_events::FoldOptions::default();
    c.bench_function("db/replay_1000", |b| {
        b.iter(|| rt.block_on(repo.replay(stream, &folding)).unwrap())
    });
    let long = Uuid::now_v7();
    for start in (1..=9_000).step_by(1_000) {
        let events: Vec<NewEvent> = (start..start + 1_000).map(|v| event(long, v, "replayer")).collect();
        rt.block_on(repo.append_batch(events)).unwrap();
    }
    rt.block_on(repo.snapshot(long)).unwrap();
    let events: Vec<NewEvent> = (9_001..=10_000).map(|v| event(long, v, "replayer")).collect();
    rt.block_on(repo.append_batch(events)).unwrap();
    c.bench_function("db/replay_latest_snapshot_1000_behind", |b| {
        b.iter(|| {
            let replay = rt.block_on(repo.replay(long, &folding)).unwrap();
            assert_eq!((replay.snapshot_version, replay.result.version), (Some(9_000), 10_000));
            replay
        })
    });
    let options = UserStreamOptions {
        limit: 100,
        ..Default::default()
    };
    c.bench_function("db/user_stream_100", |b| {
        b.iter(|| rt.block_on(repo.get_user_stream("reader", &options)).unwrap())
    });
    let filter = CountFilter {
        user_id: Some("reader".into()),
        ..Default::default()
    };
    c.bench_function("db/count_user", |b| {
        b.iter(|| rt.block_on(repo.count_events(&filter)).unwrap())
    });
}

criterion_group!(benches, database);
criterion_main!(benches);
