// The legacy switch-over from Node: dual-write, migrateLegacyEvents, verifyLegacy, stats,
// retention (dry run) and dropLegacyTable's confirmation.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { AggregateType, EventRepository } from '@synap/database'
import { freshRepository, DATABASE_URL, DIRECT_URL, POOLED } from './db.mjs'

test('legacy events migrate exactly once; dual-write keeps old readers working', async () => {
  const db = await freshRepository('switchover')
  try {
    await db.sql.query(`CREATE TABLE events (
      id uuid PRIMARY KEY, user_id text NOT NULL, timestamp timestamptz NOT NULL, type text NOT NULL,
      data jsonb NOT NULL, source text DEFAULT 'api', correlation_id uuid)`)
    const entity = randomUUID()
    const rows = [
      [randomUUID(), 'u1', '2026-01-02T00:00:00Z', 'entity.updated', { entityId: entity, title: 'b' }],
      [randomUUID(), 'u1', '2026-01-01T00:00:00Z', 'entity.created', { entityId: entity, title: 'a' }],
      [randomUUID(), 'u2', '2026-01-03T00:00:00Z', 'relation.created', { from: 'x' }],
      [randomUUID(), 'u2', '2026-01-04T00:00:00Z', 'Not A Type', {}],
    ]
    for (const [id, user, ts, type, data] of rows) {
      await db.sql.query('INSERT INTO events (id, user_id, timestamp, type, data) VALUES ($1, $2, $3, $4, $5)', [id, user, ts, type, data])
    }

    // The legacy migration holds session locks: through a transaction-mode pooler it refuses to
    // run and says to use the direct URL, which the rest of this test then does.
    const legacy = POOLED ? new EventRepository({ connectionString: DIRECT_URL, schema: db.schema }) : db.repo
    if (POOLED) {
      for (const call of [() => db.repo.migrateLegacyEvents({ dryRun: true }), () => db.repo.verifyLegacy(), () => db.repo.dropLegacyTable('events', true)]) {
        await assert.rejects(call(), (e) => e.code === 'INVALID_CONFIG' && /direct/.test(e.message))
      }
    }
    const dry = await legacy.migrateLegacyEvents({ dryRun: true })
    assert.equal(dry.dryRun, true)
    assert.equal((await db.rows()).events, 0)

    for (const writers of [0, -1, 17, 1e10]) {
      await assert.rejects(legacy.migrateLegacyEvents({ writers }), { code: 'INVALID_CONFIG' }, `writers ${writers}`)
    }
    await assert.rejects(legacy.migrateLegacyEvents({ writers: 2.5 }), { code: 'VALIDATION_FAILED' })
    await assert.rejects(legacy.migrateLegacyEvents({ batchSize: -1 }), { code: 'INVALID_CONFIG' })
    await assert.rejects(legacy.migrateLegacyEvents({ batchSize: 0.5 }), { code: 'VALIDATION_FAILED' })
    for (const options of [{ writers: '2' }, { dryRun: 'yes' }, { legacyTable: 5 }, { onInvalid: 'maybe' }, { limit: -1 }, 'x']) {
      await assert.rejects(legacy.migrateLegacyEvents(options), { code: 'INVALID_CONFIG' }, JSON.stringify(options))
    }
    assert.equal((await db.rows()).events, 0, 'a refused run writes nothing')
    const report = await legacy.migrateLegacyEvents({ batchSize: 2, writers: 3 })
    assert.equal(report.migrated, 3)
    assert.equal(report.failed, 1)
    assert.equal(report.failures[0].legacyId, rows[3][0])
    const stream = await db.repo.getAggregateStream(entity)
    assert.deepEqual(stream.map((e) => [e.version, e.data.title, e.source]), [[1, 'a', 'migration'], [2, 'b', 'migration']])
    await assert.rejects(legacy.migrateLegacyEvents(), { code: 'LEGACY_MIGRATION_STARTED' })
    const again = await legacy.migrateLegacyEvents({ resume: true })
    assert.equal(again.migrated, 0, 'nothing twice')

    // Dual-write: an append also lands in the legacy table, in the same statement.
    const dual = new EventRepository({ connectionString: DATABASE_URL, schema: db.schema, dualWriteLegacyTable: 'events' })
    const appended = await dual.append({
      aggregateId: entity, aggregateType: AggregateType.ENTITY, eventType: 'entity.updated',
      userId: 'u1', data: { title: 'c' }, version: 3,
    })
    const written = await db.sql.query('SELECT type, data FROM events WHERE id = $1', [appended.id])
    assert.deepEqual(written.rows, [{ type: 'entity.updated', data: { title: 'c' } }])
    await assert.rejects(dual.append({
      aggregateId: entity, aggregateType: AggregateType.ENTITY, eventType: 'entity.updated',
      userId: 'u1', data: {}, version: 3,
    }), { code: 'CONCURRENCY_CONFLICT' })
    assert.equal((await db.sql.query('SELECT count(*)::int AS n FROM events')).rows[0].n, 5)
    dual.close()

    const verify = await legacy.verifyLegacy()
    assert.equal(verify.ok, false, 'the failed row is a difference')
    assert.equal(verify.failedCount, 1)
    await assert.rejects(legacy.dropLegacyTable('events', true), (err) => err.code === 'VERIFY_FAILED')
    await assert.rejects(legacy.dropLegacyTable('events'), (err) => ['CONFIRMATION_REQUIRED', 'VERIFY_FAILED'].includes(err.code))

    const stats = await db.repo.stats()
    assert.equal(typeof stats, 'object')
    const retention = await db.repo.applyRetention({ olderThan: '3650d', dryRun: true })
    assert.equal(retention.dryRun, true)
    await assert.rejects(db.repo.applyRetention({ olderThan: 'soon' }), (err) => typeof err.code === 'string')
    await assert.rejects(legacy.migrateLegacyEvents({ legacyTable: 'events; drop table events_v2' }), { code: 'INVALID_CONFIG' })
    if (legacy !== db.repo) legacy.close()
  } finally {
    await db.close()
  }
})
