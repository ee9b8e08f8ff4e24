// Consumer groups through the Node module: projections exactly once with members in processes
// killed by SIGKILL, parking, the transaction's query, status, and bad options.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { AggregateType } from '@synap/database'
import { freshRepository } from './db.mjs'

const READ_MODEL = `CREATE TABLE applied (event_id uuid NOT NULL, aggregate_id uuid NOT NULL,
  version integer NOT NULL, member text NOT NULL, seq bigserial)`

let db
before(async () => {
  db = await freshRepository('groups')
  await db.sql.query(READ_MODEL)
})
after(async () => {
  await db.close()
})

const ev = (aggregateId, version) => ({
  aggregateId,
  aggregateType: AggregateType.ENTITY,
  eventType: version === 1 ? 'task.created' : 'task.updated',
  userId: 'u1',
  data: { n: version },
  version,
})

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Appends `count` events over `aggregates` new aggregates in batches of 1 to 20. */
async function write(repo, count, aggregates) {
  const ids = Array.from({ length: aggregates }, () => randomUUID())
  const versions = new Array(aggregates).fill(0)
  let written = 0
  for (let round = 0; written < count; round++) {
    const size = Math.min(1 + ((round * 7) % 20), count - written)
    const batch = []
    for (let k = 0; k < size; k++) {
      const a = (round * 13 + k * 5) % aggregates
      versions[a] += 1
      batch.push(ev(ids[a], versions[a]))
    }
    await repo.appendBatch(batch)
    written += size
  }
  return written
}

async function waitFor(check, what, limitMs = 60000) {
  const start = Date.now()
  for (;;) {
    const value = await check()
    if (value) return value
    assert.ok(Date.now() - start < limitMs, `${what} after ${limitMs} ms`)
    await sleep(50)
  }
}

/** The read model holds every event of the store once, each aggregate's in version order. */
async function assertReadModelIsTheFeed(sql) {
  const { rows: counts } = await sql.query(
    // The events' ids first (materialized): Citus joins no distributed table with a local one.
    `WITH e AS MATERIALIZED (SELECT id FROM events_v2)
     SELECT (SELECT count(*) FROM e)::int AS events, (SELECT count(*) FROM applied)::int AS applied,
            (SELECT count(*) FROM e WHERE NOT EXISTS (SELECT 1 FROM applied a WHERE a.event_id = e.id))::int AS missing`,
  )
  assert.equal(counts[0].missing, 0)
  assert.equal(counts[0].applied, counts[0].events, 'no event applied twice')
  const { rows } = await sql.query('SELECT aggregate_id, version FROM applied ORDER BY seq')
  const last = new Map()
  for (const r of rows) {
    assert.equal(r.version, (last.get(r.aggregate_id) ?? 0) + 1, `aggregate ${r.aggregate_id} in order`)
    last.set(r.aggregate_id, r.version)
  }
}

test('project: members in processes killed with SIGKILL neither lose nor repeat an event', async () => {
  const member = fileURLToPath(new URL('./fixtures/group-member.mjs', import.meta.url))
  const leaseMs = 600
  const start = (name) =>
    spawn(process.execPath, [member, db.schema, 'killed', name, String(leaseMs)], { stdio: 'ignore', env: process.env })
  const names = ['m0', 'm1', 'm2', 'm3']
  const children = names.map(start)
  try {
    const writing = write(db.repo, 8000, 200)
    let done = false
    writing.then(() => (done = true))
    let kills = 0
    let seed = 12345
    while (!done || kills < 12) {
      seed = (seed * 1103515245 + 12345) % 2147483648
      await sleep(150 + (seed % 250))
      const i = seed % 4
      const victim = `${names[i]}-${children[i].pid}`
      const exited = new Promise((resolve) => children[i].once('exit', resolve))
      children[i].kill('SIGKILL')
      await exited
      kills++
      children[i] = start(names[i])
      // Its partitions are taken over within a lease and a renewal (plus a batch in hand).
      const killedAt = Date.now()
      await waitFor(async () => {
        const { rows } = await db.sql.query(
          "SELECT count(*)::int AS n FROM consumer_group_partitions WHERE group_name = 'killed' AND owner = $1",
          [victim],
        )
        return rows[0].n === 0
      }, 'the dead member still holds partitions', leaseMs * 3)
      assert.ok(Date.now() - killedAt < leaseMs * 3)
    }
    const n = await writing
    await waitFor(async () => {
      const { rows } = await db.sql.query('SELECT count(DISTINCT event_id)::int AS n FROM applied')
      return rows[0].n === n
    }, 'not every event applied')
    await assertReadModelIsTheFeed(db.sql)
    const [status] = (await db.repo.groups()).filter((g) => g.group === 'killed')
    assert.equal(status.lagEvents, 0)
    assert.equal(status.partitions.length, 8)
    assert.equal(status.parked, 0)
  } finally {
    for (const c of children) c.kill('SIGKILL')
  }
})

