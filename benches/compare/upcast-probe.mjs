// What upcasting costs (docs/upcasting.md, docs/performance.md "upcasting"). Half the events are
// stored at schema version 1 and need a two-step chain (a rename, then a map of an enum value);
// the other half are at the latest version.
//
// 1. Without a database: the fold of 100,000 such events from JSON text, wasm and native
//    `foldEventsJson(text, { upcasters })`, against `JSON.parse` plus a hand-written JavaScript
//    upcast-and-reduce, and the same folds without upcasters. Medians of 7.
// 2. With DATABASE_URL: UPCAST_EVENTS events (default 1,000,000) in one stream, then `readAll`
//    over all of them in pages of 1,000 and `replay` of the stream, each by a repository without
//    upcasters and one with, alternating, medians of 3.
//
// Usage: npm run bench:upcast (DATABASE_URL unset: part 1 only)
import { randomUUID } from 'node:crypto'
import { createRequire } from 'node:module'
import { isDeepStrictEqual } from 'node:util'
import { EventRepository, foldEventsJson as nativeFoldJson } from '@synap/database'
import { foldInJs } from './baseline.mjs'
const wasm = createRequire(import.meta.url)('../../wasm/pkg/node/synap_events.js')

const upcasters = [
  { eventType: 'task.updated', fromVersion: 1, operations: [{ op: 'rename', from: 'data.title', to: 'data.name' }] },
  { eventType: 'task.updated', fromVersion: 2, operations: [{ op: 'map', path: 'data.status', values: { todo: 'open', done: 'closed' } }] },
]
const statuses = ['todo', 'done', 'doing']
/** Event i's type, schema version and data: odd ones old (v1, `title`), even ones latest (v3). */
function shape(i) {
  if (i === 0) return { eventType: 'task.created', schemaVersion: 1, data: { name: 'Task', status: 'open' } }
  const old = i % 2 === 1
  return old
    ? { eventType: 'task.updated', schemaVersion: 1, data: { title: `Task ${i}`, status: statuses[i % 3], n: i } }
    : { eventType: 'task.updated', schemaVersion: 3, data: { name: `Task ${i}`, status: i % 3 === 1 ? 'closed' : 'open', n: i } }
}

/** The hand-written JavaScript a user would write instead: upcast each event, then reduce. */
function upcastInJs(e) {
  if (e.eventType !== 'task.updated') return e
  let data = e.data
  let v = e.schemaVersion ?? 1
  if (v === 1) {
    if ('title' in data) {
      const { title, ...rest } = data
      data = { ...rest, name: title }
    }
    v = 2
  }
  if (v === 2) {
    if (data.status === 'todo') data = { ...data, status: 'open' }
    else if (data.status === 'done') data = { ...data, status: 'closed' }
    v = 3
  }
  return { ...e, data, schemaVersion: v }
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const time = (label, fn, runs = 7) => {
  const ts = []
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now()
    fn()
    ts.push(performance.now() - t0)
  }
  console.log(label.padEnd(48), median(ts).toFixed(1), 'ms')
  return median(ts)
}

const start = Date.UTC(2026, 0, 1)
const aggregateId = '0190c6d2-5a4e-7c1b-9a51-3f2d8e7b6a10'
const events = Array.from({ length: 100_000 }, (_, i) => ({
  aggregateId, version: i + 1, timestamp: new Date(start + i * 1000).toISOString(), ...shape(i),
}))
const text = JSON.stringify(events)
const expected = foldInJs(JSON.parse(text).map(upcastInJs)).state
for (const [name, fold] of Object.entries({ wasm: wasm.foldEventsJson, native: nativeFoldJson })) {
  if (!isDeepStrictEqual(fold(text, { upcasters }).state, expected)) throw new Error(`${name} disagrees with the JavaScript upcast`)
}
console.log('fold of 100,000 events from JSON text, half upcast by a two-step chain')
const js = time('JSON.parse + JS upcast + reducer', () => foldInJs(JSON.parse(text).map(upcastInJs)))
time('JSON.parse + reducer (no upcast)', () => foldInJs(JSON.parse(text)))
const w = time('wasm foldEventsJson, upcasters', () => wasm.foldEventsJson(text, { upcasters }))
time('wasm foldEventsJson, none', () => wasm.foldEventsJson(text))
time('native foldEventsJson, upcasters', () => nativeFoldJson(text, { upcasters }))
time('native foldEventsJson, none', () => nativeFoldJson(text))
console.log(`wasm with upcasters is ${(js / w).toFixed(2)}x the JavaScript upcast-and-reduce`)

