//! Consumer groups: several members share one projection of the global feed.
//!
//! The feed is split into a fixed number of partitions by aggregate
//! (`synap_group_partition(aggregate_id, partitions)`, migration 0011). Each partition has a
//! lease row: one member at a time holds it, reads that partition's events in the feed's
//! `(txid, position)` order and stores the partition's checkpoint. Every takeover increments the
//! partition's epoch, and every write of a member names the epoch it holds, so a member whose
//! lease was taken (it stalled, or its connection died) writes nothing: its transaction finds no
//! row to move and rolls back. Members renew their leases every third of a lease period and
//! share the partitions out evenly among the live members, so a member that joins, leaves or
//! dies has its partitions taken over once its lease ends, at another member's next renewal
//! between batches.
//!
//! An aggregate's events all fall in one partition, and one member hands them out in feed order,
//! which is version order (an append's version guard reads the committed previous version in the
//! same statement that writes, so the previous version's transaction id is the smaller one).
//!
//! A handler that fails is retried with backoff; after the last try the batch is halved, each
//! half tried once and halved again while it fails, down to single events, which get every try:
//! one that still fails is parked (`consumer_group_parked`) with the error. Leases are renewed
//! between those tries, so a long failing batch does not lose them.
//! The aggregate's later events are queued behind it; other aggregates flow on. Once the parked
//! event is retried ([`EventRepository::retry_parked`]) or skipped
//! ([`EventRepository::skip_parked`]), the partition's holder hands out the queue in order.
//!
//! [`GroupMember::project`] runs the handler inside a transaction on the same database and stores
//! the checkpoint in that transaction: the read model and the checkpoint commit together, so a
//! crash at any point neither loses nor repeats an event. [`GroupMember::consume`] stores the
//! checkpoint after the handler returns: at least once.
//!
//! Rooms: this file holds the options, the member (leases, read-ahead delivery, handling and
//! settlement: one state machine over one `GroupMember`, whose steps share its fields);
//! [`projection`] the projection's transaction and its JSON statements; [`status`] what is seen
//! of a group from outside (status, parked events, retry and skip).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

mod projection;
mod status;

pub use projection::ProjectionTx;
use projection::TxInner;
pub use status::{GroupPartitionStatus, GroupStatus, ParkedEvent};

use crate::db::conn::query_on;
use crate::db::feed::{check_name, parse_checkpoint, Checkpoint, PartitionFilter};
use crate::db::repository::{record_from_row, EventRepository, EVENT_COLUMNS};
use crate::error::{Error, Result};
use crate::model::EventRecord;
use crate::validate::{self, IssueCode};

/// What a handler returns when it fails.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed handler future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = std::result::Result<(), HandlerError>> + Send>>;

/// Default number of partitions of a new group.
pub const DEFAULT_PARTITIONS: i32 = 16;

/// Options of [`EventRepository::join_group`].
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// The group's name (1 to 200 bytes).
    pub group: String,
    /// This member's name; a fresh unique one when `None`. Give running members names of their
    /// own: two running members of one name apply nothing twice (each takes up the name's
    /// partitions at a new epoch, fencing the other), but they take the partitions from each
    /// other at every renewal.
    pub member: Option<String>,
    /// Partitions of a new group (1 to 1,024, default 16). An existing group keeps its own; a
    /// different number given here is refused.
    pub partitions: Option<i32>,
    /// Most events per handler call. Default 100.
    pub batch_size: i64,
    /// Most events read ahead and handed out before their checkpoints are stored. Default
    /// 1,000; a batch is never larger. A `consume` member that crashes gets at most this many
    /// events again.
    pub max_in_flight: i64,
    /// How long a lease lasts without renewal. Default 10 s.
    pub lease: Duration,
    /// How often to look for new events when no notification arrives. Default 1 s.
    pub poll_interval: Duration,
    /// Tries of a failing batch before it is halved (halves are tried once each, and halved again
    /// while they fail), and of a failing event before it is parked. Default 5.
    pub max_attempts: u32,
    /// The wait before the second try, doubled for each further one (at most 30 s). Default
    /// 100 ms.
    pub retry_backoff: Duration,
}

