// Child of compare.mjs: replays one aggregate and prints its peak RSS as JSON.
//   paged: getAggregateStream in 10,000-version windows, each folded from the previous snapshot
//   full:  one getAggregateStream of the whole stream, then one foldEvents
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
} else {
  result = foldEvents(await repo.getAggregateStream(aggregateId))
}
repo.close()
const seconds = (Number(process.hrtime.bigint() - t0) / 1e9).toFixed(1)
console.log(JSON.stringify({ version: result.version, maxRssMb: Math.round(process.resourceUsage().maxRSS / 1024), seconds }))
