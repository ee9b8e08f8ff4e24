// Type test: the design document's samples, unchanged, must compile under strict and
// isolatedModules (how tsx and esbuild run the application). `npm run typecheck`.
import { eventRepository, AggregateType, EventSource, EventRepository } from '@synap/database'
import type { EventRecord, AppendEventData, UserStreamOptions, EventStreamOptions } from '@synap/database'

async function designSamples(): Promise<void> {
  // Append event with optimistic locking
  const event: EventRecord = await eventRepository.append({
    aggregateId: 'entity-123',
    aggregateType: AggregateType.ENTITY,
    eventType: 'entity.updated',
    userId: 'user-456',
    data: {
      title: 'New title', // Delta only!
      updatedFields: ['title'],
    },
    version: 5, // Next version
    correlationId: 'workflow-789', // Optional
    source: EventSource.API,
  })
  const when: Date = event.timestamp
  const title: unknown = event.data.title

  // Event replay (reconstruct aggregate state)
  const stream = await eventRepository.getAggregateStream('entity-123')
  const versions: number[] = stream.map((e) => e.version)

  // User activity feed
  const userEvents = await eventRepository.getUserStream('user-456', {
    days: 7,
    limit: 100,
    eventTypes: ['entity.created', 'task.completed'],
  })

  // Workflow tracking
  const workflowEvents = await eventRepository.getCorrelatedEvents('workflow-789')

  // Analytics
  const count: number = await eventRepository.countEvents({
    userId: 'user-456',
    eventType: 'entity.created',
    fromDate: new Date('2025-01-01'),
  })

  const batch: AppendEventData[] = [
    {
      aggregateId: '00000000-0000-0000-0000-000000000001',
      aggregateType: AggregateType.ENTITY,
      eventType: 'test.event',
      userId: 'test-user',
      data: { message: 'Hello TimescaleDB!' },
      version: 1,
      source: EventSource.API,
    },
  ]
  await eventRepository.appendBatch(batch)
  const options: UserStreamOptions = { days: 1 }
  const streamOptions: EventStreamOptions = { fromVersion: 1, toVersion: 3 }
  const version: number | null | undefined = await eventRepository.getAggregateVersion('x')
  const own = new EventRepository({ connectionString: 'postgres://localhost/db', poolSize: 5 })
  own.close()
  const kind: AggregateType = AggregateType.RELATION
  const source: string = EventSource.AUTOMATION
  void [when, title, versions, userEvents, workflowEvents, count, options, streamOptions, version, kind, source]
}

void designSamples
