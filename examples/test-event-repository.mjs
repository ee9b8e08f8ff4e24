// The design document's sample script (scripts/test-event-repository.ts), runnable as it is.
// DATABASE_URL must point at PostgreSQL; `scripts/sample.sh` starts a private one.
import { eventRepository, AggregateType, EventSource } from '@synap/database'
import { randomUUID } from 'node:crypto'

async function test() {
  await eventRepository.migrate()

  // The design used a fixed id; a fresh one lets the sample run again on the same database.
  const aggregateId = process.env.SAMPLE_AGGREGATE_ID ?? randomUUID()

  // Append event
  const event = await eventRepository.append({
    aggregateId,
    aggregateType: AggregateType.ENTITY,
    eventType: 'test.event',
    userId: 'test-user',
    data: { message: 'Hello TimescaleDB!' },
    version: 1,
    source: EventSource.API,
  })

  console.log('✅ Event appended:', event.id)

  // Get aggregate stream
  const stream = await eventRepository.getAggregateStream(aggregateId)

  console.log(`✅ Stream has ${stream.length} events`)

  // Get user stream
  const userEvents = await eventRepository.getUserStream('test-user', { days: 1 })
  console.log(`✅ User has ${userEvents.length} events`)
}

test().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
