// Drop-in fidelity with the design's repository, and values that must come back exactly: the
// calls are the design's own, as the application that swaps in this module makes them.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { createRequire } from 'node:module'
import { AggregateType, EventSource, foldEvents } from '@synap/database'
import { freshRepository } from './db.mjs'

const require = createRequire(import.meta.url)
const wasm = require('../wasm/pkg/node/synap_events.js')

let db
before(async () => {
  db = await freshRepository('fidelity')
})
after(async () => {
  await db.close()
})

function ev(aggregateId, version, extra = {}) {
  return {
    aggregateId,
    aggregateType: AggregateType.ENTITY,
    eventType: version === 1 ? 'entity.created' : 'entity.updated',
    userId: 'user-456',
    data: { n: version },
    version,
    source: EventSource.API,
    ...extra,
  }
}

async function stream(id, n) {
  await db.repo.appendBatch(Array.from({ length: n }, (_, i) => ev(id, i + 1)))
}

test('getAggregateStream: fromVersion is exclusive, as in the design and its SQL helper', async () => {
  const id = randomUUID()
  await stream(id, 25)
  const versions = async (options) => (await db.repo.getAggregateStream(id, options)).map((e) => e.version)
  const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i)
  assert.deepEqual(await versions({ fromVersion: 10, toVersion: 20 }), range(11, 20))
  assert.deepEqual(await versions(), range(1, 25))
  assert.deepEqual(await versions({ fromVersion: 0 }), range(1, 25))
  // Replaying from a snapshot at version N asks for fromVersion: N and gets N + 1 first.
  assert.equal((await versions({ fromVersion: 24 }))[0], 25)
  const { rows } = await db.sql.query('SELECT version FROM get_aggregate_stream($1, 10) ORDER BY version', [id])
  assert.deepEqual(
    rows.map((r) => r.version),
    range(11, 25),
  )
  // Bounds beyond 2^31 - 1 never wrap around.
  assert.deepEqual(await versions({ toVersion: 2 ** 32 + 1 }), range(1, 25))
  assert.deepEqual(await versions({ fromVersion: 2 ** 32 + 2 }), [])
  assert.deepEqual(await versions({ toVersion: 2 ** 31 }), range(1, 25))
  for (const bad of [{ fromVersion: -1 }, { toVersion: 1.5 }, { fromVersion: Number.NaN }, { eventTypes: 'entity.created' }]) {
    await assert.rejects(db.repo.getAggregateStream(id, bad), { code: 'VALIDATION_FAILED' }, JSON.stringify(bad))
  }
})

test('filters are parameters: any string matches what has it, and nothing else', async () => {
  await stream(randomUUID(), 2)
  assert.equal(await db.repo.countEvents({ eventType: "x' OR '1'='1" }), 0)
  assert.equal(await db.repo.countEvents({ eventType: 'EntityCreated' }), 0)
  assert.equal(await db.repo.countEvents({ userId: '' }), 0)
  assert.equal(await db.repo.countEvents({ userId: 'a\u0000b' }), 0)
  assert.deepEqual(await db.repo.getEventsByType('EntityCreated'), [])
  assert.deepEqual(await db.repo.getUserStream('nobody', { eventTypes: ['Entity Created', "'; --"] }), [])
  assert.deepEqual(await db.repo.getUserStream(''), [])
  assert.ok((await db.repo.countEvents({ eventType: 'entity.created' })) >= 1)
  // What cannot be meant is still refused.
  await assert.rejects(db.repo.getUserStream('u', { days: -1 }), { code: 'VALIDATION_FAILED', field: 'days' })
  await assert.rejects(db.repo.getUserStream('u', { limit: 2.5 }), { code: 'VALIDATION_FAILED', field: 'limit' })
  await assert.rejects(db.repo.getUserStream('u', { eventTypes: 'entity.created' }), {
    code: 'VALIDATION_FAILED',
    field: 'eventTypes',
  })
  await assert.rejects(db.repo.countEvents({ fromDate: 'not a date' }), { code: 'VALIDATION_FAILED', field: 'fromDate' })
})