test('consume: a failing handler parks its event, the aggregate waits, the rest flow, retry releases', async () => {
  const { repo, sql } = await freshRepository('groups_park')
  try {
    const [a, b] = [randomUUID(), randomUUID()]
    for (let v = 1; v <= 4; v++) await repo.appendBatch([ev(a, v), ev(b, v)])
    const seen = []
    let healed = false
    const run = await repo.consume({
      group: 'park',
      partitions: 4,
      batchSize: 10,
      maxAttempts: 2,
      retryBackoffMs: 1,
      pollIntervalMs: 50,
      leaseMs: 1000,
      handler: async (events) => {
        if (!healed && events.some((e) => e.aggregateId === a && e.version === 2)) {
          throw new Error('cannot project version 2')
        }
        seen.push(...events.map((e) => `${e.aggregateId === a ? 'a' : 'b'}${e.version}`))
      },
    })
    assert.match(run.member, /./)
    const parked = await waitFor(async () => {
      const p = await repo.parked('park')
      return p.length === 3 && p
    }, 'not parked')
    assert.deepEqual(
      parked.map((p) => p.state),
      ['failed', 'waiting', 'waiting'],
    )
    assert.equal(parked[0].error, 'cannot project version 2')
    await waitFor(() => seen.filter((s) => s.startsWith('b')).length === 4, 'b did not flow')
    assert.deepEqual(seen.filter((s) => s.startsWith('a')), ['a1'])
    healed = true
    await repo.retryParked('park', parked[0].eventId)
    await waitFor(() => seen.length === 8, 'a was not released')
    assert.deepEqual(seen.filter((s) => s.startsWith('a')), ['a1', 'a2', 'a3', 'a4'])
    await assert.rejects(repo.skipParked('park', parked[0].eventId), { code: 'VALIDATION_FAILED' })
    await assert.rejects(repo.retryParked('park', 'not-a-uuid'), { code: 'VALIDATION_FAILED', field: 'eventId' })
    await run.stop()
    await run.done()
    const [status] = await repo.groups()
    assert.deepEqual(status.members, [])
    assert.equal(status.parked + status.waiting, 0)
  } finally {
    await sql.query('SELECT 1')
    repo.close()
    await sql.end()
  }
})

test('project: tx.query converts parameters and rows like node-postgres, and ends with the batch', async () => {
  const { repo, sql } = await freshRepository('groups_tx')
  try {
    await sql.query(`CREATE TABLE rm (id uuid PRIMARY KEY, n integer, big bigint, f float8, ok boolean,
                     at timestamptz, day date, doc jsonb, tags text[])`)
    await repo.append(ev(randomUUID(), 1))
    let kept
    let rows
    const run = await repo.project({
      group: 'tx',
      pollIntervalMs: 50,
      handler: async (events, tx) => {
        const e = events[0]
        await tx.query(
          'INSERT INTO rm VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)',
          [e.id, e.version, '9007199254740993', 0.5, true, e.timestamp, '2026-11-28', { deep: [1, 'x'] }, ['a', null]],
        )
        rows = (await tx.query('SELECT * FROM rm WHERE id = $1', [e.id])).rows
        kept = tx
      },
    })
    await waitFor(() => rows, 'never handled')
    await run.stop()
    assert.equal(rows.length, 1)
    const r = rows[0]
    assert.equal(r.n, 1)
    assert.equal(r.big, '9007199254740993')
    assert.equal(r.f, 0.5)
    assert.equal(r.ok, true)
    assert.equal(r.day, '2026-11-28')
    assert.deepEqual(r.doc, { deep: [1, 'x'] })
    assert.match(r.at, /^\d{4}-\d\d-\d\dT/)
    await assert.rejects(kept.query('SELECT 1'), { code: 'VALIDATION_FAILED' })
    const { rows: stored } = await sql.query('SELECT count(*)::int AS n FROM rm')
    assert.equal(stored[0].n, 1, 'the write committed with the checkpoint')
  } finally {
    repo.close()
    await sql.end()
  }
})

test('project: a tx.query still running when the handler settles stays inside the batch', async () => {
  const { repo, sql } = await freshRepository('groups_late')
  try {
    await sql.query('CREATE TABLE late (event_id uuid NOT NULL, attempt integer NOT NULL)')
    await repo.append(ev(randomUUID(), 1))
    let attempts = 0
    const run = await repo.project({
      group: 'late',
      pollIntervalMs: 50,
      retryBackoffMs: 1,
      handler: async (events, tx) => {
        attempts += 1
        const insert = tx.query('INSERT INTO late SELECT $1, $2 FROM pg_sleep(0.05)', [events[0].id, attempts])
        if (attempts === 1) {
          // Not awaited, and the batch fails: the insert must roll back with it.
          insert.catch(() => {})
          throw new Error('first try fails')
        }
        // Not awaited, and the batch succeeds: the insert commits with it.
        insert.catch(() => {})
      },
    })
    await waitFor(async () => attempts >= 2 && (await repo.groups()).find((g) => g.group === 'late')?.lagEvents === 0, 'never caught up')
    await run.stop()
    const { rows } = await sql.query('SELECT attempt FROM late ORDER BY attempt')
    assert.deepEqual(rows.map((r) => r.attempt), [2], 'only the successful try wrote, inside its batch')
  } finally {
    repo.close()
    await sql.end()
  }
})