impl GroupOptions {
    /// The defaults, for `group`.
    pub fn new(group: impl Into<String>) -> GroupOptions {
        GroupOptions {
            group: group.into(),
            member: None,
            partitions: None,
            batch_size: 100,
            max_in_flight: 1000,
            lease: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            max_attempts: 5,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

impl GroupOptions {
    /// Options from their JSON form, as the Node binding takes them: `{ group, member,
    /// partitions, batchSize, maxInFlight, leaseMs, pollIntervalMs, maxAttempts, retryBackoffMs }`
    /// (`null` for a key is its default). Ranges are checked by [`EventRepository::join_group`].
    ///
    /// Fails with [`Error::Validation`] (with the key as `field`) for a value of the wrong type or
    /// a number that is not whole, and for an unknown key.
    pub fn from_json(value: &serde_json::Value) -> Result<GroupOptions> {
        const KEYS: &[&str] = &[
            "group",
            "member",
            "partitions",
            "batchSize",
            "maxInFlight",
            "leaseMs",
            "pollIntervalMs",
            "maxAttempts",
            "retryBackoffMs",
        ];
        let o = value.as_object().ok_or_else(|| {
            Error::invalid(
                "options",
                IssueCode::InvalidType,
                "options must be an object with a group",
            )
        })?;
        crate::query::Options::of(value, KEYS)?;
        let get = |k: &str| crate::query::present(o, k);
        let string = |k: &str| -> Result<Option<String>> {
            get(k)
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| Error::invalid(k, IssueCode::InvalidType, format!("{k} must be a string")))
                })
                .transpose()
        };
        let number = |k: &str| -> Result<Option<i64>> {
            get(k)
                .map(|v| {
                    let f = v
                        .as_f64()
                        .ok_or_else(|| Error::invalid(k, IssueCode::InvalidType, format!("{k} must be a number")))?;
                    crate::query::whole_number_arg(k, f)
                })
                .transpose()
        };
        let millis = |n: i64| Duration::from_millis(n.clamp(0, 86_400_000) as u64);
        let group = string("group")?
            .ok_or_else(|| Error::invalid("group", IssueCode::Required, "a consumer group needs a group name"))?;
        let mut out = GroupOptions::new(group);
        out.member = string("member")?;
        if let Some(n) = number("partitions")? {
            out.partitions = Some(i32::try_from(n).unwrap_or(if n < 0 { 0 } else { i32::MAX }));
        }
        if let Some(n) = number("batchSize")? {
            out.batch_size = n;
        }
        if let Some(n) = number("maxInFlight")? {
            out.max_in_flight = n;
        }
        if let Some(n) = number("leaseMs")? {
            out.lease = millis(n);
        }
        if let Some(n) = number("pollIntervalMs")? {
            out.poll_interval = millis(n);
        }
        if let Some(n) = number("maxAttempts")? {
            out.max_attempts = u32::try_from(n).unwrap_or(0);
        }
        if let Some(n) = number("retryBackoffMs")? {
            if n < 0 {
                return Err(Error::invalid(
                    "retryBackoffMs",
                    IssueCode::OutOfRange,
                    "retryBackoffMs is 0 or more",
                ));
            }
            out.retry_backoff = millis(n);
        }
        Ok(out)
    }
}

/// A partition this member holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: i64,
    /// Read up to here: events at or before it were handed out, or there were none.
    cursor: Checkpoint,
    /// Whether the read that filled the read-ahead buffer covered it (a partition taken since
    /// has none of its events there, and the buffer's batches must not move its checkpoint).
    read: bool,
}

/// An event of a group's queue (`consumer_group_parked`).
#[derive(Debug, Clone)]
struct Queued {
    event_id: Uuid,
    partition: i32,
    aggregate_id: Uuid,
    place: Checkpoint,
}

/// A change to the queue, written with a settlement.
#[derive(Debug, Clone)]
struct Park {
    event: Queued,
    failed: Option<(i32, String)>,
}

/// What a settlement stores, in one transaction, fenced by the epochs held: the partitions'
/// checkpoints, events parked or queued, and queued events handed out.
#[derive(Debug, Default, Clone)]
struct Settlement {
    advance: Vec<(i32, i64, Checkpoint)>,
    park: Vec<Park>,
    release: Vec<Uuid>,
}

