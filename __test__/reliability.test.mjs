// forUser (row-level security), readAll and subscribe through the Node module.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { AggregateType, EventRepository } from '@synap/database'
import { freshRepository, DATABASE_URL } from './db.mjs'

let db
let app
let role
before(async () => {
  db = await freshRepository('rel')
  role = `synap_node_app_${process.pid}`
  await db.sql.query(`DROP ROLE IF EXISTS ${role}`)
  await db.sql.query(`CREATE ROLE ${role} LOGIN NOSUPERUSER NOBYPASSRLS`)
  // As the README says: one call grants what the repository needs.
  await db.sql.query('SELECT synap_grant_application_role($1)', [role])
  const url = new URL(DATABASE_URL)
  url.username = role
  app = new EventRepository({ connectionString: url.toString(), schema: db.schema })
})
after(async () => {
  app?.close()
  await db.sql.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`)
  await db.close()
})

const ev = (userId, aggregateId, version) => ({
  aggregateId,
  aggregateType: AggregateType.ENTITY,
  eventType: version === 1 ? 'note.created' : 'note.updated',
  userId,
  data: { n: version },
  version,
})

test('forUser: a user reaches only their own events and streams, by every method', async () => {
  const a = randomUUID()
  const b = randomUUID()
  const wf = randomUUID()
  await db.repo.appendBatch([
    { ...ev('ann', a, 1), correlationId: wf },
    { ...ev('ben', b, 1), correlationId: wf },
    ev('ben', b, 2),
  ])
  const ann = app.forUser('ann')
  assert.equal((await ann.getAggregateStream(a)).length, 1)
  assert.deepEqual(await ann.getAggregateStream(b), [])
  assert.equal(await ann.getAggregateVersion(b), null)
  assert.deepEqual(await ann.getUserStream('ben'), [])
  assert.equal((await ann.getCorrelatedEvents(wf)).length, 1)
  assert.equal(await ann.countEvents(), 1)
  assert.equal((await ann.getEventsByType('note.updated')).length, 0)
  assert.equal((await ann.readAll()).events.length, 1)
  // Another user's aggregate is refused as such at every version, not as a conflict.
  await assert.rejects(ann.append(ev('ann', b, 3)), { code: 'PERMISSION_DENIED' })
  await assert.rejects(ann.append(ev('ben', randomUUID(), 1)), { code: 'PERMISSION_DENIED' })
  await assert.rejects(ann.appendBatch([ev('ann', randomUUID(), 1), ev('ben', randomUUID(), 1)]), {
    code: 'PERMISSION_DENIED',
  })
  assert.equal(await app.countEvents(), 0, 'no user set: nothing visible')
  assert.equal(await db.repo.countEvents(), 3, 'the owner sees everything')
  assert.throws(() => app.forUser(''), { code: 'VALIDATION_FAILED' })
})

test('readAll pages through every event once, in order', async () => {
  const fresh = await freshRepository('readall')
  const repo = fresh.repo
  const a = randomUUID()
  await repo.appendBatch(Array.from({ length: 25 }, (_, i) => ev('u', a, i + 1)))
  const seen = []
  let checkpoint
  for (;;) {
    const page = await repo.readAll({ after: checkpoint, limit: 10 })
    if (page.events.length === 0) break
    seen.push(...page.events.map((e) => e.version))
    checkpoint = page.checkpoint
    assert.equal(typeof checkpoint.txid, 'string')
  }
  assert.deepEqual(
    seen,
    Array.from({ length: 25 }, (_, i) => i + 1),
  )
  await assert.rejects(repo.readAll({ limit: 0 }), { code: 'VALIDATION_FAILED' })
  await fresh.close()
})

test('subscribe: a named consumer that stops mid-stream resumes with at-least-once delivery', async () => {
  const fresh = await freshRepository('subscribe')
  const repo = fresh.repo
  const a = randomUUID()
  await repo.appendBatch(Array.from({ length: 12 }, (_, i) => ev('u', a, i + 1)))

  const first = []
  for await (const event of repo.subscribe({ consumer: 'projection', batchSize: 5, pollIntervalMs: 50 })) {
    first.push(event.version)
    if (first.length === 7) break // stops inside the second batch
  }
  assert.deepEqual(first, [1, 2, 3, 4, 5, 6, 7])

  const second = []
  const done = (async () => {
    for await (const event of repo.subscribe({ consumer: 'projection', batchSize: 5, pollIntervalMs: 50 })) {
      second.push(event.version)
      if (event.version === 13) break
    }
  })()
  // Follows new events after catching up.
  await new Promise((r) => setTimeout(r, 200))
  await repo.append(ev('u', a, 13))
  await done
  // The first batch was acknowledged when the second was fetched; the second comes again.
  assert.deepEqual(second, [6, 7, 8, 9, 10, 11, 12, 13])
  await fresh.close()
})

test('subscribe: return() stops an idle iterator whose next() is waiting', { timeout: 20_000 }, async () => {
  const fresh = await freshRepository('subscribe_stop')
  try {
    // Polling every hour: only return() can end the pending next() within the test's timeout.
    const iterator = fresh.repo.subscribe({ batchSize: 5, pollIntervalMs: 3_600_000 })[Symbol.asyncIterator]()
    const pending = iterator.next()
    await new Promise((r) => setTimeout(r, 300))
    await iterator.return()
    assert.deepEqual(await pending, { value: undefined, done: true })
  } finally {
    await fresh.close()
  }
})

test('a consumer stored by the old feed ordering is refused until repaired, then gets every event', async () => {
  const fresh = await freshRepository('repair')
  try {
    const a = randomUUID()
    await fresh.repo.appendBatch(Array.from({ length: 3 }, (_, i) => ev('u', a, i + 1)))
    // As migration 0005 leaves a checkpoint that the text-sorted ordering stored.
    await fresh.sql.query(
      "INSERT INTO event_consumers (name, txid, position, needs_repair) VALUES ('old', '99999999999', 2, true)",
    )
    const refused = fresh.repo.subscribe({ consumer: 'old', pollIntervalMs: 50 })[Symbol.asyncIterator]()
    await assert.rejects(refused.next(), { code: 'CONSUMER_NEEDS_REPAIR', consumer: 'old', retryable: false })

    const dry = await fresh.repo.repairConsumer('old', { dryRun: true })
    assert.equal(dry.neededRepair, true)
    assert.deepEqual(dry.after, { txid: '0', position: 0, store: '0' })
    assert.equal(dry.eventsDeliveredAgain, 3)
    assert.equal((await fresh.repo.consumers())[0].needsRepair, true, 'a dry run changes nothing')

    await fresh.repo.repairConsumer('old')
    const versions = []
    for await (const event of fresh.repo.subscribe({ consumer: 'old', batchSize: 2, pollIntervalMs: 50 })) {
      versions.push(event.version)
      if (versions.length === 3) break
    }
    assert.deepEqual(versions, [1, 2, 3])
    assert.equal((await fresh.repo.consumers())[0].needsRepair, false)
  } finally {
    await fresh.close()
  }
})
