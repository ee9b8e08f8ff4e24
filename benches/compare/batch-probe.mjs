// appendBatch against raw COPY into the same table, interleaved (each round runs every
// contender once, so drift on a shared machine hits them alike), medians over REPS rounds:
//   - BATCH events of BATCH new aggregates (the worst case: one guard row created per event)
//   - BATCH events of one new aggregate
//   - COPY (CSV, session_replication_role = replica: no triggers, no guard, no id registry)
// Usage: DATABASE_URL=... [BATCH=1000] [REPS=40] npm run bench:batch
import pg from 'pg'
import { randomUUID } from 'node:crypto'
import { from as copyFrom } from 'pg-copy-streams'
import { pipeline } from 'node:stream/promises'
import { Readable } from 'node:stream'
import { EventRepository } from '@synap/database'
const url = process.env.DATABASE_URL
const schema = `bench_batch_${process.pid}`
const N = Number(process.env.BATCH ?? 1000)
const admin = new pg.Client({ connectionString: url }); await admin.connect()
await admin.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE; CREATE SCHEMA ${schema}; SET search_path = ${schema}`)
const repo = new EventRepository({ connectionString: url, schema })
await repo.migrate()
const ev = (a, v) => ({ aggregateId: a, aggregateType: 'entity', eventType: v === 1 ? 'entity.created' : 'entity.updated', userId: 'bench-user', data: { title: `Title ${v}`, updatedFields: ['title'], n: v }, version: v, source: 'api' })
const now = () => Number(process.hrtime.bigint()) / 1e6
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const manyAggs = () => Array.from({ length: N }, () => ev(randomUUID(), 1))
let oneAgg
const oneAggBatch = () => { oneAgg = randomUUID(); return Array.from({ length: N }, (_, i) => ev(oneAgg, i + 1)) }
const csv = (v) => `"${String(v).replaceAll('"', '""')}"`
const line = (e) => [randomUUID(), new Date().toISOString(), e.aggregateId, e.aggregateType, e.eventType, e.userId, JSON.stringify(e.data), e.version, e.source].map(csv).join(',') + '\n'
const copy = async (events) => {
  await admin.query('BEGIN'); await admin.query("SET LOCAL session_replication_role = replica")
  await pipeline(Readable.from(events.map(line)), admin.query(copyFrom('COPY events_v2 (id, "timestamp", aggregate_id, aggregate_type, event_type, user_id, data, version, source) FROM STDIN (FORMAT csv)')))
  await admin.query('COMMIT')
}
const variants = {
  [`appendBatch, ${N} new aggregates`]: [manyAggs, (b) => repo.appendBatch(b)],
  [`appendBatch, one new aggregate`]: [oneAggBatch, (b) => repo.appendBatch(b)],
  [`COPY, ${N} events`]: [manyAggs, copy],
}
const times = Object.fromEntries(Object.keys(variants).map((k) => [k, []]))
for (let r = 0; r < Number(process.env.REPS ?? 40); r++) {
  for (const [k, [mk, fn]] of Object.entries(variants)) { const input = mk(); const t = now(); await fn(input); times[k].push(now() - t) }
}
const copyMedian = median(times[`COPY, ${N} events`])
console.log(`${N} events per call, median of ${times[`COPY, ${N} events`].length} interleaved rounds`)
for (const [k, ts] of Object.entries(times)) console.log(k.padEnd(40), median(ts).toFixed(2), 'ms', (copyMedian / median(ts)).toFixed(2) + 'x COPY')
repo.close(); await admin.query(`DROP SCHEMA ${schema} CASCADE`); await admin.end()
