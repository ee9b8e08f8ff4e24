// Filtered feeds through the built module: `readAll` and `subscribe` take eventTypes,
// eventTypePrefixes and aggregateTypes, deliver the feed filtered as JavaScript would filter it
// (the store's notices always pass), say when a page is caught up, and refuse a misspelt or
// empty filter naming it.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { freshRepository } from './db.mjs'

let store

before(async () => {
  store = await freshRepository('filtered')
})

after(async () => {
  await store?.close()
})

const TYPES = [
  ['entity', 'entity.created'],
  ['entity', 'entity.title_changed'],
  ['entity', 'entityx.created'],
  ['relation', 'relation.added'],
  ['user', 'user.renamed'],
]

function matches(filter, e) {
  if (e.aggregateType === 'system' && e.eventType.startsWith('synap.')) return true
  const typed =
    (!filter.eventTypes && !filter.eventTypePrefixes) ||
    (filter.eventTypes ?? []).includes(e.eventType) ||
    (filter.eventTypePrefixes ?? []).some((p) => e.eventType.startsWith(p))
  return typed && (!filter.aggregateTypes || filter.aggregateTypes.includes(e.aggregateType))
}

/** Every page from the start until caught up past `until`. */
async function readAll(repo, options, until) {
  const events = []
  let after
  for (;;) {
    const page = await repo.readAll({ ...options, after })
    assert.equal(typeof page.caughtUp, 'boolean')
    events.push(...page.events)
    after = page.checkpoint
    if (page.caughtUp && BigInt(after.txid) >= BigInt(until.txid)) return events
    if (page.caughtUp) await new Promise((r) => setTimeout(r, 20))
  }
}

test('readAll with a filter delivers the feed filtered, in its order, with the notices', async () => {
  const { repo } = store
  const batch = []
  for (let i = 0; i < 60; i++) {
    const [aggregateType, eventType] = TYPES[i % TYPES.length]
    batch.push({ aggregateId: randomUUID(), aggregateType, eventType, userId: 'u-f', data: { i }, version: 1 })
  }
  const written = await repo.appendBatch(batch)
  await repo.deleteStream(written[3].aggregateId, { hard: true })
  let whole
  let end
  for (;;) {
    const page = await repo.readAll({ limit: 10000 })
    if (page.events.some((e) => e.eventType === 'synap.stream_deleted')) {
      whole = page.events
      end = page.checkpoint
      break
    }
    await new Promise((r) => setTimeout(r, 20))
  }
  const filters = [
    { eventTypes: ['entity.created'] },
    { eventTypePrefixes: ['entity.'] },
    { eventTypePrefixes: ['entity.title_'] },
    { eventTypes: ['user.renamed'], eventTypePrefixes: ['relation'] },
    { aggregateTypes: ['relation', 'user'] },
    { eventTypePrefixes: ['entity'], aggregateTypes: ['entity'] },
  ]
  for (const filter of filters) {
    for (const limit of [1, 7, 1000]) {
      const got = await readAll(repo, { ...filter, limit }, end)
      const want = whole.filter((e) => matches(filter, e))
      assert.deepEqual(
        got.map((e) => e.id),
        want.map((e) => e.id),
        JSON.stringify({ filter, limit }),
      )
      assert.ok(got.some((e) => e.eventType === 'synap.stream_deleted'), 'the notice passes')
    }
  }
})

test('a filtered subscription delivers only what passes, then follows', async () => {
  const { repo } = store
  const sub = repo.subscribe({ eventTypes: ['relation.added'], batchSize: 5, pollIntervalMs: 50 })
  const next = (async () => {
    const seen = []
    for await (const e of sub) {
      seen.push(e)
      if (e.data.marker === 'last') break
    }
    return seen
  })()
  await repo.append({ aggregateId: randomUUID(), aggregateType: 'entity', eventType: 'entity.created', userId: 'u-f', data: {}, version: 1 })
  await repo.append({ aggregateId: randomUUID(), aggregateType: 'relation', eventType: 'relation.added', userId: 'u-f', data: { marker: 'last' }, version: 1 })
  const seen = await next
  assert.ok(seen.length > 0)
  assert.ok(seen.every((e) => e.eventType === 'relation.added' || e.eventType.startsWith('synap.')), seen.map((e) => e.eventType).join())
})

test('a misspelt, empty or impossible filter is refused naming it', async () => {
  const { repo } = store
  const cases = [
    [{ eventtypes: ['entity.created'] }, 'eventtypes', 'UNKNOWN_OPTION'],
    [{ eventTypes: [] }, 'eventTypes', 'OUT_OF_RANGE'],
    [{ eventTypes: ['Entity.Created'] }, 'eventTypes[0]', 'INVALID_EVENT_TYPE'],
    [{ eventTypePrefixes: ['entity.%'] }, 'eventTypePrefixes[0]', 'INVALID_EVENT_TYPE'],
    [{ aggregateTypes: ['entities'] }, 'aggregateTypes[0]', null],
    [{ eventTypes: 'entity.created' }, 'eventTypes', null],
  ]
  for (const [options, field, reason] of cases) {
    // subscribe refuses options when called, its filter's entries on the first read.
    const subscribe = async () => repo.subscribe(options)[Symbol.asyncIterator]().next()
    for (const call of [() => repo.readAll(options), subscribe]) {
      await assert.rejects(call(), (e) => {
        assert.equal(e.code, 'VALIDATION_FAILED', e.message)
        assert.equal(e.field, field, e.message)
        if (reason) assert.equal(e.reason, reason, e.message)
        return true
      })
    }
  }
})

test('a filtered consumer group hands out what passes and keeps its filter', async () => {
  const { repo } = store
  const group = `filtered-${process.pid}`
  const wanted = []
  for (let i = 0; i < 6; i++) {
    await repo.append({ aggregateId: randomUUID(), aggregateType: 'entity', eventType: 'entity.created', userId: 'u-g', data: {}, version: 1 })
    const e = await repo.append({ aggregateId: randomUUID(), aggregateType: 'user', eventType: 'user.renamed', userId: 'u-g', data: { i }, version: 1 })
    wanted.push(e.id)
  }
  const seen = []
  const run = await repo.consume({
    group,
    partitions: 2,
    pollIntervalMs: 50,
    aggregateTypes: ['user'],
    handler: async (events) => {
      seen.push(...events)
    },
  })
  try {
    const deadline = Date.now() + 60_000
    while (!wanted.every((id) => seen.some((e) => e.id === id))) {
      assert.ok(Date.now() < deadline, `saw ${seen.length}`)
      await new Promise((r) => setTimeout(r, 50))
    }
    assert.ok(seen.every((e) => e.aggregateType === 'user' || e.eventType.startsWith('synap.')), seen.map((e) => e.eventType).join())
    await assert.rejects(repo.consume({ group, handler: async () => {} }), (e) => {
      assert.equal(e.code, 'GROUP_FILTER_MISMATCH', e.message)
      assert.deepEqual(e.stored, { aggregateTypes: ['user'] })
      assert.deepEqual(e.given, {})
      return true
    })
  } finally {
    await run.stop()
  }
})
