//! Leases: a member's partitions. Renewing the member and its leases, giving back what is over
//! its share and taking up to it, fencing (every write names the epoch it holds, so a member
//! whose lease was taken writes nothing), and the heartbeat that does all of it on schedule.
//!
//! Owns the lease statements on `consumer_group_partitions` and `consumer_group_members`. Calls
//! the repository's connections only; [`super::delivery`] and [`super::handling`] call it between
//! batches and tries.

use super::*;

impl GroupMember {
    /// Renews this member and its leases, forgets partitions taken from it, and moves toward its
    /// share: between tries of a failing batch, when a renewal falls due. A partition taken now
    /// has no events in the batch in hand, and one given back is one without (`in_hand`), so
    /// partitions change hands also while a member's batch keeps failing.
    pub(super) async fn renew(&mut self) -> Result<()> {
        let (names, _) = self.renew_leases().await?;
        let share = self.share_of(&names);
        if self.held.len() < share {
            if self.take_up_to(share).await? {
                // Merged with what this member knows, not replaced: the batch in hand may queue
                // events not written yet, and an aggregate known queued stays so (a larger set
                // only queues more, released in order).
                let (queued, releasable) = (std::mem::take(&mut self.queued), self.releasable);
                self.refresh_queue().await?;
                self.queued.extend(queued);
                self.releasable |= releasable;
            }
        } else if self.held.len() > share {
            let free: Vec<i32> = self
                .held
                .keys()
                .rev()
                .filter(|p| !self.in_hand.contains(p))
                .take(self.held.len() - share)
                .copied()
                .collect();
            if !self.give_back(free).await? {
                return Ok(());
            }
        }
        self.schedule_renewal();
        Ok(())
    }

    /// Gives back partitions (none of them in hand): a `consume` member's deferred checkpoints
    /// are stored first, while it still holds every partition they name; events read ahead for
    /// them are dropped (they are their next holder's, from the stored checkpoints).
    /// False (every partition forgotten) when a lease the deferred checkpoints name was taken.
    pub(super) async fn give_back(&mut self, partitions: Vec<i32>) -> Result<bool> {
        if partitions.is_empty() {
            return Ok(true);
        }
        // Kept until stored: a run stopped during this settlement stores it at its end.
        if let Some(pending) = &self.pending {
            // Only what is still held: a partition the renewal found taken is its new holder's,
            // from its stored checkpoint.
            let pending = self.held_only(pending);
            if !self.settle_or_lose(&pending).await? {
                return Ok(false);
            }
            self.pending = None;
        }
        self.repo
            .client()
            .await?
            .execute(
                "UPDATE consumer_group_partitions SET owner = NULL, lease_expires = NULL \
                  WHERE group_name = $1 AND owner = $2 AND partition = ANY ($3)",
                &[&self.options.group, &self.member, &partitions],
            )
            .await?;
        for p in partitions {
            self.held.remove(&p);
        }
        self.drop_unheld();
        Ok(true)
    }

    /// This member's share of the partitions among the live members `names` (sorted): an even
    /// split, the first members in name order taking one more while some are left over.
    pub(super) fn share_of(&mut self, names: &[String]) -> usize {
        let count = names.len().max(1);
        let rank = names.iter().position(|m| *m == self.member).unwrap_or(0);
        let p = self.partitions as usize;
        self.share = p / count + usize::from(rank < p % count);
        self.share
    }

    /// Takes free or expired partitions up to `share`, from their stored checkpoints; whether
    /// it took any. Their events are read after what is read ahead (see [`Held::read`]).
    pub(super) async fn take_up_to(&mut self, share: usize) -> Result<bool> {
        let want = (share - self.held.len()) as i64;
        let lease = self.options.lease.as_secs_f64();
        let mut client = self.repo.client().await?;
        let rows = client
            .query(
                "UPDATE consumer_group_partitions p \
                    SET owner = $2, epoch = p.epoch + 1, lease_expires = clock_timestamp() + make_interval(secs => $3) \
                  WHERE (p.group_name, p.partition) IN ( \
                        SELECT group_name, partition FROM consumer_group_partitions \
                         WHERE group_name = $1 AND (owner IS NULL OR lease_expires < clock_timestamp()) \
                           AND owner IS DISTINCT FROM $2 \
                         ORDER BY partition LIMIT $4 FOR UPDATE SKIP LOCKED) \
                  RETURNING partition, epoch, txid::text, position",
                &[&self.options.group, &self.member, &lease, &want],
            )
            .await?;
        self.hold(&rows)?;
        Ok(!rows.is_empty())
    }

