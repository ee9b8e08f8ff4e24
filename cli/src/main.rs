//! `synap-events`: operations on the event store from a shell. The work happens in the
//! `synap_events` core; this binary parses arguments, shows progress and prints reports.
//!
//! Exit codes: 0 success; 1 an error (its core code is printed); 2 bad arguments; 3 the command
//! ran but found problems (rows that failed to migrate, a verify with differences, a retention
//! dry run that would be refused).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use synap_events::{
    Error, EventRepository, LegacyMigrationOptions, LegacyMigrationProgress, OnInvalid, RepositoryConfig, RetentionAge,
    RetentionOptions, DEFAULT_LEGACY_TABLE, DEFAULT_WRITERS,
};

#[derive(Parser)]
#[command(name = "synap-events", version, about = "Operate a Synap event store")]
struct Cli {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// Schema holding the event store tables (default: the server's search_path).
    #[arg(long, global = true)]
    schema: Option<String>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the pending schema migrations (or list them with --status).
    Migrate {
        /// List the migrations and whether they ran; apply nothing.
        #[arg(long)]
        status: bool,
    },
    /// Copy the legacy events table into events_v2, exactly once, in batches.
    MigrateEvents {
        /// Check the rows and report; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Process at most N rows in this run.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Rows per transaction.
        #[arg(long, value_name = "N", default_value_t = 5000)]
        batch_size: usize,
        /// Connections writing at once, each for its own share of the aggregates (1 with
        /// --on-invalid=fail).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_WRITERS)]
        writers: usize,
        /// Continue a migration that already ran (fully or in part).
        #[arg(long)]
        resume: bool,
        /// The legacy table.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_LEGACY_TABLE)]
        legacy_table: String,
        /// Skip rows that cannot be migrated (recorded and reported) or stop at the first one.
        #[arg(long, value_name = "skip|fail", default_value = "skip")]
        on_invalid: String,
        /// Pause after each batch (throttling; tests).
        #[arg(long, hide = true, value_name = "MS")]
        batch_delay_ms: Option<u64>,
        /// How long to wait for another run's lock on the table (a killed run's backend keeps it
        /// until its last statement ends; one left by a killed run on this host is ended at once).
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        busy_timeout: u64,
    },
    /// Compare the legacy table with events_v2 and say exactly what differs.
    Verify {
        /// The legacy table.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_LEGACY_TABLE)]
        legacy_table: String,
    },
    /// Verify, then drop the legacy table (only with --confirm and a clean verify).
    DropLegacy {
        /// The legacy table.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_LEGACY_TABLE)]
        legacy_table: String,
        /// Really drop it.
        #[arg(long)]
        confirm: bool,
        /// Accept the rows that could not be migrated as lost (they are listed); without it the
        /// drop is refused while any row is neither migrated nor accepted.
        #[arg(long)]
        accept_lost: bool,
    },
    /// Remove events older than an age by dropping whole partitions or chunks.
    Retention {
        /// Age such as 90d, 12w or 2y; the cut-off is rounded down to a UTC midnight.
        #[arg(long, value_name = "AGE")]
        older_than: String,
        /// List what would go; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Go ahead even when some aggregates' events do not fold into a snapshot (their history
        /// before the cut-off is then lost).
        #[arg(long)]
        force: bool,
    },
    /// Recompute events_daily for the days that changed (every day with --full).
    RefreshAnalytics {
        /// Rebuild every day.
        #[arg(long)]
        full: bool,
    },
    /// Store-wide numbers.
    Stats,
    /// Erase one user everywhere: their events, streams, snapshots, daily counts, parked events
    /// and legacy rows; their events in other users' streams are redacted; the feed gets one
    /// synap.user_erased notice; the touched tables are rewritten (docs/erasure.md)
    EraseUser {
        /// The user id.
        user_id: String,
        /// Count what would go; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seconds to wait for transactions older than the erasure to end.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        wait: u64,
    },
    /// After a restore into another cluster: renumber the global feed's transaction ids into
    /// this cluster's past (the feed refuses to read until then).
    RebaseFeed,
    /// Fold one aggregate's stored events into its state (from the newest snapshot on) and
    /// print it as JSON.
    Replay {
        /// The aggregate (UUID).
        aggregate_id: String,
        /// The state at this version (inclusive) instead of the latest.
        #[arg(long, value_name = "N")]
        to_version: Option<u32>,
        /// The state as of this time (RFC 3339): events at or before it.
        #[arg(long, value_name = "TIME")]
        to_timestamp: Option<String>,
    },
    /// Replay one aggregate to its current version and store a snapshot of its state.
    Snapshot {
        /// The aggregate (UUID).
        aggregate_id: String,
    },
    /// Named consumers and consumer groups of the global feed: list them (the default), repair a
    /// named consumer, or list, retry and skip a group's parked events.
    Consumers {
        #[command(subcommand)]
        command: Option<ConsumersCommand>,
    },
}

