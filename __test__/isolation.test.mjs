// The rule for user-scoped handles (README, "Row-level security"), checked against every call of
// EventRepository that index.d.ts and database.d.ts declare: a scoped handle, connected as the
// application role, either acts within its user's rows or refuses with PERMISSION_DENIED before it
// writes anything. A call added to the API without a place in one of the two tables below fails
// this test.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import { randomUUID } from 'node:crypto'
import { AggregateType, EventRepository } from '@synap/database'
import { freshRepository, DATABASE_URL } from './db.mjs'

/** Every method of EventRepository in the package's declarations. */
function declaredCalls() {
  const calls = new Set()
  const index = fs.readFileSync(new URL('../index.d.ts', import.meta.url), 'utf8')
  const body = index.slice(index.indexOf('export declare class EventRepository {'))
  for (const line of body.slice(0, body.indexOf('\n}')).split('\n')) {
    const m = /^ {2}([a-zA-Z]+)\(/.exec(line)
    if (m && m[1] !== 'constructor') calls.add(m[1])
  }
  const database = fs.readFileSync(new URL('../database.d.ts', import.meta.url), 'utf8')
  const augmented = database.slice(database.indexOf('interface EventRepository {'))
  for (const m of augmented.matchAll(/^ {4}([a-zA-Z]+)\(/gm)) calls.add(m[1])
  return [...calls].sort()
}

let db
let app
let role
const alice = { agg: randomUUID() }
const bob = { agg: randomUUID() }
const workflow = randomUUID()

const ev = (userId, aggregateId, version, extra = {}) => ({
  aggregateId,
  aggregateType: AggregateType.ENTITY,
  eventType: version === 1 ? 'note.created' : 'note.updated',
  userId,
  data: { secret: `${userId}-${version}` },
  version,
  correlationId: workflow,
  ...extra,
})

before(async () => {
  db = await freshRepository('scoped')
  role = `synap_node_scoped_${process.pid}`
  await db.sql.query(`DROP ROLE IF EXISTS ${role}`)
  await db.sql.query(`CREATE ROLE ${role} LOGIN NOSUPERUSER NOBYPASSRLS`)
  await db.sql.query('SELECT synap_grant_application_role($1)', [role])
  const url = new URL(DATABASE_URL)
  url.username = role
  app = new EventRepository({ connectionString: url.toString(), schema: db.schema })
  await db.repo.appendBatch([ev('alice', alice.agg, 1), ev('bob', bob.agg, 1), ev('bob', bob.agg, 2)])
  await db.repo.snapshot(bob.agg)
})
after(async () => {
  app?.close()
  await db.sql.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`)
  await db.close()
})

/** What the owner sees of the store, to show that a refused call wrote nothing. */
async function storeState() {
  const { rows } = await db.sql.query(`
    SELECT (SELECT count(*) FROM events_v2)::int AS events, (SELECT count(*) FROM event_snapshots)::int AS snapshots,
           (SELECT count(*) FROM consumer_groups)::int AS groups, (SELECT count(*) FROM event_consumers)::int AS consumers,
           (SELECT count(*) FROM legacy_migration_runs)::int AS legacy, (SELECT count(*) FROM events_daily)::int AS daily`)
  return rows[0]
}

/** Every event a scoped call returned must be the user's. */
function onlyAlice(events) {
  for (const e of events) assert.equal(e.userId, 'alice', JSON.stringify(e))
  return events
}

// Calls a scoped handle serves, each run as alice: what it must show.
const SCOPED = {
  append: async (h) => {
    const stored = await h.append(ev('alice', alice.agg, 2))
    assert.equal(stored.version, 2)
    await assert.rejects(h.append(ev('alice', bob.agg, 3)), { code: 'PERMISSION_DENIED' })
    await assert.rejects(h.append(ev('bob', randomUUID(), 1)), { code: 'PERMISSION_DENIED' })
  },
  appendBatch: async (h) => {
    const own = randomUUID()
    assert.equal((await h.appendBatch([ev('alice', own, 1), ev('alice', own, 2)])).length, 2)
    await assert.rejects(h.appendBatch([ev('alice', randomUUID(), 1), ev('bob', randomUUID(), 1)]), {
      code: 'PERMISSION_DENIED',
    })
  },
  getAggregateStream: async (h) => {
    assert.ok(onlyAlice(await h.getAggregateStream(alice.agg)).length >= 1)
    assert.deepEqual(await h.getAggregateStream(bob.agg), [])
  },
  getAggregateVersion: async (h) => {
    assert.ok((await h.getAggregateVersion(alice.agg)) >= 1)
    assert.equal(await h.getAggregateVersion(bob.agg), null)
  },
  getUserStream: async (h) => {
    assert.ok(onlyAlice(await h.getUserStream('alice')).length >= 1)
    assert.deepEqual(await h.getUserStream('bob'), [])
  },
  getCorrelatedEvents: async (h) => assert.ok(onlyAlice(await h.getCorrelatedEvents(workflow)).length >= 1),
  getEventsByType: async (h) => {
    onlyAlice(await h.getEventsByType('note.created'))
    onlyAlice(await h.getEventsByType('note.updated'))
  },
  countEvents: async (h) => {
    assert.ok((await h.countEvents()) >= 1)
    assert.equal(await h.countEvents({ userId: 'bob' }), 0)
  },
  readAll: async (h) => onlyAlice((await h.readAll({ limit: 100 })).events),
  subscribe: async (h) => {
    // Without a consumer it follows the user's events; a named consumer is the owner's.
    const sub = h.subscribe({ pollIntervalMs: 50 })
    const first = await sub[Symbol.asyncIterator]().next()
    onlyAlice([first.value])
    await assert.rejects(
      (async () => {
        for await (const e of h.subscribe({ consumer: 'search' })) return e
      })(),
      { code: 'PERMISSION_DENIED' },
    )
  },
  replay: async (h) => {
    assert.ok((await h.replay(alice.agg)).version >= 1)
    assert.equal((await h.replay(bob.agg)).version, 0)
  },
  getSnapshotAndTail: async (h) => {
    onlyAlice((await h.getSnapshotAndTail(alice.agg)).events)
    const other = await h.getSnapshotAndTail(bob.agg)
    assert.deepEqual([other.snapshot ?? null, other.events], [null, []])
  },
  deleteStream: async (h) => {
    // Soft: another user's stream is not there for it; hard: the owner's.
    const before = await db.repo.getAggregateVersion(bob.agg)
    assert.equal((await h.deleteStream(bob.agg)).found, false)
    await assert.rejects(h.deleteStream(bob.agg, { hard: true }), { code: 'PERMISSION_DENIED' })
    assert.equal(await db.repo.getAggregateVersion(bob.agg), before)
  },
  forUser: async (h) => assert.throws(() => h.forUser('bob'), { code: 'VALIDATION_FAILED' }),
  close: async () => {
    const h = app.forUser('alice')
    h.close()
    await assert.rejects(h.countEvents(), { code: 'CONNECTION_FAILED' })
  },
}

const handler = async () => {}
// Calls that are the owner's: a scoped handle refuses them, whatever their arguments.
const OWNER = {
  migrate: (h) => h.migrate(),
  refreshAnalytics: (h) => h.refreshAnalytics(true),
  migrateLegacyEvents: (h) => h.migrateLegacyEvents({ legacyTable: 'events' }),
  verifyLegacy: (h) => h.verifyLegacy('events'),
  dropLegacyTable: (h) => h.dropLegacyTable('events', true),
  applyRetention: (h) => h.applyRetention({ olderThan: '1d', force: true }),
  stats: (h) => h.stats(),
  rebaseFeed: (h) => h.rebaseFeed(),
  runGroup: (h) => h.runGroup({ group: 'g' }, handler, false),
  consume: (h) => h.consume({ group: 'g', handler }),
  project: (h) => h.project({ group: 'g', handler }),
  groups: (h) => h.groups(),
  parked: (h) => h.parked('g'),
  retryParked: (h) => h.retryParked('g', randomUUID()),
  skipParked: (h) => h.skipParked('g', randomUUID()),
  consumers: (h) => h.consumers(),
  repairConsumer: (h) => h.repairConsumer('search', { accept: true }),
  snapshot: (h) => h.snapshot(alice.agg),
  eraseUser: (h) => h.eraseUser('bob'),
}

test('every call of EventRepository has its place in the rule', () => {
  const ruled = [...Object.keys(SCOPED), ...Object.keys(OWNER)].sort()
  assert.deepEqual(ruled, declaredCalls())
})

for (const call of Object.keys(SCOPED)) {
  test(`a scoped handle serves ${call} within its user's rows`, async () => {
    await SCOPED[call](app.forUser('alice'))
  })
}

for (const call of Object.keys(OWNER)) {
  test(`a scoped handle refuses ${call} and writes nothing`, async () => {
    const before = await storeState()
    for (const handle of [app.forUser('alice'), db.repo.forUser('alice')]) {
      await assert.rejects(Promise.resolve().then(() => OWNER[call](handle)), (e) => {
        assert.equal(e.code, 'PERMISSION_DENIED', `${call}: ${e.code} ${e.message}`)
        assert.equal(e.retryable, false)
        return true
      })
    }
    assert.deepEqual(await storeState(), before)
  })
}
