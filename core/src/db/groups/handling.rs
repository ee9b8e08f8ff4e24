//! Handling: a delivery given to the handler, with retries and backoff, halving a failing batch
//! down to single events, parking the event that still fails, and the settlement that stores the
//! checkpoints, parked and released events (in the projection's transaction, or alone).
//!
//! Owns [`settle`] and the member's pending settlement. Calls [`super::leases`] between tries and
//! [`super::projection`] for the handler's transaction.

use super::*;

impl GroupMember {
    /// Hands a delivery to the handler, with retries, bisection and parking.
    pub(super) async fn handle<H: Handler>(
        &mut self,
        delivery: Delivery,
        handler: &mut H,
        transactional: bool,
    ) -> Result<()> {
        if delivery.events.is_empty() {
            return self.settle_or_lose(&delivery.settlement).await.map(|_| ());
        }
        // The partitions of its events are kept through its tries; the others may be given back
        // meanwhile (the settlements below then leave them out).
        self.in_hand = delivery
            .meta
            .iter()
            .map(|(p, _)| *p)
            .chain(delivery.settlement.park.iter().map(|park| park.event.partition))
            .chain(
                // Queued rows whose events are gone name their partitions only here.
                delivery
                    .settlement
                    .advance
                    .iter()
                    .filter(|_| delivery.released)
                    .map(|(p, _, _)| *p),
            )
            .collect();
        let epochs: HashMap<i32, i64> = delivery
            .settlement
            .advance
            .iter()
            .filter(|(p, _, _)| self.in_hand.contains(p))
            .map(|(p, e, _)| (*p, *e))
            .collect();
        // A batch of several is tried whole first, with every try (a failure may be passing).
        if delivery.events.len() > 1 {
            for attempt in 0..self.options.max_attempts {
                if attempt > 0 {
                    self.pause(self.backoff(attempt)).await?;
                    if !self.still_holds(&epochs) {
                        return self.lost().await;
                    }
                }
                let settlement = self.held_only(&delivery.settlement);
                match self
                    .apply(handler, transactional, delivery.events.clone(), &settlement)
                    .await?
                {
                    Outcome::Done => return Ok(()),
                    Outcome::LeaseLost => return self.lost().await,
                    Outcome::Failed(_) => {}
                }
            }
        }
        // The events this delivery queues behind earlier parked ones are written first: the
        // settlements of its parts below move checkpoints past some of them.
        if !delivery.settlement.park.is_empty() {
            let queue = Settlement {
                advance: epochs.iter().map(|(p, e)| (*p, *e, Checkpoint::START)).collect(),
                park: delivery.settlement.park.clone(),
                release: Vec::new(),
            };
            if !self.settle_or_lose(&queue).await? {
                return Ok(());
            }
        }
        // Then halves, in feed order, each tried once and halved again while it fails, down to
        // single events, which get every try before they are parked: a batch of n with one
        // failing event costs about 2·log2(n) calls rather than n. An aggregate's events after
        // a parked one are queued behind it.
        let Delivery {
            events,
            meta,
            released,
            settlement,
        } = delivery;
        if released {
            // Queued rows whose events are gone (retention) go now: no part below names them.
            let present: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
            let gone: Vec<Uuid> = settlement
                .release
                .iter()
                .filter(|id| !present.contains(id))
                .copied()
                .collect();
            if !gone.is_empty() {
                let fence = Settlement {
                    advance: epochs.iter().map(|(p, e)| (*p, *e, Checkpoint::START)).collect(),
                    park: Vec::new(),
                    release: gone,
                };
                if !self.settle_or_lose(&fence).await? {
                    return Ok(());
                }
            }
        }
        let n = events.len();
        let mut parked: HashSet<Uuid> = HashSet::new();
        let mut parts: Vec<(usize, usize)> = if n > 1 {
            vec![(n / 2, n), (0, n / 2)]
        } else {
            vec![(0, n)]
        };
        while let Some((lo, hi)) = parts.pop() {
            let mut part = Settlement::default();
            let mut to: BTreeMap<i32, Checkpoint> = BTreeMap::new();
            let mut batch: Vec<EventRecord> = Vec::new();
            let mut batch_at: Vec<(i32, Checkpoint)> = Vec::new();
            let mut waiting = Vec::new();
            for (event, &(p, place)) in events[lo..hi].iter().zip(&meta[lo..hi]) {
                // Queued events handed out again keep the partition's checkpoint (it is past
                // them) and only fence it; events from the feed move it to their place.
                let at = to.entry(p).or_insert(Checkpoint::START);
                if !released {
                    *at = (*at).max(place);
                }
                if parked.contains(&event.aggregate_id) {
                    // Queued events stay queued; new ones queue.
                    if !released {
                        waiting.push(Park {
                            event: Queued {
                                event_id: event.id,
                                partition: p,
                                aggregate_id: event.aggregate_id,
                                place,
                            },
                            failed: None,
                        });
                    }
                    continue;
                }
                if released {
                    part.release.push(event.id);
                }
                batch.push(event.clone());
                batch_at.push((p, place));
            }
            part.advance = to
                .into_iter()
                .map(|(p, at)| (p, epochs.get(&p).copied().unwrap_or_default(), at))
                .collect();
            part.park = waiting;
            if batch.is_empty() {
                if !self.settle_or_lose(&part).await? {
                    return Ok(());
                }
                continue;
            }
            let tries = if batch.len() > 1 { 1 } else { self.options.max_attempts };
            let mut outcome = Outcome::Failed(String::new());
            for attempt in 0..tries {
                let wait = if attempt > 0 {
                    self.backoff(attempt)
                } else {
                    Duration::ZERO
                };
                self.pause(wait).await?;
                // A lease the renewal found taken: its events are the new holder's (for a
                // consumer, handling them here too would run one aggregate in two members).
                if !self.still_holds(&epochs) {
                    return self.lost().await;
                }
                outcome = self.apply(handler, transactional, batch.clone(), &part).await?;
                if !matches!(outcome, Outcome::Failed(_)) {
                    break;
                }
            }
            match outcome {
                Outcome::Done => {}
                Outcome::LeaseLost => return self.lost().await,
                Outcome::Failed(_) if batch.len() > 1 => {
                    let mid = lo + (hi - lo) / 2;
                    parts.push((mid, hi));
                    parts.push((lo, mid));
                }
                Outcome::Failed(error) => {
                    let (event, (p, place)) = (&batch[0], batch_at[0]);
                    parked.insert(event.aggregate_id);
                    self.queued.insert(event.aggregate_id);
                    part.release.clear();
                    part.park.push(Park {
                        event: Queued {
                            event_id: event.id,
                            partition: p,
                            aggregate_id: event.aggregate_id,
                            place,
                        },
                        failed: Some((self.options.max_attempts as i32, error)),
                    });
                    if !self.settle_or_lose(&part).await? {
                        return Ok(());
                    }
                }
            }
        }
        if released {
            // Queued events behind a newly failed one stay queued.
            return Ok(());
        }
        if self.settle_or_lose(&self.held_only(&settlement)).await? {
            // It stored every held partition at least as far as a deferred part would.
            self.pending = None;
        }
        Ok(())
    }

