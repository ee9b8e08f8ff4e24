// Erasing one user from a full store while other users append (docs/performance.md, "Erasure").
// Loads EVENTS events (default 1,000,000) over the last 30 days with plain SQL: aggregates of 10
// events, one in ten of them the victim's (EVENTS / 10 events), the rest spread over 1,000 other
// users. Then WRITERS clients (default 16) append single events of other users, first for
// BASELINE_MS (default 5000) alone, then while `eraseUser` runs; the latency medians of the two
// windows are compared.
// Usage: DATABASE_URL=... [EVENTS=1000000] [WRITERS=16] [BASELINE_MS=5000] [LOAD_ONLY=1] npm run bench:erase
// (LOAD_ONLY=1 loads the store and leaves its schema, bench_erase_<pid>, for a look with psql.)
import pg from 'pg'
import { randomUUID } from 'node:crypto'
import { EventRepository } from '@synap/database'

const url = process.env.DATABASE_URL
const EVENTS = Number(process.env.EVENTS ?? 1_000_000)
const WRITERS = Number(process.env.WRITERS ?? 16)
const BASELINE_MS = Number(process.env.BASELINE_MS ?? 5000)
const schema = `bench_erase_${process.pid}`
const admin = new pg.Client({ connectionString: url })
await admin.connect()
await admin.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE; CREATE SCHEMA ${schema}; SET search_path = ${schema}`)
const repo = new EventRepository({ connectionString: url, schema, poolSize: WRITERS + 2 })
await repo.migrate()
const { rows: [settings] } = await admin.query(
  "SELECT current_setting('fsync') AS fsync, (SELECT value FROM synap_settings WHERE key = 'storage_mode') AS mode",
)
const now = () => Number(process.hrtime.bigint()) / 1e6
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length * p)]

// The load: aggregate k has versions 1..10 at increasing times; k % 10 = 0 is the victim's.
let t = now()
if (settings.mode !== 'timescaledb') {
  await admin.query("SELECT synap_ensure_partitions(((now() AT TIME ZONE 'UTC')::date - 31), ((now() AT TIME ZONE 'UTC')::date + 2))")
}
const AGGREGATES = Math.floor(EVENTS / 10)
await admin.query(`
  CREATE TEMP TABLE load AS
  SELECT k, v, md5('agg' || k)::uuid AS aggregate_id, gen_random_uuid() AS id,
         CASE WHEN k % 10 = 0 THEN 'victim' ELSE 'user' || (k % 1000) END AS user_id,
         now() - interval '30 days' + (k * (interval '30 days' / $1::int)) + v * interval '1 ms' AS ts
    FROM generate_series(0, $1::int - 1) k, generate_series(1, 10) v`, [AGGREGATES])
// One transaction that records its days in the feed's day index itself, as the append statement
// does, rather than through the per-row trigger.
await admin.query('BEGIN')
await admin.query("SELECT set_config('synap.feed_days', pg_current_xact_id()::text, true)")
await admin.query(`
  INSERT INTO events_v2_feed_days (bucket, day, txid)
  SELECT DISTINCT synap_feed_bucket(pg_current_xact_id()), (ts AT TIME ZONE 'UTC')::date,
         CASE WHEN abs((ts AT TIME ZONE 'UTC')::date - (now() AT TIME ZONE 'UTC')::date) > 1 THEN pg_current_xact_id() END
    FROM load`)
await admin.query(`
  INSERT INTO events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, version, source)
  SELECT id, ts, aggregate_id, 'entity', CASE WHEN v = 1 THEN 'entity.created' ELSE 'entity.updated' END, user_id,
         jsonb_build_object('title', 'title ' || k || ' v' || v, 'n', v), v, 'api'
    FROM load ORDER BY ts`)
await admin.query(`INSERT INTO events_v2_ids (id, aggregate_id, version, user_id) SELECT id, aggregate_id, v, user_id FROM load`)
await admin.query(`
  INSERT INTO event_streams (aggregate_id, aggregate_type, user_id, version, first_timestamp, last_timestamp)
  SELECT aggregate_id, 'entity', min(user_id), 10, min(ts), max(ts) FROM load GROUP BY aggregate_id`)
await admin.query('COMMIT')
await admin.query('DROP TABLE load')
await admin.query('VACUUM ANALYZE events_v2, events_v2_ids, event_streams')
const loadMs = now() - t
if (process.env.LOAD_ONLY === '1') {
  console.log(`loaded ${EVENTS} events into schema ${schema} in ${(loadMs / 1000).toFixed(1)} s (LOAD_ONLY: left in place)`)
  repo.close()
  await admin.end()
  process.exit(0)
}

const ev = (user) => ({
  aggregateId: randomUUID(), aggregateType: 'entity', eventType: 'entity.created', userId: user,
  data: { title: 'during' }, version: 1, source: 'api',
})
// WRITERS clients appending until `until()` says stop; their latencies.
const write = async (until) => {
  const latencies = []
  await Promise.all(Array.from({ length: WRITERS }, async (_, w) => {
    while (!until()) {
      const t0 = now()
      await repo.append(ev(`writer${w}`))
      latencies.push(now() - t0)
    }
  }))
  return latencies
}

// Warm-up, then the baseline window, then the window of the erasure.
let end = now() + 1000
await write(() => now() > end)
end = now() + BASELINE_MS
const baseline = await write(() => now() > end)
let done = false
const during = write(() => done)
await new Promise((r) => setTimeout(r, 200))
t = now()
const report = await repo.eraseUser('victim')
const eraseMs = now() - t
done = true
const latencies = await during
const erased = report.tables.find((x) => x.table === 'events_v2' && x.action === 'deleted').rows

console.log(`${EVENTS} events (${erased} of the erased user), ${WRITERS} writers, fsync ${settings.fsync}, ${settings.mode}; load ${(loadMs / 1000).toFixed(1)} s`)
console.log(`eraseUser: ${(eraseMs / 1000).toFixed(2)} s: deleting ${report.deleteMs} ms, rewriting ${report.rewritten.length} relations ${report.rewriteMs} ms, waiting for older transactions ${report.waitedMs} ms`)
console.log(`append latency, ms     median   p90    p99    appends`)
for (const [name, xs] of [['alone', baseline], ['during the erasure', latencies]]) {
  console.log(`  ${name.padEnd(20)} ${median(xs).toFixed(2).padStart(6)} ${pct(xs, 0.9).toFixed(2).padStart(6)} ${pct(xs, 0.99).toFixed(2).padStart(6)} ${String(xs.length).padStart(8)}`)
}
console.log(`median during / alone: ${(median(latencies) / median(baseline)).toFixed(2)}x`)
repo.close()
await admin.query(`DROP SCHEMA ${schema} CASCADE`)
await admin.end()
