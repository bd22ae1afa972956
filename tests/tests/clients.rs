//! The client suite (issue #17): every real client this project did not write, publishing and
//! playing in each URL form it takes, with the right credential and a wrong one, against the
//! real worker, control plane, Postgres and NATS. For each run it asserts what the user sees:
//! media (frames, bytes, a file) for the right credential; for the wrong one, the client's own
//! output (the reason where the client prints it) and the refusal in `/v1/decisions` with its
//! reason. README's client × form × result table is this test's table.
//!
//! The app `mx` publishes with one-time tokens (a wrong one: `token_not_found`) and plays with
//! Ant Media's hash (a tampered one: `hash_mismatch`). VLC refuses to run as root: it runs as
//! `nobody` when the suite does.
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

mod cluster;
use cluster::*;

/// A streamid form: (stream, token) → streamid.
type StreamIdForm = fn(&str, &str) -> String;

/// What a client run left: how it ended (`None`: still running at the bound, then killed),
/// the bytes it wrote to stdout, and its stdout and stderr as text (the first 64 KiB).
#[derive(Debug)]
struct Ran {
    status: Option<ExitStatus>,
    stdout_bytes: usize,
    said: String,
}

/// Runs `cmd` until it exits or `bound` passes (then kills it).
fn run_bounded(mut cmd: Command, bound: Duration) -> Ran {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    collect(child, bound)
}

fn collect(mut child: Child, bound: Duration) -> Ran {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    // Read on threads that report through channels: a grandchild still holding a pipe must not
    // hang the suite.
    let (out_tx, out_rx) = std::sync::mpsc::channel();
    let (err_tx, err_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut total, mut head, mut chunk) = (0usize, Vec::new(), [0u8; 65536]);
        while let Ok(n) = out.read(&mut chunk) {
            if n == 0 {
                break;
            }
            total += n;
            if head.len() < 65536 {
                head.extend_from_slice(&chunk[..n.min(65536 - head.len())]);
            }
        }
        let _ = out_tx.send((total, head));
    });
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        let _ = err_tx.send(s);
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() >= bound {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let drained = Duration::from_secs(5);
    let (stdout_bytes, head) = out_rx.recv_timeout(drained).unwrap_or_default();
    let err = err_rx.recv_timeout(drained).unwrap_or_default();
    let said = format!("{}{}", String::from_utf8_lossy(&head), String::from_utf8_lossy(&err));
    Ran { status, stdout_bytes, said }
}

/// gst-launch-1.0 with `pipeline` split at spaces; `\u{1}` stands for a space inside one
/// argument (librtmp's URL options: `location=rtmp://… live=1`).
fn gst(pipeline: &str) -> Command {
    let mut c = Command::new("gst-launch-1.0");
    c.args(pipeline.split_whitespace().map(|a| a.replace('\u{1}', " ")));
    c
}

