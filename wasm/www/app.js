// Loads the web build, folds a stream once in history mode, and shows the state at the version
// the slider picks.
import init, { foldEvents } from '../pkg/web/synap_events.js'

const aggregateId = '0190c6d2-5a4e-7c1b-9a51-3f2d8e7b6a10'
const at = (minutes) => new Date(Date.UTC(2026, 0, 5, 9, minutes)).toISOString()
export const events = [
  { aggregateId, version: 1, eventType: 'task.created', timestamp: at(0),
    data: { title: 'Write the launch post', status: 'todo', tags: ['blog'] } },
  { aggregateId, version: 2, eventType: 'task.title_changed', timestamp: at(5),
    data: { title: 'Write the launch post 🚀', previousTitle: 'Write the launch post', updatedFields: ['title'] } },
  { aggregateId, version: 3, eventType: 'task.assigned', timestamp: at(9),
    data: { assignee: { id: 'user-456', name: 'Zoë' } } },
  { aggregateId, version: 4, eventType: 'task.completed', timestamp: at(30),
    data: { status: 'done', tags: ['blog', 'launch'], assignee: { name: 'Zoë Q.' } } },
  { aggregateId, version: 5, eventType: 'task.deleted', timestamp: at(45), data: {} },
]

const $ = (id) => document.getElementById(id)

function show(history, version) {
  const step = history[version - 1]
  $('version-label').textContent = String(version)
  $('event-type').textContent = step.eventType
  $('deleted').hidden = !step.deleted
  $('state').textContent = JSON.stringify(step.state, null, 2)
}

async function main() {
  await init()
  const { history } = foldEvents(events, { history: true })
  const slider = $('version')
  slider.max = String(history.length)
  slider.value = String(history.length)
  slider.disabled = false
  $('aggregate').textContent = aggregateId
  $('max-version').textContent = String(history.length)
  slider.addEventListener('input', () => show(history, Number(slider.value)))
  show(history, history.length)
  document.body.dataset.ready = 'true'
}

main().catch((err) => {
  $('status').textContent = `${err.code ?? 'ERROR'}: ${err.message}`
  document.body.dataset.ready = 'error'
})
