// The repository through a transaction-mode pooler beside the same calls direct, and beside the
// design's algorithm on node-postgres through the same pooler:
//   single   — 200 appends one after another, each to a new aggregate
//   clients  — 16 clients appending 25 events each at once, each to a new aggregate
//   batch    — appendBatch of 1,000 events of new aggregates
// In a database of its own (the public schema: node-postgres cannot set a search_path through the
// pooler either), interleaved rounds, medians, ratios. Usage:
//   DIRECT_URL=postgres://...:54329/postgres POOLED_URL=postgres://...:54339/postgres [REPS=9] \
//     npm run bench:pooler
// With POOLER_PIDFILE (e.g. .local/pgbouncer/pgbouncer.pid) it also says how much CPU time the
// pooler process spent per run of each work through it (from /proc, 10 ms ticks).
import pg from 'pg'
import { randomUUID } from 'node:crypto'
import { EventRepository } from '@synap/database'
import { BaselineEventRepository } from './baseline.mjs'

const direct = process.env.DIRECT_URL
const pooled = process.env.POOLED_URL
if (!direct || !pooled) throw new Error('DIRECT_URL (the server) and POOLED_URL (PgBouncer in transaction mode) are required')
const REPS = Number(process.env.REPS ?? 9)
const database = `synap_pooler_bench_${process.pid}`

const at = (url, db) => {
  const u = new URL(url)
  u.pathname = `/${db}`
  u.search = ''
  return u.toString()
}
const now = () => Number(process.hrtime.bigint()) / 1e6
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const ev = (a, v = 1) => ({ aggregateId: a, aggregateType: 'entity', eventType: v === 1 ? 'entity.created' : 'entity.updated', userId: 'bench-user', data: { title: `x${v}` }, version: v, source: 'api' })

const admin = new pg.Client({ connectionString: direct })
await admin.connect()
await admin.query(`DROP DATABASE IF EXISTS ${database}`)
await admin.query(`CREATE DATABASE ${database}`)
const directUrl = at(direct, database)
const pooledUrl = at(pooled, database)
const stores = {
  'ours, direct': new EventRepository({ connectionString: directUrl, poolSize: 16, pooler: 'none' }),
  'ours, pooled': new EventRepository({ connectionString: pooledUrl, poolSize: 16, pooler: 'transaction' }),
  'design on node-postgres, pooled': new BaselineEventRepository({ connectionString: pooledUrl, max: 16 }),
  'design on node-postgres, direct': new BaselineEventRepository({ connectionString: directUrl, max: 16 }),
}
await stores['ours, direct'].migrate()

const work = {
  single: async (s) => {
    for (let i = 0; i < 200; i++) await s.append(ev(randomUUID()))
  },
  clients: async (s) => {
    await Promise.all(Array.from({ length: 16 }, async () => {
      for (let i = 0; i < 25; i++) await s.append(ev(randomUUID()))
    }))
  },
  batch: async (s) => {
    await s.appendBatch(Array.from({ length: 1000 }, () => ev(randomUUID())))
  },
}
const times = {}
const poolerPid = process.env.POOLER_PIDFILE ? (await import('node:fs')).readFileSync(process.env.POOLER_PIDFILE, 'utf8').trim() : null
const poolerCpu = async () => {
  const stat = (await import('node:fs')).readFileSync(`/proc/${poolerPid}/stat`, 'utf8')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) * 10 // utime + stime, ticks of 10 ms
}
const cpu = {}
for (let r = 0; r < REPS; r++) {
  for (const [w, run] of Object.entries(work)) {
    for (const [name, store] of Object.entries(stores)) {
      const c = poolerPid ? await poolerCpu() : 0
      const t = now()
      await run(store)
      ;(times[`${w}|${name}`] ??= []).push(now() - t)
      if (poolerPid) (cpu[`${w}|${name}`] ??= []).push((await poolerCpu()) - c)
    }
  }
}
const { rows } = await admin.query("SELECT current_setting('fsync') AS fsync, current_setting('server_version') AS version")
console.log(`PostgreSQL ${rows[0].version}, fsync ${rows[0].fsync}, native partitions; PgBouncer in transaction mode; medians of ${REPS} interleaved rounds (ms)`)
console.log('work'.padEnd(9), Object.keys(stores).map((n) => n.padStart(32)).join(''), '  pooled/direct  ours/design (pooled)')
for (const w of Object.keys(work)) {
  const m = Object.fromEntries(Object.keys(stores).map((n) => [n, median(times[`${w}|${n}`])]))
  console.log(
    w.padEnd(9),
    Object.values(m).map((v) => v.toFixed(1).padStart(32)).join(''),
    `  ${(m['ours, direct'] / m['ours, pooled']).toFixed(2)}x`.padStart(15),
    `${(m['design on node-postgres, pooled'] / m['ours, pooled']).toFixed(2)}x`.padStart(13),
  )
}
if (poolerPid) {
  console.log('pooler CPU per run, mean (ms):')
  for (const w of Object.keys(work)) {
    const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length
    console.log(' ', w.padEnd(9), Object.keys(stores).map((n) => `${n}: ${mean(cpu[`${w}|${n}`]).toFixed(1)}`).join(', '))
  }
}
for (const s of Object.values(stores)) await (s.close ? s.close() : s.pool.end())
await admin.query(`DROP DATABASE ${database} WITH (FORCE)`)
await admin.end()
