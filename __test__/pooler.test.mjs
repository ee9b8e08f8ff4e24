// Through a transaction-mode pooler (scripts/test.sh's pooler pass; skipped elsewhere): nothing of
// one client's session reaches another's. Two clients interleave alice's and bob's scoped calls
// over a pool of ONE server connection (PgBouncer's `postgres_one` database, scripts/db.sh), so
// every transaction of both runs on the same server session: a user setting that outlived its
// transaction would show the other user's rows.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { EventRepository } from '@synap/database'
import { freshRepository, DATABASE_URL, POOLED } from './db.mjs'

const ev = (userId, aggregateId, version) => ({
  aggregateId,
  aggregateType: 'entity',
  eventType: version === 1 ? 'note.created' : 'note.updated',
  userId,
  data: { of: userId, n: version },
  version,
})

test('interleaved users over one pooled server connection never see each other\'s rows', { skip: !POOLED && 'runs through the pooler only' }, async () => {
  const db = await freshRepository('pool_one')
  const role = `synap_pool_one_${process.pid}`
  await db.sql.query(`DROP ROLE IF EXISTS ${role}`)
  await db.sql.query(`CREATE ROLE ${role} LOGIN NOSUPERUSER NOBYPASSRLS`)
  await db.sql.query('SELECT synap_grant_application_role($1)', [role])
  const url = new URL(DATABASE_URL)
  url.pathname = '/postgres_one'
  url.username = role
  const clients = [0, 1].map(() => new EventRepository({ connectionString: url.toString(), schema: db.schema, poolSize: 3 }))
  try {
    const users = ['alice', 'bob']
    const own = { alice: [], bob: [] }
    for (const user of users) {
      const id = randomUUID()
      own[user].push(id)
      await db.repo.appendBatch([ev(user, id, 1), ev(user, id, 2)])
    }
    const rounds = 60
    await Promise.all(
      users.map(async (user, k) => {
        const scoped = clients[k].forUser(user)
        const unscoped = clients[1 - k]
        let version = 2
        const id = own[user][0]
        for (let round = 0; round < rounds; round++) {
          const [count, stream, page, nothing] = await Promise.all([
            scoped.countEvents(),
            scoped.getUserStream(user, { limit: 1000 }),
            scoped.readAll({ limit: 1000 }),
            unscoped.countEvents(),
          ])
          for (const e of [...stream, ...page.events]) assert.equal(e.userId, user, `round ${round}: ${user} saw ${e.userId}`)
          assert.equal(count, stream.length, `round ${round}: ${user}'s count is ${user}'s events`)
          assert.equal(nothing, 0, `round ${round}: no user set, no row`)
          assert.deepEqual(await scoped.getAggregateStream(own[users[1 - k]][0]), [], `round ${round}: the other's stream`)
          if (round % 3 === 0) {
            version += 1
            await scoped.append(ev(user, id, version))
          }
        }
      }),
    )
    assert.equal(await db.repo.countEvents({ userId: 'alice' }), await db.repo.countEvents({ userId: 'bob' }))
  } finally {
    for (const c of clients) c.close()
    await db.sql.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`)
    await db.close()
  }
})
