// Package entry: the generated binding plus the ready-made `eventRepository` of the design,
// which reads DATABASE_URL at its first call (importing never throws), and the consumer-group
// calls, which take their handler inside the options object.
// (`module.exports = require(...)` as such, so that ES modules see the named exports.)
module.exports = require('./index.js')
const binding = module.exports

/** A rejection in the binding's shape: `code`, `field`, `retryable`. */
function refused(field, message) {
  const error = new Error(`invalid ${field}: ${message}`)
  error.code = 'VALIDATION_FAILED'
  error.field = field
  error.path = field
  error.reason = 'INVALID_TYPE'
  error.retryable = false
  return Promise.reject(error)
}

async function runGroup(repo, options, transactional) {
  if (options === null || typeof options !== 'object') {
    return refused('options', 'options must be an object with a group and a handler')
  }
  const { handler, ...rest } = options
  if (typeof handler !== 'function') {
    return refused('handler', 'handler must be a function')
  }
  // Always a promise of nothing, whatever the handler returns; a throw becomes a rejection.
  const call = transactional
    ? async (events, tx) => {
        await handler(events, tx)
      }
    : async (events) => {
        await handler(events)
      }
  return await repo.runGroup(rest, call, transactional)
}

/** Runs `handler(events)` on the group's events; the checkpoint is stored after it returns. */
binding.EventRepository.prototype.consume = function consume(options) {
  return runGroup(this, options, false)
}

/** Runs `handler(events, tx)` in a transaction that stores the group's checkpoint too. */
binding.EventRepository.prototype.project = function project(options) {
  return runGroup(this, options, true)
}

module.exports.eventRepository = new binding.EventRepository()
