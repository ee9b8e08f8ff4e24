// Child of compare.mjs: replays one aggregate and prints its peak RSS as JSON.
//   paged: getAggregateStream in 10,000-version windows, each folded from the previous snapshot
//   full:  one getAggregateStream of the whole stream, then one foldEvents
//   replay: repository.replay, folded in Rust as the rows arrive (no snapshot exists)
import { readFileSync } from 'node:fs'
import { EventRepository, foldEvents } from '@synap/database'

const [mode, aggregateId] = process.argv.slice(2)
const repo = new EventRepository({ connectionString: process.env.DATABASE_URL, schema: process.env.BENCH_SCHEMA })
const t0 = process.hrtime.bigint()
let result
if (mode === 'paged') {
  const WINDOW = 10_000
  const last = await repo.getAggregateVersion(aggregateId)
  let snapshot
  // fromVersion is exclusive: each window starts after the snapshot's version.
  for (let after = 0; after < last; after += WINDOW) {
    const page = await repo.getAggregateStream(aggregateId, { fromVersion: after, toVersion: after + WINDOW })
    result = foldEvents(page, snapshot ? { from: snapshot } : undefined)
    snapshot = { state: result.state, version: result.version, deleted: result.deleted }
  }
} else if (mode === 'replay') {
  result = await repo.replay(aggregateId)
  if (result.snapshotVersion !== null) throw new Error('the replay benchmark expects no snapshot')
} else {
  result = foldEvents(await repo.getAggregateStream(aggregateId))
}
repo.close()
const seconds = (Number(process.hrtime.bigint() - t0) / 1e9).toFixed(2)
// Peak RSS of this process's own address space (VmHWM). Not getrusage's maxRSS: Linux carries
// that across fork and exec, so a child would report its parent's peak when that is higher.
const hwmKb = Number(/^VmHWM:\s+(\d+) kB$/m.exec(readFileSync('/proc/self/status', 'utf8'))[1])
console.log(JSON.stringify({ version: result.version, maxRssMb: Math.round(hwmKb / 1024), seconds }))
