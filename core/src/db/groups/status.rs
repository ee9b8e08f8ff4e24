//! A group seen from outside its members: its partitions, checkpoints and leases
//! ([`EventRepository::group_status`]), its parked events and what to do with them (retry, skip).
//!
//! Owns: [`GroupStatus`], [`GroupPartitionStatus`], [`ParkedEvent`] and those calls. Calls: the
//! repository's connections; nothing of the members.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::check_group;
use crate::db::repository::EventRepository;
use crate::error::{Error, Result};
use crate::validate::IssueCode;

/// A parked or queued event of a group, as [`EventRepository::parked`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParkedEvent {
    /// The event.
    pub event_id: Uuid,
    /// Its aggregate.
    pub aggregate_id: Uuid,
    /// Its partition.
    pub partition: i32,
    /// `failed` (the handler gave up on it) or `waiting` (behind a failed event of its aggregate,
    /// or retried and not yet handed out).
    pub state: String,
    /// Tries so far.
    pub attempts: i32,
    /// The handler's last error.
    pub error: Option<String>,
    /// When it was parked or queued.
    pub parked_at: DateTime<Utc>,
}

/// A partition of a group, as [`EventRepository::groups`] lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupPartitionStatus {
    /// Its number.
    pub partition: i32,
    /// The member holding its lease, if the lease has not ended.
    pub owner: Option<String>,
    /// When the lease ends.
    pub lease_expires: Option<DateTime<Utc>>,
    /// Its checkpoint as `txid:position`.
    pub checkpoint: String,
    /// Committed events after its checkpoint.
    pub lag_events: i64,
    /// Seconds since its checkpoint last moved, when events wait after it (0 otherwise).
    pub lag_seconds: f64,
}

/// A consumer group's state, as [`EventRepository::groups`] lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// The group.
    pub group: String,
    /// Live members, by name.
    pub members: Vec<String>,
    /// Every partition.
    pub partitions: Vec<GroupPartitionStatus>,
    /// Events waiting after the checkpoints, over all partitions.
    pub lag_events: i64,
    /// The largest partition lag in seconds.
    pub lag_seconds: f64,
    /// Failed events.
    pub parked: i64,
    /// Events queued behind failed ones (or retried, not yet handed out).
    pub waiting: i64,
}

