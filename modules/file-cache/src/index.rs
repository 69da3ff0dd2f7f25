//! The index of committed entries: size, metadata and recency of each, kept in memory and
//! journaled to `index.jsonl` (one JSON record per line: put, hit, del) so it survives
//! restarts. At start-up the journal is replayed, rows whose file is gone are dropped, files
//! no row names are removed, and the journal is rewritten compactly; it is compacted again
//! whenever it grows well past the number of entries.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    io::{self, BufRead, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// What is stored beside an entry's bytes and given back with them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EntryMeta {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// The compression the file's producer declared (`file_compression_alg`), echoed back.
    pub compression: Option<String>,
    /// Where the bytes came from, for operators reading the index.
    pub url: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Record {
    Put {
        key: String,
        size: u64,
        at: u64,
        #[serde(flatten)]
        meta: EntryMeta,
    },
    Hit {
        key: String,
        at: u64,
    },
    Del {
        key: String,
    },
}

struct Entry {
    size: u64,
    meta: Arc<EntryMeta>,
    /// Seconds since the epoch of the last use, kept across restarts.
    used_at: u64,
    /// Position in `by_recency`: the smallest is the least recently used.
    rank: u64,
}

pub(crate) struct Index {
    entries: HashMap<String, Entry>,
    by_recency: BTreeMap<u64, String>,
    next_rank: u64,
    bytes: u64,
    journal: fs::File,
    journal_path: PathBuf,
    journal_records: usize,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Index {
    /// Loads the journal under `dir` and reconciles it with the files in `data`.
    pub fn load(dir: &Path, data: &Path) -> io::Result<Index> {
        let journal_path = dir.join("index.jsonl");
        // Replayed in order; a torn last line (a crash mid-write) is skipped.
        let mut replayed: HashMap<String, (u64, u64, EntryMeta, usize)> = HashMap::new();
        let mut skipped = 0usize;
        if let Ok(file) = fs::File::open(&journal_path) {
            for (line_number, line) in io::BufReader::new(file).split(b'\n').enumerate() {
                match serde_json::from_slice::<Record>(&line?) {
                    Ok(Record::Put {
                        key,
                        size,
                        at,
                        meta,
                    }) => {
                        replayed.insert(key, (size, at, meta, line_number));
                    }
                    Ok(Record::Hit { key, at }) => {
                        if let Some(row) = replayed.get_mut(&key) {
                            row.1 = at;
                            row.3 = line_number;
                        }
                    }
                    Ok(Record::Del { key }) => {
                        replayed.remove(&key);
                    }
                    Err(_) => skipped += 1,
                }
            }
        }
        let mut gone = 0usize;
        replayed.retain(|key, (size, ..)| {
            let intact =
                fs::metadata(data.join(key)).is_ok_and(|m| m.is_file() && m.len() == *size);
            gone += usize::from(!intact);
            intact
        });
        let named: HashSet<&str> = replayed.keys().map(String::as_str).collect();
        let mut orphans = 0usize;
        for file in fs::read_dir(data)? {
            let file = file?;
            let name = file.file_name();
            if !name.to_str().is_some_and(|name| named.contains(name)) {
                orphans += 1;
                let _ = fs::remove_file(file.path());
            }
        }
        let mut rows: Vec<_> = replayed.into_iter().collect();
        rows.sort_by_key(|(_, (_, at, _, line))| (*at, *line));
        let mut index = Index {
            entries: HashMap::with_capacity(rows.len()),
            by_recency: BTreeMap::new(),
            next_rank: 0,
            bytes: 0,
            // Replaced by the compacted journal below.
            journal: fs::File::options()
                .create(true)
                .append(true)
                .open(&journal_path)?,
            journal_path,
            journal_records: 0,
        };
        for (key, (size, used_at, meta, _)) in rows {
            index.remember(key, size, Arc::new(meta), used_at);
        }
        index.compact()?;
        if skipped + gone + orphans > 0 {
            warn!(
                skipped_records = skipped,
                entries_without_file = gone,
                files_without_entry = orphans,
                "cache index repaired"
            );
        }
        info!(entries = index.entries.len(), bytes = index.bytes, dir = %dir.display(), "cache index loaded");
        Ok(index)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn remember(&mut self, key: String, size: u64, meta: Arc<EntryMeta>, used_at: u64) {
        let rank = self.next_rank;
        self.next_rank += 1;
        self.by_recency.insert(rank, key.clone());
        self.bytes += size;
        if let Some(old) = self.entries.insert(
            key,
            Entry {
                size,
                meta,
                used_at,
                rank,
            },
        ) {
            self.by_recency.remove(&old.rank);
            self.bytes -= old.size;
        }
    }

    /// The entry's size and metadata, now the most recently used.
    pub fn touch(&mut self, key: &str) -> Option<(u64, Arc<EntryMeta>)> {
        let rank = self.next_rank;
        let entry = self.entries.get_mut(key)?;
        self.by_recency.remove(&entry.rank);
        self.by_recency.insert(rank, key.to_owned());
        self.next_rank += 1;
        entry.rank = rank;
        let (size, meta) = (entry.size, Arc::clone(&entry.meta));
        // Recency survives restarts to the second; more hits within one add nothing to keep.
        let at = now();
        if entry.used_at != at {
            entry.used_at = at;
            self.append(&Record::Hit {
                key: key.to_owned(),
                at,
            });
        }
        Some((size, meta))
    }

    pub fn insert(&mut self, key: &str, size: u64, meta: Arc<EntryMeta>) {
        let at = now();
        let record = Record::Put {
            key: key.to_owned(),
            size,
            at,
            meta: (*meta).clone(),
        };
        // Remembered first: a compaction the record sets off must include the entry.
        self.remember(key.to_owned(), size, meta, at);
        self.append(&record);
    }

    /// Forgets the entry; its size when there was one.
    pub fn remove(&mut self, key: &str) -> Option<u64> {
        let entry = self.entries.remove(key)?;
        self.by_recency.remove(&entry.rank);
        self.bytes -= entry.size;
        self.append(&Record::Del {
            key: key.to_owned(),
        });
        Some(entry.size)
    }

    /// The least recently used entry.
    pub fn oldest(&self) -> Option<&str> {
        self.by_recency.values().next().map(String::as_str)
    }

    fn append(&mut self, record: &Record) {
        let mut line = serde_json::to_vec(record).unwrap_or_default();
        line.push(b'\n');
        if let Err(error) = self.journal.write_all(&line) {
            warn!(%error, journal = %self.journal_path.display(), "cache index not written; entries made now are forgotten at restart");
        }
        self.journal_records += 1;
        if self.journal_records > 2 * self.entries.len() + 10_000 {
            if let Err(error) = self.compact() {
                warn!(%error, journal = %self.journal_path.display(), "cache index not compacted");
            }
        }
    }

    /// Rewrites the journal as one `put` per entry (oldest first) and swaps it in atomically.
    fn compact(&mut self) -> io::Result<()> {
        let fresh = self.journal_path.with_extension("jsonl.new");
        let mut out = io::BufWriter::new(fs::File::create(&fresh)?);
        for key in self.by_recency.values() {
            let entry = &self.entries[key];
            serde_json::to_writer(
                &mut out,
                &Record::Put {
                    key: key.clone(),
                    size: entry.size,
                    at: entry.used_at,
                    meta: (*entry.meta).clone(),
                },
            )?;
            out.write_all(b"\n")?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&fresh, &self.journal_path)?;
        self.journal = fs::File::options().append(true).open(&self.journal_path)?;
        self.journal_records = self.entries.len();
        Ok(())
    }
}
