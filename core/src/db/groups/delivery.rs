//! Read-ahead delivery: the next batch for the handler. Each held partition's events are read
//! ahead into a buffer in feed order; an aggregate with a parked event is queued behind it and
//! released in order once the event is retried or skipped.
//!
//! Owns the member's buffers and queues. Calls [`super::leases`] (the heartbeat) and the feed's
//! statements.

use super::*;

/// Whether the event is one of the store's notices ([`crate::db::erasure::USER_ERASED`],
/// [`crate::db::erasure::STREAM_DELETED`]).
fn is_notice(event: &EventRecord) -> bool {
    crate::db::feed::is_notice(&event.event_type, event.aggregate_type.as_str())
}

impl GroupMember {
    /// The next delivery, waiting until there is one.
    pub(super) async fn next_delivery(&mut self) -> Result<Delivery> {
        loop {
            if Instant::now() >= self.next_heartbeat {
                self.heartbeat().await?;
            }
            if let Some(d) = self.take_buffered() {
                return Ok(d);
            }
            if self.held.is_empty() {
                self.wait().await;
                continue;
            }
            if self.releasable {
                if let Some(d) = self.next_release().await? {
                    return Ok(d);
                }
                self.releasable = false;
                self.refresh_queue().await?;
            }
            // Read ahead up to `max_in_flight` events; hand them out `batch_size` at a time.
            let limit = self.options.max_in_flight;
            let from = self.held.values().map(|h| h.cursor).min().unwrap_or(Checkpoint::START);
            let filter = PartitionFilter {
                partitions: self.partitions,
                owned: self.held.keys().copied().collect(),
            };
            let (page, meta) = self
                .repo
                .read_feed(Some(&from), limit, Some(&filter), self.filter.as_ref())
                .await?;
            let caught_up = page.caught_up;
            for (event, (part, place)) in page.events.into_iter().zip(meta) {
                // A notice of the store's is read by every member: handed out once, in the held
                // partition furthest behind that has not passed it (every held partition's
                // checkpoint moves past it with that delivery).
                let part = if is_notice(&event) {
                    match self
                        .held
                        .iter()
                        .filter(|(_, h)| place.place() > h.cursor.place())
                        .min_by_key(|(p, h)| (h.cursor.place(), **p))
                    {
                        Some((p, _)) => *p,
                        None => continue,
                    }
                } else {
                    part
                };
                let Some(held) = self.held.get(&part) else { continue };
                // By place only: a checkpoint read back from the lease row names no store, the
                // event's place does, and `Checkpoint`'s order compares the store last (an event
                // exactly at a taken-over checkpoint was handed out again).
                if place.place() <= held.cursor.place() {
                    continue;
                }
                if self.queued.contains(&event.aggregate_id) {
                    self.buffer.push_back(Buffered::Queue(Park {
                        event: Queued {
                            event_id: event.id,
                            partition: part,
                            aggregate_id: event.aggregate_id,
                            place,
                        },
                        failed: None,
                    }));
                } else {
                    self.buffer.push_back(Buffered::Event(Box::new(event), part, place));
                }
            }
            let through = page.checkpoint;
            self.buffer_through = through;
            for held in self.held.values_mut() {
                held.read = true;
                held.cursor = held.cursor.max(through);
            }
            if self.buffer.is_empty() && self.filter.is_some() && self.last_progress.elapsed() >= Duration::from_secs(1)
            {
                // A filtered read hands out nothing of the rows it passed over: the checkpoints
                // move past them anyway (at most once a second), so that the next holder of a
                // partition does not scan them again.
                let advance = Settlement {
                    advance: self.held.iter().map(|(p, h)| (*p, h.epoch, h.cursor)).collect(),
                    ..Default::default()
                };
                let settlement = self.merged_with_pending(&advance);
                self.settle_or_lose(&settlement).await?;
                self.last_progress = Instant::now();
            }
            if self.buffer.is_empty() && caught_up {
                self.wait().await;
            }
        }
    }

    /// The next batch from the read-ahead buffer: up to `batch_size` events and the queued events
    /// among them; it settles every held partition up to its last item (up to the end of the read
    /// when it empties the buffer).
    pub(super) fn take_buffered(&mut self) -> Option<Delivery> {
        if self.buffer.is_empty() {
            return None;
        }
        let mut delivery = Delivery {
            events: Vec::new(),
            meta: Vec::new(),
            released: false,
            settlement: Settlement::default(),
        };
        let mut last = Checkpoint::START;
        while (delivery.events.len() as i64) < self.options.batch_size {
            let Some(item) = self.buffer.pop_front() else { break };
            match item {
                // An aggregate parked since the read: its later events queue behind it.
                Buffered::Event(event, part, place) if self.queued.contains(&event.aggregate_id) => {
                    last = place;
                    delivery.settlement.park.push(Park {
                        event: Queued {
                            event_id: event.id,
                            partition: part,
                            aggregate_id: event.aggregate_id,
                            place,
                        },
                        failed: None,
                    });
                }
                Buffered::Event(event, part, place) => {
                    last = place;
                    delivery.events.push(*event);
                    delivery.meta.push((part, place));
                }
                Buffered::Queue(park) => {
                    last = park.event.place;
                    delivery.settlement.park.push(park);
                }
            }
        }
        let to = if self.buffer.is_empty() {
            self.buffer_through
        } else {
            Checkpoint {
                store: self.buffer_through.store,
                ..last
            }
        };
        for (p, held) in self.held.iter().filter(|(_, h)| h.read) {
            delivery.settlement.advance.push((*p, held.epoch, to));
        }
        if !delivery.settlement.park.is_empty() {
            // Queued behind nothing that failed: handed out once this delivery is stored.
            self.releasable = true;
        }
        Some(delivery)
    }