impl EventRepository {
    /// Every consumer group with its members, partitions, lag and parked events, by name.
    pub async fn groups(&self) -> Result<Vec<GroupStatus>> {
        self.refuse_scoped("groups")?;
        let mut client = self.client().await?;
        let groups = client
            .query("SELECT name, partitions FROM consumer_groups ORDER BY name", &[])
            .await?;
        let mut out = Vec::new();
        for g in &groups {
            let name: String = g.get(0);
            let count: i32 = g.get(1);
            let members: Vec<String> = client
                .query(
                    "SELECT member FROM consumer_group_members WHERE group_name = $1 AND expires > clock_timestamp() \
                     ORDER BY member",
                    &[&name],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            // One pass over the feed from the earliest checkpoint, below the horizon.
            let rows = client
                .query(
                    "WITH c AS (SELECT partition, owner, lease_expires, txid, position, updated_at \
                                  FROM consumer_group_partitions WHERE group_name = $1), \
                          h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon), \
                          lag AS (SELECT synap_group_partition(e.aggregate_id, $2) AS partition, e.txid, e.position \
                                    FROM events_v2 e, h \
                                   WHERE (e.txid, e.position) > (SELECT txid, position FROM c ORDER BY 1, 2 LIMIT 1) \
                                     AND e.txid < h.horizon) \
                     SELECT c.partition, CASE WHEN c.lease_expires > clock_timestamp() THEN c.owner END, c.lease_expires, \
                            c.txid::text || ':' || c.position, \
                            (SELECT count(*) FROM lag l WHERE l.partition = c.partition \
                                AND (l.txid, l.position) > (c.txid, c.position)), \
                            extract(epoch FROM clock_timestamp() - c.updated_at)::float8 \
                       FROM c ORDER BY c.partition",
                    &[&name, &count],
                )
                .await?;
            let partitions: Vec<GroupPartitionStatus> = rows
                .iter()
                .map(|r| {
                    let lag_events: i64 = r.get(4);
                    GroupPartitionStatus {
                        partition: r.get(0),
                        owner: r.get(1),
                        lease_expires: r.get(2),
                        checkpoint: r.get(3),
                        lag_events,
                        lag_seconds: if lag_events > 0 { r.get(5) } else { 0.0 },
                    }
                })
                .collect();
            let parked = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE state = 'failed'), count(*) FILTER (WHERE state = 'waiting') \
                       FROM consumer_group_parked WHERE group_name = $1",
                    &[&name],
                )
                .await?;
            out.push(GroupStatus {
                group: name,
                members,
                lag_events: partitions.iter().map(|p| p.lag_events).sum(),
                lag_seconds: partitions.iter().map(|p| p.lag_seconds).fold(0.0, f64::max),
                partitions,
                parked: parked.get(0),
                waiting: parked.get(1),
            });
        }
        Ok(out)
    }

    /// A group's failed and queued events, in feed order.
    ///
    /// Fails with [`Error::Validation`] for an unknown group.
    pub async fn parked(&self, group: &str) -> Result<Vec<ParkedEvent>> {
        self.refuse_scoped("parked")?;
        let mut client = self.group_client(group).await?;
        let rows = client
            .query(
                "SELECT event_id, aggregate_id, partition, state, attempts, error, parked_at FROM consumer_group_parked \
                  WHERE group_name = $1 ORDER BY txid, position",
                &[&group],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ParkedEvent {
                event_id: r.get(0),
                aggregate_id: r.get(1),
                partition: r.get(2),
                state: r.get(3),
                attempts: r.get(4),
                error: r.get(5),
                parked_at: r.get(6),
            })
            .collect())
    }

    /// Hands a failed event to the group again (with the events queued behind it, in order),
    /// through the member holding its partition.
    ///
    /// Fails with [`Error::Validation`] when the group has no such failed event.
    pub async fn retry_parked(&self, group: &str, event_id: Uuid) -> Result<()> {
        self.refuse_scoped("retry_parked")?;
        let mut client = self.group_client(group).await?;
        let n = client
            .execute(
                "UPDATE consumer_group_parked SET state = 'waiting' \
                  WHERE group_name = $1 AND event_id = $2 AND state = 'failed'",
                &[&group, &event_id],
            )
            .await?;
        self.parked_done(n, group, event_id).await
    }

    /// Gives up on a failed event: it is never handed to the group again, and the events queued
    /// behind it go on in order.
    ///
    /// Fails with [`Error::Validation`] when the group has no such failed event.
    pub async fn skip_parked(&self, group: &str, event_id: Uuid) -> Result<()> {
        self.refuse_scoped("skip_parked")?;
        let mut client = self.group_client(group).await?;
        let n = client
            .execute(
                "DELETE FROM consumer_group_parked WHERE group_name = $1 AND event_id = $2 AND state = 'failed'",
                &[&group, &event_id],
            )
            .await?;
        self.parked_done(n, group, event_id).await
    }

    async fn parked_done(&self, changed: u64, group: &str, event_id: Uuid) -> Result<()> {
        if changed == 0 {
            return Err(Error::invalid(
                "eventId",
                IssueCode::OutOfRange,
                format!("group \"{group}\" has no failed event {event_id}"),
            ));
        }
        self.wake_subscribers();
        Ok(())
    }

    async fn group_client(&self, group: &str) -> Result<crate::db::conn::Conn> {
        check_group(group)?;
        let mut client = self.client().await?;
        let known = client
            .query_opt("SELECT 1 FROM consumer_groups WHERE name = $1", &[&group])
            .await?;
        if known.is_none() {
            return Err(Error::invalid(
                "group",
                IssueCode::OutOfRange,
                format!("no consumer group named \"{group}\""),
            ));
        }
        Ok(client)
    }
}