    /// Holds the partitions of rows `(partition, epoch, txid::text, position)` that a statement
    /// took at a new epoch, from their stored checkpoints; read after what is read ahead.
    pub(super) fn hold(&mut self, rows: &[tokio_postgres::Row]) -> Result<()> {
        for r in rows {
            self.held.insert(
                r.get(0),
                Held {
                    epoch: r.get(1),
                    cursor: parse_checkpoint(r.get(2), r.get(3), 0)?,
                    read: false,
                },
            );
        }
        Ok(())
    }

    /// The next renewal: in a third of the lease, sooner while short of the share (a member that
    /// left or died frees partitions when its lease ends).
    pub(super) fn schedule_renewal(&mut self) {
        let every = if self.held.len() < self.share {
            self.options.lease / 10
        } else {
            self.options.lease / 3
        };
        self.next_heartbeat = Instant::now() + every;
    }

    /// Renews this member and its leases; returns the live members' names, sorted, and the
    /// partitions renewed (partition, epoch, checkpoint).
    pub(super) async fn renew_leases(&mut self) -> Result<(Vec<String>, Vec<(i32, i64, Checkpoint)>)> {
        let lease = self.options.lease.as_secs_f64();
        let group = &self.options.group;
        let mut client = self.repo.client().await?;
        let members = client
            .query(
                "WITH me AS (INSERT INTO consumer_group_members (group_name, member, expires) \
                              VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
                              ON CONFLICT (group_name, member) DO UPDATE SET expires = EXCLUDED.expires \
                              RETURNING member) \
                 SELECT member FROM me \
                 UNION SELECT member FROM consumer_group_members \
                  WHERE group_name = $1 AND expires > clock_timestamp() ORDER BY 1",
                &[group, &self.member, &lease],
            )
            .await?;
        let names: Vec<String> = members.iter().map(|r| r.get(0)).collect();
        // What still names this member is still its own (a takeover changes the owner).
        let renewed = client
            .query(
                "UPDATE consumer_group_partitions SET lease_expires = clock_timestamp() + make_interval(secs => $3) \
                  WHERE group_name = $1 AND owner = $2 RETURNING partition, epoch, txid::text, position",
                &[group, &self.member, &lease],
            )
            .await?;
        let renewed = renewed
            .iter()
            .map(|r| Ok((r.get(0), r.get(1), parse_checkpoint(r.get(2), r.get(3), 0)?)))
            .collect::<Result<Vec<_>>>()?;
        let mine: HashMap<i32, i64> = renewed.iter().map(|(p, e, _)| (*p, *e)).collect();
        self.held.retain(|p, h| mine.get(p) == Some(&h.epoch));
        self.drop_unheld();
        Ok((names, renewed))
    }

    /// Drops events read ahead for partitions no longer held: they are their new holder's.
    pub(super) fn drop_unheld(&mut self) {
        let held = &self.held;
        self.buffer.retain(|item| match item {
            Buffered::Event(_, p, _) => held.contains_key(p),
            Buffered::Queue(park) => held.contains_key(&park.event.partition),
        });
    }

    /// Renews this member, its leases and its share: gives back partitions above its share and
    /// takes free or expired ones up to it.
    pub(super) async fn heartbeat(&mut self) -> Result<()> {
        let (names, renewed) = self.renew_leases().await?;
        let share = self.share_of(&names);
        // Still ours in the database but forgotten here (a run's start, or a lease lost in a
        // batch, forgets every partition): taken up again from the stored checkpoint, at a new
        // epoch. Taken up at the stored epoch, another running member of the same name (a
        // second process started with it, or an earlier run of this one) would pass the same
        // fence, and both would apply the partition's events.
        let forgotten: Vec<i32> = renewed
            .iter()
            .map(|(p, _, _)| *p)
            .filter(|p| !self.held.contains_key(p))
            .collect();
        if !forgotten.is_empty() {
            let lease = self.options.lease.as_secs_f64();
            let rows = self
                .repo
                .client()
                .await?
                .query(
                    "UPDATE consumer_group_partitions \
                        SET epoch = epoch + 1, lease_expires = clock_timestamp() + make_interval(secs => $3) \
                      WHERE group_name = $1 AND owner = $2 AND partition = ANY ($4) \
                      RETURNING partition, epoch, txid::text, position",
                    &[&self.options.group, &self.member, &lease, &forgotten],
                )
                .await?;
            self.hold(&rows)?;
        }
        // Partitions change hands also while events are read ahead (a member that waited for
        // an empty buffer could go a long time without taking its share): events read ahead
        // for a partition given back are dropped, and a partition taken is read after them.
        if self.held.len() > share {
            let extra: Vec<i32> = self.held.keys().rev().take(self.held.len() - share).copied().collect();
            if !self.give_back(extra).await? {
                return Ok(());
            }
        } else if self.held.len() < share {
            self.take_up_to(share).await?;
        }
        self.refresh_queue().await?;
        self.schedule_renewal();
        Ok(())
    }
}
