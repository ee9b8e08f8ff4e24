// Package entry: the generated binding plus the ready-made `eventRepository` of the design,
// which reads DATABASE_URL at its first call (importing never throws), and the consumer-group
// calls, which take their handler inside the options object.
// (`module.exports = require(...)` as such, so that ES modules see the named exports.)
module.exports = require('./index.js')
const binding = module.exports

// Every error a call gives, thrown or rejected, has the store's `code` (README, "Errors") and
// `retryable`. The binding makes such errors itself where it can; two kinds reach here without:
// - errors raised where the binding can make no JavaScript object (the `subscribe` iterator's
//   promise): their message is `CODE: text`, then a line with the details as JSON;
// - arguments of the wrong type, refused by napi before the call (`InvalidArg`,
//   `StringExpected`, ...): VALIDATION_FAILED.
const DETAILS_MARK = '\nsynap-error-details: '
const NAPI_STATUS = /^[A-Z][a-z]+[A-Za-z]*$/

function normalized(error) {
  if (!(error instanceof Error)) {
    return normalized(new Error(String(error)))
  }
  if (typeof error.retryable === 'boolean' && /^[A-Z][A-Z_]+$/.test(error.code)) {
    return error
  }
  const mark = error.message.indexOf(DETAILS_MARK)
  const coded = /^([A-Z][A-Z_]+): /.exec(error.message)
  if (coded && mark > 0) {
    const details = JSON.parse(error.message.slice(mark + DETAILS_MARK.length))
    const rebuilt = new Error(error.message.slice(coded[0].length, mark))
    rebuilt.code = coded[1]
    Object.assign(rebuilt, details)
    return rebuilt
  }
  const rebuilt = new Error(error.message)
  if (error.code === undefined || NAPI_STATUS.test(error.code) || error instanceof TypeError) {
    // napi's conversions: a value of the wrong type where the declarations name another.
    rebuilt.code = 'VALIDATION_FAILED'
    rebuilt.reason = 'INVALID_TYPE'
    const field = /field `([^`]+)`/.exec(error.message)
    rebuilt.field = field ? field[1] : ''
    rebuilt.path = rebuilt.field
  } else {
    rebuilt.code = 'INTERNAL_ERROR'
  }
  rebuilt.retryable = false
  return rebuilt
}

/** Wraps every method of `cls` so that its errors, thrown or rejected, are `normalized`. */
function normalizeErrors(cls) {
  for (const name of Object.getOwnPropertyNames(cls.prototype)) {
    const descriptor = Object.getOwnPropertyDescriptor(cls.prototype, name)
    if (name === 'constructor' || typeof descriptor.value !== 'function') continue
    const native = descriptor.value
    Object.defineProperty(cls.prototype, name, {
      ...descriptor,
      value: {
        [name](...args) {
          let result
          try {
            result = native.apply(this, args)
          } catch (error) {
            throw normalized(error)
          }
          if (result && typeof result.then === 'function') {
            return result.then(undefined, (error) => Promise.reject(normalized(error)))
          }
          return result
        },
      }[name],
    })
  }
}

/** The `subscribe` iterator, with its errors normalized. */
function normalizedIterator(subscription) {
  const iterator = subscription[Symbol.asyncIterator]()
  const step = (method) => async (value) => {
    try {
      return await iterator[method](value)
    } catch (error) {
      throw normalized(error)
    }
  }
  const wrapped = {
    next: step('next'),
    return: step('return'),
    [Symbol.asyncIterator]() {
      return wrapped
    },
  }
  if (typeof iterator.throw === 'function') wrapped.throw = step('throw')
  return wrapped
}

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

normalizeErrors(binding.EventRepository)
normalizeErrors(binding.GroupRun)
normalizeErrors(binding.ProjectionTransaction)
const nativeSubscribe = binding.EventRepository.prototype.subscribe
binding.EventRepository.prototype.subscribe = function subscribe(options) {
  return normalizedIterator(nativeSubscribe.call(this, options))
}

module.exports.eventRepository = new binding.EventRepository()