test('project: tx.query gives back what it takes, or refuses it with a field', async () => {
  const { repo, sql } = await freshRepository('groups_hostile')
  try {
    await repo.append(ev(randomUUID(), 1))
    let got
    const run = await repo.project({
      group: 'hostile',
      pollIntervalMs: 50,
      handler: async (_events, tx) => {
        const one = async (text, params) => {
          try {
            return { rows: (await tx.query(text, params)).rows }
          } catch (e) {
            return { code: e.code, field: e.field }
          }
        }
        got = {
          nan: await one('SELECT $1::float8 AS v', [NaN]),
          infinite: await one('SELECT $1::float8[] AS v', [[1, Infinity]]),
          badDate: await one('SELECT $1::timestamptz AS v', [new Date(NaN)]),
          nanColumn: await one("SELECT 'NaN'::float8 AS v", []),
          real: await one('SELECT 0.1::real AS v', []),
          hugeReal: await one('SELECT $1::real AS v', [1e39]),
          unsafeInt: await one('SELECT $1::bigint AS v', [2 ** 62]),
          bigString: await one('SELECT $1::bigint AS v', ['4611686018427387904']),
          micros: await one('SELECT $1::timestamptz AS v', ['2026-11-28T10:00:00.123456Z']),
          millis: await one('SELECT $1::timestamptz AS v', ['2026-11-28T10:00:00.123Z']),
          infiniteDate: await one("SELECT 'infinity'::date AS v", []),
          offsetTimestamp: await one('SELECT $1::timestamp AS v', ['2026-11-28T12:00:00+02:00']),
          dayTime: await one('SELECT $1::date AS v', ['2026-11-28T05:00:00Z']),
          day: await one('SELECT $1::date AS v', ['2026-11-28']),
        }
      },
    })
    await waitFor(() => got, 'never handled')
    await run.stop()
    const refused = (field) => ({ code: 'VALIDATION_FAILED', field })
    assert.deepEqual(got.nan, refused('params[0]'))
    assert.deepEqual(got.infinite, refused('params[0][1]'))
    assert.deepEqual(got.badDate, refused('params[0]'))
    assert.deepEqual(got.nanColumn, refused('columns[0]'))
    assert.deepEqual(got.real, { rows: [{ v: 0.1 }] })
    assert.deepEqual(got.hugeReal, refused('params[0]'))
    assert.deepEqual(got.unsafeInt, refused('params[0]'))
    assert.deepEqual(got.bigString, { rows: [{ v: '4611686018427387904' }] })
    assert.deepEqual(got.micros, { rows: [{ v: '2026-11-28T10:00:00.123456Z' }] })
    assert.deepEqual(got.millis, { rows: [{ v: '2026-11-28T10:00:00.123Z' }] })
    assert.deepEqual(got.infiniteDate, refused('columns[0]'))
    assert.deepEqual(got.offsetTimestamp, refused('params[0]'))
    assert.deepEqual(got.dayTime, refused('params[0]'))
    assert.deepEqual(got.day, { rows: [{ v: '2026-11-28' }] })
  } finally {
    repo.close()
    await sql.end()
  }
})

test('bad consumer-group options are refused with codes, and nothing is written', async () => {
  const { repo, sql } = await freshRepository('groups_bad')
  try {
    const handler = async () => {}
    await assert.rejects(repo.consume({ group: 'g' }), { code: 'VALIDATION_FAILED', field: 'handler' })
    await assert.rejects(repo.consume(null), { code: 'VALIDATION_FAILED' })
    await assert.rejects(repo.consume({ handler }), { code: 'VALIDATION_FAILED', field: 'group' })
    await assert.rejects(repo.consume({ group: 'g', handler, batchSize: 0 }), { code: 'VALIDATION_FAILED', field: 'batchSize' })
    await assert.rejects(repo.consume({ group: 'g', handler, batchSize: 2.5 }), { code: 'VALIDATION_FAILED' })
    await assert.rejects(repo.consume({ group: 'g', handler, batchsize: 5 }), { code: 'VALIDATION_FAILED', field: 'batchsize' })
    await assert.rejects(repo.project({ group: 'g', handler, partitions: 5000 }), { code: 'VALIDATION_FAILED', field: 'partitions' })
    await assert.rejects(repo.consume({ group: 'g', handler, leaseMs: -1 }), { code: 'VALIDATION_FAILED', field: 'lease' })
    await assert.rejects(repo.forUser('u1').consume({ group: 'g', handler }), { code: 'PERMISSION_DENIED' })
    await assert.rejects(repo.parked('none'), { code: 'VALIDATION_FAILED' })
    const { rows } = await sql.query('SELECT count(*)::int AS n FROM consumer_groups')
    assert.equal(rows[0].n, 0)
  } finally {
    repo.close()
    await sql.end()
  }
})