    /// `settlement` with the deferred checkpoints (taken) merged in, each partition at the
    /// further of the two, and without partitions no longer held: a part of a split batch names
    /// only its own partitions, and replacing the deferred checkpoints with it would drop the
    /// others' (handed out again after a crash).
    pub(super) fn merged_with_pending(&mut self, settlement: &Settlement) -> Settlement {
        let mut s = settlement.clone();
        if let Some(pending) = self.pending.take() {
            for (part, epoch, at) in pending.advance {
                match s.advance.iter_mut().find(|(p, _, _)| *p == part) {
                    Some(entry) if entry.1 == epoch => entry.2 = entry.2.max(at),
                    Some(_) => {}
                    None => s.advance.push((part, epoch, at)),
                }
            }
        }
        self.held_only(&s)
    }

    /// `settlement` without the partitions given back or taken since it was made (none of them
    /// has events in the batch in hand; their next holder reads them from their stored
    /// checkpoints).
    pub(super) fn held_only(&self, settlement: &Settlement) -> Settlement {
        let mut s = settlement.clone();
        s.advance
            .retain(|(p, e, _)| self.held.get(p).is_some_and(|h| h.epoch == *e));
        s
    }

    /// Whether every partition of `epochs` is still held at that epoch.
    pub(super) fn still_holds(&self, epochs: &HashMap<i32, i64>) -> bool {
        epochs
            .iter()
            .all(|(p, e)| self.held.get(p).is_some_and(|h| h.epoch == *e))
    }

