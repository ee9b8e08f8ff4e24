// Test support: each test file gets fresh schemas in the database named by DATABASE_URL
// (scripts/test.sh starts the private cluster and sets it).
import pg from 'pg'
import { EventRepository } from '@synap/database'

export const DATABASE_URL = process.env.DATABASE_URL
if (!DATABASE_URL) {
  throw new Error('DATABASE_URL must point at PostgreSQL: run scripts/test.sh, or eval "$(scripts/db.sh env)"')
}
/**
 * The server itself, for the tests' own statements (node-postgres sessions: SET search_path):
 * scripts/test.sh's pooler pass sets DATABASE_URL to PgBouncer in transaction mode and
 * SYNAP_TEST_DIRECT_URL to the server. The repositories go through DATABASE_URL.
 */
export const DIRECT_URL = process.env.SYNAP_TEST_DIRECT_URL || DATABASE_URL
/** Whether this pass goes through a transaction-mode pooler. */
export const POOLED = DIRECT_URL !== DATABASE_URL
/** Options every test repository takes: through a pooler, LISTEN on the server directly. */
export const BASE_OPTIONS = POOLED ? { listenUrl: DIRECT_URL } : {}

let counter = 0

/** A migrated repository in a schema of its own, and a pg client on that schema. */
export async function freshRepository(tag, options = {}) {
  const schema = `n_${tag}_${process.pid}_${counter++}`
  const client = new pg.Client({ connectionString: DIRECT_URL })
  await client.connect()
  await client.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE; CREATE SCHEMA ${schema}`)
  await client.query(`SET search_path = ${schema}`)
  const repo = new EventRepository({ connectionString: DATABASE_URL, schema, ...BASE_OPTIONS, ...options })
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
