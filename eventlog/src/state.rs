//! The bounded state of one owned partition (ADR 10): a small in-memory cache over a
//! local on-disk store (redb), both fed from the partition's changelog topic.
//!
//! - Every transaction of an owner also writes the new state of each aggregate (or saga)
//!   it changed to `<prefix>.<stream>.state`, a compacted topic co-partitioned with the
//!   events and keyed by id, in the SAME Kafka transaction as the events: a state record
//!   never exists without its events, nor events without it.
//! - The local store is written only after the commit, with the changelog offset it
//!   reflects in the same store transaction. A restart reads only the changelog's tail
//!   past that offset; a takeover with no local store reads the compacted changelog, never
//!   the event history.
//! - Each changelog record carries its state schema version as a header. A store or
//!   changelog written under another schema is not trusted: the owner folds the events
//!   again and seeds the changelog (also the upgrade path of a log written before
//!   changelogs existed).
//!
//! The store need not fsync each batch: what it lost in a crash, it reads again from the
//! changelog past the offset it did keep.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use lru::LruCache;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::message::{Headers, Message, OwnedHeaders};
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{info, warn};

use crate::{read_partition, watermarks, KafkaConfig};

/// The header of a changelog record that names its state schema version.
pub const SCHEMA_HEADER: &str = "tally-state-schema";
/// The header of a changelog record that names an offset of the events partition its
/// states have folded every event before: the end of the events when its transaction
/// began. They also hold their own transaction's events, past it, which a restore reads
/// again and skips by version. (Not the end after the transaction's own events: the
/// states are then sent WITH the events, not after them, which saves a produce round
/// trip per transaction.)
pub const EVENTS_NEXT_HEADER: &str = "tally-events-next";
/// Key of the record a seeding writes after every state: "all states before me are
/// superseded by the ones written with me".
const SEED_KEY: &str = "\u{0}seeded";
/// Key in a store's meta table asking its next restore to fold the events again.
const REBUILD_KEY: &str = "rebuild";

const STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("states");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// An owner's index of some states (the saga's running ones, by deadline): id → value.
const INDEX: TableDefinition<&str, i64> = TableDefinition::new("index");

/// The dedup record (ADR 8, ADR 10): command ids and their outcomes, each kept until it
/// expires, beside the states. Its changelog is the topic the outcome was written to in
/// the command's transaction (the stream's outcomes topic; the results topic for a saga's
/// commands): time retention instead of compaction and tombstones, because every entry
/// expires at a fixed age and retention drops whole segments at no cost. Value: the
/// expiry (ms since the epoch, 8 bytes big-endian), then the outcome's bytes.
const KEPT: TableDefinition<u128, &[u8]> = TableDefinition::new("kept");
/// The same entries by expiry, for the sweep.
const EXPIRY: TableDefinition<(i64, u128), ()> = TableDefinition::new("expiry");

/// What an owner indexes of a state (`None`: not in the index). The saga indexes its
/// running sagas, so a start lists them without decoding every saga ever run.
pub type IndexOf<S> = fn(&S) -> Option<i64>;
/// The layout of a local store (its tables and the index's encoding). A store of
/// another format is not trusted: it is emptied and restored from the changelog, which
/// rebuilds its index. Bump it with any change to what the store keeps.
const STORE_FORMAT: u32 = 2;
/// Page cache of one partition's store (counts toward the process's memory).
const STORE_CACHE_BYTES: usize = 4 << 20;
/// A durable store commit at least this often (the rest are not fsynced).
const DURABLE_EVERY: Duration = Duration::from_secs(10);
/// States written per store transaction during a restore (sorted by key first).
const RESTORE_CHUNK: usize = 50_000;

/// Where and how much state an owner keeps.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Directory of the local stores (`<dir>/<prefix>/<stream>/p<n>.redb`).
    pub dir: PathBuf,
    /// Entries kept decoded in memory per owned partition; the rest are on disk.
    pub cache_entries: usize,
    /// The log's id (ADR 7): a store written for another log is thrown away.
    pub log_id: String,
    /// Ignore local stores and changelogs and fold the events again (`tally rebuild-state`).
    pub rebuild: bool,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".data/state"),
            cache_entries: 10_000,
            log_id: String::new(),
            rebuild: false,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    stream: String,
    /// `store` (local), `changelog` or `events` (a rebuild).
    source: String,
}

/// Prometheus metrics of partition state: cache hits and misses, records restored by
/// source, partitions restoring, entries cached.
#[derive(Clone, Default)]
pub struct StateMetrics {
    hits: Family<StreamLabels, Counter>,
    misses: Family<StreamLabels, Counter>,
    restored: Family<SourceLabels, Counter>,
    rebuilds: Family<StreamLabels, Counter>,
    restoring: Family<StreamLabels, Gauge>,
    cached: Family<StreamLabels, Gauge>,
}

