//! One client's read of an entry: a committed file, or a download still being written (then it
//! follows the fill's progress and ends with the fill's error if it fails). Reads are
//! positional, so any number of readers share one open file.

use std::{fs, os::unix::fs::FileExt, sync::Arc};

use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::watch;

use crate::{EntryMeta, Progress};

/// Bytes read per step.
const READ_CHUNK: u64 = 1024 * 1024;

/// Why a read ended early.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the download being cached failed: {0}")]
    Download(Arc<str>),
    #[error("the download being cached stopped without a verdict")]
    Stopped,
    #[error("reading the cache file: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Reader {
    file: Arc<fs::File>,
    meta: Arc<EntryMeta>,
    len: Option<u64>,
    offset: u64,
    /// Following a download; `None` for a committed entry of `len` bytes.
    progress: Option<watch::Receiver<Progress>>,
}

impl Reader {
    pub(crate) fn committed(file: fs::File, size: u64, meta: Arc<EntryMeta>) -> Reader {
        Reader {
            file: Arc::new(file),
            meta,
            len: Some(size),
            offset: 0,
            progress: None,
        }
    }

    pub(crate) fn download(
        file: Arc<fs::File>,
        meta: Arc<EntryMeta>,
        len: Option<u64>,
        progress: watch::Receiver<Progress>,
    ) -> Reader {
        Reader {
            file,
            meta,
            len,
            offset: 0,
            progress: Some(progress),
        }
    }

    pub fn meta(&self) -> &EntryMeta {
        &self.meta
    }

    /// The whole size, when known (always for a committed entry).
    pub fn size(&self) -> Option<u64> {
        self.len
    }

    /// Whether this reads a committed entry (a cache hit).
    pub fn is_committed(&self) -> bool {
        self.progress.is_none()
    }

    /// How far this reader may read now: waits for the download to go past `offset`.
    async fn readable(&mut self) -> Result<u64, ReadError> {
        let Some(progress) = &mut self.progress else {
            return Ok(self.len.unwrap_or(0));
        };
        let offset = self.offset;
        let state = progress
            .wait_for(|p| match p {
                Progress::Streaming { visible } => *visible > offset,
                _ => true,
            })
            .await
            .map_err(|_| ReadError::Stopped)?
            .clone();
        match state {
            Progress::Streaming { visible } => Ok(visible),
            Progress::Done { size } => Ok(size),
            Progress::Failed(why) => Err(ReadError::Download(why)),
            Progress::Connecting | Progress::Abandoned => Err(ReadError::Stopped),
        }
    }

    /// The next bytes; `None` at the end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, ReadError>> {
        let end = match self.readable().await {
            Ok(end) => end,
            Err(error) => return Some(Err(error)),
        };
        if self.offset >= end {
            return None;
        }
        let (file, offset) = (Arc::clone(&self.file), self.offset);
        let want = (end - offset).min(READ_CHUNK) as usize;
        let read = tokio::task::spawn_blocking(move || {
            let mut buffer = vec![0; want];
            file.read_exact_at(&mut buffer, offset).map(|()| buffer)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match read {
            Ok(buffer) => {
                self.offset += buffer.len() as u64;
                Some(Ok(Bytes::from(buffer)))
            }
            Err(error) => Some(Err(ReadError::Io(error))),
        }
    }

    /// The reader as a stream of chunks, ending with an error if the download fails.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, ReadError>> + Send + 'static {
        futures_util::stream::unfold(self, |mut reader| async move {
            reader.chunk().await.map(|chunk| (chunk, reader))
        })
    }
}