test('an invalid Date is refused, never read as absent or as 1970', async () => {
  const invalid = new Date(Number.NaN)
  await assert.rejects(db.repo.countEvents({ toDate: invalid }), { code: 'VALIDATION_FAILED', field: 'toDate' })
  await assert.rejects(db.repo.countEvents({ fromDate: invalid }), { code: 'VALIDATION_FAILED', field: 'fromDate' })
  const before = await db.rows()
  await assert.rejects(db.repo.append(ev(randomUUID(), 1, { timestamp: invalid })), {
    code: 'VALIDATION_FAILED',
    field: 'timestamp',
  })
  await assert.rejects(db.repo.appendBatch([ev(randomUUID(), 1), ev(randomUUID(), 1, { timestamp: invalid })]), {
    code: 'VALIDATION_FAILED',
    field: 'events[1].timestamp',
  })
  await assert.rejects(db.repo.appendBatch([ev(randomUUID(), 1), ev(randomUUID(), 1, { timestamp: Number.NaN })]), {
    code: 'VALIDATION_FAILED',
    field: 'events[1].timestamp',
    reason: 'OUT_OF_RANGE',
  })
  assert.deepEqual(await db.rows(), before)
  // A null timestamp is an absent one: the database's time.
  const [stored] = await db.repo.appendBatch([ev(randomUUID(), 1, { timestamp: null })])
  assert.ok(stored.timestamp instanceof Date && !Number.isNaN(stored.timestamp.getTime()))
})

/** Every read path's copy of the event `id` of aggregate `aggregateId`. */
async function everyRead(stored) {
  const byId = (list) => list.find((e) => e.id === stored.id)
  let checkpoint
  let fromFeed
  for (;;) {
    const page = await db.repo.readAll({ after: checkpoint, limit: 1000 })
    fromFeed ??= byId(page.events)
    if (page.events.length === 0) break
    checkpoint = page.checkpoint
  }
  return {
    append: stored,
    stream: byId(await db.repo.getAggregateStream(stored.aggregateId)),
    user: byId(await db.repo.getUserStream(stored.userId)),
    type: byId(await db.repo.getEventsByType(stored.eventType, 1000)),
    correlated: byId(await db.repo.getCorrelatedEvents(stored.correlationId)),
    feed: fromFeed,
  }
}

test('numbers come back exactly on every read path, and records are plain JSON', async () => {
  const data = {
    max: Number.MAX_VALUE,
    min: Number.MIN_VALUE,
    a: 123456789.12345679,
    b: 3941966.9308699667,
    safe: Number.MAX_SAFE_INTEGER,
    big: 9007199254740992,
    huge: 2 ** 60,
    neg: -1.5e-300,
    list: [0.1, 0.2, 0.30000000000000004],
  }
  const stored = await db.repo.append(
    ev(randomUUID(), 1, { userId: `u-${randomUUID()}`, correlationId: randomUUID(), data, metadata: { n: Number.MAX_VALUE } }),
  )
  for (const [path, record] of Object.entries(await everyRead(stored))) {
    assert.ok(record, `${path} returned the event`)
    assert.deepEqual(record.data, data, path)
    assert.equal(record.metadata.n, Number.MAX_VALUE, path)
    for (const value of Object.values(record.data)) {
      assert.notEqual(typeof value, 'bigint', path)
    }
    // JSON.stringify works, as with the design's pg records.
    assert.deepEqual(JSON.parse(JSON.stringify(record.data)), data, path)
  }
  // A BigInt cannot be sent as JSON: refused with a code, nothing written.
  await assert.rejects(db.repo.append(ev(randomUUID(), 1, { data: { n: 10n } })), { code: 'VALIDATION_FAILED' })
})