impl StateMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tally_state_cache_hits",
            "State lookups answered from the in-memory cache",
            self.hits.clone(),
        );
        registry.register(
            "tally_state_cache_misses",
            "State lookups that went to the local store",
            self.misses.clone(),
        );
        registry.register(
            "tally_state_restored_records",
            "Records read while restoring partition state, by source (changelog or events)",
            self.restored.clone(),
        );
        registry.register(
            "tally_state_rebuilds",
            "Partitions whose state was folded again from the events (schema change, upgrade or rebuild-state)",
            self.rebuilds.clone(),
        );
        registry.register(
            "tally_state_partitions_restoring",
            "Owned partitions whose state is being restored",
            self.restoring.clone(),
        );
        registry.register(
            "tally_state_cached_entries",
            "Decoded states held in memory",
            self.cached.clone(),
        );
    }

    fn stream(stream: &str) -> StreamLabels {
        StreamLabels {
            stream: stream.to_string(),
        }
    }

    fn restored(&self, stream: &str, source: &str) -> Counter {
        self.restored
            .get_or_create(&SourceLabels {
                stream: stream.to_string(),
                source: source.to_string(),
            })
            .clone()
    }
}

/// One entry of the dedup record: a command id, its outcome's bytes, and when it expires.
pub struct Kept {
    pub id: u128,
    pub expires_ms: i64,
    pub bytes: Vec<u8>,
}

/// One changed state, ready for the changelog and, after the commit, the store.
pub struct Changed<S> {
    pub id: String,
    pub state: S,
    pub bytes: Vec<u8>,
}

/// The state of one owned partition: an LRU cache of decoded states over the local store.
pub struct PartitionState<S> {
    db: Database,
    path: PathBuf,
    cache: LruCache<String, S>,
    hits: Counter,
    misses: Counter,
    cached: Gauge,
    last_durable: Instant,
    /// Entries written since the last durable commit.
    undurable: u64,
    /// The offset of the events partition the stored states have folded up to.
    events_next: i64,
    /// A store of this owner alone (the usual one was held): removed when released.
    temporary: bool,
    index: Option<IndexOf<S>>,
}

/// What an owner restores into: the store, and states it must still write to the
/// changelog (folded from events the changelog did not cover) before it takes work.
pub struct Restored<S> {
    pub state: PartitionState<S>,
    /// States folded from the events, to be written to the changelog (see [`seed`]) in
    /// one transaction before the owner takes work.
    pub to_seed: Option<Seed<S>>,
}

/// States folded from events, for the changelog.
pub struct Seed<S> {
    pub states: HashMap<String, S>,
    /// The offset of the events partition they have folded up to.
    pub events_next: i64,
    /// A full rebuild: every state of the partition, superseding the changelog's past.
    pub full: bool,
}