/// An ffmpeg copying `file` in a loop, in real time, to `url` (`-` for stdout).
fn ffmpeg_loop(file: &str, format: &str, url: &str) -> Command {
    let mut c = Command::new("ffmpeg");
    c.args(["-hide_banner", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", file])
        .args(["-c", "copy", "-f", format, url]);
    c
}

/// srt-live-transmit publishing what ffmpeg sends it on stdin, for at most `bound`.
fn srt_live_transmit_publish(ts: &str, url: &str, bound: Duration) -> (Ran, Child) {
    let mut feed = ffmpeg_loop(ts, "mpegts", "-").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let transmit = Command::new("srt-live-transmit")
        .args(["-a:no", "file://con", url])
        .stdin(Stdio::from(feed.stdout.take().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (collect(transmit, bound), feed)
}

/// The same, in the background, with both processes to kill.
fn srt_live_transmit_publisher(ts: &str, url: &str) -> (Child, Child) {
    let mut feed = ffmpeg_loop(ts, "mpegts", "-").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let transmit = Command::new("srt-live-transmit")
        .args(["-a:no", "file://con", url])
        .stdin(Stdio::from(feed.stdout.take().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (feed, transmit)
}

/// A publisher in the background, quiet (its end, when it is stopped, is expected).
fn background(mut c: Command) -> Child {
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// A progress line, so a stuck client is named in the test's output.
fn step(what: &str) {
    eprintln!("clients: {what}");
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// VLC 3.0 (`cvlc`, as `nobody` when the suite runs as root) playing `url` for 4 s into a TS
/// file in `dir`; what it said and the bytes it recorded. A refused SRT play makes VLC retry
/// for ever: `timeout` ends it.
fn vlc(dir: &Path, name: &str, url: &str) -> (Ran, u64) {
    let out = dir.join(format!("{name}.ts"));
    let home = format!("HOME={}", dir.display());
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--", "timeout", "-s", "KILL", "15", "env", &home, "cvlc"]);
        c
    } else {
        let mut c = Command::new("timeout");
        c.args(["-s", "KILL", "15", "env", &home, "cvlc"]);
        c
    };
    c.args(["-I", "dummy", "--no-video-title-show", "--run-time=4", "--play-and-exit", url])
        .arg("--sout")
        .arg(format!("#std{{access=file,mux=ts,dst={}}}", out.display()));
    let ran = run_bounded(c, Duration::from_secs(25));
    let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    (ran, bytes)
}

/// The refusals of `stream` in the audit, with their reasons.
async fn refusals(http: &reqwest::Client, cp: u16, stream: &str) -> Vec<String> {
    let (_, body) = get(http, format!("http://127.0.0.1:{cp}/v1/decisions?app=mx&stream={stream}&outcome=deny")).await;
    body["decisions"]
        .as_array()
        .map(|a| a.iter().map(|d| d["reason"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

async fn refused_with(http: &reqwest::Client, cp: u16, stream: &str, reason: &str) {
    until(&format!("{stream} refused with {reason} in the audit"), || async {
        refusals(http, cp, stream).await.iter().any(|r| r == reason)
    })
    .await;
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_in_every_form_with_a_right_and_a_wrong_credential() {
    let plane = Plane::start("clients").await;
    let http = plane.http.clone();
    let (cp, dir) = (plane.cp, plane.dir.path().to_owned());
    let policy = json!({"publish": {"methods": ["one_time_token"]}, "play": {"methods": ["hash"]}});
    post(&http, cp, "/v1/apps", json!({"name": "mx", "policy": policy})).await;
    post(&http, cp, "/v1/apps/mx/secrets/hash", json!({"secret": "a-hash-secret-for-clients"})).await;
    let hash = |stream: &'static str| {
        let http = http.clone();
        async move {
            let r = post(&http, cp, &format!("/v1/apps/mx/streams/{stream}/hash"), json!({"action": "play"})).await;
            r["token"].as_str().unwrap().to_owned()
        }
    };
    let flv = media_file(&dir, "flv", 20);
    let ts = media_file(&dir, "mpegts", 20);
    let w = media_worker(&plane, "w1", &[("SLUICE_FAILURE_BACKOFF_AFTER", "0")]);
    ready_at_head(&http, &plane.store, w.admin).await;
    let (rtmp, srt) = (format!("rtmp://127.0.0.1:{}", w.rtmp), format!("srt://127.0.0.1:{}", w.srt));
    // A token reaches the worker through the log: a client handed one at once could be there
    // first (tens of milliseconds at most, longer on a loaded machine); the tests wait for it.
    let (store, admin) = (&plane.store, w.admin);
    let token = |stream: &'static str| {
        let http = http.clone();
        async move {
            let t = one_time_token(&http, cp, "mx", stream, "publish").await;
            ready_at_head(&http, store, admin).await;
            t
        }
    };
    let long = Duration::from_secs(20);

    // ---- Publishing over RTMP ----
    step("ffmpeg 5");
    // ffmpeg 5.1, the token in the stream name's query.
    let t = token("ff-rtmp").await;
    let mut p = background(ffmpeg_loop(&flv, "flv", &format!("{rtmp}/mx/ff-rtmp?token={t}")));
    until_live(&http, cp, "mx", "ff-rtmp").await;
    stop(p);
    let url = format!("{rtmp}/mx/ff-rtmp-x?token=guess");
    let flv2 = flv.clone();
    let ran = blocking(move || run_bounded(ffmpeg_loop(&flv2, "flv", &url), Duration::from_secs(20))).await;
    assert!(ran.status.is_some_and(|s| !s.success()) && ran.said.contains("token_not_found"), "ffmpeg: {ran:?}");
    refused_with(&http, cp, "ff-rtmp-x", "token_not_found").await;

    step("GStreamer rtmpsink (librtmp)");
    // GStreamer rtmpsink (librtmp): before, a refusal killed it with SIGPIPE and no message.
    let source = "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=15/1 ! \
                  x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 ! flvmux streamable=true";
    let t = token("gst-rtmp").await;
    p = gst(&format!("{source} ! rtmpsink location={rtmp}/mx/gst-rtmp?token={t}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until_live(&http, cp, "mx", "gst-rtmp").await;
    stop(p);
    let pipeline = format!("{source} ! rtmpsink location={rtmp}/mx/gst-rtmp-x?token=guess");
    let ran = blocking(move || run_bounded(gst(&pipeline), long)).await;
    assert_eq!(ran.status.and_then(|s| s.code()), Some(1), "an error exit, not a signal: {ran:?}");
    assert!(ran.said.contains("Could not connect to RTMP stream"), "rtmpsink: {ran:?}");
    refused_with(&http, cp, "gst-rtmp-x", "token_not_found").await;

    step("Publishing over SRT");
    // ---- Publishing over SRT ----
    // srt-live-transmit in each streamid form: SRT's access control, Ant Media's, and the
    // access-control form percent-encoded (VLC's and GStreamer's URIs need it).
    let forms: [(&str, StreamIdForm); 3] = [
        ("slt-acl", |s, t| format!("#!::r=mx/{s},m=publish,t={t}")),
        ("slt-ant", |s, t| format!("mx/{s},token={t}")),
        ("slt-pct", |s, t| format!("%23!%3A%3Ar%3Dmx%2F{s}%2Cm%3Dpublish%2Ct%3D{t}")),
    ];
    for (stream, form) in forms {
        let t = token(stream).await;
        let (feed, transmit) = srt_live_transmit_publisher(&ts, &format!("{srt}?streamid={}", form(stream, &t)));
        until_live(&http, cp, "mx", stream).await;
        stop(transmit);
        stop(feed);
        let wrong = format!("{srt}?streamid={}", form(&format!("{stream}-x"), "guess"));
        let ts2 = ts.clone();
        let (ran, feed) = blocking(move || srt_live_transmit_publish(&ts2, &wrong, Duration::from_secs(10))).await;
        stop(feed);
        // libsrt says only that the listener rejected it; the reason is in the audit.
        assert!(ran.said.contains("REJECT"), "srt-live-transmit ({stream}): {ran:?}");
        refused_with(&http, cp, &format!("{stream}-x"), "token_not_found").await;
    }
    step("ffmpeg over SRT");
    let t = token("ff-srt").await;
    p = background(ffmpeg_loop(
        &ts,
        "mpegts",
        &format!("{srt}?streamid=#!::r=mx/ff-srt,m=publish,t={t}&pkt_size=1316"),
    ));
    until_live(&http, cp, "mx", "ff-srt").await;
    stop(p);
    let url = format!("{srt}?streamid=#!::r=mx/ff-srt-x,m=publish,t=guess&pkt_size=1316");
    let ts2 = ts.clone();
    let ran = blocking(move || run_bounded(ffmpeg_loop(&ts2, "mpegts", &url), long)).await;
    assert!(ran.status.is_some_and(|s| !s.success()) && ran.said.contains("Input/output error"), "ffmpeg: {ran:?}");
    refused_with(&http, cp, "ff-srt-x", "token_not_found").await;
    step("GStreamer srtsink");
    let ts_source = "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=15/1 ! \
                     x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 ! mpegtsmux";
    let pipeline = format!("{ts_source} ! srtsink uri={srt}?streamid=mx/gst-srt-x,token=guess");
    let ran = blocking(move || run_bounded(gst(&pipeline), long)).await;
    assert!(ran.status.is_some_and(|s| !s.success()) && ran.said.contains("SRT socket"), "srtsink: {ran:?}");
    refused_with(&http, cp, "gst-srt-x", "token_not_found").await;

    step("Playing: one live");
    // ---- Playing: one live stream over RTMP, one over SRT ----
    let t = token("live-rtmp").await;
    let rtmp_source = background(ffmpeg_loop(&flv, "flv", &format!("{rtmp}/mx/live-rtmp?token={t}")));
    let t = token("live-srt").await;
    let srt_source = background(ffmpeg_loop(
        &ts,
        "mpegts",
        &format!("{srt}?streamid=#!::r=mx/live-srt,m=publish,t={t}&pkt_size=1316"),
    ));
    until_live(&http, cp, "mx", "live-rtmp").await;
    until_live(&http, cp, "mx", "live-srt").await;
    let (hr, hs) = (hash("live-rtmp").await, hash("live-srt").await);
    let wrong = |h: &str| format!("{}{}", &h[..h.len() - 1], if h.ends_with('0') { '1' } else { '0' });
    let (wr, ws) = (wrong(&hr), wrong(&hs));
    let mut refused_plays = 0;

    step("ffmpeg over RTMP");
    // ffmpeg over RTMP.
    let out = blocking({
        let u = format!("{rtmp}/mx/live-rtmp?token={hr}");
        move || ffmpeg_play(&u)
    })
    .await;
    assert!(out.status.success() && stderr(&out).contains("frame="), "ffmpeg play: {}", stderr(&out));
    let out = blocking({
        let u = format!("{rtmp}/mx/live-rtmp?token={wr}");
        move || ffmpeg_play(&u)
    })
    .await;
    assert!(!out.status.success() && stderr(&out).contains("hash_mismatch"), "ffmpeg play: {}", stderr(&out));
    refused_plays += 1;
    step("rtmpdump 2");
    // rtmpdump 2.4 (librtmp), 3 s of the live stream to stdout.
    let dump = |h: String| {
        let mut c = Command::new("rtmpdump");
        c.args(["--live", "--stop", "3", "-o", "-", "-r"]).arg(format!("{rtmp}/mx/live-rtmp?token={h}"));
        c
    };
    let (right, bad) = (dump(hr.clone()), dump(wr.clone()));
    let ran = blocking(move || run_bounded(right, long)).await;
    assert!(ran.stdout_bytes > 10_000, "rtmpdump recorded the stream: {ran:?}");
    let ran = blocking(move || run_bounded(bad, long)).await;
    assert!(ran.stdout_bytes < 1000 && ran.said.contains("NetStream.Play.Failed"), "rtmpdump: {ran:?}");
    refused_plays += 1;
    step("GStreamer rtmp2src and rtmpsrc");
    // GStreamer rtmp2src and rtmpsrc (librtmp).
    for element in ["rtmp2src location=", "rtmpsrc location="] {
        step(element);
        let live = if element.starts_with("rtmpsrc") { "\u{1}live=1" } else { "" };
        let ok = format!("{element}{rtmp}/mx/live-rtmp?token={hr}{live} num-buffers=30 ! fakesink");
        let ran = blocking(move || run_bounded(gst(&ok), long)).await;
        assert!(ran.status.is_some_and(|s| s.success()), "{element} played: {ran:?}");
        let bad = format!("{element}{rtmp}/mx/live-rtmp?token={wr}{live} num-buffers=30 ! fakesink");
        let ran = blocking(move || run_bounded(gst(&bad), long)).await;
        assert!(ran.status.is_some_and(|s| !s.success()), "{element} refused: {ran:?}");
        if element.starts_with("rtmp2src") {
            // rtmp2src prints the status it got, our reason included.
            assert!(ran.said.contains("hash_mismatch"), "{ran:?}");
        } else {
            assert!(ran.said.contains("Could not read from resource"), "{ran:?}");
        }
        refused_plays += 1;
    }
    step("VLC 3");
    // VLC 3.0, not as root.
    let vlc_dir = tempfile::Builder::new().prefix("sluice-vlc").tempdir_in("/tmp").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(vlc_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let vd = vlc_dir.path().to_owned();
    let plays = [
        ("vlc-rtmp", format!("{rtmp}/mx/live-rtmp?token={hr}"), true),
        ("vlc-rtmp-x", format!("{rtmp}/mx/live-rtmp?token={wr}"), false),
        ("vlc-srt-pct", format!("{srt}?streamid=%23!%3A%3Ar%3Dmx%2Flive-srt%2Cm%3Drequest%2Ct%3D{hs}"), true),
        ("vlc-srt-ant", format!("{srt}?streamid=mx/live-srt,token={hs},play"), true),
        ("vlc-srt-x", format!("{srt}?streamid=mx/live-srt,token={ws},play"), false),
    ];
    for (name, url, right) in plays {
        step(name);
        let d = vd.clone();
        let (ran, bytes) = blocking(move || vlc(&d, name, &url)).await;
        if right {
            assert!(bytes > 10_000, "VLC {name} recorded the stream: {bytes} bytes, {ran:?}");
        } else {
            assert!(bytes < 1000, "VLC {name} recorded nothing: {bytes} bytes, {ran:?}");
            if name.contains("rtmp") {
                assert!(ran.said.contains("Server error: hash_mismatch"), "VLC {name}: {ran:?}");
            }
            refused_plays += 1;
        }
    }
    step("srt-live-transmit playing");
    // srt-live-transmit playing to stdout in each form; ffmpeg and GStreamer srtsrc.
    let slt_forms = [
        format!("#!::r=mx/live-srt,m=request,t={hs}"),
        format!("mx/live-srt,token={hs},play"),
        format!("%23!%3A%3Ar%3Dmx%2Flive-srt%2Cm%3Drequest%2Ct%3D{hs}"),
    ];
    for sid in slt_forms {
        let mut c = Command::new("srt-live-transmit");
        c.args(["-a:no", &format!("{srt}?streamid={sid}"), "file://con"]);
        let ran = blocking(move || run_bounded(c, Duration::from_secs(4))).await;
        assert!(ran.stdout_bytes > 10_000, "srt-live-transmit played {sid}: {} bytes, {}", ran.stdout_bytes, ran.said);
    }
    let mut c = Command::new("srt-live-transmit");
    c.args(["-a:no", &format!("{srt}?streamid=#!::r=mx/live-srt,m=request,t={ws}"), "file://con"]);
    let ran = blocking(move || run_bounded(c, Duration::from_secs(6))).await;
    assert!(ran.stdout_bytes == 0 && ran.said.contains("REJECT"), "srt-live-transmit refused: {ran:?}");
    refused_plays += 1;
    let out = blocking({
        let u = format!("{srt}?streamid=#!::r=mx/live-srt,m=request,t={hs}");
        move || ffmpeg_play(&u)
    })
    .await;
    assert!(out.status.success() && stderr(&out).contains("frame="), "ffmpeg SRT play: {}", stderr(&out));
    let out = blocking({
        let u = format!("{srt}?streamid=#!::r=mx/live-srt,m=request,t={ws}");
        move || ffmpeg_play(&u)
    })
    .await;
    assert!(!out.status.success() && stderr(&out).contains("Input/output error"), "{}", stderr(&out));
    refused_plays += 1;
    let ok = format!("srtsrc uri={srt}?streamid=mx/live-srt,token={hs},play num-buffers=30 ! fakesink");
    let ran = blocking(move || run_bounded(gst(&ok), long)).await;
    assert!(ran.status.is_some_and(|s| s.success()), "srtsrc played: {ran:?}");
    step("srtsrc retries");
    // srtsrc retries a rejection for ever ("Trying to reconnect"): the user sees the warning.
    let bad = format!("srtsrc uri={srt}?streamid=mx/live-srt,token={ws},play num-buffers=30 ! fakesink");
    let ran = blocking(move || run_bounded(gst(&bad), Duration::from_secs(5))).await;
    assert!(ran.said.contains("Application-defined rejection reason"), "srtsrc: {ran:?}");
    refused_plays += 1;

    // Every refused play is in the audit as `hash_mismatch` (retries coalesced).
    for stream in ["live-rtmp", "live-srt"] {
        refused_with(&http, cp, stream, "hash_mismatch").await;
        assert!(refusals(&http, cp, stream).await.iter().all(|r| r == "hash_mismatch"));
    }
    assert_eq!(refused_plays, 9, "every client tried a refused play");
    stop(rtmp_source);
    stop(srt_source);
}
