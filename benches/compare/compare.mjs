// Side-by-side comparison, one run, one database, the same data:
//   ours     — @synap/database (the native module)
//   baseline — the design document's algorithm on node-postgres (./baseline.mjs)
//   floor    — raw single-row INSERT and COPY into the same table through node-postgres
// Reports medians over REPEATS runs and ratios (the machine is shared: ratios hold, absolute
// times drift). Usage: DATABASE_URL=... npm run bench:compare   (REPEATS=5, MEMORY=1 by default)
import { createRequire } from 'node:module'
import { execFileSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { randomUUID } from 'node:crypto'
import os from 'node:os'
import { isDeepStrictEqual } from 'node:util'
import pg from 'pg'
import { from as copyFrom } from 'pg-copy-streams'
import { pipeline } from 'node:stream/promises'
import { Readable } from 'node:stream'
import { EventRepository, foldEvents as nativeFold, foldEventsJson as nativeFoldJson } from '@synap/database'
import { BaselineEventRepository, foldInJs } from './baseline.mjs'

const require = createRequire(import.meta.url)
const wasm = require('../../wasm/pkg/node/synap_events.js')

const url = process.env.DATABASE_URL
if (!url) throw new Error('DATABASE_URL is required (scripts/db.sh start prints one)')
const REPEATS = Number(process.env.REPEATS ?? 5)
const DAY = 86_400_000

const now = () => process.hrtime.bigint()
const ms = (t0) => Number(now() - t0) / 1e6
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

function event(aggregateId, version, extra = {}) {
  return {
    aggregateId,
    aggregateType: 'entity',
    eventType: version === 1 ? 'entity.created' : 'entity.updated',
    userId: 'bench-user',
    data: { title: `Title ${version}`, updatedFields: ['title'], n: version },
    version,
    source: 'api',
    ...extra,
  }
}

const COLUMNS = ['id', 'timestamp', 'aggregate_id', 'aggregate_type', 'event_type', 'user_id', 'data', 'version', 'source']
const csv = (v) => `"${String(v).replaceAll('"', '""')}"`
const copyLine = (e) =>
  [e.id ?? randomUUID(), (e.timestamp ?? new Date()).toISOString(), e.aggregateId, e.aggregateType, e.eventType, e.userId, JSON.stringify(e.data), e.version, e.source]
    .map(csv)
    .join(',') + '\n'

const schema = `bench_compare_${process.pid}`

async function main() {
  const admin = new pg.Client({ connectionString: url })
  await admin.connect()
  await admin.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE; CREATE SCHEMA ${schema}`)
  await admin.query(`SET search_path = ${schema}`)

  const ours = new EventRepository({ connectionString: url, schema, poolSize: 16 })
  await ours.migrate()
  await admin.query(`SELECT synap_ensure_partitions((now() - interval '366 days')::date, (now() + interval '2 days')::date)`)
  const baseline = new BaselineEventRepository({ connectionString: url, schema, max: 16 })
  // The floor writes rows and nothing else: session_replication_role=replica switches off the
  // table's triggers (the feed index's row trigger, NOTIFY), which a real writer would pay for.
  const floor = new pg.Pool({
    connectionString: url,
    max: 16,
    options: `-c search_path=${schema} -c session_replication_role=replica`,
  })
  const rawInsert = (e) =>
    floor.query(
      'INSERT INTO events_v2 (id, aggregate_id, aggregate_type, event_type, user_id, data, version, source) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)',
      [randomUUID(), e.aggregateId, e.aggregateType, e.eventType, e.userId, e.data, e.version, e.source],
    )
  const copy = async (events) => {
    const client = await floor.connect()
    try {
      const stream = client.query(copyFrom(`COPY events_v2 (${COLUMNS.join(', ')}) FROM STDIN (FORMAT csv)`))
      await pipeline(Readable.from(events.map(copyLine)), stream)
    } finally {
      client.release()
    }
  }

  const results = []
  async function measure(workload, contenders, unit, count) {
    const times = Object.fromEntries(Object.keys(contenders).map((k) => [k, []]))
    for (let r = 0; r < REPEATS; r++) {
      for (const [name, fn] of Object.entries(contenders)) {
        const t0 = now()
        await fn(r)
        times[name].push(ms(t0))
      }
    }
    const medians = Object.fromEntries(Object.entries(times).map(([k, v]) => [k, median(v)]))
    results.push({ workload, unit, count, medians })
    console.error(`${workload}: ${Object.entries(medians).map(([k, v]) => `${k} ${v.toFixed(1)} ms`).join(', ')}`)
  }

  // 1. Sequential appends, one client.
  const N_SEQ = 200
  await measure(
    `sequential append x${N_SEQ} (1 client)`,
    {
      ours: async () => {
        const id = randomUUID()
        for (let v = 1; v <= N_SEQ; v++) await ours.append(event(id, v))
      },
      baseline: async () => {
        const id = randomUUID()
        for (let v = 1; v <= N_SEQ; v++) await baseline.append(event(id, v))
      },
      'floor: raw INSERT': async () => {
        const id = randomUUID()
        for (let v = 1; v <= N_SEQ; v++) await rawInsert(event(id, v))
      },
    },
    'append',
    N_SEQ,
  )

  // 2. 16 concurrent clients on distinct aggregates.
  const CLIENTS = 16
  const PER_CLIENT = 25
  const concurrently = (fn) =>
    Promise.all(
      Array.from({ length: CLIENTS }, async () => {
        const id = randomUUID()
        for (let v = 1; v <= PER_CLIENT; v++) await fn(event(id, v))
      }),
    )
  await measure(
    `concurrent append ${CLIENTS} clients x${PER_CLIENT}`,
    {
      ours: () => concurrently((e) => ours.append(e)),
      baseline: () => concurrently((e) => baseline.append(e)),
      'floor: raw INSERT': () => concurrently(rawInsert),
    },
    'append',
    CLIENTS * PER_CLIENT,
  )

  // 3. Batches of 1,000.
  const BATCHES = 10
  const batch = () => Array.from({ length: 1000 }, () => event(randomUUID(), 1))
  await measure(
    `batch of 1,000 x${BATCHES}`,
    {
      ours: async () => {
        for (let i = 0; i < BATCHES; i++) await ours.appendBatch(batch())
      },
      baseline: async () => {
        for (let i = 0; i < BATCHES; i++) await baseline.appendBatch(batch())
      },
      'floor: COPY': async () => {
        for (let i = 0; i < BATCHES; i++) await copy(batch())
      },
    },
    'event',
    BATCHES * 1000,
  )

  // 4. Reads from a table of 1,000,000 events over 365 daily partitions.
  const { rows: have } = await admin.query('SELECT count(*)::int AS n FROM events_v2')
  const background = Math.max(0, 1_000_000 - have[0].n - 1000 - 5000)
  const t0 = now()
  const start = Date.now() - 365 * DAY
  const PAGE = 10_000
  for (let done = 0; done < background; done += PAGE) {
    const page = Array.from({ length: Math.min(PAGE, background - done) }, (_, i) =>
      event(randomUUID(), 1, {
        userId: `user-${(done + i) % 500}`,
        timestamp: new Date(start + Math.floor(((done + i) / background) * 365 * DAY)),
      }),
    )
    await ours.appendBatch(page)
  }
  const loadMs = ms(t0)
  console.error(`loaded ${background} background events with appendBatch(10,000) in ${(loadMs / 1000).toFixed(1)} s (${Math.round(background / (loadMs / 1000))} events/s)`)
  // The stream: 1,000 events over three days, 200 days ago.
  const streamId = randomUUID()
  const streamStart = Date.now() - 200 * DAY
  await ours.appendBatch(
    Array.from({ length: 1000 }, (_, i) => event(streamId, i + 1, { timestamp: new Date(streamStart + i * 250_000) })),
  )
  // A user with 5,000 events over the year, the last week included.
  const feedUser = 'feed-user'
  await ours.appendBatch(
    Array.from({ length: 5000 }, (_, i) => event(randomUUID(), 1, { userId: feedUser, timestamp: new Date(Date.now() - 365 * DAY + i * ((365 * DAY) / 5000)) })),
  )
  await admin.query('ANALYZE events_v2')
  const { rows: parts } = await admin.query(
    "SELECT count(*)::int AS n FROM pg_inherits WHERE inhparent = 'events_v2'::regclass",
  )
  const { rows: total } = await admin.query('SELECT count(*)::int AS n FROM events_v2')
  console.error(`events_v2: ${total[0].n} events in ${parts[0].n} partitions`)

  const READS = 20
  await measure(
    `1,000-event stream read x${READS} (${total[0].n} events, ${parts[0].n} partitions)`,
    {
      ours: async () => {
        for (let i = 0; i < READS; i++) if ((await ours.getAggregateStream(streamId)).length !== 1000) throw new Error('short read')
      },
      baseline: async () => {
        for (let i = 0; i < READS; i++) if ((await baseline.getAggregateStream(streamId)).length !== 1000) throw new Error('short read')
      },
    },
    'read',
    READS,
  )
  await measure(
    `7-day user stream x${READS}`,
    {
      ours: async () => {
        for (let i = 0; i < READS; i++) await ours.getUserStream(feedUser, { days: 7 })
      },
      baseline: async () => {
        for (let i = 0; i < READS; i++) await baseline.getUserStream(feedUser, { days: 7 })
      },
    },
    'read',
    READS,
  )

  // The global feed from the start, in pages of 1,000, as a projection catching up reads it.
  await measure(
    `readAll of every event in pages of 1,000 (${total[0].n} events)`,
    {
      ours: async () => {
        let checkpoint
        let n = 0
        for (;;) {
          const page = await ours.readAll({ after: checkpoint, limit: 1000 })
          if (page.events.length === 0) break
          n += page.events.length
          checkpoint = page.checkpoint
        }
        if (n < total[0].n) throw new Error(`readAll delivered ${n} of ${total[0].n} events`)
      },
    },
    'event',
    total[0].n,
  )

  // 5. Folding 100,000 events.
  const foldInput = Array.from({ length: 100_000 }, (_, i) => ({
    aggregateId: streamId,
    eventType: i === 0 ? 'task.created' : 'task.updated',
    version: i + 1,
    timestamp: new Date(start + i * 1000).toISOString(),
    data: i === 0 ? { title: 'Task', status: 'todo', meta: { p: 1 } } : { title: `Task ${i}`, previousTitle: `Task ${i - 1}`, updatedFields: ['title'], meta: { p: i % 5, t: i % 3 ? i : null } },
  }))
  const expected = foldInJs(foldInput)
  const check = (r) => {
    if (!isDeepStrictEqual(r.state, expected.state)) throw new Error('folds disagree')
  }
  await measure(
    'fold 100,000 events',
    {
      'ours: native': () => check(nativeFold(foldInput)),
      'ours: wasm': () => check(wasm.foldEvents(foldInput)),
      'baseline: JS reducer': () => check(foldInJs(foldInput)),
    },
    'fold',
    1,
  )
  // The same events as JSON text, as a browser receives them from the server.
  const foldText = JSON.stringify(foldInput)
  await measure(
    'fold 100,000 events from JSON text',
    {
      'ours: wasm foldEventsJson': () => check(wasm.foldEventsJson(foldText)),
      'ours: native foldEventsJson': () => check(nativeFoldJson(foldText)),
      'baseline: JSON.parse + JS reducer': () => check(foldInJs(JSON.parse(foldText))),
    },
    'fold',
    1,
  )

  // 6. Peak memory replaying a 1,000,000-event stream, in child processes.
  let memory = null
  if (process.env.MEMORY !== '0') {
    const big = randomUUID()
    const t1 = now()
    for (let v = 1; v <= 1_000_000; v += PAGE) {
      await ours.appendBatch(Array.from({ length: PAGE }, (_, i) => event(big, v + i, { userId: 'replay-user', timestamp: new Date(Date.now() - 30 * DAY + (v + i) * 2000) })))
    }
    console.error(`appended a 1,000,000-event stream in ${(ms(t1) / 1000).toFixed(1)} s`)
    const child = (mode) =>
      JSON.parse(
        // The paged replay runs with a 128 MB V8 heap, so it fails rather than grows if a page leaks.
        execFileSync(process.execPath, [mode === 'paged' ? '--max-old-space-size=128' : '--max-old-space-size=16384', fileURLToPath(new URL('./replay-memory.mjs', import.meta.url)), mode, big], {
          env: { ...process.env, BENCH_SCHEMA: schema },
          encoding: 'utf8',
        }),
      )
    memory = { paged: child('paged'), replay: child('replay'), full: child('full') }
    console.error(`replay 1,000,000 events: ${JSON.stringify(memory)}`)
    // The latest state with a snapshot 1,000 events behind: snapshot, append 1,000, replay.
    await ours.snapshot(big)
    await ours.appendBatch(Array.from({ length: 1_000 }, (_, i) => event(big, 1_000_001 + i, { userId: 'replay-user' })))
    const latest = []
    for (let i = 0; i < 21; i++) {
      const t = now()
      const r = await ours.replay(big)
      latest.push(ms(t))
      if (r.version !== 1_001_000 || r.snapshotVersion !== 1_000_000 || r.eventsFolded !== 1_000) throw new Error(`latest replay: ${JSON.stringify(r)}`)
    }
    memory.latestMs = median(latest)
    console.error(`latest state, snapshot 1,000 behind: median ${memory.latestMs.toFixed(1)} ms of 21`)
  }

  ours.close()
  await baseline.close()
  await floor.end()
  await admin.query(`DROP SCHEMA ${schema} CASCADE`)
  await admin.end()
  report(results, memory, loadMs, background)
}

function report(results, memory, loadMs, background) {
  const lines = []
  lines.push(`Machine: ${os.cpus().length} × ${os.cpus()[0].model}, ${Math.round(os.totalmem() / 2 ** 30)} GiB, Node ${process.version}; REPEATS=${REPEATS}`)
  lines.push('')
  lines.push('| workload | contender | median | per op | ours vs this |')
  lines.push('|---|---|---:|---:|---:|')
  for (const { workload, unit, count, medians } of results) {
    const oursKey = Object.keys(medians).find((k) => k.startsWith('ours'))
    for (const [name, t] of Object.entries(medians)) {
      const ratio = name === oursKey ? '1.00×' : `${(t / medians[oursKey]).toFixed(2)}×`
      lines.push(`| ${workload} | ${name} | ${t.toFixed(1)} ms | ${((t * 1000) / count).toFixed(1)} µs/${unit} | ${ratio} |`)
    }
  }
  lines.push('')
  lines.push('"ours vs this" = this contender\'s median time / ours: above 1 means ours is faster.')
  lines.push(`Loading ${background} events with appendBatch(10,000): ${Math.round(background / (loadMs / 1000))} events/s.`)
  if (memory) {
    lines.push('')
    lines.push('| replay of a 1,000,000-event stream | peak RSS | time |')
    lines.push('|---|---:|---:|')
    lines.push(`| paged: getAggregateStream in 10,000-version windows + foldEvents from a snapshot | ${memory.paged.maxRssMb} MB | ${memory.paged.seconds} s |`)
    lines.push(`| replay(): folded in Rust as the rows arrive | ${memory.replay.maxRssMb} MB | ${memory.replay.seconds} s |`)
    lines.push(`| full: one getAggregateStream + one foldEvents | ${memory.full.maxRssMb} MB | ${memory.full.seconds} s |`)
    lines.push('')
    lines.push(`replay() vs paged: ${(memory.paged.seconds / memory.replay.seconds).toFixed(2)}× faster. Latest state with a snapshot 1,000 events behind (replay(), median of 21): ${memory.latestMs.toFixed(1)} ms.`)
  }
  console.log(lines.join('\n'))
}

main().catch(async (err) => {
  console.error(err)
  const admin = new pg.Client({ connectionString: url })
  await admin.connect()
  await admin.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`)
  await admin.end()
  process.exit(1)
})