impl<S: Serialize + DeserializeOwned + Clone> PartitionState<S> {
    /// The state of `id` (cache, then store), or `None` when it has none yet.
    pub fn get(&mut self, id: &str) -> anyhow::Result<Option<S>> {
        if let Some(s) = self.cache.get(id) {
            self.hits.inc();
            return Ok(Some(s.clone()));
        }
        self.misses.inc();
        let read = self.db.begin_read()?;
        let table = match read.open_table(STATES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(bytes) = table.get(id)? else {
            return Ok(None);
        };
        let state: S = match serde_json::from_slice(bytes.value()) {
            Ok(state) => state,
            Err(error) => {
                // Not a state this version can use (a corrupt changelog record, or a bug):
                // the owner fails, and its next restore folds the events again instead
                // of failing on this state for ever.
                drop(table);
                drop(read);
                let asked = self.ask_rebuild();
                return Err(anyhow::Error::new(error).context(format!(
                    "state of {id} in {} does not decode; the partition's state will be rebuilt from its events on restart{}",
                    self.path.display(),
                    match asked {
                        Ok(()) => String::new(),
                        Err(e) => format!(" (could not say so in the store: {e}; run `tally rebuild-state`)"),
                    }
                )));
            }
        };
        self.put_cache(id.to_string(), state.clone());
        Ok(Some(state))
    }

    /// Marks the store so that the next restore folds the partition's events again.
    fn ask_rebuild(&self) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?
            .insert(REBUILD_KEY, [1u8].as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// The offset of the events partition the states have folded up to: the value of the
    /// [`EVENTS_NEXT_HEADER`] of a transaction that writes no events.
    pub fn events_next(&self) -> i64 {
        self.events_next
    }

    /// Records committed changes: the cache, then the store with the changelog offset they
    /// reach (`next_changelog`: the offset after the last state record committed) and the
    /// events offset they fold up to.
    pub fn committed(
        &mut self,
        changed: Vec<Changed<S>>,
        next_changelog: i64,
        events_next: i64,
    ) -> anyhow::Result<()> {
        self.commit(changed, Some((next_changelog, events_next)), None)
    }

    /// Records what one committed Kafka transaction changed, in ONE store transaction: the
    /// states with the changelog position they reach (`changelog`: the offset after the
    /// last state record and the events offset they fold up to; see [`changelog_next`]),
    /// and dedup entries kept from `source` up to its position (see [`Self::keep`]).
    ///
    /// Most commits are not synced to disk and run inline (a write to the page cache); one
    /// every [`DURABLE_EVERY`] syncs, off the async threads.
    pub fn commit(
        &mut self,
        changed: Vec<Changed<S>>,
        changelog: Option<(i64, i64)>,
        kept: Option<(Vec<Kept>, &str, Option<i64>)>,
    ) -> anyhow::Result<()> {
        if changelog.is_none() && kept.is_none() {
            return Ok(());
        }
        let durable = self.last_durable.elapsed() >= DURABLE_EVERY;
        let mut entries = changed.len() as u64;
        let write = |this: &mut Self| -> anyhow::Result<()> {
            let mut txn = this.db.begin_write()?;
            if !durable {
                txn.set_durability(Durability::None);
            }
            if let Some((next, events_next)) = changelog {
                this.events_next = this.events_next.max(events_next);
                let mut states = txn.open_table(STATES)?;
                for c in &changed {
                    states.insert(c.id.as_str(), c.bytes.as_slice())?;
                }
                if let Some(index_of) = this.index {
                    let mut index = txn.open_table(INDEX)?;
                    for c in &changed {
                        match index_of(&c.state) {
                            Some(v) => index.insert(c.id.as_str(), v)?,
                            None => index.remove(c.id.as_str())?,
                        };
                    }
                }
                let mut meta = txn.open_table(META)?;
                meta.insert("next", next.to_be_bytes().as_slice())?;
                meta.insert("events_next", this.events_next.to_be_bytes().as_slice())?;
            }
            if let Some((kept, source, next)) = kept {
                entries += kept.len() as u64;
                keep_in(&txn, kept, source, next)?;
            }
            txn.commit()?;
            Ok(())
        };
        if durable {
            blocking(|| write(self))?;
            self.last_durable = Instant::now();
            self.undurable = 0;
        } else {
            write(self)?;
            self.undurable += entries.max(1);
        }
        if changelog.is_some() {
            for c in changed {
                self.put_cache(c.id, c.state);
            }
        }
        Ok(())
    }

    fn put_cache(&mut self, id: String, state: S) {
        let before = self.cache.len();
        self.cache.put(id, state);
        self.cached.inc_by((self.cache.len() - before) as i64);
    }

    /// The kept outcome of command `id` (see [`KEPT`]), unless it expired before `now_ms`.
    pub fn kept(&self, id: u128, now_ms: i64) -> anyhow::Result<Option<Vec<u8>>> {
        let read = self.db.begin_read()?;
        let table = match read.open_table(KEPT) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(value) = table.get(id)? else {
            return Ok(None);
        };
        let value = value.value();
        let expires = i64::from_be_bytes(value[..8].try_into()?);
        Ok((expires >= now_ms).then(|| value[8..].to_vec()))
    }

    /// How far `source` (a topic the dedup record is written to) has been kept: the
    /// offset after the last of its records in the store; 0 for none.
    pub fn kept_next(&self, source: &str) -> anyhow::Result<i64> {
        Ok(meta_get(&self.db, &format!("kept_next {source}"))?
            .map(|b| i64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
            .unwrap_or(0))
    }

    /// Keeps `entries`, read from or committed to `source` up to `next`, in one store
    /// transaction with that position (so a restart reads only what follows; `None`: no
    /// position is kept). An entry kept already keeps the later of its two expiries: an
    /// outcome read again must not be forgotten sooner.
    pub fn keep(
        &mut self,
        entries: Vec<Kept>,
        source: &str,
        next: Option<i64>,
    ) -> anyhow::Result<()> {
        self.commit(Vec::new(), None, Some((entries, source, next)))
    }

    /// Forgets kept outcomes `source` has no more (its position is past its end: the
    /// topic was recreated), so that they are read again from where it is now.
    pub fn forget_kept(&mut self) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        clear_kept(&txn)?;
        txn.commit()?;
        Ok(())
    }

    /// Removes up to `limit` kept outcomes that expired before `now_ms`; answers how many.
    pub fn sweep(&mut self, now_ms: i64, limit: usize) -> anyhow::Result<usize> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None);
        let removed;
        {
            let mut expiry = txn.open_table(EXPIRY)?;
            let mut kept = txn.open_table(KEPT)?;
            let expired: Vec<(i64, u128)> = expiry
                .range(..(now_ms, 0u128))?
                .take(limit)
                .map(|e| e.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            for (at, id) in &expired {
                expiry.remove((*at, *id))?;
                kept.remove(*id)?;
            }
            removed = expired.len();
        }
        txn.commit()?;
        self.undurable += removed as u64;
        Ok(removed)
    }

    /// Every entry of the owner's index (see [`IndexOf`]).
    pub fn indexed(&self, mut each: impl FnMut(&str, i64)) -> anyhow::Result<()> {
        let read = self.db.begin_read()?;
        let table = match read.open_table(INDEX) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for entry in table.iter()? {
            let (key, value) = entry?;
            each(key.value(), value.value());
        }
        Ok(())
    }
}

impl<S> Drop for PartitionState<S> {
    fn drop(&mut self) {
        self.cached.dec_by(self.cache.len() as i64);
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        // A last durable commit, so the next start of this process reads only the tail.
        if self.undurable > 0 {
            if let Ok(txn) = self.db.begin_write() {
                let _ = txn.commit();
            }
        }
    }
}

/// Keeps dedup entries inside a store transaction (see [`PartitionState::keep`]).
fn keep_in(
    txn: &redb::WriteTransaction,
    entries: Vec<Kept>,
    source: &str,
    next: Option<i64>,
) -> anyhow::Result<()> {
    let mut kept = txn.open_table(KEPT)?;
    let mut expiry = txn.open_table(EXPIRY)?;
    for e in entries {
        let old = match kept.get(e.id)? {
            Some(v) => Some(i64::from_be_bytes(v.value()[..8].try_into()?)),
            None => None,
        };
        if old.is_some_and(|old| old >= e.expires_ms) {
            continue;
        }
        if let Some(old) = old {
            expiry.remove((old, e.id))?;
        }
        let mut value = Vec::with_capacity(8 + e.bytes.len());
        value.extend_from_slice(&e.expires_ms.to_be_bytes());
        value.extend_from_slice(&e.bytes);
        kept.insert(e.id, value.as_slice())?;
        expiry.insert((e.expires_ms, e.id), ())?;
    }
    if let Some(next) = next {
        let mut meta = txn.open_table(META)?;
        meta.insert(
            format!("kept_next {source}").as_str(),
            next.to_be_bytes().as_slice(),
        )?;
    }
    Ok(())
}

/// Sends the new state of each changed aggregate (or saga) to `changelog` inside the
/// caller's open transaction, WITH its events (`events_from`: the end of the events
/// partition before them, see [`EVENTS_NEXT_HEADER`]). Answers the changes for
/// [`PartitionState::commit`] and the deliveries, to be awaited FIRST with the commit, so
/// that [`changelog_next`] finds them.
pub fn send_states<S: Serialize>(
    producer: &crate::TxnProducer,
    changelog: &str,
    partition: i32,
    schema: u32,
    events_from: i64,
    states: impl IntoIterator<Item = (String, S)>,
) -> anyhow::Result<(Vec<Changed<S>>, Vec<crate::Delivery>)> {
    let mut changed = Vec::new();
    let mut sends = Vec::new();
    for (id, state) in states {
        let (bytes, headers) = encode(&state, schema, events_from)?;
        sends.push(producer.send(changelog, partition, &id, &bytes, headers)?);
        changed.push(Changed { id, state, bytes });
    }
    Ok((changed, sends))
}

/// The changelog position a committed transaction reaches: the offset after the last of
/// its `states` state records (the first ones `landed`) and the events offset they fold
/// up to. `None` when it wrote no state.
pub fn changelog_next(
    landed: &[crate::Landed],
    states: usize,
    events_next: i64,
) -> Option<(i64, i64)> {
    landed[..states]
        .iter()
        .map(|(_, offset)| offset + 1)
        .max()
        .map(|next| (next, events_next))
}

/// The changelog record of one state: its JSON, and headers naming its schema and the
/// events offset its transaction folds up to.
pub fn encode<S: Serialize>(
    state: &S,
    schema: u32,
    events_next: i64,
) -> anyhow::Result<(Vec<u8>, OwnedHeaders)> {
    Ok((serde_json::to_vec(state)?, headers(schema, events_next)))
}

fn headers(schema: u32, events_next: i64) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(rdkafka::message::Header {
            key: SCHEMA_HEADER,
            value: Some(schema.to_string().as_bytes()),
        })
        .insert(rdkafka::message::Header {
            key: EVENTS_NEXT_HEADER,
            value: Some(events_next.to_string().as_bytes()),
        })
}

