// Hostile and mistaken input that used to get through, each with the answer the contract gives.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { EventRepository } from '@synap/database'
import { freshRepository, DATABASE_URL } from './db.mjs'

let db
before(async () => {
  db = await freshRepository('hostile')
})
after(async () => {
  await db.close()
})

const ev = (aggregateId, version, data, extra = {}) => ({
  aggregateId,
  aggregateType: 'entity',
  eventType: version === 1 ? 'note.created' : 'note.updated',
  userId: 'u',
  data,
  version,
  ...extra,
})

test('NaN, infinities and invalid Dates anywhere in data or metadata are refused, not stored as null', async () => {
  const id = randomUUID()
  await db.repo.append(ev(id, 1, { price: 3 }))
  const cases = [
    [{ price: NaN }, 'data.price'],
    [{ nested: { deep: [1, Infinity] } }, 'data.nested.deep[1]'],
    [{ when: new Date('nope') }, 'data.when'],
  ]
  for (const [data, field] of cases) {
    await assert.rejects(db.repo.append(ev(id, 2, data)), { code: 'VALIDATION_FAILED', field })
    await assert.rejects(db.repo.appendBatch([ev(id, 2, data)]), { code: 'VALIDATION_FAILED', field: `events[0].${field}` })
  }
  await assert.rejects(db.repo.append(ev(id, 2, {}, { metadata: { at: -Infinity } })), {
    code: 'VALIDATION_FAILED',
    field: 'metadata.at',
  })
  // A real null is a removal, as in the design, and a toJSON's null is the object's own choice.
  await db.repo.append(ev(id, 2, { price: null, other: { toJSON: () => null }, kept: 1 }))
  assert.deepEqual((await db.repo.replay(id)).state, { kept: 1 })
})

test('a replay from a snapshot gives the keys in the order a replay from version 1 gives them', async () => {
  const id = randomUUID()
  await db.repo.append(ev(id, 1, { longer_key: 1, a: 2 }))
  const before = await db.repo.replay(id)
  await db.repo.snapshot(id)
  const after = await db.repo.replay(id)
  assert.equal(after.snapshotVersion, 1)
  assert.deepEqual(Object.keys(after.state), Object.keys(before.state))
  const { snapshot } = await db.repo.getSnapshotAndTail(id)
  assert.deepEqual(Object.keys(snapshot.state), Object.keys(before.state))
})

test('a replay with hundreds of ignored keys stores and uses its snapshot', async () => {
  const repo = new EventRepository({ connectionString: DATABASE_URL, schema: db.schema, snapshotEvery: 1 })
  try {
    const id = randomUUID()
    await repo.append(ev(id, 1, { kept: 1, key_0: 2 }))
    const ignoreKeys = Array.from({ length: 400 }, (_, i) => `key_${i}`)
    const first = await repo.replay(id, { bookkeeping: { ignoreKeys } })
    assert.equal(first.snapshotStored, true)
    assert.deepEqual(first.state, { kept: 1 })
    const second = await repo.replay(id, { bookkeeping: { ignoreKeys } })
    assert.equal(second.snapshotVersion, 1)
    assert.deepEqual(second.state, { kept: 1 })
  } finally {
    repo.close()
  }
})

test("a NUL byte in a projection's statement is refused as bad input, not a lost connection", async () => {
  await db.repo.append(ev(randomUUID(), 1, {}))
  let seen
  const run = await db.repo.project({
    group: `nul-${process.pid}`,
    partitions: 1,
    pollIntervalMs: 50,
    handler: async (events, tx) => {
      if (seen) return
      seen = await tx.query('SELECT 1\u0000').then(
        () => 'ran',
        (e) => e,
      )
      throw new Error('stop this batch')
    },
  })
  for (let i = 0; i < 200 && !seen; i++) await new Promise((r) => setTimeout(r, 25))
  await run.stop()
  assert.equal(seen.code, 'VALIDATION_FAILED', String(seen))
  assert.equal(seen.field, 'sql')
  assert.equal(seen.retryable, false)
})

// Under libfaketime (scripts/clock-test.sh) the server's timers do not end a lock wait, so its
// deadlock detector never runs: the DROP below and the member would wait for each other forever.
const underFaketime = process.env.FAKETIME ? 'libfaketime: no deadlock detection in lock waits' : false

test("a group run ended by what no retry can fix rejects done() with the store's code", { skip: underFaketime }, async () => {
  const fresh = await freshRepository('done')
  await fresh.repo.append(ev(randomUUID(), 1, {}))
  const run = await fresh.repo.consume({ group: 'g', partitions: 1, pollIntervalMs: 50, handler: async () => {} })
  try {
    // The store's tables go away under the running member. The DROP and the member's statements
    // take their locks in different orders: when the server picks the DROP as a deadlock's victim,
    // it is tried again, as PostgreSQL asks of a victim.
    for (let attempt = 1; ; attempt++) {
      try {
        await fresh.sql.query(`DROP SCHEMA ${fresh.schema} CASCADE`)
        break
      } catch (e) {
        if (e.code !== '40P01' || attempt === 10) throw e
      }
    }
    await assert.rejects(run.done(), (e) => {
      assert.match(e.code, /^[A-Z_]+$/, String(e))
      assert.notEqual(e.code, 'GenericFailure')
      assert.equal(typeof e.retryable, 'boolean')
      return true
    })
  } finally {
    // Whatever failed above, the member stops: a run left going would keep this process alive.
    await run.stop().catch(() => {})
    await fresh.close()
  }
})
