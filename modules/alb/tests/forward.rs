//! The ALB's caching forward proxy between curl (as devices use it: `curl -x ALB URL`) and a
//! file server written here: 50 clients of one file cost one upstream download and get the
//! same bytes, a download cut midway leaves nothing cached and the next request recovers,
//! `retry_caching` replaces a damaged entry, `no_cache` bypasses, a wrong digest is caught,
//! entries survive a restart, eviction keeps the cache within its budget, and a chain of two
//! proxies passes the cache directives on.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use marchproxy_testkit::{eventually, external::require, http_request};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

mod common;
use common::{Alb, DEADLINE, ROOMY_CACHE};

/// What the file server was asked, per path: requests and the headers of the last one.
#[derive(Default)]
struct Seen {
    requests: HashMap<String, usize>,
    headers: HashMap<String, hyper::HeaderMap>,
}

/// Files by path; each answer streams in 64 KiB pieces with a pause between them (so many
/// clients overlap one download). `/cut/*` paths send half their bytes, then drop the
/// connection, the first time they are asked.
struct FileServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl FileServer {
    async fn start(files: HashMap<String, Bytes>) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (files, counted) = (Arc::new(files), Arc::clone(&seen));
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (files, counted) = (Arc::clone(&files), Arc::clone(&counted));
                let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                    let (files, counted) = (Arc::clone(&files), Arc::clone(&counted));
                    async move {
                        Ok::<_, std::convert::Infallible>(serve_file(&files, &counted, request))
                    }
                });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FileServer { addr, seen, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .requests
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    fn last_headers(&self, path: &str) -> hyper::HeaderMap {
        self.seen.lock().unwrap().headers[path].clone()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Piece = Result<hyper::body::Frame<Bytes>, std::io::Error>;

fn serve_file(
    files: &HashMap<String, Bytes>,
    seen: &Mutex<Seen>,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::StreamBody<futures_util::stream::BoxStream<'static, Piece>>> {
    let path = request.uri().path().to_owned();
    let count = {
        let mut seen = seen.lock().unwrap();
        seen.headers.insert(path.clone(), request.headers().clone());
        let count = seen.requests.entry(path.clone()).or_default();
        *count += 1;
        *count
    };
    let Some(file) = files.get(&path).cloned() else {
        let body = futures_util::stream::iter([Ok(hyper::body::Frame::data(Bytes::from_static(
            b"no such file",
        )))]);
        let mut response =
            hyper::Response::new(http_body_util::StreamBody::new(Box::pin(body) as _));
        *response.status_mut() = hyper::StatusCode::NOT_FOUND;
        return response;
    };
    let cut = path.starts_with("/cut/") && count == 1;
    let sent = if cut {
        file.slice(..file.len() / 2)
    } else {
        file.clone()
    };
    let pieces: Vec<Bytes> = (0..sent.len())
        .step_by(64 * 1024)
        .map(|at| sent.slice(at..(at + 64 * 1024).min(sent.len())))
        .collect();
    let stream =
        futures_util::stream::unfold((pieces.into_iter(), cut), |(mut pieces, cut)| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            match pieces.next() {
                Some(piece) => Some((Ok(hyper::body::Frame::data(piece)), (pieces, cut))),
                None if cut => Some((
                    Err(std::io::Error::other("cut on purpose")),
                    (pieces, false),
                )),
                None => None,
            }
        });
    let mut response = hyper::Response::new(http_body_util::StreamBody::new(Box::pin(stream) as _));
    let headers = response.headers_mut();
    headers.insert("content-length", file.len().into());
    headers.insert("content-type", "application/x-update".parse().unwrap());
    headers.insert("x-internal", "not for devices".parse().unwrap());
    response
}

fn content(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// curl through the proxy: its output (`-D` headers kept apart) and exit status.
struct Fetched {
    status: Option<i32>,
    code: u16,
    headers: String,
    body: Vec<u8>,
}

async fn curl_via(proxy: SocketAddr, url: &str, headers: &[&str], out: &Path) -> Fetched {
    let head = out.with_extension("head");
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["-s", "-x", &format!("http://{proxy}"), "-o"])
        .arg(out)
        .arg("-D")
        .arg(&head)
        .args(["-w", "%{http_code}", "--max-time", "60"]);
    for header in headers {
        command.args(["-H", header]);
    }
    let Output { status, stdout, .. } = command.arg(url).output().await.expect("curl runs");
    Fetched {
        status: status.code(),
        code: String::from_utf8_lossy(&stdout).trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&head)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        body: std::fs::read(out).unwrap_or_default(),
    }
}