/// Writes a [`Seed`]'s states (and, for a full one, a seed marker after them) to the
/// changelog inside the caller's open transaction; returns the deliveries to await with
/// the commit and the changes for [`PartitionState::committed`].
pub fn seed<S: Serialize + Clone>(
    producer: &crate::TxnProducer,
    changelog: &str,
    partition: i32,
    schema: u32,
    seed: &Seed<S>,
) -> anyhow::Result<(Vec<crate::Delivery>, Vec<Changed<S>>)> {
    let (changed, mut sends) = send_states(
        producer,
        changelog,
        partition,
        schema,
        seed.events_next,
        seed.states.iter().map(|(id, s)| (id.clone(), s.clone())),
    )?;
    if seed.full {
        sends.push(producer.send(
            changelog,
            partition,
            SEED_KEY,
            schema.to_string().as_bytes(),
            headers(schema, seed.events_next),
        )?);
    }
    Ok((sends, changed))
}

/// Where `stream`/`partition` keeps its store under `config.dir`.
fn store_path(config: &StateConfig, prefix: &str, stream: &str, partition: i32) -> PathBuf {
    config
        .dir
        .join(prefix)
        .join(stream)
        .join(format!("p{partition}.redb"))
}

/// Opens the store, waiting for an old owner in another process on this machine to let go
/// of the file; when it does not, this owner restores into a store of its own.
fn open_store(path: &Path) -> anyhow::Result<(Database, PathBuf, bool)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)
        {
            Ok(db) => return Ok((db, path.to_path_buf(), false)),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                let own = path.with_extension(format!("{}.redb", uuid::Uuid::new_v4().simple()));
                warn!(store = %path.display(), fallback = %own.display(), "state store held by another process; restoring into a store of this process");
                let _ = std::fs::remove_file(&own);
                let db = Database::builder()
                    .set_cache_size(STORE_CACHE_BYTES)
                    .create(&own)
                    .with_context(|| format!("creating the state store {}", own.display()))?;
                return Ok((db, own, true));
            }
            Err(e) => {
                // A store that does not open (torn, another format) is only a cache.
                warn!(store = %path.display(), error = %e, "state store unreadable; starting it again");
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the unreadable store {}", path.display()))?;
                let db = Database::builder()
                    .set_cache_size(STORE_CACHE_BYTES)
                    .create(path)
                    .with_context(|| format!("creating the state store {}", path.display()))?;
                return Ok((db, path.to_path_buf(), false));
            }
        }
    }
}

