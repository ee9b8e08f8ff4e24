// Every method and option of the Node module, on the real built module and a real PostgreSQL.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { execFileSync } from 'node:child_process'
import { AggregateType, EventSource, EventRepository, validateEvent } from '@synap/database'
import { freshRepository, DATABASE_URL } from './db.mjs'

let db
before(async () => {
  db = await freshRepository('repo')
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

test('enums carry the design names and stored values', () => {
  assert.equal(AggregateType.ENTITY, 'entity')
  assert.equal(AggregateType.RELATION, 'relation')
  assert.equal(AggregateType.USER, 'user')
  assert.equal(AggregateType.SYSTEM, 'system')
  assert.equal(EventSource.API, 'api')
  assert.equal(EventSource.AUTOMATION, 'automation')
  assert.equal(EventSource.SYNC, 'sync')
  assert.equal(EventSource.MIGRATION, 'migration')
  assert.equal(EventSource.SYSTEM, 'system')
})

test('append returns the stored record; optional fields are absent', async () => {
  const id = randomUUID()
  const rec = await db.repo.append(ev(id, 1))
  assert.equal(rec.aggregateId, id)
  assert.equal(rec.aggregateType, 'entity')
  assert.equal(rec.version, 1)
  assert.equal(rec.source, 'api')
  assert.ok(rec.timestamp instanceof Date)
  assert.equal(typeof rec.position, 'number')
  assert.equal(rec.metadata, undefined)
  assert.equal(rec.correlationId, undefined)
  assert.equal(rec.causationId, undefined)
  assert.equal(await db.repo.getAggregateVersion(id), 1)
  assert.equal(await db.repo.getAggregateVersion(randomUUID()), null)
})

test('a conflict carries aggregateId, expectedVersion, actualVersion', async () => {
  const id = randomUUID()
  await db.repo.append(ev(id, 1))
  await db.repo.append(ev(id, 2))
  await assert.rejects(db.repo.append(ev(id, 2)), (err) => {
    assert.ok(err instanceof Error)
    assert.equal(err.code, 'CONCURRENCY_CONFLICT')
    assert.equal(err.aggregateId, id)
    assert.equal(err.expectedVersion, 1)
    assert.equal(err.actualVersion, 2)
    assert.equal(err.retryable, false)
    // The design's message, exactly; the versions are properties.
    assert.equal(err.message, 'Concurrency conflict detected')
    return true
  })
})

test('20 concurrent appends of one version: exactly one wins', async () => {
  const id = randomUUID()
  const results = await Promise.allSettled(
    Array.from({ length: 20 }, (_, i) => db.repo.append(ev(id, 1, { data: { writer: i } }))),
  )
  const fulfilled = results.filter((r) => r.status === 'fulfilled')
  const rejected = results.filter((r) => r.status === 'rejected')
  assert.equal(fulfilled.length, 1)
  assert.equal(rejected.length, 19)
  for (const r of rejected) assert.equal(r.reason.code, 'CONCURRENCY_CONFLICT')
  assert.equal((await db.repo.getAggregateStream(id)).length, 1)
})

test('appendBatch is atomic', async () => {
  const a = randomUUID()
  const b = randomUUID()
  const stored = await db.repo.appendBatch([ev(a, 1), ev(b, 1), ev(a, 2)])
  assert.deepEqual(
    stored.map((e) => e.version),
    [1, 1, 2],
  )
  const before = await db.rows()
  await assert.rejects(db.repo.appendBatch([ev(randomUUID(), 1), ev(a, 3), ev(b, 1)]), {
    code: 'CONCURRENCY_CONFLICT',
    aggregateId: b,
  })
  await assert.rejects(db.repo.appendBatch([ev(randomUUID(), 1), ev(a, 3, { version: 'x' })]), {
    code: 'VALIDATION_FAILED',
    field: 'events[1].version',
  })
  assert.deepEqual(await db.rows(), before)
  assert.equal(await db.repo.getAggregateVersion(a), 2)
})

test('JSON round-trips exactly', async () => {
  const data = {
    nested: { deep: { arr: [1, 2.5, -3, true, null, { k: 'v' }], empty: {} } },
    unicode: 'emoji 🚀✅ café 漢字 \u2028',
    quotes: `it's "quoted" \\ back\\slash\nnew\tline`,
    large: 'y'.repeat(200_000),
    maxSafe: 2 ** 53 - 1,
    minSafe: -(2 ** 53 - 1),
    float: 0.1 + 0.2,
  }
  const id = randomUUID()
  const metadata = { ip: '127.0.0.1', tags: ['a', 'b'] }
  await db.repo.append(ev(id, 1, { data, metadata }))
  const [read] = await db.repo.getAggregateStream(id)
  assert.deepEqual(read.data, data)
  assert.deepEqual(read.metadata, metadata)
})

test('Dates are accepted; undefined members are absent', async () => {
  const id = randomUUID()
  const when = new Date('2026-02-03T04:05:06.789Z')
  const rec = await db.repo.append(ev(id, 1, { timestamp: when, correlationId: undefined, metadata: undefined }))
  assert.equal(rec.timestamp.toISOString(), when.toISOString())
  const [read] = await db.repo.getAggregateStream(id)
  assert.equal(read.timestamp.toISOString(), when.toISOString())
  assert.equal(
    await db.repo.countEvents({ fromDate: new Date('2026-02-03T00:00:00Z'), toDate: new Date('2026-02-04T00:00:00Z') }),
    1,
  )
})

test('a supplied id makes a retried append idempotent', async () => {
  const id = randomUUID()
  const e = ev(randomUUID(), 1, { id })
  const first = await db.repo.append(e)
  const again = await db.repo.append(e)
  assert.deepEqual(again, first)
})

test('stream, user, correlation, type and count queries with every option', async () => {
  const user = `user-${randomUUID()}`
  const a = randomUUID()
  const r = randomUUID()
  const wf = randomUUID()
  const now = Date.now()
  const day = 86_400_000
  await db.repo.appendBatch([
    ev(a, 1, { userId: user, timestamp: new Date(now - 10 * day) }),
    ev(a, 2, { userId: user, timestamp: new Date(now - 3 * day), correlationId: wf }),
    ev(a, 3, { userId: user, timestamp: new Date(now - 2 * day), eventType: 'entity.title_changed' }),
    ev(a, 4, { userId: user, timestamp: new Date(now - 1 * day), correlationId: wf }),
    {
      ...ev(r, 1, { userId: user, correlationId: wf }),
      aggregateType: AggregateType.RELATION,
      eventType: 'relation.created',
    },
  ])
  // The design's semantics: the versions after fromVersion, up to and including toVersion.
  assert.deepEqual(
    (await db.repo.getAggregateStream(a, { fromVersion: 2, toVersion: 3 })).map((e) => e.version),
    [3],
  )
  assert.deepEqual(
    (await db.repo.getAggregateStream(a, { eventTypes: ['entity.title_changed'] })).map((e) => e.version),
    [3],
  )
  const week = await db.repo.getUserStream(user)
  assert.equal(week.length, 4)
  assert.ok(week[0].timestamp >= week[1].timestamp)
  assert.equal((await db.repo.getUserStream(user, { days: 30 })).length, 5)
  assert.equal((await db.repo.getUserStream(user, { days: 30, limit: 2 })).length, 2)
  assert.equal((await db.repo.getUserStream(user, { days: 30, eventTypes: ['entity.created', 'relation.created'] })).length, 2)
  assert.equal((await db.repo.getUserStream(user, { days: 30, aggregateTypes: [AggregateType.RELATION] })).length, 1)
  const workflow = await db.repo.getCorrelatedEvents(wf)
  assert.equal(workflow.length, 3)
  assert.ok(workflow[0].timestamp <= workflow[1].timestamp)
  assert.equal((await db.repo.getEventsByType('entity.title_changed')).length, 1)
  assert.equal((await db.repo.getEventsByType('entity.updated', 1)).length, 1)
  assert.equal(await db.repo.countEvents({ userId: user }), 5)
  assert.equal(await db.repo.countEvents({ userId: user, eventType: 'entity.created' }), 1)
  assert.equal(await db.repo.countEvents({ userId: user, aggregateType: AggregateType.RELATION }), 1)
  assert.equal(await db.repo.countEvents({ userId: user, fromDate: new Date(now - 2.5 * day) }), 3)
  assert.equal(typeof (await db.repo.countEvents()), 'number')
  assert.ok((await db.repo.refreshAnalytics()) >= 1)
})

test('each bad input rejects with its code and writes nothing', async () => {
  const id = randomUUID()
  const base = ev(id, 1)
  const cases = [
    ['missing aggregateId', { ...base, aggregateId: undefined }, 'REQUIRED', 'aggregateId'],
    ['aggregateId not a uuid', { ...base, aggregateId: 'entity-123' }, 'INVALID_UUID', 'aggregateId'],
    ['aggregateId a number', { ...base, aggregateId: 42 }, 'INVALID_TYPE', 'aggregateId'],
    ['unknown aggregateType', { ...base, aggregateType: 'thing' }, 'INVALID_AGGREGATE_TYPE', 'aggregateType'],
    ['missing eventType', { ...base, eventType: undefined }, 'REQUIRED', 'eventType'],
    ['eventType without a dot', { ...base, eventType: 'created' }, 'INVALID_EVENT_TYPE', 'eventType'],
    ['eventType uppercase', { ...base, eventType: 'Entity.Created' }, 'INVALID_EVENT_TYPE', 'eventType'],
    ['eventType injection', { ...base, eventType: "x.y'; DROP TABLE events_v2;--" }, 'INVALID_EVENT_TYPE', 'eventType'],
    ['empty userId', { ...base, userId: '' }, 'INVALID_USER_ID', 'userId'],
    ['userId too long', { ...base, userId: 'u'.repeat(300) }, 'INVALID_USER_ID', 'userId'],
    ['userId with NUL', { ...base, userId: 'a\u0000b' }, 'NUL_CHARACTER', 'userId'],
    ['data missing', { ...base, data: undefined }, 'REQUIRED', 'data'],
    ['data an array', { ...base, data: [1] }, 'INVALID_DATA', 'data'],
    ['data a string', { ...base, data: 'x' }, 'INVALID_DATA', 'data'],
    ['NUL in data', { ...base, data: { a: { b: ['ok', 'x\u0000'] } } }, 'NUL_CHARACTER', 'data.a.b[1]'],
    ['data too large', { ...base, data: { s: 'x'.repeat(1024 * 1024) } }, 'TOO_LARGE', 'data'],
    ['metadata an array', { ...base, metadata: [] }, 'INVALID_METADATA', 'metadata'],
    ['version 0', { ...base, version: 0 }, 'INVALID_VERSION', 'version'],
    ['version 1.5', { ...base, version: 1.5 }, 'INVALID_VERSION', 'version'],
    ['version 2^31', { ...base, version: 2 ** 31 }, 'INVALID_VERSION', 'version'],
    ['version a string', { ...base, version: '1' }, 'INVALID_TYPE', 'version'],
    ['unknown source', { ...base, source: 'email' }, 'INVALID_SOURCE', 'source'],
    ['bad correlationId', { ...base, correlationId: 'workflow-789' }, 'INVALID_UUID', 'correlationId'],
    ['bad causationId', { ...base, causationId: 'nope' }, 'INVALID_UUID', 'causationId'],
    ['bad timestamp', { ...base, timestamp: 'yesterday' }, 'INVALID_TIMESTAMP', 'timestamp'],
  ]
  assert.ok(cases.length >= 20)
  const before = await db.rows()
  for (const [name, input, reason, field] of cases) {
    await assert.rejects(db.repo.append(input), (err) => {
      assert.equal(err.code, 'VALIDATION_FAILED', name)
      assert.equal(err.reason, reason, name)
      assert.equal(err.field, field, name)
      return true
    })
    const report = validateEvent(input)
    assert.equal(report.valid, false, name)
    assert.ok(
      report.errors.some((e) => e.code === reason && e.path === field),
      `${name}: ${JSON.stringify(report.errors)}`,
    )
  }
  assert.deepEqual(await db.rows(), before)
  await assert.rejects(db.repo.getAggregateStream('entity-123'), { code: 'VALIDATION_FAILED', field: 'aggregateId' })
  await assert.rejects(db.repo.getUserStream('u', { days: 0 }), { code: 'VALIDATION_FAILED', field: 'days' })
  await assert.rejects(db.repo.getAggregateStream(randomUUID(), { fromVersion: -1 }), {
    code: 'VALIDATION_FAILED',
    field: 'fromVersion',
  })
  assert.deepEqual(validateEvent(ev(randomUUID(), 1)), { valid: true, errors: [] })
})

test('the default instance names DATABASE_URL when it is unset, and importing never throws', () => {
  const script = `
    const { eventRepository } = require('@synap/database');
    eventRepository.getAggregateVersion('00000000-0000-0000-0000-000000000001')
      .then(() => { console.log('resolved'); process.exit(1) })
      .catch((e) => { console.log(e.code + ' ' + e.message); });
  `
  const env = { ...process.env }
  delete env.DATABASE_URL
  const out = execFileSync(process.execPath, ['-e', script], { env, encoding: 'utf8' })
  assert.match(out, /^INVALID_CONFIG .*DATABASE_URL/)
})

test('a script that never calls close() still exits', () => {
  const script = `
    const { EventRepository } = require('@synap/database');
    const repo = new EventRepository({ connectionString: process.env.DATABASE_URL, schema: process.env.SCHEMA });
    repo.countEvents().then((n) => console.log('count', typeof n));
  `
  const env = { ...process.env, SCHEMA: db.schema }
  const out = execFileSync(process.execPath, ['-e', script], { env, encoding: 'utf8', timeout: 20_000 })
  assert.match(out, /count number/)
})

test('an unreachable database rejects with a retryable code after the timeout', async () => {
  const repo = new EventRepository({
    connectionString: 'postgres://postgres@127.0.0.1:1/postgres',
    connectTimeoutMs: 1000,
    acquireTimeoutMs: 1000,
  })
  await assert.rejects(repo.countEvents(), (err) => {
    assert.ok(['CONNECTION_FAILED', 'POOL_TIMEOUT'].includes(err.code), err.code)
    assert.equal(err.retryable, true)
    return true
  })
  repo.close()
})

test('bad options throw INVALID_CONFIG', () => {
  assert.throws(() => new EventRepository({ connectionString: DATABASE_URL, schema: 'Bad Schema' }), {
    code: 'INVALID_CONFIG',
  })
  assert.throws(() => new EventRepository({ connectionString: DATABASE_URL, storageMode: 'mongo' }), {
    code: 'INVALID_CONFIG',
  })
  assert.throws(() => new EventRepository('not a url ::'), { code: 'INVALID_CONFIG' })
  // Numbers are taken as given, never wrapped around or truncated.
  for (const [key, value] of [
    ['poolSize', -1], ['poolSize', 2 ** 32 + 1], ['poolSize', 1.5], ['poolSize', NaN],
    ['statementTimeoutMs', -1], ['statementTimeoutMs', 3e9], ['statementTimeoutMs', 2 ** 31],
    ['acquireTimeoutMs', 2 ** 32], ['connectTimeoutMs', -1], ['maxDataBytes', -1], ['snapshotEvery', Infinity],
  ]) {
    assert.throws(() => new EventRepository({ connectionString: DATABASE_URL, [key]: value }), (err) => {
      assert.equal(err.code, 'INVALID_CONFIG', `${key}: ${value}`)
      assert.match(err.message, /2147483647|4294967295|between 1 and 1000|finite number/, `${key}: ${value}`)
      return true
    })
  }
  new EventRepository({ connectionString: DATABASE_URL, statementTimeoutMs: 2 ** 31 - 1, poolSize: 1000 }).close()
})

test('close() before any call also makes later calls reject', async () => {
  const repo = new EventRepository()
  repo.close()
  await assert.rejects(repo.countEvents(), { code: 'CONNECTION_FAILED' })
})

test('close() makes later calls reject', async () => {
  const repo = new EventRepository(DATABASE_URL)
  repo.close()
  await assert.rejects(repo.countEvents(), { code: 'CONNECTION_FAILED' })
})