fn cached_files(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache.join("data"))
        .map(|dir| dir.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

fn cached_bytes(cache: &Path) -> u64 {
    cached_files(cache)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

async fn start_proxy(dir: &Path, name: &str, args: &[&str]) -> Alb {
    let run = dir.join(name);
    std::fs::create_dir_all(&run).unwrap();
    Alb::start(&run, "", args, None).await
}

#[tokio::test]
async fn one_download_feeds_many_devices_and_the_cache_recovers_from_failures() {
    require("curl", "curl --version", "sudo apt-get install -y curl");
    let big = content(16 << 20, 1);
    let (digested, wrong) = (content(300_000, 2), content(1000, 3));
    let files: HashMap<String, Bytes> = [
        ("/big.bin".to_owned(), big.clone()),
        ("/cut/part.bin".to_owned(), content(2 << 20, 4)),
        ("/digested.bin".to_owned(), digested.clone()),
        ("/wrong.bin".to_owned(), wrong.clone()),
    ]
    .into();
    let cut_source = files["/cut/part.bin"].clone();
    let upstream = FileServer::start(files).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_arg = cache.to_str().unwrap().to_owned();
    let alb = start_proxy(
        dir.path(),
        "first",
        &["--cache-dir", &cache_arg, "--cache-max-bytes", ROOMY_CACHE],
    )
    .await;

    // 50 devices at once: one upstream request, the same bytes for all.
    let url = upstream.url("/big.bin");
    let fetches: Vec<_> = (0..50)
        .map(|i| {
            let (out, url, proxy) = (dir.path().join(format!("big-{i}")), url.clone(), alb.http);
            tokio::spawn(async move { curl_via(proxy, &url, &[], &out).await })
        })
        .collect();
    let want = sha256_hex(&big);
    for fetch in fetches {
        let fetched = fetch.await.unwrap();
        assert_eq!(
            (fetched.status, fetched.code),
            (Some(0), 200),
            "{}",
            fetched.headers
        );
        assert_eq!(
            sha256_hex(&fetched.body),
            want,
            "identical bytes for every client"
        );
        assert!(
            fetched
                .headers
                .contains("content-type: application/x-update"),
            "{}",
            fetched.headers
        );
        assert!(
            !fetched.headers.contains("x-internal"),
            "upstream-only headers stay behind"
        );
    }
    assert_eq!(
        upstream.requests("/big.bin"),
        1,
        "one upstream download for 50 clients"
    );
    let joined = alb
        .metric("alb_forward_requests_total", "outcome=\"joined\"")
        .await
        .unwrap_or(0.0);
    assert!(
        joined >= 1.0,
        "concurrent clients joined the download ({joined})"
    );

    // Cached: served again without upstream; only Authorization and Cookie go upstream.
    let again = curl_via(alb.http, &url, &[], &dir.path().join("big-again")).await;
    assert_eq!(sha256_hex(&again.body), want);
    assert_eq!(upstream.requests("/big.bin"), 1);
    let bypass = curl_via(
        alb.http,
        &url,
        &[
            "Ota-File-Cache-Control: no_cache",
            "Authorization: Bearer device-7",
            "Cookie: session=1",
            "X-Device: 7",
        ],
        &dir.path().join("big-bypass"),
    )
    .await;
    assert_eq!(sha256_hex(&bypass.body), want);
    assert_eq!(upstream.requests("/big.bin"), 2, "no_cache goes upstream");
    let sent = upstream.last_headers("/big.bin");
    assert_eq!(sent["authorization"], "Bearer device-7");
    assert_eq!(sent["cookie"], "session=1");
    assert!(
        !sent.contains_key("x-device") && !sent.contains_key("ota-file-cache-control"),
        "{sent:?}"
    );

    // Cut midway: the client sees a broken transfer, nothing is cached, the next one works.
    let url = upstream.url("/cut/part.bin");
    let entries = cached_files(&cache).len();
    let broken = curl_via(alb.http, &url, &[], &dir.path().join("cut-1")).await;
    assert_ne!(
        broken.status,
        Some(0),
        "a cut download is an error for its client"
    );
    assert!(broken.body.len() < cut_source.len());
    eventually("the failed fill cleaned up", DEADLINE, || async {
        std::fs::read_dir(cache.join("tmp")).unwrap().count() == 0
    })
    .await;
    assert_eq!(
        cached_files(&cache).len(),
        entries,
        "no partial entry committed"
    );
    let recovered = curl_via(alb.http, &url, &[], &dir.path().join("cut-2")).await;
    assert_eq!(
        (recovered.status, sha256_hex(&recovered.body)),
        (Some(0), sha256_hex(&cut_source))
    );
    assert_eq!(upstream.requests("/cut/part.bin"), 2);

    // A digest-keyed entry: echoed back on a hit; damaged on disk, retry_caching replaces it.
    let digest = sha256_hex(&digested);
    let directive =
        format!("Ota-File-Cache-Control: file_sha256={digest},file_compression_alg=zst");
    let url = upstream.url("/digested.bin");
    let first = curl_via(alb.http, &url, &[&directive], &dir.path().join("d-1")).await;
    assert_eq!(sha256_hex(&first.body), digest);
    let hit = curl_via(alb.http, &url, &[&directive], &dir.path().join("d-2")).await;
    assert!(
        hit.headers.contains(&format!(
            "ota-file-cache-control: file_sha256={digest},file_compression_alg=zst"
        )),
        "{}",
        hit.headers
    );
    assert_eq!(upstream.requests("/digested.bin"), 1);
    let entry = cache.join("data").join(&digest);
    std::fs::write(&entry, vec![0u8; digested.len()]).unwrap();
    let damaged = curl_via(alb.http, &url, &[&directive], &dir.path().join("d-3")).await;
    assert_ne!(
        sha256_hex(&damaged.body),
        digest,
        "the damaged entry is what the device sees"
    );
    let retry = format!("{directive},retry_caching");
    let repaired = curl_via(alb.http, &url, &[&retry], &dir.path().join("d-4")).await;
    assert_eq!(sha256_hex(&repaired.body), digest);
    assert_eq!(upstream.requests("/digested.bin"), 2);
    let after = curl_via(alb.http, &url, &[&directive], &dir.path().join("d-5")).await;
    assert_eq!(sha256_hex(&after.body), digest);
    assert_eq!(
        upstream.requests("/digested.bin"),
        2,
        "the replaced entry is served"
    );

    // A file that does not match its digest is never committed; its client gets an error.
    let claimed = format!(
        "Ota-File-Cache-Control: file_sha256={}",
        sha256_hex(b"something else")
    );
    let url = upstream.url("/wrong.bin");
    for attempt in 1..=2 {
        let mismatch = curl_via(
            alb.http,
            &url,
            &[&claimed],
            &dir.path().join(format!("w-{attempt}")),
        )
        .await;
        assert_ne!(
            mismatch.status,
            Some(0),
            "a digest mismatch ends the transfer with an error"
        );
    }
    assert_eq!(
        upstream.requests("/wrong.bin"),
        2,
        "nothing was cached under the wrong digest"
    );

    // Bad requests and upstream failures, each with its status.
    let (status, body) = http_request(alb.http, "POST", &upstream.url("/big.bin"), &[], b"x").await;
    assert_eq!(status, 400, "{body}");
    let own = format!("http://{}/", alb.http);
    let (status, body) = http_request(alb.http, "GET", &own, &[], b"").await;
    assert_eq!(status, 400, "{body}");
    let missing = curl_via(
        alb.http,
        &upstream.url("/missing"),
        &[],
        &dir.path().join("missing"),
    )
    .await;
    assert_eq!(missing.code, 404, "upstream statuses pass through");
    let closed = format!(
        "http://127.0.0.1:{}/x",
        marchproxy_testkit::external::free_port()
    );
    let unreachable = curl_via(alb.http, &closed, &[], &dir.path().join("closed")).await;
    assert_eq!(unreachable.code, 502);

    // A restart keeps the entries.
    drop(alb);
    let alb = start_proxy(
        dir.path(),
        "second",
        &["--cache-dir", &cache_arg, "--cache-max-bytes", ROOMY_CACHE],
    )
    .await;
    let restarted = curl_via(
        alb.http,
        &upstream.url("/big.bin"),
        &[],
        &dir.path().join("big-restart"),
    )
    .await;
    assert_eq!(sha256_hex(&restarted.body), want);
    assert_eq!(
        upstream.requests("/big.bin"),
        2,
        "served from the cache kept across the restart"
    );
}

#[tokio::test]
async fn eviction_keeps_the_budget_and_a_chained_proxy_shares_its_cache() {
    require("curl", "curl --version", "sudo apt-get install -y curl");
    let files: HashMap<String, Bytes> = (0..5)
        .map(|i| (format!("/f{i}.bin"), content(1 << 20, 10 + i)))
        .collect();
    let upstream = FileServer::start(files.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (upper_cache, edge_cache) = (
        dir.path().join("upper-cache"),
        dir.path().join("edge-cache"),
    );
    let budget = 3 << 20;
    let upper = start_proxy(
        dir.path(),
        "upper",
        &[
            "--cache-dir",
            upper_cache.to_str().unwrap(),
            "--cache-max-bytes",
            &budget.to_string(),
        ],
    )
    .await;
    let upper_url = format!("http://{}", upper.http);
    let edge = start_proxy(
        dir.path(),
        "edge",
        &[
            "--cache-dir",
            edge_cache.to_str().unwrap(),
            "--cache-max-bytes",
            ROOMY_CACHE,
            "--upper-proxy",
            &upper_url,
        ],
    )
    .await;

    for i in 0..5 {
        let path = format!("/f{i}.bin");
        let digest = sha256_hex(&files[&path]);
        let directive = format!("Ota-File-Cache-Control: file_sha256={digest}");
        let fetched = curl_via(
            edge.http,
            &upstream.url(&path),
            &[&directive],
            &dir.path().join(format!("f{i}")),
        )
        .await;
        assert_eq!(sha256_hex(&fetched.body), digest);
        assert!(
            upstream
                .last_headers(&path)
                .get("ota-file-cache-control")
                .is_none(),
            "the upper proxy is the last in the chain"
        );
        let upper_bytes = cached_bytes(&upper_cache);
        assert!(
            upper_bytes * 100 <= budget * 75,
            "the upper cache holds {upper_bytes} bytes, over 75 % of its {budget}-byte budget"
        );
    }
    // The upper proxy cached under the digest the edge passed on; the oldest went first.
    assert!(
        upper_cache
            .join("data")
            .join(sha256_hex(&files["/f4.bin"]))
            .exists()
    );
    assert!(
        !upper_cache
            .join("data")
            .join(sha256_hex(&files["/f0.bin"]))
            .exists()
    );
    assert_eq!(
        cached_files(&edge_cache).len(),
        5,
        "the edge's own budget is far above what it holds"
    );
    // Asked of the upper proxy directly: the evicted file is fetched anew, the newest is a hit.
    for (path, upstream_requests) in [("/f0.bin", 2), ("/f4.bin", 1)] {
        let digest = sha256_hex(&files[path]);
        let directive = format!("Ota-File-Cache-Control: file_sha256={digest}");
        let again = curl_via(
            upper.http,
            &upstream.url(path),
            &[&directive],
            &dir.path().join("again"),
        )
        .await;
        assert_eq!(sha256_hex(&again.body), digest);
        assert_eq!(upstream.requests(path), upstream_requests, "{path}");
    }
    let evictions = upper
        .metric("alb_cache_evictions_total", "")
        .await
        .unwrap_or(0.0);
    assert!(evictions >= 2.0, "evictions counted ({evictions})");
}
