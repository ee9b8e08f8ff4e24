// Concurrent single appends: CLIENTS clients each appending ROUNDS events at once (each to a
// new aggregate, or with ONE_AGGREGATE=1 the versions 1..ROUNDS of one aggregate per client),
// against the same with the events_v2_notify trigger disabled (what a NOTIFY at commit costs).
// Interleaved rounds, medians.
// Usage: DATABASE_URL=... [CLIENTS=16] [ROUNDS=25] [ONE_AGGREGATE=1] [REPS=15] npm run bench:concurrent
import pg from 'pg'
import { randomUUID } from 'node:crypto'
import { EventRepository } from '@synap/database'
const url = process.env.DATABASE_URL
const CLIENTS = Number(process.env.CLIENTS ?? 16), ROUNDS = Number(process.env.ROUNDS ?? 25)
const ONE = process.env.ONE_AGGREGATE === '1'
const schema = `bench_concurrent_${process.pid}`
const admin = new pg.Client({ connectionString: url }); await admin.connect()
await admin.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE; CREATE SCHEMA ${schema}; SET search_path = ${schema}`)
const repo = new EventRepository({ connectionString: url, schema, poolSize: CLIENTS })
await repo.migrate()
const ev = (a, v = 1) => ({ aggregateId: a, aggregateType: 'entity', eventType: v === 1 ? 'entity.created' : 'entity.updated', userId: 'bench-user', data: { title: `x${v}` }, version: v, source: 'api' })
const now = () => Number(process.hrtime.bigint()) / 1e6
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const run = async () => {
  const t = now()
  await Promise.all(Array.from({ length: CLIENTS }, async () => {
    const id = randomUUID()
    for (let i = 0; i < ROUNDS; i++) await repo.append(ONE ? ev(id, i + 1) : ev(randomUUID()))
  }))
  return now() - t
}
const times = { ours: [], 'ours, notify trigger disabled': [] }
for (let r = 0; r < Number(process.env.REPS ?? 15); r++) {
  times.ours.push(await run())
  await admin.query('ALTER TABLE events_v2 DISABLE TRIGGER events_v2_notify')
  times['ours, notify trigger disabled'].push(await run())
  await admin.query('ALTER TABLE events_v2 ENABLE TRIGGER events_v2_notify')
}
const { rows } = await admin.query("SELECT current_setting('fsync') AS fsync, (SELECT value FROM synap_settings WHERE key = 'storage_mode') AS mode")
console.log(`${CLIENTS} clients x ${ROUNDS} appends${ONE ? ' (one aggregate each)' : ''}, fsync ${rows[0].fsync}, ${rows[0].mode}; medians of ${times.ours.length}`)
for (const [k, ts] of Object.entries(times)) console.log(k.padEnd(34), median(ts).toFixed(1), 'ms')
repo.close(); await admin.query(`DROP SCHEMA ${schema} CASCADE`); await admin.end()
