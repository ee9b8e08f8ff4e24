// The API's contract with a careless caller, checked against every call that index.d.ts and
// database.d.ts declare (a call added later is covered without a change here, or fails until it
// has its arguments below):
// - every options object refuses a key that is not one of its options, naming it, and writes
//   nothing (a misspelt `dryRun` must never run for real);
// - every rejection or throw, whatever the arguments, has a `code` from docs/api.md's table of
//   codes and a boolean `retryable`;
// - every call is named in docs/api.md.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import { randomUUID } from 'node:crypto'
import { EventRepository } from '@synap/database'
import { freshRepository, DATABASE_URL } from './db.mjs'

/** Every method of EventRepository in the declarations, with its parameter list. */
function declaredCalls() {
  const calls = new Map()
  const index = fs.readFileSync(new URL('../index.d.ts', import.meta.url), 'utf8')
  const body = index.slice(index.indexOf('export declare class EventRepository {'))
  for (const line of body.slice(0, body.indexOf('\n}')).split('\n')) {
    const m = /^ {2}([a-zA-Z]+)\((.*)\)/.exec(line)
    if (m && m[1] !== 'constructor') calls.set(m[1], m[2])
  }
  const database = fs.readFileSync(new URL('../database.d.ts', import.meta.url), 'utf8')
  for (const m of database.matchAll(/^ {4}([a-zA-Z]+)\(\n?\s*(options[^)]*)\)/gm)) calls.set(m[1], m[2])
  return calls
}

const apiDoc = () => fs.readFileSync(new URL('../docs/api.md', import.meta.url), 'utf8')

/** The codes of docs/api.md's table (the first column under "### Errors"), with the fold's. */
function documentedCodes() {
  const doc = apiDoc()
  const table = doc.slice(doc.indexOf('### Errors'), doc.indexOf('\n## ', doc.indexOf('### Errors')))
  const codes = new Set()
  for (const line of table.split('\n').filter((l) => l.startsWith('| `'))) {
    for (const m of line.split('|')[1].matchAll(/`([A-Z_]+)`/g)) codes.add(m[1])
  }
  // The fold's codes (docs/api.md, "Replay fold").
  for (const c of ['VERSION_GAP', 'DUPLICATE_VERSION', 'UNORDERED_EVENTS', 'MIXED_AGGREGATES', 'INVALID_EVENT', 'INVALID_OPTIONS']) {
    codes.add(c)
  }
  return codes
}

let db
before(async () => {
  db = await freshRepository('contract')
  await db.repo.append({
    aggregateId: randomUUID(),
    aggregateType: 'entity',
    eventType: 'entity.created',
    userId: 'u',
    data: { keep: true },
    version: 1,
    timestamp: new Date(Date.now() - 3 * 86_400_000),
  })
})
after(async () => {
  await db.close()
})

const handler = async () => {}
const id = () => randomUUID()

// The calls that take an options object: their arguments with `options` in place, and the keys
// an options object needs besides a misspelt one.
const WITH_OPTIONS = {
  getAggregateStream: (o) => [id(), o],
  getUserStream: (o) => ['u', o],
  countEvents: (o) => [o],
  readAll: (o) => [o],
  subscribe: (o) => [o],
  migrateLegacyEvents: (o) => [o],
  dropLegacyTable: (o) => ['events', false, o],
  applyRetention: (o) => [{ olderThan: '1d', ...o }],
  eraseUser: (o) => ['nobody', o],
  deleteStream: (o) => [id(), o],
  runGroup: (o) => [{ group: 'g', ...o }, handler, false],
  consume: (o) => [{ group: 'g', handler, ...o }],
  project: (o) => [{ group: 'g', handler, ...o }],
  repairConsumer: (o) => ['c', o],
  replay: (o) => [id(), o],
}

test('every call of the declarations is in the API reference', () => {
  const doc = apiDoc()
  const missing = [...declaredCalls().keys()].filter((call) => !doc.includes(`${call}(`))
  assert.deepEqual(missing, [], 'docs/api.md names each call as name(...)')
})

test('every call with an options object has its place here', () => {
  const withOptions = [...declaredCalls()].filter(([, params]) => /\boptions\??:/.test(params)).map(([name]) => name)
  assert.deepEqual(withOptions.sort(), Object.keys(WITH_OPTIONS).sort())
})

