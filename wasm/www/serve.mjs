// A static server for the replay page: serves wasm/ (the page and the web build) on loopback.
//   node wasm/www/serve.mjs [port]   then open the address it prints (the root leads to the page)
import { createServer } from 'node:http'
import { readFile } from 'node:fs/promises'
import { extname, join, normalize } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const types = { '.html': 'text/html', '.js': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json' }

export function startServer(port = 0) {
  const server = createServer(async (req, res) => {
    if (new URL(req.url, 'http://x').pathname === '/') {
      // The page loads the web build by relative paths from /www/.
      res.writeHead(302, { location: '/www/' }).end()
      return
    }
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname)).replace(/^(\.\.[/\\])+/, '')
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
  })
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)))
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const server = await startServer(Number(process.argv[2] ?? 8080))
  console.log(`the replay page: open http://127.0.0.1:${server.address().port}/`)
}