test('timestamps in every year both PostgreSQL and the store can hold come back exactly, and fold', async () => {
  // PostgreSQL's earliest instant, the year -1, the first instant past 9999 (JavaScript writes
  // it +010000-...), its 29 February, and the latest millisecond the store reads back.
  for (const ms of [-210866803200000, -62198755200000, 253402300800000, 253407398400000, 8210266876799999]) {
    for (const timestamp of [ms, new Date(ms)]) {
      const stored = await db.repo.append(
        ev(randomUUID(), 1, { userId: `u-${randomUUID()}`, correlationId: randomUUID(), timestamp }),
      )
      const iso = new Date(ms).toISOString()
      for (const [path, record] of Object.entries(await everyRead(stored))) {
        // The user stream reads a window of recent days.
        if (path === 'user' && !record) continue
        assert.ok(record, `${path} returned the event of ${iso}`)
        assert.equal(record.timestamp.getTime(), ms, `${path}: ${iso}`)
      }
      const stream = await db.repo.getAggregateStream(stored.aggregateId)
      assert.equal(foldEvents(stream).lastTimestamp, iso)
      assert.equal(wasm.foldEvents(JSON.parse(JSON.stringify(stream))).lastTimestamp, iso)
    }
  }
  // Before PostgreSQL's earliest, or past the latest year the store reads back: refused.
  const before = await db.rows()
  for (const ms of [-210866803200001, 8210266876800000]) {
    for (const timestamp of [ms, new Date(ms), new Date(ms).toISOString()]) {
      await assert.rejects(db.repo.append(ev(randomUUID(), 1, { timestamp })), {
        code: 'VALIDATION_FAILED',
        field: 'timestamp',
      })
    }
  }
  assert.deepEqual(await db.rows(), before)
})

test('keys come in the order node-postgres gives them, on every read path and from append', async () => {
  // jsonb keeps keys shortest first, then by bytes; JavaScript puts integer-like keys first.
  const data = { title: 'x', b: 1, aa: { zz: 1, c: [{ yy: 1, x: 2 }] }, status: 's', meta: 1, 10: 1, 2: 2, Z: 0, é: 1 }
  const metadata = { requestId: 'r', ip: '::1', agent: { version: 2, os: 'linux' } }
  const stored = await db.repo.append(
    ev(randomUUID(), 1, { userId: `u-${randomUUID()}`, correlationId: randomUUID(), data, metadata }),
  )
  const { rows } = await db.sql.query('SELECT data, metadata FROM events_v2 WHERE id = $1', [stored.id])
  const design = (value) => JSON.stringify(value)
  assert.notEqual(design(rows[0].data), JSON.stringify(data), 'the stored order differs from the input order')
  for (const [path, record] of Object.entries(await everyRead(stored))) {
    assert.ok(record, `${path} returned the event`)
    assert.equal(design(record.data), design(rows[0].data), path)
    assert.equal(design(record.metadata), design(rows[0].metadata), path)
  }
})

test('the fold keeps keys in the order a JavaScript reducer makes them', () => {
  const id = randomUUID()
  const events = [
    { aggregateId: id, eventType: 'entity.created', version: 1, timestamp: 0, data: { title: 'a', b: 1, aa: { z: 1, c: 2 } } },
    { aggregateId: id, eventType: 'entity.updated', version: 2, timestamp: 1, data: { b: null, zz: 1, aa: { z: null, d: 3 } } },
    { aggregateId: id, eventType: 'entity.updated', version: 3, timestamp: 2, data: { b: 2, title: 'c' } },
  ]
  // {...state, ...data} with deletes: JavaScript's own order.
  const expected = { title: 'c', aa: { c: 2, d: 3 }, zz: 1, b: 2 }
  for (const fold of [foldEvents, wasm.foldEvents]) {
    assert.equal(JSON.stringify(fold(events).state), JSON.stringify(expected))
  }
})

