// Replay where the data lives, through the built module: `replay` folds in Rust as the rows
// arrive and gives what `foldEvents` over the stream gives; snapshots are used only when their
// fold rules match; `getSnapshotAndTail` finished by the wasm build's `foldEvents(tail, { from })`
// agrees with the native fold at every snapshot position; retention keeps live aggregates whole
// and says plainly when history was removed.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { createRequire } from 'node:module'
import * as native from '@synap/database'
import { freshRepository } from './db.mjs'

const require = createRequire(import.meta.url)
const wasm = require('../wasm/pkg/node/synap_events.js')

let store

before(async () => {
  store = await freshRepository('replay')
})

after(async () => {
  await store?.close()
})

/** A small deterministic generator, so a failure names its seed. */
function random(seed) {
  let s = seed >>> 0
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0
    return s / 2 ** 32
  }
}

/** Appends `n` events that set, change, nest and remove keys, with a delete and a restore. */
async function writeStream(repo, id, n, seed, start = Date.UTC(2026, 0, 1)) {
  const rnd = random(seed)
  const base = { aggregateId: id, aggregateType: 'entity', userId: 'u-replay' }
  for (let v = 1; v <= n; v++) {
    const key = `k${Math.floor(rnd() * 6)}`
    const roll = rnd()
    let eventType = 'entity.updated'
    let data
    if (roll < 0.15) data = { [key]: null }
    else if (roll < 0.3) data = { nested: { [key]: v, list: [v, 'é', { deep: roll }] } }
    else if (roll < 0.35 && v > 1) eventType = 'entity.deleted'
    else if (roll < 0.4 && v > 1) eventType = 'entity.restored'
    else data = { [key]: `v${v} "quoted" \u2028 ${'x'.repeat(Math.floor(rnd() * 20))}`, count: v }
    await repo.append({ ...base, eventType, data: data ?? {}, version: v, timestamp: new Date(start + v * 60_000) })
  }
}

const plain = (value) => JSON.parse(JSON.stringify(value))

test('replay gives what foldEvents over the stream gives, to every version and time', async () => {
  const id = randomUUID()
  await writeStream(store.repo, id, 40, 7)
  const stream = await store.repo.getAggregateStream(id)
  assert.equal(stream.length, 40)
  for (const toVersion of [undefined, 1, 2, 17, 39, 40, 100]) {
    const options = toVersion === undefined ? {} : { toVersion }
    const got = await store.repo.replay(id, options)
    const want = native.foldEvents(stream, options)
    assert.deepEqual(
      plain({ state: got.state, version: got.version, deleted: got.deleted, lastTimestamp: got.lastTimestamp }),
      plain(want),
      `toVersion ${toVersion}`,
    )
    assert.equal(got.snapshotVersion, null)
    assert.equal(got.eventsFolded, want.version)
  }
  const toTimestamp = new Date(Date.UTC(2026, 0, 1) + 25 * 60_000 + 30_000)
  const atTime = await store.repo.replay(id, { toTimestamp })
  assert.equal(atTime.version, 25)
  assert.deepEqual(plain(atTime.state), plain(native.foldEvents(stream, { toTimestamp }).state))

  const unknown = await store.repo.replay(randomUUID())
  assert.deepEqual(
    [unknown.state, unknown.version, unknown.deleted, unknown.lastTimestamp, unknown.eventsFolded],
    [null, 0, false, null, 0],
  )
  await assert.rejects(store.repo.replay('not-a-uuid'), { code: 'VALIDATION_FAILED' })
  await assert.rejects(store.repo.replay(id, { toVersion: -1 }), { code: 'INVALID_OPTIONS' })
})

test('native replay and the wasm fold of getSnapshotAndTail agree at every snapshot position', async () => {
  const id = randomUUID()
  const rnd = random(11)
  const base = { aggregateId: id, aggregateType: 'entity', userId: 'u-replay' }
  let snapshots = 0
  for (let v = 1; v <= 30; v++) {
    await store.repo.append({ ...base, eventType: 'entity.updated', data: { [`k${v % 4}`]: v, at: rnd() }, version: v })
    if (v % 7 === 0) {
      await store.repo.snapshot(id)
      snapshots++
    }
    const { snapshot, events } = await store.repo.getSnapshotAndTail(id)
    const expectedSnapshot = Math.floor(v / 7) * 7
    assert.equal(snapshot?.version ?? 0, expectedSnapshot, `after v${v}`)
    assert.deepEqual(events.map((e) => e.version), Array.from({ length: v - expectedSnapshot }, (_, i) => expectedSnapshot + i + 1))
    // What a browser receives: JSON text.
    const wire = plain({ snapshot, events })
    const options = wire.snapshot ? { from: wire.snapshot } : {}
    const inBrowser = wasm.foldEvents(wire.events, options)
    const inNode = native.foldEvents(wire.events, options)
    const replayed = await store.repo.replay(id)
    const fromScratch = native.foldEvents(await store.repo.getAggregateStream(id))
    const fields = (r) => plain({ state: r.state, version: r.version, deleted: r.deleted, lastTimestamp: r.lastTimestamp })
    assert.deepEqual(fields(inBrowser), fields(fromScratch), `wasm after v${v}`)
    assert.deepEqual(fields(inNode), fields(fromScratch), `native fold after v${v}`)
    assert.deepEqual(fields(replayed), fields(fromScratch), `replay after v${v}`)
    assert.equal(replayed.snapshotVersion, expectedSnapshot || null)
    assert.equal(replayed.eventsFolded, v - expectedSnapshot)
  }
  assert.equal(snapshots, 4)
})

