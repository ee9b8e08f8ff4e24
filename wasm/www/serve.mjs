// The replay page's server, on loopback: serves wasm/ (the page and the web build) and one
// endpoint over a running store, GET /api/aggregates/<id>, which answers with the repository's
// getSnapshotAndTail(id): the newest snapshot and the events after it, for the page to fold.
//
//   DATABASE_URL=postgres://... node wasm/www/serve.mjs [port] [--demo]
//
// then open the address it prints. With --demo it first appends a small task (five events, a
// snapshot after the third) and prints the page's address for it.
//
// The endpoint serves whatever the repository it is given can read: an application puts its own
// authentication in front and gives it `repository.forUser(userId)`.
import { createServer } from 'node:http'
import { readFile } from 'node:fs/promises'
import { extname, join, normalize } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const types = { '.html': 'text/html', '.js': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json' }

function sendJson(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' })
  res.end(JSON.stringify(body))
}

async function serveAggregate(repository, id, res) {
  if (!repository) {
    sendJson(res, 503, { code: 'NO_STORE', message: 'this server was started without a store (set DATABASE_URL)' })
    return
  }
  try {
    sendJson(res, 200, await repository.getSnapshotAndTail(id))
  } catch (err) {
    const status = { VALIDATION_FAILED: 400, PERMISSION_DENIED: 403 }[err.code] ?? (err.retryable ? 503 : 500)
    sendJson(res, status, { code: err.code ?? 'INTERNAL', message: err.message })
  }
}

async function serveFile(pathname, res) {
  const path = normalize(decodeURIComponent(pathname)).replace(/^(\.\.[/\\])+/, '')
  const file = join(root, path.endsWith('/') ? `${path}index.html` : path)
  if (!file.startsWith(root)) {
    res.writeHead(403).end()
    return
  }
  try {
    const body = await readFile(file)
    res.writeHead(200, { 'content-type': types[extname(file)] ?? 'application/octet-stream' }).end(body)
  } catch {
    res.writeHead(404).end('not found')
  }
}

/** Starts the server; `repository` is an EventRepository (or a handle from `forUser`). */
export function startServer({ port = 0, repository } = {}) {
  const server = createServer(async (req, res) => {
    try {
      await route(req, res, repository)
    } catch (err) {
      // A malformed request (a path that does not decode, say) is the client's; anything else is
      // ours. Either way this request fails and the server stays up.
      if (!res.headersSent) {
        const malformed = err instanceof URIError || err instanceof TypeError
        sendJson(res, malformed ? 400 : 500, {
          code: malformed ? 'VALIDATION_FAILED' : 'INTERNAL_ERROR',
          message: malformed ? `malformed request: ${err.message}` : 'internal error',
        })
      } else {
        res.destroy()
      }
    }
  })
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)))
}

async function route(req, res, repository) {
  {
    const url = new URL(req.url, 'http://x')
    if (url.pathname === '/') {
      // The page loads the web build by relative paths from /www/.
      res.writeHead(302, { location: `/www/${url.search}` }).end()
      return
    }
    const api = /^\/api\/aggregates\/([^/]+)$/.exec(url.pathname)
    if (api) {
      if (req.method !== 'GET') {
        res.writeHead(405, { allow: 'GET' }).end()
        return
      }
      await serveAggregate(repository, decodeURIComponent(api[1]), res)
      return
    }
    await serveFile(url.pathname, res)
  }
}

/** Appends the demo task: five events, with a snapshot after the third. Returns its id. */
export async function seedDemoTask(repository, aggregateId) {
  const at = (minutes) => new Date(Date.now() - (60 - minutes) * 60_000)
  const base = { aggregateId, aggregateType: 'entity', userId: 'demo-user', source: 'api' }
  const events = [
    { eventType: 'task.created', data: { title: 'Write the launch post', status: 'todo', tags: ['blog'] } },
    { eventType: 'task.title_changed', data: { title: 'Write the launch post 🚀', previousTitle: 'Write the launch post', updatedFields: ['title'] } },
    { eventType: 'task.assigned', data: { assignee: { id: 'user-456', name: 'Zoë' } } },
    { eventType: 'task.completed', data: { status: 'done', tags: ['blog', 'launch'], assignee: { name: 'Zoë Q.' } } },
    { eventType: 'task.deleted', data: {} },
  ]
  for (const [i, event] of events.entries()) {
    await repository.append({ ...base, ...event, version: i + 1, timestamp: at(i * 10) })
    if (i === 2) await repository.snapshot(aggregateId)
  }
  return aggregateId
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2)
  const port = Number(args.find((a) => /^\d+$/.test(a)) ?? 8080)
  let repository
  if (process.env.DATABASE_URL) {
    const { EventRepository } = await import('@synap/database')
    repository = new EventRepository()
    await repository.migrate()
  } else {
    console.error('DATABASE_URL is not set: the page will load, the store will not (try: eval "$(scripts/db.sh env)")')
  }
  const server = await startServer({ port, repository })
  const address = `http://127.0.0.1:${server.address().port}/`
  if (repository && args.includes('--demo')) {
    const { randomUUID } = await import('node:crypto')
    const id = await seedDemoTask(repository, randomUUID())
    console.log(`the replay page, on a demo task: open ${address}?aggregate=${id}`)
  } else {
    console.log(`the replay page: open ${address}?aggregate=<aggregate id>`)
  }
}
