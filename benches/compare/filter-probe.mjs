// What a server-side filter saves a consumer of a rare type (docs/performance.md "filtered
// feeds"). FILTER_EVENTS events (default 1,000,000) over about 12 days, 1% of them of the type
// `task.completed`, the rest `entity.updated`; then a catch-up from the start in pages of 1,000
// until `caughtUp`, unfiltered and with `eventTypes: ['task.completed']`, alternating, medians
// of 3. Each catch-up is checked: the unfiltered one sees every event, the filtered one exactly
// the rare ones.
//
// Usage: DATABASE_URL=... npm run bench:filter
// FILTER_SCHEMA=name reads a store an earlier run left there (FILTER_KEEP=1 keeps it) instead
// of writing one; FILTER_ONLY=unfiltered times only the unfiltered catch-up (which an older
// build, without filters, can run too: that is how "unfiltered loses nothing" is measured).
import { randomUUID } from 'node:crypto'
import { EventRepository } from '@synap/database'

if (!process.env.DATABASE_URL) throw new Error('DATABASE_URL must point at PostgreSQL (scripts/db.sh start)')
const n = Number(process.env.FILTER_EVENTS ?? 1_000_000)
const reuse = process.env.FILTER_SCHEMA
const schema = reuse ?? `filter_probe_${process.pid}`
const repo = new EventRepository({ connectionString: process.env.DATABASE_URL, schema })
const pg = (await import('pg')).default
const client = new pg.Client({ connectionString: process.env.DATABASE_URL })
await client.connect()
if (!reuse) {
  await client.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE; CREATE SCHEMA ${schema}`)
  await repo.migrate()
}

const start = Date.UTC(2026, 0, 1)
const t0 = performance.now()
let rare = reuse ? Math.floor((n - 38) / 100) + 1 : 0
for (let from = 0; from < n && !reuse; from += 1000) {
  const aggregateId = randomUUID()
  const batch = []
  for (let i = from; i < Math.min(n, from + 1000); i++) {
    const isRare = i % 100 === 37
    rare += isRare ? 1 : 0
    batch.push({
      aggregateId,
      aggregateType: 'entity',
      eventType: isRare ? 'task.completed' : 'entity.updated',
      userId: 'u-bench',
      data: { n: i, title: `Item ${i}`, tags: ['a', 'b'] },
      version: i - from + 1,
      timestamp: new Date(start + i * 1000),
    })
  }
  await repo.appendBatch(batch)
}
const mode = (await client.query(`SELECT value FROM ${schema}.synap_settings WHERE key = 'storage_mode'`)).rows[0].value
const fsync = (await client.query('SHOW fsync')).rows[0].fsync
console.log(`schema ${schema}: ${n} events (${rare} task.completed) appended in ${((performance.now() - t0) / 1000).toFixed(1)} s (storage mode ${mode}, fsync ${fsync})`)

async function catchUp(options) {
  let after
  let events = 0
  let pages = 0
  for (;;) {
    const page = await repo.readAll({ ...options, after, limit: 1000 })
    pages++
    events += page.events.length
    after = page.checkpoint
    // Unfiltered, as a reader without `caughtUp` (an older build) would: until an empty page.
    const done = options.eventTypes ? page.caughtUp : page.events.length === 0
    if (done && events >= (options.eventTypes ? rare : n)) return { events, pages }
  }
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const runs = { all: [], filtered: [] }
let shape
const kinds = [['all', {}], ['filtered', { eventTypes: ['task.completed'] }]]
for (let r = 0; r < 3; r++) {
  for (const [key, options] of kinds.slice(0, process.env.FILTER_ONLY === 'unfiltered' ? 1 : 2)) {
    const t1 = performance.now()
    const got = await catchUp(options)
    runs[key].push(performance.now() - t1)
    const want = key === 'all' ? n : rare
    if (got.events !== want) throw new Error(`${key}: ${got.events} events, expected ${want}`)
    shape = { ...shape, [key]: got.pages }
  }
}
const rate = (ms) => `${median(ms).toFixed(0)} ms (${Math.round(n / (median(ms) / 1000)).toLocaleString('en')} rows/s)`
console.log(`unfiltered catch-up, pages of 1,000      ${rate(runs.all)}, ${shape.all} pages`)
if (runs.filtered.length) {
  console.log(`eventTypes: ['task.completed'] catch-up  ${rate(runs.filtered)}, ${shape.filtered} pages`)
  console.log(`filtered / unfiltered time: ${(median(runs.filtered) / median(runs.all)).toFixed(3)}`)
}
repo.close()
if (!process.env.FILTER_KEEP) await client.query(`DROP SCHEMA ${schema} CASCADE`)
await client.end()
