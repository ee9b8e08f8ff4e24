// Schema versions and upcasters through the built module (docs/upcasting.md): the constructor
// refuses a bad definition naming its step; what an append takes reads back on every read path;
// a repository with upcasters delivers the latest shape, saying what was stored; and the wasm
// build's fold of `getSnapshotAndTail` under the same definition gives what `replay` gives.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { createRequire } from 'node:module'
import { EventRepository } from '@synap/database'
import { freshRepository, DATABASE_URL, BASE_OPTIONS } from './db.mjs'

const require = createRequire(import.meta.url)
const wasm = require('../wasm/pkg/node/synap_events.js')

const upcasters = [
  { eventType: 'task.updated', fromVersion: 1, operations: [{ op: 'rename', from: 'data.title', to: 'data.name' }] },
  { eventType: 'task.updated', fromVersion: 2, operations: [{ op: 'map', path: 'data.status', values: { todo: 'open' } }] },
  { eventType: 'todo.done', fromVersion: 1, operations: [{ op: 'renameType', to: 'task.completed' }] },
]

let store
let upcasting

before(async () => {
  store = await freshRepository('upcast')
  upcasting = new EventRepository({ connectionString: DATABASE_URL, schema: store.schema, ...BASE_OPTIONS, upcasters })
})

after(async () => {
  upcasting?.close()
  await store?.close()
})

test('the constructor refuses a bad definition with INVALID_UPCASTERS, naming the step', () => {
  const bad = [
    [[{ eventType: 'a.b', fromVersion: 1, operations: [{ op: 'renam', from: 'data.a', to: 'data.b' }] }], 'a.b@1', 'unknownOperation'],
    [[{ eventType: 'a.b', fromVersion: 1, operations: [{ op: 'rename', form: 'data.a', to: 'data.b' }] }], 'a.b@1', 'invalidOperation'],
    [[{ eventType: 'a.b', fromVersion: 2, operations: [] }], 'a.b@2', 'gap'],
    [{ 'a.b': [] }, '', 'invalidDefinition'],
  ]
  for (const [definition, step, reason] of bad) {
    assert.throws(() => new EventRepository({ connectionString: DATABASE_URL, upcasters: definition }), (e) => {
      assert.equal(e.code, 'INVALID_UPCASTERS', e.message)
      assert.equal(e.step, step, e.message)
      assert.equal(e.reason, reason, e.message)
      assert.equal(e.retryable, false)
      return true
    })
  }
})

test('every read path delivers the latest shape and says what was stored', async () => {
  const { repo } = store
  const id = randomUUID()
  const correlationId = randomUUID()
  const base = { aggregateId: id, aggregateType: 'entity', userId: 'u-upcast', correlationId }
  const appended = await repo.appendBatch([
    { ...base, eventType: 'task.created', data: { name: 'a' }, version: 1 },
    { ...base, eventType: 'task.updated', data: { title: 'b', status: 'todo' }, version: 2 },
    { ...base, eventType: 'task.updated', data: { name: 'c', status: 'todo' }, version: 3, schemaVersion: 2 },
    { ...base, eventType: 'todo.done', data: {}, version: 4, schemaVersion: 1 },
  ])
  assert.deepEqual(appended.map((e) => e.schemaVersion), [1, 1, 2, 1])

  // Without upcasters: as stored.
  const stored = await repo.getAggregateStream(id)
  assert.deepEqual(stored.map((e) => [e.eventType, e.schemaVersion, e.storedSchemaVersion, e.storedEventType]), [
    ['task.created', 1, 1, undefined],
    ['task.updated', 1, 1, undefined],
    ['task.updated', 2, 2, undefined],
    ['todo.done', 1, 1, undefined],
  ])

  const latest = (events) => events
    .filter((e) => e.aggregateId === id)
    .sort((a, b) => a.version - b.version)
    .map((e) => [e.eventType, e.schemaVersion, e.storedSchemaVersion, e.storedEventType, e.data])
  const expected = [
    ['task.created', 1, 1, undefined, { name: 'a' }],
    ['task.updated', 3, 1, undefined, { name: 'b', status: 'open' }],
    ['task.updated', 3, 2, undefined, { name: 'c', status: 'open' }],
    ['task.completed', 1, 1, 'todo.done', {}],
  ]
  assert.deepEqual(latest(await upcasting.getAggregateStream(id)), expected, 'getAggregateStream')
  assert.deepEqual(latest(await upcasting.getUserStream('u-upcast')), expected, 'getUserStream')
  assert.deepEqual(latest(await upcasting.getCorrelatedEvents(correlationId)), expected, 'getCorrelatedEvents')
  let feed = []
  let after
  while (feed.filter((e) => e.aggregateId === id).length < 4) {
    const page = await upcasting.readAll({ after, limit: 2 })
    if (page.events.length === 0) await new Promise((r) => setTimeout(r, 20))
    feed = feed.concat(page.events)
    after = page.checkpoint
  }
  assert.deepEqual(latest(feed), expected, 'readAll')
  const { snapshot, events } = await upcasting.getSnapshotAndTail(id)
  assert.deepEqual(latest(events), expected, 'getSnapshotAndTail')

  // The browser's fold of what the server sent, under the same definition, is the replay.
  const replay = await upcasting.replay(id)
  assert.deepEqual(replay.state, { name: 'c', status: 'open' })
  const browser = wasm.foldEvents(JSON.parse(JSON.stringify(events)), { from: snapshot ?? undefined, upcasters })
  assert.deepEqual(browser.state, replay.state)
  // Given the stored events instead, it upcasts them itself: the same state.
  assert.deepEqual(wasm.foldEvents(JSON.parse(JSON.stringify(stored)), { upcasters }).state, replay.state)
  // And the plain repository's replay folds the stored shape.
  assert.deepEqual((await repo.replay(id)).state, { name: 'c', title: 'b', status: 'todo' })
})

test('a bad schemaVersion is refused on append and writes nothing', async () => {
  const { repo } = store
  const before = await store.rows()
  for (const schemaVersion of [0, -1, 1.5, '2', 2 ** 31]) {
    await assert.rejects(
      repo.append({ aggregateId: randomUUID(), aggregateType: 'entity', eventType: 'entity.created', userId: 'u', data: {}, version: 1, schemaVersion }),
      (e) => e.code === 'VALIDATION_FAILED' && e.field === 'schemaVersion',
      String(schemaVersion),
    )
  }
  assert.deepEqual(await store.rows(), before)
})