fn meta_get(db: &Database, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let read = db.begin_read()?;
    let table = match read.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(table.get(key)?.map(|v| v.value().to_vec()))
}

/// Empties the dedup record and forgets how far each of its topics was read.
fn clear_kept(txn: &redb::WriteTransaction) -> anyhow::Result<()> {
    txn.delete_table(KEPT)?;
    txn.delete_table(EXPIRY)?;
    let mut meta = txn.open_table(META)?;
    let positions: Vec<String> = meta
        .iter()?
        .filter_map(|e| e.ok().map(|(k, _)| k.value().to_string()))
        .filter(|k| k.starts_with("kept_next "))
        .collect();
    for k in positions {
        meta.remove(k.as_str())?;
    }
    Ok(())
}

/// Empties the store and records whose log, schema and changelog position it holds.
fn reset(db: &Database, log_id: &str, schema: u32) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    txn.delete_table(STATES)?;
    txn.delete_table(INDEX)?;
    // The dedup record goes too: it is read again from its topics, from where the log
    // is now (a store of another log must not answer for this one).
    clear_kept(&txn)?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert("log", log_id.as_bytes())?;
        meta.insert("format", STORE_FORMAT.to_be_bytes().as_slice())?;
        meta.insert("schema", schema.to_be_bytes().as_slice())?;
        meta.insert("next", 0i64.to_be_bytes().as_slice())?;
        meta.insert("events_next", 0i64.to_be_bytes().as_slice())?;
        meta.remove(REBUILD_KEY)?;
    }
    txn.commit()?;
    Ok(())
}

/// What a restore needs to know of the owner.
pub struct RestoreSpec<'a> {
    pub kafka: &'a KafkaConfig,
    pub config: &'a StateConfig,
    pub metrics: &'a StateMetrics,
    /// The stream's name in paths and metrics (`order`, `saga.order-fulfilment`).
    pub stream: &'a str,
    pub partition: i32,
    pub schema: u32,
    pub changelog: String,
    pub events: String,
    /// Cancelled when the partition is revoked: the restore stops between records.
    pub revoked: &'a tokio_util::sync::CancellationToken,
}

/// Reads one event of a rebuild for a `fold`: its envelope and typed event, checked to be
/// the next of its aggregate, whose version so far `version` answers (0 for a new one).
/// `None` for an event the state has folded already: a changelog record promises only
/// that its states hold every event before its [`EVENTS_NEXT_HEADER`] offset, and also
/// hold their own transaction's events, which lie past it. A gap is an error: the log
/// must be read in order.
pub fn next_event<E: cqrs_es::DomainEvent>(
    message: &rdkafka::message::BorrowedMessage<'_>,
    version: impl FnOnce(&str) -> u64,
) -> anyhow::Result<Option<(crate::EventEnvelope, E)>> {
    let at = || {
        format!(
            "{}/{}/{}",
            message.topic(),
            message.partition(),
            message.offset()
        )
    };
    let envelope: crate::EventEnvelope =
        serde_json::from_slice(message.payload().unwrap_or_default())
            .with_context(|| format!("event at {} is not an envelope", at()))?;
    let version = version(&envelope.aggregate_id);
    if envelope.sequence <= version {
        return Ok(None);
    }
    anyhow::ensure!(
        envelope.sequence == version + 1,
        "sequence gap at {}: {} after {version}",
        at(),
        envelope.sequence
    );
    let event = envelope
        .decode::<E>()
        .with_context(|| format!("event {} at {} does not decode", envelope.event_type, at()))?;
    Ok(Some((envelope, event)))
}

