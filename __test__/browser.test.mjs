// End to end in a real headless Chromium against a real store: the replay page fetches an
// aggregate's newest snapshot and the events after it from wasm/www/serve.mjs, folds the tail
// with the wasm web build, shows the state at the version the slider picks and marks what each
// event changed; the states agree with the native `replay`.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { chromium } from 'playwright-core'
import { randomUUID } from 'node:crypto'
import { seedDemoTask, startServer } from '../wasm/www/serve.mjs'
import { freshRepository } from './db.mjs'

const executablePath = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'
let server
let store
let browser
let profile

before(async () => {
  store = await freshRepository('browser')
  server = await startServer({ port: 0, repository: store.repo })
  profile = mkdtempSync(join(tmpdir(), 'synap-chromium-'))
  browser = await chromium.launch({
    executablePath,
    // Without libfaketime (scripts/clock-test.sh preloads it into every process): under it
    // Chromium never finishes loading a page. The clock that test is about is the server's and
    // this process's; the browser only folds what they give it.
    env: Object.fromEntries(Object.entries(process.env).filter(([k]) => k !== 'LD_PRELOAD' && !k.startsWith('FAKETIME'))),
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  })
})

after(async () => {
  await browser?.close()
  server?.close()
  await store?.close()
  if (profile) rmSync(profile, { recursive: true, force: true })
})

async function pick(page, version) {
  await page.$eval(
    '#version',
    (el, v) => {
      el.value = String(v)
      el.dispatchEvent(new Event('input', { bubbles: true }))
    },
    version,
  )
  return {
    state: JSON.parse(await page.textContent('#state')),
    label: await page.textContent('#version-label'),
    eventType: await page.textContent('#event-type'),
    deleted: !(await page.$eval('#deleted', (el) => el.hidden)),
    changes: await page.$$eval('#changes li', (lis) => lis.map((li) => li.textContent)),
    marked: await page.$$eval('#state mark', (ms) => ms.map((m) => `${m.className} ${m.dataset.path}`)),
  }
}

async function open(path) {
  const page = await browser.newPage()
  const errors = []
  page.on('pageerror', (e) => errors.push(e.message))
  await page.goto(`http://127.0.0.1:${server.address().port}${path}`)
  await page.waitForSelector('body[data-ready]')
  return { page, errors }
}

test('the replay page loads a stored task from its snapshot, moves through its versions and marks what changed', async () => {
  const id = await seedDemoTask(store.repo, randomUUID())
  // The root address keeps the query, as `npm run demo:browser --demo` prints it.
  const { page, errors } = await open(`/?aggregate=${id}`)
  assert.equal(await page.getAttribute('body', 'data-ready'), 'true', await page.textContent('#status'))
  assert.equal(await page.textContent('#origin'), 'Snapshot at version 3, then 2 event(s).')
  assert.equal(await page.getAttribute('#version', 'min'), '3')
  assert.equal(await page.getAttribute('#version', 'max'), '5')

  const v3 = await pick(page, 3)
  assert.equal(v3.eventType, '(snapshot)')
  assert.deepEqual(v3.state, (await store.repo.replay(id, { toVersion: 3 })).state)
  assert.deepEqual(v3.state, {
    title: 'Write the launch post 🚀',
    status: 'todo',
    tags: ['blog'],
    assignee: { id: 'user-456', name: 'Zoë' },
  })

  const v4 = await pick(page, 4)
  assert.equal(v4.label, '4')
  assert.equal(v4.eventType, 'task.completed')
  assert.deepEqual(v4.state, {
    title: 'Write the launch post 🚀',
    status: 'done',
    tags: ['blog', 'launch'],
    assignee: { id: 'user-456', name: 'Zoë Q.' },
  })
  assert.deepEqual(v4.changes.sort(), ['~ assignee.name', '~ status', '~ tags'])
  assert.deepEqual(v4.marked.sort(), ['changed assignee.name', 'changed status', 'changed tags'])
  assert.equal(v4.deleted, false)

  const v5 = await pick(page, 5)
  assert.equal(v5.deleted, true)
  const latest = await store.repo.replay(id)
  assert.equal(latest.deleted, true)
  assert.deepEqual(v5.state, latest.state)
  assert.deepEqual(errors, [])
  await page.close()
})

test('an aggregate without a snapshot is folded from version 1, and each event marks its additions', async () => {
  const id = randomUUID()
  const base = { aggregateId: id, aggregateType: 'entity', userId: 'u-browser' }
  await store.repo.append({ ...base, eventType: 'note.created', data: { title: 'a' }, version: 1 })
  await store.repo.append({ ...base, eventType: 'note.tagged', data: { meta: { tags: ['x'] } }, version: 2 })
  const { page, errors } = await open(`/?aggregate=${id}`)
  assert.equal(await page.getAttribute('body', 'data-ready'), 'true', await page.textContent('#status'))
  assert.equal(await page.textContent('#origin'), 'No snapshot: 2 event(s) from version 1.')
  const v2 = await pick(page, 2)
  assert.deepEqual(v2.state, { title: 'a', meta: { tags: ['x'] } })
  assert.deepEqual(v2.changes, ['+ meta'])
  assert.deepEqual(v2.marked, ['added meta'])
  const v1 = await pick(page, 1)
  assert.deepEqual(v1.state, { title: 'a' })
  assert.deepEqual(errors, [])
  await page.close()
})

test('a bad aggregate id shows the store\'s error code', async () => {
  const { page } = await open('/?aggregate=not-a-uuid')
  assert.equal(await page.getAttribute('body', 'data-ready'), 'error')
  assert.match(await page.textContent('#status'), /^VALIDATION_FAILED: /)
  await page.close()
})

test('a malformed request gets 400 and the server serves the next one', async () => {
  const base = `http://127.0.0.1:${server.address().port}`
  const id = randomUUID()
  await seedDemoTask(store.repo, id)
  for (const path of ['/api/aggregates/%E0%A4%A', '/www/%E0%A4%A', '/www/%']) {
    const res = await fetch(base + path)
    assert.equal(res.status, 400, path)
    assert.equal((await res.json()).code, 'VALIDATION_FAILED', path)
  }
  const res = await fetch(`${base}/api/aggregates/${id}`)
  assert.equal(res.status, 200)
  assert.equal((await res.json()).events.length, 2)
})