    /// Reads which aggregates of the held partitions have queued events, and whether any of them
    /// can be handed out (its aggregate has no failed event, and the event is at or behind its
    /// partition's checkpoint; see [`GroupMember::next_release`]).
    pub(super) async fn refresh_queue(&mut self) -> Result<()> {
        let held: Vec<i32> = self.held.keys().copied().collect();
        let mut client = self.repo.client().await?;
        let rows = client
            .query(
                "SELECT q.aggregate_id, bool_or(q.state = 'failed'), \
                        bool_or((q.txid, q.position) <= (c.txid, c.position)) \
                   FROM consumer_group_parked q JOIN consumer_group_partitions c \
                     ON c.group_name = q.group_name AND c.partition = q.partition \
                  WHERE q.group_name = $1 AND q.partition = ANY ($2) GROUP BY q.aggregate_id",
                &[&self.options.group, &held],
            )
            .await?;
        self.queued = rows.iter().map(|r| r.get(0)).collect();
        self.releasable = rows.iter().any(|r| !r.get::<_, bool>(1) && r.get::<_, bool>(2));
        Ok(())
    }

    /// Queued events of aggregates with no failed one, in feed order, at or behind their
    /// partition's checkpoint: a queued row ahead of it (written before the events around it
    /// were settled, by a member that then died or lost its lease) is met again by the feed read,
    /// which queues it again and moves the checkpoint past it; handed out before that, it would
    /// be handed out twice.
    pub(super) async fn next_release(&mut self) -> Result<Option<Delivery>> {
        let limit = self.options.batch_size.min(self.options.max_in_flight);
        let held: Vec<i32> = self.held.keys().copied().collect();
        let mut client = self.repo.client().await?;
        let rows = client
            .query(
                "SELECT q.event_id, q.partition, q.aggregate_id, q.txid::text, q.position \
                   FROM consumer_group_parked q JOIN consumer_group_partitions c \
                     ON c.group_name = q.group_name AND c.partition = q.partition \
                  WHERE q.group_name = $1 AND q.partition = ANY ($2) \
                    AND (q.txid, q.position) <= (c.txid, c.position) \
                    AND NOT EXISTS (SELECT 1 FROM consumer_group_parked f WHERE f.group_name = q.group_name \
                                       AND f.aggregate_id = q.aggregate_id AND f.state = 'failed') \
                  ORDER BY q.txid, q.position LIMIT $3",
                &[&self.options.group, &held, &limit],
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        let stored = client
            .query(
                &format!("SELECT {EVENT_COLUMNS} FROM events_v2 WHERE id = ANY ($1)"),
                &[&ids],
            )
            .await?;
        let mut by_id: HashMap<Uuid, EventRecord> = HashMap::new();
        for r in &stored {
            let e = self.repo.delivered(r)?;
            by_id.insert(e.id, e);
        }
        let mut delivery = Delivery {
            events: Vec::new(),
            meta: Vec::new(),
            released: true,
            settlement: Settlement::default(),
        };
        for r in &rows {
            let id: Uuid = r.get(0);
            let part: i32 = r.get(1);
            let place = parse_checkpoint(r.get(3), r.get(4), 0)?;
            delivery.settlement.release.push(id);
            // An event removed since it was queued (retention) has nothing left to hand out.
            if let Some(e) = by_id.remove(&id) {
                delivery.events.push(e);
                delivery.meta.push((part, place));
            }
        }
        let parts: HashSet<i32> = rows.iter().map(|r| r.get(1)).collect();
        for p in parts {
            if let Some(h) = self.held.get(&p) {
                delivery.settlement.advance.push((p, h.epoch, Checkpoint::START));
            }
        }
        Ok(Some(delivery))
    }

    /// Waits for a notification, the polling interval or the next renewal, whichever is first.
    pub(super) async fn wait(&self) {
        let until = self.next_heartbeat.min(Instant::now() + self.options.poll_interval);
        let _ = tokio::time::timeout_at(until, self.notify.notified()).await;
    }
}
