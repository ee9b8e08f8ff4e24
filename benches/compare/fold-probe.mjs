// The fold of 100,000 events (the comparison harness's input) by every path, without a
// database: the JS reducer of the baseline, foldEvents over JavaScript objects and
// foldEventsJson over JSON text, native and wasm, plus JSON.stringify and JSON.parse alone for
// scale. Medians of 7. Usage: npm run bench:fold
import { foldEvents as nativeFold, foldEventsJson as nativeFoldJson } from '@synap/database'
import { createRequire } from 'node:module'
import { isDeepStrictEqual } from 'node:util'
import { foldInJs } from './baseline.mjs'
const wasm = createRequire(import.meta.url)('../../wasm/pkg/node/synap_events.js')
const start = Date.UTC(2026, 0, 1), streamId = '0190c6d2-5a4e-7c1b-9a51-3f2d8e7b6a10'
const foldInput = Array.from({ length: 100_000 }, (_, i) => ({
  aggregateId: streamId, eventType: i === 0 ? 'task.created' : 'task.updated', version: i + 1,
  timestamp: new Date(start + i * 1000).toISOString(),
  data: i === 0 ? { title: 'Task', status: 'todo', meta: { p: 1 } } : { title: `Task ${i}`, previousTitle: `Task ${i - 1}`, updatedFields: ['title'], meta: { p: i % 5, t: i % 3 ? i : null } },
}))
const text = JSON.stringify(foldInput)
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const t = (label, fn) => { const ts = []; for (let i = 0; i < 7; i++) { const t0 = performance.now(); fn(); ts.push(performance.now() - t0) } console.log(label.padEnd(36), median(ts).toFixed(1), 'ms') }
t('JSON.stringify', () => JSON.stringify(foldInput))
t('JSON.parse', () => JSON.parse(text))
const expected = foldInJs(foldInput).state
for (const [name, r] of Object.entries({ nativeObjects: nativeFold(foldInput), nativeText: nativeFoldJson(text), wasmObjects: wasm.foldEvents(foldInput), wasmText: wasm.foldEventsJson(text) })) {
  if (!isDeepStrictEqual(r.state, expected) || r.version !== 100_000) throw new Error(`${name} disagrees with the reducer`)
}
t('reducer (JS objects)', () => foldInJs(foldInput))
t('JSON.parse + reducer (text)', () => foldInJs(JSON.parse(text)))
t('native foldEvents (objects)', () => nativeFold(foldInput))
t('native foldEventsJson (text)', () => nativeFoldJson(text))
t('wasm foldEvents (objects)', () => wasm.foldEvents(foldInput))
t('wasm foldEventsJson (text)', () => wasm.foldEventsJson(text))
