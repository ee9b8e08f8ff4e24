// The shared vectors in vectors/: the native module and the wasm build (nodejs target) must both
// give exactly the expected answers, the same ones `cargo test --test vectors` checks in Rust.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import * as native from '@synap/database'

const require = createRequire(import.meta.url)
const wasm = require('../wasm/pkg/node/synap_events.js')

const load = (name) => JSON.parse(readFileSync(new URL(`../vectors/${name}.json`, import.meta.url), 'utf8')).cases

const builds = { native, wasm }

function foldOutcome(impl, c) {
  try {
    return { ok: impl.foldEvents(c.events, c.options) }
  } catch (err) {
    if (typeof err.code !== 'string') throw err
    return { error: { code: err.code, index: err.index } }
  }
}

for (const [buildName, impl] of Object.entries(builds)) {
  test(`${buildName}: fold vectors`, () => {
    const cases = load('fold')
    assert.ok(cases.length >= 40)
    for (const c of cases) {
      const got = foldOutcome(impl, c)
      if (c.expectError) {
        assert.deepEqual(got, { error: c.expectError }, c.name)
      } else {
        // Compare as JSON: the result holds plain JSON (timestamps as ISO strings).
        assert.deepEqual(JSON.parse(JSON.stringify(got)), { ok: c.expect }, c.name)
      }
    }
  })

  test(`${buildName}: fold vectors through foldEventsJson (JSON text in)`, () => {
    for (const c of load('fold')) {
      let got
      try {
        got = { ok: impl.foldEventsJson(JSON.stringify(c.events), c.options) }
      } catch (err) {
        if (typeof err.code !== 'string') throw err
        got = { error: { code: err.code, index: err.index } }
      }
      if (c.expectError) assert.deepEqual(got, { error: c.expectError }, c.name)
      else assert.deepEqual(JSON.parse(JSON.stringify(got)), { ok: c.expect }, c.name)
    }
    assert.throws(() => impl.foldEventsJson('[{"not json'), { code: 'VALIDATION_FAILED' })
    for (const notText of [42, null, undefined, {}, ['[]']]) {
      assert.throws(() => impl.foldEventsJson(notText), { code: 'VALIDATION_FAILED' }, String(notText))
    }
    // Text past the first event is still checked: a fold that stops early does not hide bad JSON.
    assert.throws(() => impl.foldEventsJson('[{"aggregateId":"a","eventType":"x.created","version":1,"timestamp":0,"data":{}}, oops]', { toVersion: 1 }), { code: 'VALIDATION_FAILED' })
    // Non-ASCII text crosses intact (the wasm build encodes it with TextEncoder).
    const text = JSON.stringify([{ aggregateId: 'a', eventType: 'x.created', version: 1, timestamp: 0, data: { t: 'Zoë 🚀 \u2028' } }])
    assert.equal(impl.foldEventsJson(text).state.t, 'Zoë 🚀 \u2028')
  })

  test(`${buildName}: input nested deeper than JSON allows is a validation error, not a crash`, () => {
    let deep = {}
    for (let i = 0; i < 200; i++) deep = { d: deep }
    assert.throws(() => impl.applyDelta({}, deep), { code: 'VALIDATION_FAILED' })
  })

  test(`${buildName}: upcast vectors`, () => {
    const cases = load('upcast')
    assert.ok(cases.length >= 25)
    for (const c of cases) {
      if (c.expectError) {
        // A refused definition throws the same code, step and reason from every entry point.
        const calls = [() => impl.foldEvents([], { upcasters: c.upcasters })]
        if (impl.upcastEvents) calls.push(() => impl.upcastEvents([], c.upcasters))
        for (const call of calls) {
          assert.throws(call, (err) => {
            assert.deepEqual({ code: err.code, step: err.step, reason: err.reason }, c.expectError, c.name)
            return true
          })
        }
        continue
      }
      if (impl.upcastEvents) assert.deepEqual(impl.upcastEvents(c.events, c.upcasters), c.expect, c.name)
      // Folding under the definition is folding the expected events.
      const under = foldOutcome(impl, { events: c.events, options: { upcasters: c.upcasters } })
      const direct = foldOutcome(impl, { events: c.expect })
      assert.deepEqual(JSON.parse(JSON.stringify(under)), JSON.parse(JSON.stringify(direct)), `${c.name} (fold)`)
    }
  })

  test(`${buildName}: merge patch vectors`, () => {
    const cases = load('merge_patch')
    assert.ok(cases.length >= 10)
    for (const c of cases) {
      assert.deepEqual(impl.applyDelta(c.target, c.patch), c.expect, c.name)
    }
  })

  test(`${buildName}: validation vectors`, () => {
    const cases = load('validate')
    assert.ok(cases.length >= 20)
    for (const c of cases) {
      const report = impl.validateEvent(c.input)
      assert.equal(report.valid, c.expect.valid, c.name)
      assert.deepEqual(
        report.errors.map((e) => ({ path: e.path, code: e.code })),
        c.expect.codes,
        c.name,
      )
    }
  })
}

test('native and wasm agree on a 1,000-event fold with history', () => {
  const events = [{ aggregateId: 'a', eventType: 'doc.created', version: 1, data: { n: 0 }, timestamp: 0 }]
  for (let v = 2; v <= 1000; v++) {
    events.push({ aggregateId: 'a', eventType: 'doc.updated', version: v, data: { n: v, [`k${v % 7}`]: v % 3 ? v : null }, timestamp: v * 1000 })
  }
  const options = { history: true, toTimestamp: new Date(900_000) }
  assert.deepEqual(JSON.parse(JSON.stringify(native.foldEvents(events, options))), wasm.foldEvents(events, options))
})
