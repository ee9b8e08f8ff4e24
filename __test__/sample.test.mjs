// The design document's sample script, as a test.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { AggregateType, EventSource } from '@synap/database'
import { freshRepository } from './db.mjs'

test('design sample: append, then the stream and the user have one event', async () => {
  const db = await freshRepository('sample')
  const eventRepository = db.repo
  try {
    const event = await eventRepository.append({
      aggregateId: '00000000-0000-0000-0000-000000000001',
      aggregateType: AggregateType.ENTITY,
      eventType: 'test.event',
      userId: 'test-user',
      data: { message: 'Hello TimescaleDB!' },
      version: 1,
      source: EventSource.API,
    })
    assert.match(event.id, /^[0-9a-f-]{36}$/)
    assert.ok(event.timestamp instanceof Date)
    assert.deepEqual(event.data, { message: 'Hello TimescaleDB!' })

    const stream = await eventRepository.getAggregateStream('00000000-0000-0000-0000-000000000001')
    assert.equal(stream.length, 1)
    const userEvents = await eventRepository.getUserStream('test-user', { days: 1 })
    assert.equal(userEvents.length, 1)
  } finally {
    await db.close()
  }
})