    /// Stores a settlement on its own: false (every partition forgotten) when a lease it names
    /// was taken.
    pub(super) async fn settle_or_lose(&mut self, settlement: &Settlement) -> Result<bool> {
        match self.settle_alone(settlement).await {
            Ok(()) => Ok(true),
            Err(Error::LeaseLost { .. }) => self.lost().await.map(|()| false),
            Err(e) => Err(e),
        }
    }

    /// Waits `wait` between tries, renewing the leases when due meanwhile (a failing batch can
    /// take longer than a lease).
    pub(super) async fn pause(&mut self, wait: Duration) -> Result<()> {
        let until = Instant::now() + wait;
        loop {
            if Instant::now() >= self.next_heartbeat {
                self.renew().await?;
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            tokio::time::sleep_until(until.min(self.next_heartbeat.max(now))).await;
        }
    }

    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << (attempt - 1).min(16);
        (self.options.retry_backoff * factor).min(Duration::from_secs(30))
    }

    /// A lease was taken while handling: forget every partition and renew at once (what was
    /// read and not stored is read again by whoever holds each partition now).
    pub(super) async fn lost(&mut self) -> Result<()> {
        self.held.clear();
        self.queued.clear();
        self.buffer.clear();
        self.pending = None;
        self.next_heartbeat = Instant::now();
        Ok(())
    }

