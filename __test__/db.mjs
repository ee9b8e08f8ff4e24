// Test support: each test file gets fresh schemas in the database named by DATABASE_URL
// (scripts/test.sh starts the private cluster and sets it).
import pg from 'pg'
import { EventRepository } from '@synap/database'

export const DATABASE_URL = process.env.DATABASE_URL
if (!DATABASE_URL) {
  throw new Error('DATABASE_URL must point at PostgreSQL: run scripts/test.sh, or eval "$(scripts/db.sh env)"')
}

let counter = 0

/** A migrated repository in a schema of its own, and a pg client on that schema. */
export async function freshRepository(tag, options = {}) {
  const schema = `n_${tag}_${process.pid}_${counter++}`
  const client = new pg.Client({ connectionString: DATABASE_URL })
  await client.connect()
  await client.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE; CREATE SCHEMA ${schema}`)
  await client.query(`SET search_path = ${schema}`)
  const repo = new EventRepository({ connectionString: DATABASE_URL, schema, ...options })
  await repo.migrate()
  return {
    repo,
    schema,
    sql: client,
    async rows() {
      const { rows } = await client.query(
        'SELECT (SELECT count(*) FROM events_v2)::int AS events, (SELECT count(*) FROM event_streams)::int AS streams',
      )
      return rows[0]
    },
    async close() {
      repo.close()
      await client.end()
    },
  }
}
