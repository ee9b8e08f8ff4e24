export * from './index'
import { EventRecord, EventRepository, GroupRun, ProjectionTransaction } from './index'

/** A ready repository configured from `DATABASE_URL` at its first call. */
export declare const eventRepository: EventRepository

/** Options of `consume` and `project` (see README, "Consumer groups"). */
export interface GroupOptions {
  /** The group's name. */
  group: string
  /** This member's name (unique among running members); generated when absent. */
  member?: string
  /** Partitions of a new group, 1 to 1024 (default 16); an existing group keeps its own. */
  partitions?: number
  /** Most events per handler call (default 100). */
  batchSize?: number
  /** Most events handed out and not yet settled (default 1000); a batch is never larger. */
  maxInFlight?: number
  /** Lease period in milliseconds (default 10000). */
  leaseMs?: number
  /** Polling interval in milliseconds when no notification arrives (default 1000). */
  pollIntervalMs?: number
  /** Tries before a batch is split and before an event is parked (default 5). */
  maxAttempts?: number
  /** Wait before the second try, doubled for each further one (default 100). */
  retryBackoffMs?: number
  /**
   * Only events of these types (and of `eventTypePrefixes`). A group keeps the filter it was
   * made with: joining with another is refused with GROUP_FILTER_MISMATCH.
   */
  eventTypes?: string[]
  /** Only events whose type starts with one of these (`'entity.'`). */
  eventTypePrefixes?: string[]
  /** Only events of these aggregate types. */
  aggregateTypes?: Array<'entity' | 'relation' | 'user' | 'system'>
}

declare module './index' {
  interface EventRepository {
    /** Joins the group and runs `handler` on batches of its events, at least once. */
    consume(options: GroupOptions & { handler: (events: EventRecord[]) => unknown }): Promise<GroupRun>
    /**
     * Joins the group and runs `handler` on batches of its events, each in a transaction `tx`
     * that stores the group's checkpoint too: exactly once for what the handler writes with `tx`.
     */
    project(
      options: GroupOptions & { handler: (events: EventRecord[], tx: ProjectionTransaction) => unknown },
    ): Promise<GroupRun>
  }
}
