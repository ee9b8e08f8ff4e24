// Loads an aggregate's newest snapshot and the events after it from the server
// (GET /api/aggregates/<id>), folds the tail from the snapshot in history mode with the web
// build, and shows the state at the version the slider picks, marking what that event changed.
import init, { foldEvents } from '../pkg/web/synap_events.js'

const $ = (id) => document.getElementById(id)

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v)

/** What differs between two states: one entry per changed leaf path (arrays are leaves). */
export function changes(before, after, path = []) {
  if (isObject(before) && isObject(after)) {
    const out = []
    for (const key of new Set([...Object.keys(before), ...Object.keys(after)])) {
      if (!(key in after)) out.push({ path: [...path, key], kind: 'removed' })
      else if (!(key in before)) out.push({ path: [...path, key], kind: 'added' })
      else out.push(...changes(before[key], after[key], [...path, key]))
    }
    return out
  }
  if (JSON.stringify(before) === JSON.stringify(after)) return []
  return [{ path, kind: before === undefined || before === null ? 'added' : 'changed' }]
}

const escape = (s) => s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c])

/** The state as indented JSON, with each changed path wrapped in a <mark>. */
function render(value, marks, path = [], indent = '') {
  if (!isObject(value)) return escape(JSON.stringify(value) ?? 'null')
  const keys = Object.keys(value)
  if (keys.length === 0) return '{}'
  const inner = indent + '  '
  const lines = keys.map((key) => {
    const here = [...path, key]
    const text = `${escape(JSON.stringify(key))}: ${render(value[key], marks, here, inner)}`
    const kind = marks.get(JSON.stringify(here))
    return kind ? `${inner}<mark class="${kind}" data-path="${escape(here.join('.'))}">${text}</mark>` : `${inner}${text}`
  })
  return `{\n${lines.join(',\n')}\n${indent}}`
}

let steps = []

function show(index) {
  const step = steps[index]
  const previous = index > 0 ? steps[index - 1].state : undefined
  const diff = index > 0 ? changes(previous ?? {}, step.state ?? {}) : []
  $('version-label').textContent = String(step.version)
  $('event-type').textContent = step.eventType
  $('deleted').hidden = !step.deleted
  $('changes').replaceChildren(
    ...diff.map(({ path, kind }) => {
      const li = document.createElement('li')
      li.className = kind
      li.textContent = `${{ added: '+', changed: '~', removed: '-' }[kind]} ${path.join('.')}`
      return li
    }),
  )
  const marks = new Map(diff.filter((d) => d.kind !== 'removed').map((d) => [JSON.stringify(d.path), d.kind]))
  $('state').innerHTML = render(step.state, marks)
}

async function load(aggregateId) {
  $('aggregate').textContent = aggregateId
  $('aggregate-input').value = aggregateId
  const res = await fetch(`/api/aggregates/${encodeURIComponent(aggregateId)}`)
  const body = await res.json()
  if (!res.ok) throw Object.assign(new Error(body.message), { code: body.code })
  const { snapshot, events } = body
  if (!snapshot && events.length === 0) {
    $('status').textContent = 'This aggregate has no events.'
    return
  }
  const fold = foldEvents(events, snapshot ? { from: snapshot, history: true } : { history: true })
  steps = [
    ...(snapshot
      ? [{ version: snapshot.version, eventType: '(snapshot)', state: snapshot.state, deleted: !!snapshot.deleted }]
      : []),
    ...fold.history,
  ]
  $('origin').textContent = snapshot
    ? `Snapshot at version ${snapshot.version}, then ${events.length} event(s).`
    : `No snapshot: ${events.length} event(s) from version 1.`
  const slider = $('version')
  slider.min = String(steps[0].version)
  slider.max = String(fold.version)
  slider.value = slider.max
  slider.disabled = steps.length < 2
  $('max-version').textContent = String(fold.version)
  slider.oninput = () => show(Number(slider.value) - steps[0].version)
  show(steps.length - 1)
  $('status').textContent = ''
}

async function main() {
  await init()
  $('pick').addEventListener('submit', (e) => {
    e.preventDefault()
    const id = $('aggregate-input').value.trim()
    history.replaceState(null, '', `?aggregate=${encodeURIComponent(id)}`)
    load(id).catch(fail)
  })
  const aggregateId = new URLSearchParams(location.search).get('aggregate')
  if (aggregateId) await load(aggregateId)
  document.body.dataset.ready = 'true'
}

function fail(err) {
  $('status').textContent = `${err.code ?? 'ERROR'}: ${err.message}`
  document.body.dataset.ready = 'error'
}

main().catch(fail)