if (process.env.DATABASE_URL) {
  const n = Number(process.env.UPCAST_EVENTS ?? 1_000_000)
  const schema = `upcast_probe_${process.pid}`
  const plain = new EventRepository({ connectionString: process.env.DATABASE_URL, schema })
  const pg = (await import('pg')).default
  const client = new pg.Client({ connectionString: process.env.DATABASE_URL })
  await client.connect()
  await client.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE; CREATE SCHEMA ${schema}`)
  await plain.migrate()
  const id = randomUUID()
  const t0 = performance.now()
  for (let from = 0; from < n; from += 1000) {
    const batch = []
    for (let i = from; i < Math.min(n, from + 1000); i++) {
      batch.push({ aggregateId: id, aggregateType: 'entity', userId: 'u-bench', version: i + 1, timestamp: new Date(start + i * 1000), ...shape(i) })
    }
    await plain.appendBatch(batch)
  }
  const mode = (await client.query(`SELECT value FROM ${schema}.synap_settings WHERE key = 'storage_mode'`)).rows[0].value
  const fsync = (await client.query('SHOW fsync')).rows[0].fsync
  console.log(`\n${n} events appended in ${((performance.now() - t0) / 1000).toFixed(1)} s (storage mode ${mode}, fsync ${fsync})`)
  const upcasting = new EventRepository({ connectionString: process.env.DATABASE_URL, schema, upcasters })
  const readAll = async (repo) => {
    let after
    let count = 0
    for (;;) {
      const page = await repo.readAll({ after, limit: 1000 })
      count += page.events.length
      after = page.checkpoint
      if (page.events.length === 0 && count >= n) return count
    }
  }
  const timeAsync = async (label, fn) => {
    const t1 = performance.now()
    await fn()
    return performance.now() - t1
  }
  const runs = { readAllNone: [], readAllUp: [], replayNone: [], replayUp: [] }
  for (let r = 0; r < 3; r++) {
    runs.readAllNone.push(await timeAsync('', () => readAll(plain)))
    runs.readAllUp.push(await timeAsync('', () => readAll(upcasting)))
    runs.replayNone.push(await timeAsync('', () => plain.replay(id)))
    runs.replayUp.push(await timeAsync('', () => upcasting.replay(id)))
  }
  const rate = (ms) => `${median(ms).toFixed(0)} ms (${Math.round(n / (median(ms) / 1000)).toLocaleString('en')} events/s)`
  console.log('readAll, pages of 1,000, no upcasters  ', rate(runs.readAllNone))
  console.log('readAll, pages of 1,000, upcasters     ', rate(runs.readAllUp), `${(median(runs.readAllNone) / median(runs.readAllUp)).toFixed(2)}x`)
  console.log('replay, no upcasters                   ', rate(runs.replayNone))
  console.log('replay, upcasters                      ', rate(runs.replayUp), `${(median(runs.replayNone) / median(runs.replayUp)).toFixed(2)}x`)
  const state = (await upcasting.replay(id)).state
  if (!('name' in state) || 'title' in state) throw new Error('the upcast replay kept the stored shape')
  plain.close()
  upcasting.close()
  await client.query(`DROP SCHEMA ${schema} CASCADE`)
  await client.end()
}