test('a __proto__ key is data: an own property on every read path, never the prototype', async () => {
  const data = JSON.parse('{"__proto__": {"admin": true}, "title": "t", "nested": {"__proto__": 5}}')
  assert.ok(Object.hasOwn(data, '__proto__'))
  const stored = await db.repo.append(ev(randomUUID(), 1, { userId: `u-${randomUUID()}`, correlationId: randomUUID(), data }))
  for (const [path, record] of Object.entries(await everyRead(stored))) {
    assert.ok(Object.hasOwn(record.data, '__proto__'), path)
    assert.equal(Object.getPrototypeOf(record.data), Object.prototype, path)
    assert.equal(record.data.admin, undefined, `${path}: not fooled by the key`)
    assert.deepEqual(Object.keys(record.data).sort(), ['__proto__', 'nested', 'title'], path)
    assert.equal(record.data.nested['__proto__'], 5, path)
    assert.ok(Object.hasOwn(record.data.nested, '__proto__'), path)
  }
  const folded = foldEvents([stored])
  assert.ok(Object.hasOwn(folded.state, '__proto__'))
  assert.equal(folded.state.admin, undefined)
  const folded2 = wasm.foldEvents([stored])
  assert.ok(Object.hasOwn(folded2.state, '__proto__'))
})

test('foldEvents: toVersion and toTimestamp, and an unknown option key is refused', () => {
  const id = randomUUID()
  const events = [1, 2, 3].map((v) => ({
    ...ev(id, v),
    data: { n: v },
    timestamp: new Date(Date.UTC(2024, 0, v)),
  }))
  for (const fold of [foldEvents, wasm.foldEvents]) {
    assert.equal(fold(events, { toVersion: 2 }).state.n, 2)
    assert.equal(fold(events, { toTimestamp: new Date(Date.UTC(2024, 0, 1)) }).state.n, 1)
    for (const bad of [{ upToVersion: 2 }, { toVerison: 2 }, { bookkeeping: { ignorekeys: [] } }]) {
      assert.throws(() => fold(events, bad), { code: 'INVALID_OPTIONS' }, JSON.stringify(bad))
    }
  }
})

test('event ids are unique across the store; a retried batch returns what is stored', async () => {
  const x = randomUUID()
  const a = randomUUID()
  const first = await db.repo.append(ev(a, 1, { id: x }))
  // The idempotent retry of the same event.
  assert.equal((await db.repo.append(ev(a, 1, { id: x }))).id, first.id)
  const before = await db.rows()
  await assert.rejects(db.repo.append(ev(randomUUID(), 1, { id: x })), { code: 'DUPLICATE_EVENT_ID', field: 'id' })
  await assert.rejects(db.repo.append(ev(a, 2, { id: x })), { code: 'DUPLICATE_EVENT_ID' })
  await assert.rejects(db.repo.appendBatch([ev(randomUUID(), 1), ev(randomUUID(), 1, { id: x })]), {
    code: 'DUPLICATE_EVENT_ID',
    field: 'events[1].id',
  })
  assert.deepEqual(await db.rows(), before)

  // A batch retried after a lost reply: the same ids at the same versions give the stored events.
  const b = randomUUID()
  const batch = [ev(b, 1, { id: randomUUID() }), ev(b, 2, { id: randomUUID() }), ev(randomUUID(), 1, { id: randomUUID() })]
  const stored = await db.repo.appendBatch(batch)
  const again = await db.repo.appendBatch(batch)
  assert.deepEqual(
    again.map((e) => [e.id, e.version, e.position]),
    stored.map((e) => [e.id, e.version, e.position]),
  )
  // Part of it stored, part new: a conflict that says so.
  await assert.rejects(db.repo.appendBatch([batch[0], batch[1], ev(b, 3, { id: randomUUID() })].slice(1)), {
    code: 'BATCH_PARTLY_STORED',
  })
})

test("a user handle's close() ends that handle only", async () => {
  const scoped = db.repo.forUser('someone')
  assert.equal(typeof (await scoped.countEvents()), 'number')
  scoped.close()
  await assert.rejects(scoped.countEvents(), { code: 'CONNECTION_FAILED' })
  // The repository it came from, and its other handles, go on.
  await db.repo.append(ev(randomUUID(), 1))
  assert.equal(typeof (await db.repo.forUser('other').countEvents()), 'number')
})