/// Opens the partition's store and brings it up to the changelog's end, then folds any
/// events the changelog does not cover yet (written before changelogs existed, or by a
/// process of an older version) with `fold`, for the caller to [`seed`]. When the
/// changelog cannot be trusted at all (another schema, or `rebuild`), folds every event.
pub async fn restore<S, F>(
    spec: RestoreSpec<'_>,
    index: Option<IndexOf<S>>,
    mut fold: F,
) -> anyhow::Result<Restored<S>>
where
    S: Serialize + DeserializeOwned + Clone + Send + 'static,
    F: FnMut(
        &mut HashMap<String, S>,
        &rdkafka::message::BorrowedMessage<'_>,
    ) -> anyhow::Result<bool>,
{
    let started = Instant::now();
    let prefix = spec.kafka.topic_prefix.as_str();
    let path = store_path(spec.config, prefix, spec.stream, spec.partition);
    let (db, path, temporary) = blocking(|| open_store(&path))?;
    let restoring = spec
        .metrics
        .restoring
        .get_or_create(&StateMetrics::stream(spec.stream))
        .clone();
    restoring.inc();
    let _restoring = scopeguard(move || {
        restoring.dec();
    });

    let (_, changelog_end) = watermarks(spec.kafka, &spec.changelog, spec.partition).await?;
    let meta_i64 = |key: &str| -> anyhow::Result<i64> {
        Ok(meta_get(&db, key)?
            .map(|b| i64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
            .unwrap_or(0))
    };
    let stored_log = meta_get(&db, "log")?;
    let stored_schema =
        meta_get(&db, "schema")?.map(|b| u32::from_be_bytes(b.try_into().unwrap_or([0; 4])));
    let mut next = meta_i64("next")?;
    let mut events_next = meta_i64("events_next")?;
    let stored_format = meta_get(&db, "format")?;
    // Asked for (`tally rebuild-state`), or by an owner that met a state it cannot decode.
    let undecodable = meta_get(&db, REBUILD_KEY)?.is_some();
    let rebuild = spec.config.rebuild || undecodable;
    let trusted = stored_log.as_deref() == Some(spec.config.log_id.as_bytes())
        && stored_format.as_deref() == Some(STORE_FORMAT.to_be_bytes().as_slice())
        && stored_schema == Some(spec.schema)
        && next <= changelog_end
        && !rebuild;
    if !trusted {
        if next > 0 {
            info!(stream = spec.stream, partition = spec.partition, store = %path.display(), "local state store is for another log, schema or position; restoring from the changelog");
        }
        blocking(|| reset(&db, &spec.config.log_id, spec.schema))?;
        next = 0;
        events_next = 0;
    }
    let from = next;

    // Read the changelog's tail into the store, a chunk per store transaction.
    let restored = spec.metrics.restored(spec.stream, "changelog");
    let mut chunk = Chunk::default();
    let mut stale_since_seed = false;
    // While a state of another schema is pending, the stored changelog position stays
    // before it: a crash then restores it (and rebuilds) again rather than skip it.
    let mut stale_at: Option<i64> = None;
    let mut records = 0u64;
    let mut last_log = Instant::now();
    let end = if rebuild {
        changelog_end
    } else {
        read_partition(
            spec.kafka,
            &spec.changelog,
            spec.partition,
            from,
            |message| {
                let key = String::from_utf8_lossy(message.key().unwrap_or_default());
                let header = |name: &str| {
                    message
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == name))
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| v.parse::<i64>().ok())
                };
                let schema = header(SCHEMA_HEADER);
                if let Some(at) = header(EVENTS_NEXT_HEADER) {
                    events_next = events_next.max(at);
                }
                if spec.revoked.is_cancelled() {
                    anyhow::bail!("partition revoked while restoring");
                }
                if key == SEED_KEY {
                    // Everything before a seed of this schema is superseded by it.
                    if schema == Some(i64::from(spec.schema)) {
                        stale_since_seed = false;
                        stale_at = None;
                    }
                    return Ok(());
                }
                if message.payload().is_some() && schema != Some(i64::from(spec.schema)) {
                    stale_since_seed = true;
                    stale_at.get_or_insert(message.offset());
                }
                // The index needs the state decoded; nothing else here does.
                let indexed = match (index, message.payload()) {
                    (Some(index_of), Some(bytes)) if schema == Some(i64::from(spec.schema)) => {
                        match serde_json::from_slice::<S>(bytes) {
                            Ok(state) => index_of(&state),
                            Err(error) => {
                                // Not a state this version can use: rebuild from the
                                // events rather than retry a restore that cannot succeed.
                                warn!(stream = spec.stream, partition = spec.partition, offset = message.offset(), key = %key, %error, "a changelog state does not decode; the partition's state will be folded again from its events");
                                stale_since_seed = true;
                                stale_at.get_or_insert(message.offset());
                                None
                            }
                        }
                    }
                    _ => None,
                };
                chunk.push(&key, message.payload(), indexed);
                records += 1;
                if chunk.len() >= RESTORE_CHUNK {
                    let next = stale_at.unwrap_or(message.offset() + 1);
                    blocking(|| chunk.write(&db, index.is_some(), next, events_next))?;
                    restored.inc_by(RESTORE_CHUNK as u64);
                }
                if records % 4096 == 0 && last_log.elapsed() >= Duration::from_secs(2) {
                    last_log = Instant::now();
                    info!(
                        stream = spec.stream,
                        partition = spec.partition,
                        offset = message.offset(),
                        end = changelog_end,
                        records,
                        "restoring state from the changelog"
                    );
                }
                Ok(())
            },
        )
        .await
        .with_context(|| {
            format!(
                "restoring {}/{} from its changelog",
                spec.changelog, spec.partition
            )
        })?
    };
    restored.inc_by(chunk.len() as u64);
    let next = stale_at.unwrap_or(end);
    blocking(|| chunk.write(&db, index.is_some(), next, events_next))?;
    drop(chunk);

    let mut cache = LruCache::new(
        NonZeroUsize::new(spec.config.cache_entries.max(1)).unwrap_or(NonZeroUsize::MIN),
    );
    let stream = StateMetrics::stream(spec.stream);
    let mut state = PartitionState {
        db,
        path,
        cache: LruCache::new(NonZeroUsize::MIN),
        hits: spec.metrics.hits.get_or_create(&stream).clone(),
        misses: spec.metrics.misses.get_or_create(&stream).clone(),
        cached: spec.metrics.cached.get_or_create(&stream).clone(),
        last_durable: Instant::now(),
        undurable: 1,
        temporary,
        index,
        events_next,
    };

    // Fold what the changelog does not cover: every event when it cannot be trusted,
    // else the events past the last one its states have folded.
    let full = stale_since_seed || rebuild;
    if full {
        let why = if spec.config.rebuild {
            "asked to rebuild state"
        } else if undecodable {
            "a state in the local store did not decode"
        } else {
            "the changelog holds states of another schema version, or that do not decode"
        };
        warn!(
            stream = spec.stream,
            partition = spec.partition,
            reason = why,
            "folding every event of the partition to rebuild its state"
        );
        spec.metrics.rebuilds.get_or_create(&stream).inc();
        blocking(|| reset(&state.db, &spec.config.log_id, spec.schema))?;
        state.events_next = 0;
    }
    let (_, events_end) = watermarks(spec.kafka, &spec.events, spec.partition).await?;
    let mut states: HashMap<String, S> = HashMap::new();
    // The states an event changed (not every one read to check an event against).
    let mut changed: HashSet<String> = HashSet::new();
    let mut folded = 0u64;
    // One offset past what the states folded is the commit marker of their last
    // transaction: nothing to read. (Events of an older writer, or an aborted transaction,
    // take at least two: a record and its marker.)
    if state.events_next + 1 < events_end {
        let from_events = spec.metrics.restored(spec.stream, "events");
        let reached = read_partition(
            spec.kafka,
            &spec.events,
            spec.partition,
            state.events_next,
            |message| {
                let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
                if !full && !states.contains_key(&key) {
                    if let Some(before) = state.get(&key)? {
                        states.insert(key.clone(), before);
                    }
                }
                if spec.revoked.is_cancelled() {
                    anyhow::bail!("partition revoked while restoring");
                }
                if last_log.elapsed() >= Duration::from_secs(2) {
                    last_log = Instant::now();
                    info!(
                        stream = spec.stream,
                        partition = spec.partition,
                        offset = message.offset(),
                        end = events_end,
                        folded,
                        "folding events the changelog does not cover"
                    );
                }
                // Counted only when it changed a state: the last transactions' own events
                // are read again and skipped.
                if fold(&mut states, message)? {
                    from_events.inc();
                    folded += 1;
                    changed.insert(key);
                }
                Ok(())
            },
        )
        .await
        .with_context(|| format!("folding {}/{}", spec.events, spec.partition))?;
        state.events_next = reached;
    }
    // The last transactions' own events are read again and found folded already; only
    // states an event changed go to the changelog.
    states.retain(|id, _| changed.contains(id));
    if !full && !states.is_empty() {
        warn!(stream = spec.stream, partition = spec.partition, events = folded, aggregates = states.len(), "events past what the changelog covers (a log written before changelogs, or by an older version); folded and written to the changelog");
    }
    let to_seed = (full || !states.is_empty()).then(|| Seed {
        states,
        events_next: state.events_next,
        full,
    });
    std::mem::swap(&mut state.cache, &mut cache);
    // The one-entry cache used while folding is gone: so is what it counted.
    state.cached.dec_by(cache.len() as i64);
    info!(
        stream = spec.stream,
        partition = spec.partition,
        from,
        end,
        records,
        events_folded = folded,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "partition state restored"
    );
    Ok(Restored { state, to_seed })
}

