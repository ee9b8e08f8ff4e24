// BASELINE — not our product. The design document's TypeScript EventRepository algorithm on
// node-postgres, written here only to be measured against:
//   append:             SELECT MAX(version) for the aggregate, compare, then INSERT (two round
//                       trips, and a read-then-write race the real thing would have too)
//   appendBatch:        one multi-VALUES INSERT (one bind parameter per value) in a transaction
//   getAggregateStream: no time predicate, so every chunk/partition is probed
import pg from 'pg'

const COLUMNS = ['id', 'timestamp', 'aggregate_id', 'aggregate_type', 'event_type', 'user_id', 'data', 'metadata', 'version', 'causation_id', 'correlation_id', 'source']

function row(e) {
  return [
    e.id ?? crypto.randomUUID(), e.timestamp ?? new Date(), e.aggregateId, e.aggregateType, e.eventType, e.userId,
    e.data, e.metadata ?? null, e.version, e.causationId ?? null, e.correlationId ?? null, e.source ?? 'api',
  ]
}

function toRecord(r) {
  return {
    id: r.id, timestamp: r.timestamp, aggregateId: r.aggregate_id, aggregateType: r.aggregate_type,
    eventType: r.event_type, userId: r.user_id, data: r.data, metadata: r.metadata ?? undefined,
    version: r.version, causationId: r.causation_id ?? undefined, correlationId: r.correlation_id ?? undefined,
    source: r.source,
  }
}

export class BaselineEventRepository {
  constructor({ connectionString, schema, max = 10 }) {
    // Without a schema (a database of its own, as through a pooler, which refuses `options`):
    // the server's search_path.
    this.pool = new pg.Pool({ connectionString, max, ...(schema ? { options: `-c search_path=${schema}` } : {}) })
  }

  async append(event) {
    const { rows } = await this.pool.query('SELECT MAX(version) AS v FROM events_v2 WHERE aggregate_id = $1', [event.aggregateId])
    const current = rows[0].v ?? 0
    if (current !== event.version - 1) {
      throw new Error(`Concurrency conflict: expected version ${event.version - 1}, got ${current}`)
    }
    const inserted = await this.pool.query(
      `INSERT INTO events_v2 (${COLUMNS.join(', ')}) VALUES (${COLUMNS.map((_, i) => `$${i + 1}`).join(', ')}) RETURNING *`,
      row(event),
    )
    return toRecord(inserted.rows[0])
  }

  async appendBatch(events) {
    const client = await this.pool.connect()
    try {
      await client.query('BEGIN')
      const ids = [...new Set(events.map((e) => e.aggregateId))]
      const { rows } = await client.query(
        'SELECT aggregate_id, MAX(version) AS v FROM events_v2 WHERE aggregate_id = ANY($1) GROUP BY aggregate_id',
        [ids],
      )
      const current = new Map(rows.map((r) => [r.aggregate_id, r.v]))
      const next = new Map()
      for (const e of events) {
        const expected = (next.get(e.aggregateId) ?? current.get(e.aggregateId) ?? 0) + 1
        if (e.version !== expected) throw new Error(`Concurrency conflict: expected version ${expected - 1}, got ${e.version - 1}`)
        next.set(e.aggregateId, e.version)
      }
      const values = []
      const tuples = events.map((e, i) => {
        values.push(...row(e))
        return `(${COLUMNS.map((_, j) => `$${i * COLUMNS.length + j + 1}`).join(', ')})`
      })
      const inserted = await client.query(`INSERT INTO events_v2 (${COLUMNS.join(', ')}) VALUES ${tuples.join(', ')} RETURNING *`, values)
      await client.query('COMMIT')
      return inserted.rows.map(toRecord)
    } catch (err) {
      await client.query('ROLLBACK')
      throw err
    } finally {
      client.release()
    }
  }

  async getAggregateStream(aggregateId) {
    const { rows } = await this.pool.query('SELECT * FROM events_v2 WHERE aggregate_id = $1 ORDER BY version', [aggregateId])
    return rows.map(toRecord)
  }

  async getUserStream(userId, { days = 7, limit = 1000 } = {}) {
    const { rows } = await this.pool.query(
      `SELECT * FROM events_v2 WHERE user_id = $1 AND timestamp >= NOW() - ($2 || ' days')::interval
       ORDER BY timestamp DESC LIMIT $3`,
      [userId, String(days), limit],
    )
    return rows.map(toRecord)
  }

  close() {
    return this.pool.end()
  }
}

/** BASELINE fold: a plain JavaScript reducer with the same rules as foldEvents. */
export function foldInJs(events) {
  let state = null
  let deleted = false
  const patch = (target, p) => {
    if (p === null || typeof p !== 'object' || Array.isArray(p)) return p
    const out = target !== null && typeof target === 'object' && !Array.isArray(target) ? { ...target } : {}
    for (const [k, v] of Object.entries(p)) {
      if (v === null) delete out[k]
      else out[k] = patch(out[k], v)
    }
    return out
  }
  for (const e of events) {
    const data = {}
    for (const [k, v] of Object.entries(e.data)) {
      if (k === 'updatedFields') continue
      if (/^previous[A-Z]/.test(k) && Object.hasOwn(e.data, k[8].toLowerCase() + k.slice(9))) continue
      data[k] = v
    }
    if (e.eventType.endsWith('.created')) {
      state = patch({}, data)
      deleted = false
    } else {
      state = patch(state, data)
      if (e.eventType.endsWith('.deleted')) deleted = true
    }
  }
  return { state, version: events.at(-1)?.version ?? 0, deleted }
}