/// An item of a member's read-ahead buffer.
#[derive(Debug)]
enum Buffered {
    /// An event to hand out, with its partition and place.
    Event(Box<EventRecord>, i32, Checkpoint),
    /// An event of an aggregate with queued events: queued too.
    Queue(Park),
}

/// One handing-out: events for the handler, and what to store once they are handled.
#[derive(Debug)]
struct Delivery {
    events: Vec<EventRecord>,
    /// Each event's partition and place in the feed (for a queued event, its queue row's).
    meta: Vec<(i32, Checkpoint)>,
    /// Queued events handed out again (empty for a delivery from the feed).
    released: bool,
    settlement: Settlement,
}

/// A member of a consumer group; see the module documentation. Made by
/// [`EventRepository::join_group`].
pub struct GroupMember {
    repo: EventRepository,
    options: GroupOptions,
    member: String,
    partitions: i32,
    held: BTreeMap<i32, Held>,
    /// Aggregates of held partitions with events in the queue: their new events queue too.
    queued: HashSet<Uuid>,
    /// Whether the queue may hold events to hand out (aggregates with no failed event).
    releasable: bool,
    next_heartbeat: Instant,
    /// Partitions the last renewal found this member should hold.
    share: usize,
    /// Read and not yet handed out (at most `max_in_flight` events), in feed order.
    buffer: std::collections::VecDeque<Buffered>,
    /// Where the read that filled the buffer ended.
    buffer_through: Checkpoint,
    /// A `consume` batch's checkpoints not yet stored: stored with the read-ahead's last batch.
    pending: Option<Settlement>,
    /// The partitions of the events of the batch being handled: kept through its tries, while
    /// the others may be given back.
    in_hand: HashSet<i32>,
    notify: Arc<Notify>,
    _listener: Option<tokio_postgres::Client>,
}