/// Changelog records on their way to the store, written a chunk per store transaction.
/// Keys and states sit in one buffer that the next chunk reuses: no allocation per
/// record, and no fresh memory for the allocator to fault in after the first chunk.
#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    entries: Vec<ChunkEntry>,
}

/// One record of a [`Chunk`]: its key and its state (`None`: deleted) in the chunk's
/// buffer, and its index value.
type ChunkEntry = (Range<usize>, Option<Range<usize>>, Option<i64>);

impl Chunk {
    fn push(&mut self, key: &str, state: Option<&[u8]>, indexed: Option<i64>) {
        let mut put = |b: &[u8]| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(b);
            start..self.bytes.len()
        };
        let key = put(key.as_bytes());
        let state = state.map(put);
        self.entries.push((key, state, indexed));
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Writes the chunk in one store transaction with the changelog position it reaches,
    /// and empties it. `indexed`: the owner keeps an index (else its table is left alone).
    fn write(
        &mut self,
        db: &Database,
        indexed: bool,
        next: i64,
        events_next: i64,
    ) -> anyhow::Result<()> {
        let bytes = &self.bytes;
        let key = |r: &Range<usize>| std::str::from_utf8(&bytes[r.clone()]);
        // In key order, each page of a B-tree larger than the store's cache is read and
        // written once per chunk, not once per record (random ids otherwise thrash it: 4x
        // slower). The sort is stable, so a key's later record still wins.
        self.entries
            .sort_by(|a, b| bytes[a.0.clone()].cmp(&bytes[b.0.clone()]));
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::None);
        {
            let mut states = txn.open_table(STATES)?;
            let mut index = indexed.then(|| txn.open_table(INDEX)).transpose()?;
            for (k, state, value) in &self.entries {
                let k = key(k)?;
                match state {
                    Some(s) => states.insert(k, &bytes[s.clone()])?,
                    None => states.remove(k)?,
                };
                match (&mut index, value) {
                    (Some(index), Some(v)) => index.insert(k, *v)?,
                    (Some(index), None) => index.remove(k)?,
                    (None, _) => None,
                };
            }
            let mut meta = txn.open_table(META)?;
            meta.insert("next", next.to_be_bytes().as_slice())?;
            meta.insert("events_next", events_next.to_be_bytes().as_slice())?;
        }
        txn.commit()?;
        self.bytes.clear();
        self.entries.clear();
        Ok(())
    }
}