for (const [call, args] of Object.entries(WITH_OPTIONS)) {
  test(`${call} refuses an option it does not have, naming it, and writes nothing`, async () => {
    const repo = new EventRepository({ connectionString: DATABASE_URL, schema: db.schema })
    try {
      const before = await db.rows()
      await assert.rejects(
        (async () => {
          const result = repo[call](...args({ dryrun: true }))
          if (result && typeof result[Symbol.asyncIterator] === 'function') {
            for await (const _ of result) break
          }
          return result
        })(),
        (e) => {
          // The fold's options have the fold's code; the others VALIDATION_FAILED.
          const code = call === 'replay' ? 'INVALID_OPTIONS' : 'VALIDATION_FAILED'
          assert.equal(e.code, code, `${call}: ${e.code} ${e.message}`)
          if (code === 'VALIDATION_FAILED') {
            assert.equal(e.field, 'dryrun', e.message)
            assert.equal(e.reason, 'UNKNOWN_OPTION', e.message)
          }
          assert.match(e.message, /dryrun/)
          assert.equal(e.retryable, false)
          return true
        },
      )
      assert.deepEqual(await db.rows(), before)
    } finally {
      repo.close()
    }
  })
}

test('the constructor refuses an option it does not have, naming it', () => {
  assert.throws(() => new EventRepository({ conectionString: DATABASE_URL }), (e) => {
    assert.equal(e.code, 'INVALID_CONFIG')
    assert.match(e.message, /conectionString/)
    assert.equal(e.retryable, false)
    return true
  })
})

test('options of the wrong type are refused, naming the key', async () => {
  const cases = [
    ['readAll', [{ limit: '1' }], 'limit'],
    ['countEvents', [{ userId: 5 }], 'userId'],
    ['getUserStream', ['u', { days: '7' }], 'days'],
    ['applyRetention', [{ olderThan: '1y', dryRun: 'yes' }], 'dryRun'],
    ['applyRetention', [{ olderThan: 7 }], 'olderThan'],
    ['repairConsumer', ['c', { accept: 1 }], 'accept'],
  ]
  for (const [call, args, field] of cases) {
    await assert.rejects(db.repo[call](...args), (e) => {
      assert.equal(e.code, 'VALIDATION_FAILED', `${call}: ${e.message}`)
      assert.equal(e.field, field, `${call}: ${e.message}`)
      return true
    })
  }
  assert.throws(() => db.repo.subscribe({ consumer: 123 }), { code: 'VALIDATION_FAILED', field: 'consumer' })
  assert.equal((await db.rows()).events, 1, 'nothing removed')
})

test('unknown aggregate types in a filter match nothing, as unknown users and event types do', async () => {
  assert.equal(await db.repo.countEvents({ aggregateType: 'widget' }), 0)
  assert.equal((await db.repo.getUserStream('u', { aggregateTypes: ['entity', 'widget'], days: 30 })).length, 1)
  assert.deepEqual(await db.repo.getUserStream('u', { aggregateTypes: ['widget'], days: 30 }), [])
})

test('every rejection of every call, whatever its arguments, has a documented code and retryable', async () => {
  const codes = documentedCodes()
  const hostile = [[], [null], [5], ['x'], [{}], [{ notAnOption: 1 }], ['x', 5], [null, null, null], [() => 1, 'x', 'y']]
  const seen = new Set()
  for (const call of [...declaredCalls().keys()].filter((c) => c !== 'close')) {
    for (const args of hostile) {
      const repo = new EventRepository({ connectionString: DATABASE_URL, schema: db.schema })
      try {
        let error
        try {
          const result = repo[call](...args)
          if (result && typeof result.then === 'function') {
            const settled = await result.then(
              (value) => ({ value }),
              (e) => ({ e }),
            )
            error = settled.e
            // A group run started by accident must end.
            if (settled.value && typeof settled.value.stop === 'function') await settled.value.stop()
          }
        } catch (e) {
          error = e
        }
        if (error) {
          seen.add(`${call}:${error.code}`)
          assert.ok(codes.has(error.code), `${call}(${args.map(String)}): code ${error.code} (${error.message})`)
          assert.equal(typeof error.retryable, 'boolean', `${call}(${args.map(String)}): ${error.message}`)
        }
      } finally {
        repo.close()
      }
    }
  }
  assert.ok(seen.size > 20, `rejections were seen: ${[...seen]}`)
  assert.equal((await db.rows()).events, 1, 'no hostile call removed the event')
})

test('a checkpoint past every transaction of the server is refused, not read from', async () => {
  for (const txid of ['18446744073709551615', '4611686018427387904']) {
    await assert.rejects(db.repo.readAll({ after: { txid, position: 0, store: '0' } }), {
      code: 'VALIDATION_FAILED',
      field: 'after.txid',
    })
  }
  await assert.rejects(db.repo.applyRetention({ olderThan: '7000y' }), { code: 'INVALID_CONFIG' })
})
