// eraseUser through the Node module: the report, the notice in the feed, and the refusal of
// the store's own event types and of scoped handles.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { freshRepository } from './db.mjs'

let db
before(async () => {
  db = await freshRepository('erasure')
})
after(async () => {
  await db.close()
})

const event = (aggregateId, version, userId, data) => ({
  aggregateId,
  aggregateType: 'entity',
  eventType: version === 1 ? 'entity.created' : 'entity.updated',
  userId,
  data,
  version,
})

test('eraseUser removes the user, keeps the others, and puts one notice on the feed', async () => {
  const { repo } = db
  const [a, b] = [randomUUID(), randomUUID()]
  await repo.append(event(a, 1, 'ann', { secret: 'ann-only' }))
  await repo.append(event(a, 2, 'ann', { more: 1 }))
  await repo.append(event(b, 1, 'ben', { mine: true }))

  const dry = await repo.eraseUser('ann', { dryRun: true })
  assert.equal(dry.dryRun, true)
  assert.equal(dry.notice, null)
  assert.equal((await repo.getAggregateStream(a)).length, 2, 'a dry run changes nothing')

  const report = await repo.eraseUser('ann')
  assert.deepEqual(report.tables, dry.tables)
  const events = report.tables.find((t) => t.table === 'events_v2' && t.action === 'deleted')
  assert.equal(events.rows, 2)
  assert.equal(report.streams, 1)
  assert.ok(report.rewritten.length > 0)
  assert.deepEqual(await repo.getAggregateStream(a), [])
  assert.equal((await repo.getAggregateStream(b)).length, 1)

  const seen = []
  let after
  for (;;) {
    const page = await repo.readAll({ after, limit: 100 })
    seen.push(...page.events)
    after = page.checkpoint
    if (seen.some((e) => e.id === report.notice.id)) break
    if (page.events.length === 0) await new Promise((r) => setTimeout(r, 20))
  }
  assert.ok(!seen.some((e) => e.userId === 'ann' && e.eventType !== 'synap.user_erased'))
  const notice = seen.find((e) => e.eventType === 'synap.user_erased')
  assert.deepEqual(
    [notice.aggregateType, notice.source, notice.userId, notice.data],
    ['system', 'system', 'ann', { userId: 'ann' }],
  )

  const again = await repo.eraseUser('ann')
  assert.equal(again.notice, null)
})

test('the store refuses to append its own event types, and scoped handles may not erase', async () => {
  const { repo } = db
  await assert.rejects(
    repo.append({ ...event(randomUUID(), 1, 'ann', {}), aggregateType: 'system', eventType: 'synap.user_erased' }),
    (e) => e.code === 'VALIDATION_FAILED' && e.reason === 'INVALID_EVENT_TYPE',
  )
  await assert.rejects(repo.forUser('ann').eraseUser('ann'), (e) => e.code === 'PERMISSION_DENIED')
  await assert.rejects(repo.eraseUser(''), (e) => e.code === 'VALIDATION_FAILED')
  await assert.rejects(repo.eraseUser('ann', { waitTimeoutMs: -1 }), (e) => e.code === 'VALIDATION_FAILED')
})

test('deleteStream: soft folds as deleted, hard leaves a tombstone that refuses the id', async () => {
  const { repo } = db
  const [soft, hard] = [randomUUID(), randomUUID()]
  await repo.append(event(soft, 1, 'cy', { a: 1 }))
  await repo.append(event(hard, 1, 'cy', { a: 1 }))
  const s = await repo.deleteStream(soft)
  assert.deepEqual([s.found, s.hard, s.event.eventType, s.event.version], [true, false, 'entity.deleted', 2])
  assert.equal((await repo.replay(soft)).deleted, true)
  const h = await repo.deleteStream(hard, { hard: true })
  assert.deepEqual([h.found, h.hard, h.events], [true, true, 1])
  assert.deepEqual(await repo.getAggregateStream(hard), [])
  await assert.rejects(repo.append(event(hard, 1, 'cy', {})), (e) => e.code === 'STREAM_DELETED' && e.aggregateId === hard)
  await assert.rejects(repo.append(event(hard, 2, 'cy', {})), (e) => e.code === 'STREAM_DELETED')
  await assert.rejects(repo.forUser('cy').deleteStream(soft, { hard: true }), (e) => e.code === 'PERMISSION_DENIED')
  await assert.rejects(repo.deleteStream('not-a-uuid'), (e) => e.code === 'VALIDATION_FAILED')
})
