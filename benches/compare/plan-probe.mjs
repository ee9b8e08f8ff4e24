// What planning costs a single append: the repository's append statement run unnamed (planned
// on every call, as any statement through a transaction-mode pooler), the same statement
// prepared once (as the repository runs it directly connected), and `synap_append`, the PL/pgSQL
// function that runs it through a pooler (its plan kept by the server connection), called
// unnamed and prepared. node-postgres on one direct connection, interleaved rounds, medians.
// The statement is read from the function's source, so it is the one the repository runs.
// Usage (a migrated database; appends go to new aggregates of user 'plan-probe'):
//   DATABASE_URL=postgres://...:54329/postgres [N=500] [ROUNDS=5] npm run bench:plan
import pg from 'pg'
import { randomUUID } from 'node:crypto'

const url = process.env.DATABASE_URL
if (!url) throw new Error('DATABASE_URL (a migrated database, direct) is required')
const N = Number(process.env.N ?? 500)
const ROUNDS = Number(process.env.ROUNDS ?? 5)
const client = new pg.Client({ connectionString: url })
await client.connect()
const { rows } = await client.query("SELECT prosrc FROM pg_proc WHERE proname = 'synap_append' AND pronamespace = current_schema()::regnamespace")
if (rows.length !== 1) throw new Error('synap_append not found: migrate the database first')
const src = rows[0].prosrc
const statement = src.slice(src.indexOf('RETURN QUERY') + 'RETURN QUERY'.length, src.lastIndexOf(';'))
const call = 'SELECT out_timestamp, out_position FROM synap_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)'
const params = () => [randomUUID(), null, randomUUID(), 'entity', 'entity.created', 'plan-probe', '{}', null, 1, null, null, 'api', 1]
const ways = {
  'statement, unnamed': () => client.query({ text: statement, values: params() }),
  'statement, prepared': () => client.query({ name: 'probe_statement', text: statement, values: params() }),
  'synap_append, unnamed': () => client.query({ text: call, values: params() }),
  'synap_append, prepared': () => client.query({ name: 'probe_function', text: call, values: params() }),
}
const times = {}
for (let r = 0; r < ROUNDS; r++) {
  for (const [name, run] of Object.entries(ways)) {
    const t = process.hrtime.bigint()
    for (let i = 0; i < N; i++) await run()
    ;(times[name] ??= []).push(Number(process.hrtime.bigint() - t) / 1e6 / N)
  }
}
const settings = await client.query("SELECT current_setting('fsync') AS fsync, current_setting('server_version') AS version")
console.log(`PostgreSQL ${settings.rows[0].version}, fsync ${settings.rows[0].fsync}; ${N} appends per round, medians of ${ROUNDS} rounds (ms per append)`)
for (const [name, xs] of Object.entries(times)) {
  const sorted = [...xs].sort((a, b) => a - b)
  console.log(name.padEnd(24), sorted[Math.floor(sorted.length / 2)].toFixed(3))
}
await client.end()
