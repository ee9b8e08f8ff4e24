// End to end in a real headless Chromium: the replay page loads the wasm web build, folds the
// stream and shows the state at the version the slider picks.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { chromium } from 'playwright-core'
import { startServer } from '../wasm/www/serve.mjs'

const executablePath = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'
let server
let browser
let profile

before(async () => {
  server = await startServer(0)
  profile = mkdtempSync(join(tmpdir(), 'synap-chromium-'))
  browser = await chromium.launch({
    executablePath,
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
  }
}

test('the replay page shows the folded state at two versions', async () => {
  const page = await browser.newPage()
  const errors = []
  page.on('pageerror', (e) => errors.push(e.message))
  // The root address leads to the page, as `npm run demo:browser` prints it.
  await page.goto(`http://127.0.0.1:${server.address().port}/`)
  await page.waitForSelector('body[data-ready]')
  assert.equal(await page.getAttribute('body', 'data-ready'), 'true', await page.textContent('#status'))

  const v2 = await pick(page, 2)
  assert.equal(v2.label, '2')
  assert.equal(v2.eventType, 'task.title_changed')
  assert.deepEqual(v2.state, { title: 'Write the launch post 🚀', status: 'todo', tags: ['blog'] })
  assert.equal(v2.deleted, false)

  const v4 = await pick(page, 4)
  assert.equal(v4.eventType, 'task.completed')
  assert.deepEqual(v4.state, {
    title: 'Write the launch post 🚀',
    status: 'done',
    tags: ['blog', 'launch'],
    assignee: { id: 'user-456', name: 'Zoë Q.' },
  })

  const v5 = await pick(page, 5)
  assert.equal(v5.deleted, true)
  assert.deepEqual(errors, [])
})