#[derive(Subcommand)]
enum ConsumersCommand {
    /// Every named consumer with its checkpoint, and every consumer group with its members,
    /// partitions (holder, checkpoint, lag in events and seconds) and parked events.
    List,
    /// A group's failed events (with the error) and the events queued behind them.
    Parked {
        /// The group.
        group: String,
    },
    /// Hand a group's failed event to it again, then the events queued behind it.
    Retry {
        /// The group.
        group: String,
        /// The failed event (UUID).
        event_id: String,
    },
    /// Give up on a group's failed event; the events queued behind it go on.
    Skip {
        /// The group.
        group: String,
        /// The failed event (UUID).
        event_id: String,
    },
    /// Repair a consumer whose checkpoint the old feed ordering stored (before migration 0005):
    /// it goes back to the start and gets every event again, the ones it missed included.
    Repair {
        /// The consumer's name.
        name: String,
        /// Keep its checkpoint instead (for a consumer known to have missed nothing).
        #[arg(long)]
        accept: bool,
        /// Say what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// A replay as text: the state as JSON, then where it came from.
fn replay_text(replay: &synap_events::Replay) -> String {
    format!(
        "{}
version {}{}, last event {}; folded {} events after {}",
        serde_json::to_string_pretty(&replay.result.state).unwrap_or_default(),
        replay.result.version,
        if replay.result.deleted { " (deleted)" } else { "" },
        replay
            .result
            .last_timestamp
            .map_or("-".into(), |t| synap_events::format_timestamp(&t)),
        replay.events_folded,
        replay
            .snapshot_version
            .map_or("version 0".into(), |v| format!("the snapshot at version {v}")),
    )
}

/// What a command produced: the JSON document, its text form, and whether it found problems.
struct Outcome {
    json: Value,
    text: String,
    problems: bool,
}

impl Outcome {
    fn ok(json: Value, text: String) -> Outcome {
        Outcome {
            json,
            text,
            problems: false,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if stdout_was_closed() {
        let _ = print(
            Stream::Err,
            "error [INVALID_CONFIG]: standard output is closed (>&-): the report would have nowhere to go",
        );
        return ExitCode::from(1);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error [INTERNAL_ERROR]: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json_mode = cli.json;
    let (printed, code) = match runtime.block_on(run(cli)) {
        Ok(outcome) => {
            let text = if json_mode {
                outcome.json.to_string()
            } else {
                outcome.text
            };
            (print(Stream::Out, &text), if outcome.problems { 3 } else { 0 })
        }
        Err(e) => {
            let printed = if json_mode {
                let error = json!({ "error": { "code": e.code(), "message": e.to_string(), "details": e.details() } });
                print(Stream::Out, &error.to_string())
            } else {
                print(Stream::Err, &format!("error [{}]: {e}", e.code()))
            };
            (printed, 1)
        }
    };
    match printed {
        Ok(()) => ExitCode::from(code),
        Err(e) => {
            let _ = print(
                Stream::Err,
                &format!("error [INTERNAL_ERROR]: cannot write the report: {e}"),
            );
            ExitCode::from(1)
        }
    }
}

/// Whether the process started with standard output closed (`synap-events stats >&-`). Rust's
/// runtime then opens `/dev/null` there, read-write, before `main`, and every report would vanish
/// with exit code 0; a shell's `>/dev/null` opens it write-only. (Linux; elsewhere: false.)
fn stdout_was_closed() -> bool {
    let Ok(target) = std::fs::read_link("/proc/self/fd/1") else {
        return false;
    };
    if target != std::path::Path::new("/dev/null") {
        return false;
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/fdinfo/1") else {
        return false;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| flags & 0o3 == 0o2)
}

#[derive(Clone, Copy)]
enum Stream {
    Out,
    Err,
}

/// Writes one report line. A reader that has gone away (`synap-events verify | head -1`) is not
/// a failure: the rest is not wanted. Any other write error is returned (`println!` would panic).
fn print(stream: Stream, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let written = match stream {
        Stream::Out => writeln!(std::io::stdout().lock(), "{text}"),
        Stream::Err => writeln!(std::io::stderr().lock(), "{text}"),
    };
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn repository(cli: &Cli) -> Result<EventRepository, Error> {
    let url = cli
        .database_url
        .clone()
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| Error::InvalidConfig {
            message: "no database: pass --database-url or set DATABASE_URL".into(),
        })?;
    let mut config = RepositoryConfig::new(url);
    config.schema = cli.schema.clone();
    config.pool_size = 4;
    EventRepository::new(config)
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

async fn run(cli: Cli) -> Result<Outcome, Error> {
    let repo = repository(&cli)?;
    let show_progress = !cli.json && std::io::stderr().is_terminal();
    match cli.command {
        Command::Migrate { status } => {
            if status {
                let list = repo.migration_status().await?;
                let text = list
                    .iter()
                    .map(|m| {
                        format!(
                            "{:04} {:<20} {}{}",
                            m.version,
                            m.name,
                            m.applied_at.map_or("pending".to_owned(), |t| format!("applied {t}")),
                            if m.checksum_ok { "" } else { "  EDITED AFTER APPLY" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                let json = json!({ "migrations": list.iter().map(|m| json!({
                    "version": m.version, "name": m.name, "appliedAt": m.applied_at, "checksumOk": m.checksum_ok,
                })).collect::<Vec<_>>() });
                let problems = list.iter().any(|m| !m.checksum_ok);
                return Ok(Outcome { json, text, problems });
            }
            let report = repo.migrate().await?;
            let text = format!(
                "applied {:?}, already applied {:?}; storage mode {}",
                report.applied, report.already_applied, report.storage_mode
            );
            Ok(Outcome::ok(
                json!({ "applied": report.applied, "alreadyApplied": report.already_applied, "storageMode": report.storage_mode }),
                text,
            ))
        }
        Command::MigrateEvents {
            dry_run,
            limit,
            batch_size,
            writers,
            resume,
            legacy_table,
            on_invalid,
            batch_delay_ms,
            busy_timeout,
        } => {
            let options = LegacyMigrationOptions {
                legacy_table,
                batch_size,
                writers,
                limit,
                dry_run,
                resume,
                on_invalid: OnInvalid::parse(&on_invalid)?,
                batch_delay: batch_delay_ms.map(Duration::from_millis),
                busy_timeout: Duration::from_secs(busy_timeout),
            };
            let bar = if show_progress {
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template("{bar:40} {pos}/{len} rows  {per_sec}  ETA {eta}  {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar
            } else {
                ProgressBar::hidden()
            };
            let mut on_progress = |p: &LegacyMigrationProgress| {
                bar.set_length(p.total);
                bar.set_position(p.processed);
                bar.set_message(format!("migrated {}, failed {}", p.migrated, p.failed));
            };
            let result = repo.migrate_legacy_events(&options, &mut on_progress).await;
            bar.finish_and_clear();
            let report = result?;
            let mut text = format!(
                "{}legacy table {}: migrated {}, skipped {} (already migrated or failed before), failed {}, \
                 success rate {:.2}%\n{} rows in {:.1} s ({:.0} rows/s), {} left",
                if report.dry_run {
                    "DRY RUN (nothing written) "
                } else {
                    ""
                },
                report.legacy_table,
                report.migrated,
                report.previously_migrated + report.previously_failed,
                report.failed,
                report.success_rate,
                report.processed,
                report.elapsed_ms as f64 / 1000.0,
                report.events_per_second,
                report.remaining,
            );
            for f in &report.failures {
                text.push_str(&format!("\n  failed {} [{}] {}", f.legacy_id, f.reason_code, f.reason));
            }
            if report.failed as usize > report.failures.len() {
                text.push_str(&format!(
                    "\n  ... and {} more",
                    report.failed as usize - report.failures.len()
                ));
            }
            if report.stopped_on_invalid {
                text.push_str(
                    "\nstopped at the first invalid row (--on-invalid=fail); fix it and run again with --resume",
                );
            }
            let problems = report.failed > 0 || report.stopped_on_invalid;
            Ok(Outcome {
                json: to_json(&report),
                text,
                problems,
            })
        }
        Command::Verify { legacy_table } => {
            let report = repo.verify_legacy(&legacy_table).await?;
            Ok(Outcome {
                text: verify_text(&report),
                problems: !report.ok,
                json: to_json(&report),
            })
        }
        Command::DropLegacy {
            legacy_table,
            confirm,
            accept_lost,
        } => {
            let report = repo.verify_legacy(&legacy_table).await?;
            if !cli.json {
                // Best effort: the confirmation below does not depend on the report being seen.
                let _ = print(Stream::Err, &verify_text(&report));
            }
            if !confirm {
                return Err(Error::ConfirmationRequired {
                    action: format!("dropping the legacy table \"{legacy_table}\" (pass --confirm)"),
                });
            }
            let dropped = repo.drop_legacy_table(&legacy_table, true, accept_lost).await?;
            let mut text = format!("dropped legacy table {legacy_table}");
            if dropped.accepted_lost_count > 0 {
                text.push_str(&format!(
                    "; {} row(s) that could not be migrated were accepted as lost:",
                    dropped.accepted_lost_count
                ));
                for f in &dropped.accepted_lost {
                    text.push_str(&format!("\n  lost {} [{}] {}", f.legacy_id, f.reason_code, f.reason));
                }
            }
            Ok(Outcome::ok(to_json(&dropped), text))
        }
        Command::Retention {
            older_than,
            dry_run,
            force,
        } => {
            let cutoff = RetentionAge::parse(&older_than)?.cutoff(chrono::Utc::now())?;
            let report = repo
                .apply_retention(&RetentionOptions { cutoff, dry_run, force })
                .await?;
            let mut text = format!(
                "{}cut-off {} ({}): {} rows in {} {}",
                if dry_run { "DRY RUN (nothing changed) " } else { "" },
                report.cutoff.to_rfc3339(),
                report.storage_mode,
                report.rows,
                report.targets.len(),
                if report.storage_mode == "timescaledb" {
                    "chunks"
                } else {
                    "partitions"
                },
            );
            for t in &report.targets {
                text.push_str(&format!(
                    "\n  {} {} rows {} .. {}",
                    t.name,
                    t.rows,
                    t.from.map_or("-".into(), |d| d.to_rfc3339()),
                    t.to.map_or("-".into(), |d| d.to_rfc3339())
                ));
            }
            text.push_str(&format!(
                "\nsnapshots stored {} ({} aggregates kept whole, {} with events on both sides), \
                 streams deleted {}, trimmed {}, events_daily rows deleted {}",
                report.snapshots_stored,
                report.streams_kept,
                report.cut_through_count,
                report.streams_deleted,
                report.streams_trimmed,
                report.daily_rows_deleted
            ));
            let refused = dry_run && report.unfoldable_count > 0 && !force;
            if report.unfoldable_count > 0 {
                text.push_str(&format!(
                    "\n{} aggregate(s) have events that do not fold into a snapshot (e.g. {:?}){}",
                    report.unfoldable_count,
                    report.unfoldable_sample,
                    if refused {
                        "; a real run would be refused without --force"
                    } else {
                        "; their history before the cut-off is lost"
                    }
                ));
            }
            Ok(Outcome {
                json: to_json(&report),
                text,
                problems: refused,
            })
        }
        Command::RefreshAnalytics { full } => {
            let days = repo.refresh_analytics(full).await?;
            Ok(Outcome::ok(
                json!({ "daysRefreshed": days, "full": full }),
                format!("refreshed {days} day(s) of events_daily"),
            ))
        }
        Command::EraseUser { user_id, dry_run, wait } => {
            let options = synap_events::EraseOptions {
                dry_run,
                wait_timeout: std::time::Duration::from_secs(wait.max(1)),
            };
            let report = repo.erase_user(&user_id, &options).await?;
            let mut text = format!(
                "{}user {:?}: {} stream(s), {} event(s) of other users in them",
                if dry_run { "DRY RUN (nothing changed) " } else { "" },
                report.user_id,
                report.streams,
                report.other_users_events
            );
            for t in &report.tables {
                text.push_str(&format!("\n  {:<28} {:>9} {}", t.table, t.rows, t.action));
            }
            match &report.notice {
                Some(n) => text.push_str(&format!("\nnotice {} on the feed (stream {})", n.id, n.aggregate_id)),
                None if !dry_run => text.push_str("\nnothing of the user was left: no notice"),
                None => {}
            }
            for r in &report.rewritten {
                text.push_str(&format!("\nrewritten {r}"));
            }
            Ok(Outcome::ok(to_json(&report), text))
        }
        Command::Stats => {
            let stats = repo.stats().await?;
            let mut text = format!(
                "storage mode {}\nevents {}\nstreams {}\noldest {}\nnewest {}\npartitions/chunks {}\n\
                 default partition rows {}\nanalytics days pending {}",
                stats.storage_mode,
                stats.events,
                stats.streams,
                stats.oldest.map_or("-".into(), |d| d.to_rfc3339()),
                stats.newest.map_or("-".into(), |d| d.to_rfc3339()),
                stats.partitions,
                stats.default_partition_rows,
                stats.dirty_days,
            );
            for m in &stats.legacy_migrations {
                text.push_str(&format!(
                    "\nlegacy {}: migrated {}, failed {}, {}",
                    m.legacy_table,
                    m.migrated,
                    m.failed,
                    m.finished_at
                        .map_or("not finished".into(), |t| format!("finished {}", t.to_rfc3339()))
                ));
            }
            Ok(Outcome::ok(to_json(&stats), text))
        }
        Command::Replay {
            aggregate_id,
            to_version,
            to_timestamp,
        } => {
            let id = synap_events::validate::parse_uuid_arg("aggregate_id", &aggregate_id)?;
            let options = synap_events::replay_options(&serde_json::json!({
                "toVersion": to_version,
                "toTimestamp": to_timestamp,
            }))?;
            let replay = repo.replay(id, &options).await?;
            let text = replay_text(&replay);
            Ok(Outcome::ok(to_json(&replay), text))
        }
        Command::Snapshot { aggregate_id } => {
            let id = synap_events::validate::parse_uuid_arg("aggregate_id", &aggregate_id)?;
            let replay = repo.snapshot(id).await?;
            let text = format!(
                "{}
{}",
                replay_text(&replay),
                if replay.snapshot_stored {
                    format!("stored a snapshot at version {}", replay.result.version)
                } else {
                    format!(
                        "a snapshot at version {} was already stored (or there is nothing to snapshot)",
                        replay.result.version
                    )
                }
            );
            Ok(Outcome::ok(to_json(&replay), text))
        }
        Command::RebaseFeed => {
            let report = repo.rebase_feed().await?;
            let text = if report.needed {
                format!(
                    "renumbered the transaction ids of {} events into this cluster's past ({} ids consumed first); \
                     checkpoints taken before are no longer accepted",
                    report.events_renumbered, report.transaction_ids_consumed
                )
            } else {
                "the feed already holds this cluster's transaction ids: nothing to do".to_owned()
            };
            Ok(Outcome::ok(to_json(&report), text))
        }
        Command::Consumers {
            command: None | Some(ConsumersCommand::List),
        } => {
            let consumers = repo.consumers().await?;
            let groups = repo.groups().await?;
            let mut lines: Vec<String> = consumers
                .iter()
                .map(|c| {
                    format!(
                        "{}  at {}  stored {}{}",
                        c.name,
                        checkpoint_text(&c.checkpoint),
                        c.updated_at.to_rfc3339(),
                        if c.needs_repair { "  NEEDS REPAIR" } else { "" }
                    )
                })
                .collect();
            for g in &groups {
                lines.push(format!(
                    "group {}  {} member(s), {} partitions, lag {} event(s) / {:.1} s, {} parked, {} waiting",
                    g.group,
                    g.members.len(),
                    g.partitions.len(),
                    g.lag_events,
                    g.lag_seconds,
                    g.parked,
                    g.waiting
                ));
                for m in &g.members {
                    let held: Vec<String> = g
                        .partitions
                        .iter()
                        .filter(|p| p.owner.as_deref() == Some(m))
                        .map(|p| p.partition.to_string())
                        .collect();
                    lines.push(format!("  member {m}: partitions {}", held.join(",")));
                }
                for p in g.partitions.iter().filter(|p| p.lag_events > 0 || p.owner.is_none()) {
                    lines.push(format!(
                        "  partition {}  {}  at {}  lag {} event(s) / {:.1} s",
                        p.partition,
                        p.owner.as_deref().unwrap_or("unheld"),
                        p.checkpoint,
                        p.lag_events,
                        p.lag_seconds
                    ));
                }
            }
            let text = lines.join("\n");
            Ok(Outcome {
                problems: consumers.iter().any(|c| c.needs_repair) || groups.iter().any(|g| g.parked > 0),
                json: json!({ "consumers": to_json(&consumers), "groups": to_json(&groups) }),
                text: if text.is_empty() {
                    "no named consumers or consumer groups".into()
                } else {
                    text
                },
            })
        }
        Command::Consumers {
            command: Some(ConsumersCommand::Parked { group }),
        } => {
            let parked = repo.parked(&group).await?;
            let text = parked
                .iter()
                .map(|p| {
                    format!(
                        "{}  {}  aggregate {}  partition {}  {} tries{}",
                        p.event_id,
                        p.state,
                        p.aggregate_id,
                        p.partition,
                        p.attempts,
                        p.error.as_deref().map(|e| format!("  {e}")).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            Ok(Outcome {
                problems: parked.iter().any(|p| p.state == "failed"),
                json: json!({ "group": group, "parked": to_json(&parked) }),
                text: if text.is_empty() {
                    format!("group {group} has no parked events")
                } else {
                    text
                },
            })
        }
        Command::Consumers {
            command: Some(ConsumersCommand::Retry { group, event_id }),
        } => {
            let id = synap_events::validate::parse_uuid_arg("event_id", &event_id)?;
            repo.retry_parked(&group, id).await?;
            Ok(Outcome::ok(
                json!({ "group": group, "eventId": id.to_string(), "retried": true }),
                format!("event {id} goes back to group {group}, then the events queued behind it"),
            ))
        }
        Command::Consumers {
            command: Some(ConsumersCommand::Skip { group, event_id }),
        } => {
            let id = synap_events::validate::parse_uuid_arg("event_id", &event_id)?;
            repo.skip_parked(&group, id).await?;
            Ok(Outcome::ok(
                json!({ "group": group, "eventId": id.to_string(), "skipped": true }),
                format!("event {id} is skipped by group {group}; the events queued behind it go on"),
            ))
        }
        Command::Consumers {
            command: Some(ConsumersCommand::Repair { name, accept, dry_run }),
        } => {
            let report = repo.repair_consumer(&name, accept, dry_run).await?;
            let text = if !report.needed_repair {
                format!(
                    "consumer {name} needs no repair (at {})",
                    checkpoint_text(&report.before)
                )
            } else if report.after == report.before {
                format!(
                    "{}consumer {name} keeps its checkpoint {} and reads on",
                    if dry_run { "DRY RUN " } else { "" },
                    checkpoint_text(&report.before)
                )
            } else {
                format!(
                    "{}consumer {name} goes back from {} to the start: {} event(s) at or before its old checkpoint \
                     are delivered again (skip the ones it has by event id)",
                    if dry_run { "DRY RUN " } else { "" },
                    checkpoint_text(&report.before),
                    report.events_delivered_again
                )
            };
            Ok(Outcome::ok(to_json(&report), text))
        }
    }
}

fn checkpoint_text(c: &synap_events::Checkpoint) -> String {
    format!("{}:{}", c.txid, c.position)
}

fn verify_text(r: &synap_events::VerifyReport) -> String {
    let mut text = format!(
        "verify {}: {}\n  legacy rows {}, migrated {}, dual-written {}, failed {}, missing {}, mismatched {}, \
         count differences {}\n  checksums legacy {} / events_v2 {}",
        r.legacy_table,
        if r.ok { "OK" } else { "DIFFERENCES" },
        r.legacy_rows,
        r.migrated_rows,
        r.dual_written_rows,
        r.failed_count,
        r.missing_count,
        r.mismatched_count,
        r.count_differences_count,
        r.legacy_checksum,
        r.events_checksum,
    );
    for f in &r.failed {
        text.push_str(&format!("\n  failed {} [{}] {}", f.legacy_id, f.reason_code, f.reason));
    }
    for id in &r.missing {
        text.push_str(&format!("\n  missing {id}"));
    }
    for m in &r.mismatched {
        text.push_str(&format!(
            "\n  mismatch {} (event {}): {}",
            m.legacy_id,
            m.event_id,
            m.fields.join(", ")
        ));
    }
    for d in &r.count_differences {
        text.push_str(&format!(
            "\n  count user {} type {}: legacy {}, events_v2 {}",
            d.user_id.as_deref().unwrap_or("(none)"),
            d.event_type.as_deref().unwrap_or("(none)"),
            d.legacy,
            d.events_v2
        ));
    }
    text
}
