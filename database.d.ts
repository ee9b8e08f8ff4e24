export * from './index'
import { EventRepository } from './index'

/** A ready repository configured from `DATABASE_URL` at its first call. */
export declare const eventRepository: EventRepository