    /// Calls the handler and settles: in the handler's transaction for a projection, after it
    /// for a consumer.
    pub(super) async fn apply<H: Handler>(
        &mut self,
        handler: &mut H,
        transactional: bool,
        events: Vec<EventRecord>,
        settlement: &Settlement,
    ) -> Result<Outcome> {
        if !transactional {
            if let Err(e) = handler.handle(events, None).await {
                return Ok(Outcome::Failed(e.to_string()));
            }
            // At least once: the checkpoints of a read-ahead's batches are stored with its last
            // batch (a crash hands out at most `max_in_flight` events again). A later settlement
            // moves every held partition at least as far.
            let merged = self.merged_with_pending(settlement);
            if !self.buffer.is_empty() && settlement.park.is_empty() && settlement.release.is_empty() {
                self.pending = Some(merged);
                return Ok(Outcome::Done);
            }
            return match self.settle_alone(&merged).await {
                Ok(()) => Ok(Outcome::Done),
                Err(Error::LeaseLost { .. }) => Ok(Outcome::LeaseLost),
                Err(e) => Err(e),
            };
        }
        // Guarded before `BEGIN` is sent: a task cancelled while waiting for it (a `select!` or
        // a timeout around the run) must not put the connection back in the pool inside the
        // transaction, where every later statement on it would join the transaction and none
        // would commit.
        let (client, pooled) = self.repo.client().await?.into_parts();
        let tx = ProjectionTx(Arc::new(TxInner {
            client: Some(client),
            pooled: pooled.clone(),
            finished: std::sync::atomic::AtomicBool::new(false),
            open: Arc::new(tokio::sync::RwLock::new(true)),
        }));
        match &pooled {
            // Through a transaction-mode pooler, the settings a session would have had.
            Some(p) => tx.client().batch_execute(&format!("BEGIN; {}", p.settings())).await?,
            None => tx.client().batch_execute("BEGIN").await?,
        }
        let handled = handler.handle(events, Some(tx.clone())).await;
        *tx.0.open.write().await = false;
        let outcome = match handled {
            Err(e) => Outcome::Failed(e.to_string()),
            Ok(()) => match settle(
                tx.client(),
                pooled.as_deref().map(|p| (p, None)),
                &self.options.group,
                &self.member,
                settlement,
            )
            .await
            {
                // A statement of the handler's failed and it resolved anyway (it did not wait
                // for the statement): the batch failed.
                Err(Error::Database { sqlstate, message }) if sqlstate == "25P02" => {
                    Outcome::Failed(format!("a statement of the batch failed: {message}"))
                }
                Ok(true) => {
                    tx.client().batch_execute("COMMIT").await?;
                    tx.0.finished.store(true, std::sync::atomic::Ordering::Release);
                    return Ok(Outcome::Done);
                }
                Ok(false) => Outcome::LeaseLost,
                Err(e) => {
                    // A failed statement leaves the transaction aborted: roll back (or drop the
                    // connection) before giving the error back.
                    let _ = tx.client().batch_execute("ROLLBACK").await.map(|()| {
                        tx.0.finished.store(true, std::sync::atomic::Ordering::Release);
                    });
                    return Err(e);
                }
            },
        };
        if tx.client().batch_execute("ROLLBACK").await.is_ok() {
            tx.0.finished.store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(outcome)
    }

    /// Stores a settlement in a transaction of its own.
    pub(super) async fn settle_alone(&mut self, settlement: &Settlement) -> Result<()> {
        let mut client = self.repo.client().await?;
        let tx = client.transaction().await?;
        if settle(
            tx.client(),
            tx.pooled().map(|(p, cut)| (p, Some(cut))),
            &self.options.group,
            &self.member,
            settlement,
        )
        .await?
        {
            tx.commit().await?;
            Ok(())
        } else {
            tx.rollback().await?;
            Err(Error::LeaseLost {
                group: self.options.group.clone(),
            })
        }
    }
}

/// Writes a settlement; false (and the caller rolls back) when a partition it names is no longer
/// held at the epoch it names.
async fn settle<C: tokio_postgres::GenericClient>(
    client: &C,
    pooled: Option<(&crate::db::conn::Pooled, Option<&std::sync::atomic::AtomicBool>)>,
    group: &str,
    member: &str,
    s: &Settlement,
) -> Result<bool> {
    let parts: Vec<i32> = s.advance.iter().map(|a| a.0).collect();
    let epochs: Vec<i64> = s.advance.iter().map(|a| a.1).collect();
    let txids: Vec<String> = s.advance.iter().map(|a| a.2.txid.to_string()).collect();
    let positions: Vec<i64> = s.advance.iter().map(|a| a.2.position).collect();
    // Checkpoints only move forward; the row is locked (and its epoch checked) either way.
    let moved = query_on(
        client,
        pooled,
        "UPDATE consumer_group_partitions p \
                SET txid = CASE WHEN (u.txid::xid8, u.position) > (p.txid, p.position) THEN u.txid::xid8 ELSE p.txid END, \
                    position = CASE WHEN (u.txid::xid8, u.position) > (p.txid, p.position) THEN u.position ELSE p.position END, \
                    updated_at = CASE WHEN (u.txid::xid8, u.position) > (p.txid, p.position) THEN now() ELSE p.updated_at END \
               FROM unnest($3::integer[], $4::bigint[], $5::text[], $6::bigint[]) AS u(partition, epoch, txid, position) \
              WHERE p.group_name = $1 AND p.partition = u.partition AND p.owner = $2 AND p.epoch = u.epoch \
             RETURNING p.partition",
        &[&group, &member, &parts, &epochs, &txids, &positions],
    )
    .await?;
    if moved.len() != parts.len() {
        return Ok(false);
    }
    if !s.park.is_empty() {
        let ids: Vec<Uuid> = s.park.iter().map(|p| p.event.event_id).collect();
        let partitions: Vec<i32> = s.park.iter().map(|p| p.event.partition).collect();
        let aggregates: Vec<Uuid> = s.park.iter().map(|p| p.event.aggregate_id).collect();
        let txids: Vec<String> = s.park.iter().map(|p| p.event.place.txid.to_string()).collect();
        let positions: Vec<i64> = s.park.iter().map(|p| p.event.place.position).collect();
        let states: Vec<&str> = s
            .park
            .iter()
            .map(|p| if p.failed.is_some() { "failed" } else { "waiting" })
            .collect();
        let attempts: Vec<i32> = s.park.iter().map(|p| p.failed.as_ref().map_or(0, |f| f.0)).collect();
        let errors: Vec<Option<&str>> = s.park.iter().map(|p| p.failed.as_ref().map(|f| f.1.as_str())).collect();
        query_on(
            client,
            pooled,
            "INSERT INTO consumer_group_parked (group_name, event_id, partition, aggregate_id, txid, position, state, attempts, error) \
                 SELECT $1, u.* FROM unnest($2::uuid[], $3::integer[], $4::uuid[], $5::text[]::xid8[], $6::bigint[], \
                                            $7::text[], $8::integer[], $9::text[]) AS u \
                 ON CONFLICT (group_name, event_id) DO UPDATE \
                    SET state = EXCLUDED.state, attempts = consumer_group_parked.attempts + EXCLUDED.attempts, \
                        error = EXCLUDED.error, parked_at = now()",
            &[&group, &ids, &partitions, &aggregates, &txids, &positions, &states, &attempts, &errors],
        )
        .await?;
    }
    if !s.release.is_empty() {
        query_on(
            client,
            pooled,
            "DELETE FROM consumer_group_parked WHERE group_name = $1 AND event_id = ANY ($2)",
            &[&group, &s.release],
        )
        .await?;
    }
    Ok(true)
}