test('the snapshot policy stores one after snapshotEvery events; other fold rules never use it', async () => {
  const { repo, close, sql } = await freshRepository('replay_policy', { snapshotEvery: 10 })
  try {
    const id = randomUUID()
    await writeStream(repo, id, 25, 3)
    const first = await repo.replay(id)
    assert.deepEqual([first.snapshotVersion, first.eventsFolded, first.snapshotStored], [null, 25, true])
    const second = await repo.replay(id)
    assert.deepEqual([second.snapshotVersion, second.eventsFolded, second.snapshotStored], [25, 0, false])
    assert.deepEqual(plain(second.state), plain(first.state))
    // Below the policy's threshold past the newest snapshot: nothing stored.
    await repo.append({ aggregateId: id, aggregateType: 'entity', eventType: 'entity.updated', userId: 'u-replay', data: { z: 1 }, version: 26 })
    const third = await repo.replay(id)
    assert.deepEqual([third.snapshotVersion, third.eventsFolded, third.snapshotStored], [25, 1, false])

    // Other bookkeeping rules make another fingerprint: the stored snapshot is not used.
    const other = await repo.replay(id, { bookkeeping: { ignoreKeys: ['count'] } })
    assert.equal(other.snapshotVersion, null)
    assert.equal(other.eventsFolded, 26)
    const stream = await repo.getAggregateStream(id)
    assert.deepEqual(plain(other.state), plain(native.foldEvents(stream, { bookkeeping: { ignoreKeys: ['count'] } }).state))

    const { rows } = await sql.query('SELECT count(DISTINCT rules)::int AS rules, count(*)::int AS n FROM event_snapshots')
    assert.ok(rows[0].n >= 1)
  } finally {
    await close()
  }
})

test('retention keeps a live aggregate whole through a snapshot and says when history was removed', async () => {
  const { repo, close } = await freshRepository('replay_retention')
  try {
    const day = 86_400_000
    const old = Date.now() - 400 * day
    const live = randomUUID()
    const dormant = randomUUID()
    const gone = randomUUID()
    const base = { aggregateType: 'entity', userId: 'u-replay', eventType: 'entity.updated' }
    await repo.append({ ...base, aggregateId: live, data: { a: 1 }, version: 1, timestamp: new Date(old) })
    await repo.append({ ...base, aggregateId: live, data: { b: 2 }, version: 2, timestamp: new Date(old + day) })
    await repo.append({ ...base, aggregateId: live, data: { a: 3 }, version: 3 })
    // Every event old, not deleted: still live, so kept as a snapshot.
    await repo.append({ ...base, aggregateId: dormant, data: { x: 1 }, version: 1, timestamp: new Date(old) })
    // Every event old and deleted: its stream goes with them.
    await repo.append({ ...base, aggregateId: gone, data: { y: 1 }, version: 1, timestamp: new Date(old) })
    await repo.append({ ...base, aggregateId: gone, eventType: 'entity.deleted', data: {}, version: 2, timestamp: new Date(old) })
    const before = await repo.replay(live)

    const report = await repo.applyRetention({ olderThan: '300d' })
    assert.equal(report.snapshotsStored, 2, 'live and dormant')
    assert.equal(report.streamsKept, 1, 'dormant')
    assert.equal(report.streamsDeleted, 1, 'gone')

    const afterDrop = await repo.replay(live)
    assert.deepEqual(plain(afterDrop.state), plain(before.state))
    assert.deepEqual([afterDrop.version, afterDrop.snapshotVersion, afterDrop.eventsFolded], [3, 2, 1])
    await assert.rejects(repo.getAggregateStream(live), (err) => {
      assert.equal(err.code, 'HISTORY_REMOVED')
      assert.equal(err.aggregateId, live)
      assert.equal(err.retainedFrom, 3)
      assert.equal(err.snapshotVersion, 2)
      return true
    })
    await assert.rejects(repo.replay(live, { toVersion: 1 }), { code: 'HISTORY_REMOVED' })
    const { snapshot, events } = await repo.getSnapshotAndTail(live)
    assert.equal(snapshot.version, 2)
    assert.deepEqual(events.map((e) => e.version), [3])
    assert.equal(await repo.getAggregateVersion(gone), null)
    assert.equal(await repo.getAggregateVersion(dormant), 1)
    const kept = await repo.replay(dormant)
    assert.deepEqual([plain(kept.state), kept.version, kept.snapshotVersion, kept.eventsFolded], [{ x: 1 }, 1, 1, 0])
    await assert.rejects(repo.getAggregateStream(dormant), { code: 'HISTORY_REMOVED' })
  } finally {
    await close()
  }
})