impl std::fmt::Debug for GroupMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupMember")
            .field("group", &self.options.group)
            .field("member", &self.member)
            .field("held", &self.held.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A handler's outcome for one delivery.
enum Outcome {
    Done,
    Failed(String),
    /// A lease of the delivery was taken: nothing was stored.
    LeaseLost,
}

/// A handler: called with a batch and, for projections, the transaction to write in.
pub trait Handler: Send {
    /// Handles a batch.
    fn handle(&mut self, events: Vec<EventRecord>, tx: Option<ProjectionTx>) -> HandlerFuture;
}

struct Consume<F>(F);
impl<F, Fut> Handler for Consume<F>
where
    F: FnMut(Vec<EventRecord>) -> Fut + Send,
    Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
{
    fn handle(&mut self, events: Vec<EventRecord>, _tx: Option<ProjectionTx>) -> HandlerFuture {
        Box::pin((self.0)(events))
    }
}

struct Project<F>(F);
impl<F, Fut> Handler for Project<F>
where
    F: FnMut(Vec<EventRecord>, ProjectionTx) -> Fut + Send,
    Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
{
    fn handle(&mut self, events: Vec<EventRecord>, tx: Option<ProjectionTx>) -> HandlerFuture {
        Box::pin((self.0)(events, tx.expect("a projection runs in a transaction")))
    }
}

impl EventRepository {
    /// Joins a consumer group (made with `options.partitions` partitions when new), as a member
    /// holding no partition yet; it takes its share on its first
    /// [`GroupMember::consume`] / [`GroupMember::project`] call.
    ///
    /// Fails with [`Error::Validation`] for a bad option or a partition count other than the
    /// existing group's, and with [`Error::PermissionDenied`] on a user-scoped handle.
    pub async fn join_group(&self, options: GroupOptions) -> Result<GroupMember> {
        self.refuse_scoped("join_group")?;
        check_group(&options.group)?;
        let limits = &self.config().limits;
        validate::check_limit("batchSize", options.batch_size, limits)?;
        validate::check_limit("maxInFlight", options.max_in_flight, limits)?;
        if let Some(p) = options.partitions {
            if !(1..=1024).contains(&p) {
                return Err(Error::invalid(
                    "partitions",
                    IssueCode::OutOfRange,
                    format!("a group has 1 to 1024 partitions, not {p}"),
                ));
            }
        }
        for (field, value) in [("lease", options.lease), ("pollInterval", options.poll_interval)] {
            if value < Duration::from_millis(10) || value > Duration::from_secs(3600) {
                return Err(Error::invalid(
                    field,
                    IssueCode::OutOfRange,
                    format!("{field} is 10 ms to 1 hour"),
                ));
            }
        }
        if !(1..=100).contains(&options.max_attempts) {
            return Err(Error::invalid(
                "maxAttempts",
                IssueCode::OutOfRange,
                "maxAttempts is 1 to 100",
            ));
        }
        if options.retry_backoff > Duration::from_secs(30) {
            return Err(Error::invalid(
                "retryBackoff",
                IssueCode::OutOfRange,
                "retryBackoff is at most 30 s",
            ));
        }
        let member = match &options.member {
            Some(m) => {
                check_name("member", m)?;
                m.clone()
            }
            None => format!("{}-{}", std::process::id(), Uuid::now_v7().simple()),
        };
        let mut client = self.client().await?;
        // A member that joins a new group while another makes it waits for the other's insert to
        // commit and then finds no row: its statement's snapshot is older than that commit. The
        // next statement sees the row.
        let mut partitions = None;
        for _ in 0..3 {
            partitions = client
                .query_opt(
                    "WITH made AS (INSERT INTO consumer_groups (name, partitions) VALUES ($1, $2) \
                                    ON CONFLICT (name) DO NOTHING RETURNING partitions) \
                     SELECT partitions FROM made UNION ALL SELECT partitions FROM consumer_groups WHERE name = $1",
                    &[&options.group, &options.partitions.unwrap_or(DEFAULT_PARTITIONS)],
                )
                .await?
                .map(|row| row.get::<_, i32>(0));
            if partitions.is_some() {
                break;
            }
        }
        let partitions = partitions.ok_or_else(|| {
            Error::invalid(
                "group",
                IssueCode::OutOfRange,
                format!("group \"{}\" was made and removed while joining", options.group),
            )
        })?;
        if let Some(given) = options.partitions {
            if given != partitions {
                return Err(Error::invalid(
                    "partitions",
                    IssueCode::OutOfRange,
                    format!("group \"{}\" has {partitions} partitions, not {given}", options.group),
                ));
            }
        }
        client
            .execute(
                "INSERT INTO consumer_group_partitions (group_name, partition) \
                 SELECT $1, g FROM generate_series(0, $2 - 1) g ON CONFLICT DO NOTHING",
                &[&options.group, &partitions],
            )
            .await?;
        drop(client);
        let notify = Arc::new(Notify::new());
        let listener = self.listen(notify.clone()).await.ok();
        Ok(GroupMember {
            repo: self.clone(),
            options,
            member,
            partitions,
            held: BTreeMap::new(),
            queued: HashSet::new(),
            releasable: false,
            next_heartbeat: Instant::now(),
            share: 0,
            buffer: std::collections::VecDeque::new(),
            buffer_through: Checkpoint::START,
            pending: None,
            in_hand: HashSet::new(),
            notify,
            _listener: listener,
        })
    }
}

impl GroupMember {
    /// This member's name.
    pub fn name(&self) -> &str {
        &self.member
    }

    /// The partitions it holds now.
    pub fn held(&self) -> Vec<i32> {
        self.held.keys().copied().collect()
    }

    /// Runs `handler` on batches of the group's events until `stop` completes (a batch in hand
    /// is finished first), then leaves the group. The checkpoint is stored after the handler
    /// returns: at least once.
    ///
    /// Fails on database errors; the handler's own errors are retried and then parked.
    pub async fn consume<F, Fut>(&mut self, handler: F, stop: impl Future<Output = ()>) -> Result<()>
    where
        F: FnMut(Vec<EventRecord>) -> Fut + Send,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        self.run(Consume(handler), false, stop).await
    }

    /// Runs `handler` on batches of the group's events until `stop` completes, each batch in a
    /// transaction ([`ProjectionTx`]) in which the group's checkpoint is stored too: exactly once.
    ///
    /// Fails on database errors; the handler's own errors are retried and then parked.
    pub async fn project<F, Fut>(&mut self, handler: F, stop: impl Future<Output = ()>) -> Result<()>
    where
        F: FnMut(Vec<EventRecord>, ProjectionTx) -> Fut + Send,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        self.run(Project(handler), true, stop).await
    }

    /// [`GroupMember::consume`] or [`GroupMember::project`] with a [`Handler`].
    pub async fn run<H: Handler>(
        &mut self,
        mut handler: H,
        transactional: bool,
        stop: impl Future<Output = ()>,
    ) -> Result<()> {
        // What an earlier run left in memory (one cancelled mid-batch, or one whose `leave`
        // failed) is forgotten: its read positions may be past a batch that was never stored.
        // The partitions still ours are taken up again from their stored checkpoints.
        self.lost().await?;
        tokio::pin!(stop);
        let mut failures = 0u32;
        let result = loop {
            let delivery = tokio::select! {
                biased;
                () = &mut stop => break Ok(()),
                d = self.next_delivery() => d,
            };
            let handled = match delivery {
                Ok(d) => self.handle(d, &mut handler, transactional).await,
                Err(e) => Err(e),
            };
            match handled {
                Ok(()) => failures = 0,
                // A lost connection (a pooler or server restart, a failover, an idle transaction
                // ended by the server), a timeout, a deadlock: the batch's transaction is gone,
                // and with it what the batch wrote. Like a member that lost its lease, this one
                // forgets what it read and did not store and goes on from the stored
                // checkpoints, on a new connection, once the database answers again (it may have
                // lost its partitions meanwhile). Only what no retry can fix ends the run.
                Err(e) if e.is_retryable() => {
                    failures = failures.saturating_add(1);
                    self.lost().await?;
                    let wait =
                        (self.options.poll_interval * 2u32.saturating_pow(failures.min(6) - 1)).min(self.options.lease);
                    tokio::select! {
                        biased;
                        () = &mut stop => break Ok(()),
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => break Err(e),
            }
        };
        if let Some(pending) = self.pending.take() {
            if result.is_ok() {
                match self.settle_alone(&self.held_only(&pending)).await {
                    Ok(()) | Err(Error::LeaseLost { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let left = self.leave().await;
        result.and(left)
    }

    /// Gives back every partition and leaves the group's members.
    pub async fn leave(&mut self) -> Result<()> {
        let mut client = self.repo.client().await?;
        client
            .execute(
                "UPDATE consumer_group_partitions SET owner = NULL, lease_expires = NULL \
                  WHERE group_name = $1 AND owner = $2",
                &[&self.options.group, &self.member],
            )
            .await?;
        client
            .execute(
                "DELETE FROM consumer_group_members WHERE group_name = $1 AND member = $2",
                &[&self.options.group, &self.member],
            )
            .await?;
        self.held.clear();
        self.queued.clear();
        self.buffer.clear();
        Ok(())
    }

    /// Renews this member and its leases, forgets partitions taken from it, and moves toward its
    /// share: between tries of a failing batch, when a renewal falls due. A partition taken now
    /// has no events in the batch in hand, and one given back is one without (`in_hand`), so
    /// partitions change hands also while a member's batch keeps failing.
    async fn renew(&mut self) -> Result<()> {
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
    async fn give_back(&mut self, partitions: Vec<i32>) -> Result<bool> {
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
    fn share_of(&mut self, names: &[String]) -> usize {
        let count = names.len().max(1);
        let rank = names.iter().position(|m| *m == self.member).unwrap_or(0);
        let p = self.partitions as usize;
        self.share = p / count + usize::from(rank < p % count);
        self.share
    }

    /// Takes free or expired partitions up to `share`, from their stored checkpoints; whether
    /// it took any. Their events are read after what is read ahead (see [`Held::read`]).
    async fn take_up_to(&mut self, share: usize) -> Result<bool> {
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
    fn hold(&mut self, rows: &[tokio_postgres::Row]) -> Result<()> {
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
    fn schedule_renewal(&mut self) {
        let every = if self.held.len() < self.share {
            self.options.lease / 10
        } else {
            self.options.lease / 3
        };
        self.next_heartbeat = Instant::now() + every;
    }

    /// Renews this member and its leases; returns the live members' names, sorted, and the
    /// partitions renewed (partition, epoch, checkpoint).
    async fn renew_leases(&mut self) -> Result<(Vec<String>, Vec<(i32, i64, Checkpoint)>)> {
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
    fn drop_unheld(&mut self) {
        let held = &self.held;
        self.buffer.retain(|item| match item {
            Buffered::Event(_, p, _) => held.contains_key(p),
            Buffered::Queue(park) => held.contains_key(&park.event.partition),
        });
    }

    /// Renews this member, its leases and its share: gives back partitions above its share and
    /// takes free or expired ones up to it.
    async fn heartbeat(&mut self) -> Result<()> {
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

    /// The next delivery, waiting until there is one.
    async fn next_delivery(&mut self) -> Result<Delivery> {
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
            let (page, meta) = self.repo.read_feed(Some(&from), limit, Some(&filter)).await?;
            let full = page.events.len() as i64 == limit;
            for (event, (part, place)) in page.events.into_iter().zip(meta) {
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
            if self.buffer.is_empty() && !full {
                self.wait().await;
            }
        }
    }

    /// The next batch from the read-ahead buffer: up to `batch_size` events and the queued events
    /// among them; it settles every held partition up to its last item (up to the end of the read
    /// when it empties the buffer).
    fn take_buffered(&mut self) -> Option<Delivery> {
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
    async fn refresh_queue(&mut self) -> Result<()> {
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
    async fn next_release(&mut self) -> Result<Option<Delivery>> {
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
            let e = record_from_row(r)?;
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
    async fn wait(&self) {
        let until = self.next_heartbeat.min(Instant::now() + self.options.poll_interval);
        let _ = tokio::time::timeout_at(until, self.notify.notified()).await;
    }

    /// Hands a delivery to the handler, with retries, bisection and parking.
    async fn handle<H: Handler>(&mut self, delivery: Delivery, handler: &mut H, transactional: bool) -> Result<()> {
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
    fn merged_with_pending(&mut self, settlement: &Settlement) -> Settlement {
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
    fn held_only(&self, settlement: &Settlement) -> Settlement {
        let mut s = settlement.clone();
        s.advance
            .retain(|(p, e, _)| self.held.get(p).is_some_and(|h| h.epoch == *e));
        s
    }

    /// Whether every partition of `epochs` is still held at that epoch.
    fn still_holds(&self, epochs: &HashMap<i32, i64>) -> bool {
        epochs
            .iter()
            .all(|(p, e)| self.held.get(p).is_some_and(|h| h.epoch == *e))
    }

    /// Stores a settlement on its own: false (every partition forgotten) when a lease it names
    /// was taken.
    async fn settle_or_lose(&mut self, settlement: &Settlement) -> Result<bool> {
        match self.settle_alone(settlement).await {
            Ok(()) => Ok(true),
            Err(Error::LeaseLost { .. }) => self.lost().await.map(|()| false),
            Err(e) => Err(e),
        }
    }

    /// Waits `wait` between tries, renewing the leases when due meanwhile (a failing batch can
    /// take longer than a lease).
    async fn pause(&mut self, wait: Duration) -> Result<()> {
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

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << (attempt - 1).min(16);
        (self.options.retry_backoff * factor).min(Duration::from_secs(30))
    }

    /// A lease was taken while handling: forget every partition and renew at once (what was
    /// read and not stored is read again by whoever holds each partition now).
    async fn lost(&mut self) -> Result<()> {
        self.held.clear();
        self.queued.clear();
        self.buffer.clear();
        self.pending = None;
        self.next_heartbeat = Instant::now();
        Ok(())
    }

    /// Calls the handler and settles: in the handler's transaction for a projection, after it
    /// for a consumer.
    async fn apply<H: Handler>(
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
    async fn settle_alone(&mut self, settlement: &Settlement) -> Result<()> {
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

fn check_group(name: &str) -> Result<()> {
    check_name("group", name)
}
