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
//! Rooms: this file holds the options, the member's state and its public calls (join, run,
//! leave); [`leases`] the partitions' leases, fencing and the heartbeat; [`delivery`] read-ahead
//! delivery in feed order and the queues behind parked events; [`handling`] tries, halving,
//! parking and the settlement; [`projection`] the projection's transaction and its JSON
//! statements; [`status`] what is seen of a group from outside (status, parked events, retry and
//! skip). The member is one state machine over one `GroupMember`: each room adds its steps to it
//! and reads the fields it needs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

mod delivery;
mod handling;
mod leases;
mod projection;
mod status;

pub use projection::ProjectionTx;
use projection::TxInner;
pub use status::{GroupPartitionStatus, GroupStatus, ParkedEvent};

use crate::db::conn::query_on;
use crate::db::feed::{check_name, parse_checkpoint, Checkpoint, FeedFilter, PartitionFilter};
use crate::db::repository::{EventRepository, EVENT_COLUMNS};
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
    /// The events the group's members are handed (every event when empty); see [`FeedFilter`].
    /// A group keeps the filter it was made with: a member joining with another is refused.
    pub filter: FeedFilter,
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
            filter: FeedFilter::default(),
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
            "eventTypes",
            "eventTypePrefixes",
            "aggregateTypes",
        ];
        let o = value.as_object().ok_or_else(|| {
            Error::invalid(
                "options",
                IssueCode::InvalidType,
                "options must be an object with a group",
            )
        })?;
        let filter = FeedFilter::from_options(&crate::query::Options::of(value, KEYS)?)?;
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
        out.filter = filter;
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
    /// The group's filter, when it has one.
    filter: Option<FeedFilter>,
    /// When the checkpoints last moved past rows a filtered read passed over.
    last_progress: Instant,
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
        options.filter.check(limits)?;
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
        let mut made = None;
        let filter = options.filter.normalized().to_json();
        for _ in 0..3 {
            made = client
                .query_opt(
                    "WITH made AS (INSERT INTO consumer_groups (name, partitions, filter) VALUES ($1, $2, $3) \
                                    ON CONFLICT (name) DO NOTHING RETURNING partitions, filter) \
                     SELECT partitions, filter FROM made \
                     UNION ALL SELECT partitions, filter FROM consumer_groups WHERE name = $1",
                    &[
                        &options.group,
                        &options.partitions.unwrap_or(DEFAULT_PARTITIONS),
                        &filter,
                    ],
                )
                .await?
                .map(|row| (row.get::<_, i32>(0), row.get::<_, serde_json::Value>(1)));
            if made.is_some() {
                break;
            }
        }
        let (partitions, stored) = made.ok_or_else(|| {
            Error::invalid(
                "group",
                IssueCode::OutOfRange,
                format!("group \"{}\" was made and removed while joining", options.group),
            )
        })?;
        let same = crate::query::Options::of(&stored, &crate::db::feed::FILTER_OPTIONS)
            .and_then(|o| FeedFilter::from_options(&o))
            .is_ok_and(|f| f.normalized() == options.filter.normalized());
        if !same {
            return Err(Error::GroupFilterMismatch {
                group: options.group.clone(),
                stored: Box::new(stored),
                given: Box::new(filter),
            });
        }
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
            filter: (!options.filter.is_empty()).then(|| options.filter.clone()),
            last_progress: Instant::now(),
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
}

fn check_group(name: &str) -> Result<()> {
    check_name("group", name)
}