/// Runs blocking store work on this thread, telling a multi-threaded runtime to move its
/// other tasks elsewhere meanwhile (a current-thread runtime, as in tests, just runs it).
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(path: &Path) -> PartitionState<u64> {
        let (db, path, temporary) = open_store(path).unwrap();
        PartitionState {
            db,
            path,
            cache: LruCache::new(NonZeroUsize::MIN),
            hits: Counter::default(),
            misses: Counter::default(),
            cached: Gauge::default(),
            last_durable: Instant::now(),
            undurable: 0,
            temporary,
            index: None,
            events_next: 0,
        }
    }

    fn kept(id: u128, expires_ms: i64) -> Kept {
        Kept {
            id,
            expires_ms,
            bytes: format!("outcome {id}").into_bytes(),
        }
    }

    #[test]
    fn the_dedup_record_answers_until_it_expires_and_survives_a_reopen_with_its_position() {
        let dir = std::env::temp_dir().join(format!("tally-kept-{}", uuid::Uuid::new_v4()));
        let path = dir.join("p0.redb");
        {
            let mut s = store(&path);
            assert_eq!(s.kept_next("outcomes").unwrap(), 0);
            s.keep(vec![kept(1, 1_000), kept(2, 2_000)], "outcomes", Some(7))
                .unwrap();
            s.keep(vec![kept(3, 3_000)], "results", Some(4)).unwrap();
            // Read again with an earlier expiry (another topic's shorter window): the
            // later one holds.
            s.keep(vec![kept(2, 1_200)], "results", None).unwrap();
            assert_eq!(s.kept_next("results").unwrap(), 4, "no position: unchanged");
            assert_eq!(s.kept(1, 500).unwrap(), Some(b"outcome 1".to_vec()));
            assert_eq!(s.kept(1, 1_001).unwrap(), None, "expired: not an answer");
            assert_eq!(s.kept(9, 0).unwrap(), None);
        }
        // Reopened (a restart of the process): the entries and each topic's position.
        let mut s = store(&path);
        assert_eq!(s.kept_next("outcomes").unwrap(), 7);
        assert_eq!(s.kept_next("results").unwrap(), 4);
        assert_eq!(s.kept(2, 1_500).unwrap(), Some(b"outcome 2".to_vec()));
        // Kept again with a later expiry (read again from its topic): the later one holds.
        s.keep(vec![kept(1, 5_000)], "outcomes", Some(8)).unwrap();
        assert_eq!(s.sweep(2_500, 10).unwrap(), 1, "only 2 had expired by then");
        assert_eq!(s.kept(2, 0).unwrap(), None, "swept");
        assert!(s.kept(1, 4_000).unwrap().is_some());
        assert_eq!(s.sweep(10_000, 1).unwrap(), 1, "a sweep stops at its limit");
        assert_eq!(s.sweep(10_000, 10).unwrap(), 1);
        // Forgotten (the topic was recreated): nothing answers, every position is 0.
        s.keep(vec![kept(4, 9_000)], "results", Some(9)).unwrap();
        s.forget_kept().unwrap();
        assert_eq!(s.kept(4, 0).unwrap(), None);
        assert_eq!(s.kept_next("outcomes").unwrap(), 0);
        assert_eq!(s.kept_next("results").unwrap(), 0);
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }
}
