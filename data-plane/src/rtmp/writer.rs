//! A connection's way out: the `Outbox` every sender uses and the one writer task that
//! gathers what waits into one write.

use std::cell::Cell;
use std::rc::Rc;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::channel::mpsc as fmpsc;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};

pub(super) enum Out {
    Bytes(Vec<u8>),
    /// Media bytes shared with other players, the player's count of queued media, and how
    /// many media messages these bytes hold.
    Media(Bytes, Rc<Cell<usize>>, usize),
    Close,
}

/// Most bytes gathered into one write when several messages are waiting.
pub(super) const WRITE_BATCH: usize = 256 * 1024;

/// A connection's way out: everything in order, to its writer; or `abort`, which ends the
/// connection at once.
#[derive(Clone)]
pub(super) struct Outbox {
    pub(super) tx: fmpsc::UnboundedSender<Out>,
    pub(super) abort: Rc<[fmpsc::UnboundedSender<()>; 2]>,
}

impl Outbox {
    pub(super) fn unbounded_send(&self, out: Out) -> Result<(), ()> {
        self.tx.unbounded_send(out).map_err(|_| ())
    }

    /// Ends the connection now, even if its writer is stuck on a full socket (a player that
    /// stopped reading): its reader and writer both stop waiting and let go of the socket,
    /// which closes it. What was queued is not written.
    pub(super) fn abort(&self) {
        for tx in self.abort.iter() {
            let _ = tx.unbounded_send(());
        }
    }
}

/// A new connection's outbox, with what its writer reads and the reader's and writer's abort
/// signals.
pub(super) fn outbox()
-> (Outbox, fmpsc::UnboundedReceiver<Out>, fmpsc::UnboundedReceiver<()>, fmpsc::UnboundedReceiver<()>) {
    let (tx, rx) = fmpsc::unbounded();
    let (abort_reader, reader) = fmpsc::unbounded();
    let (abort_writer, writer) = fmpsc::unbounded();
    (Outbox { tx, abort: Rc::new([abort_reader, abort_writer]) }, rx, reader, writer)
}

/// Resolves when the connection is aborted; never when its outbox is simply dropped (the
/// writer then ends by draining its queue).
pub(super) async fn aborted(signal: &mut fmpsc::UnboundedReceiver<()>) {
    if signal.next().await.is_none() {
        std::future::pending::<()>().await;
    }
}

/// What one write gathers.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) parts: Vec<Bytes>,
    pub(super) size: usize,
    /// The player's queue count and how many media messages this write takes off it.
    pub(super) media: Option<(Rc<Cell<usize>>, usize)>,
    pub(super) closing: bool,
}

impl Batch {
    pub(super) fn take(&mut self, out: Out) {
        match out {
            Out::Bytes(b) => {
                self.size += b.len();
                self.parts.push(Bytes::from(b));
            }
            Out::Media(b, queued, messages) => {
                self.size += b.len();
                self.parts.push(b);
                let n = self.media.as_ref().map_or(0, |m| m.1);
                self.media = Some((queued, n + messages));
            }
            Out::Close => self.closing = true,
        }
    }

    pub(super) fn full(&self) -> bool {
        self.closing || self.size >= WRITE_BATCH
    }
}

/// Writes what the connection sends, in order, gathering what is waiting into one write (one
/// ring entry instead of one per message; a lone message is written as is, no copy). Media
/// comes already merged per stream (`Window`), so nothing waits here: a control message or a
/// close is written as soon as it is queued.
pub(super) async fn writer(
    mut wr: impl AsyncWriteRent,
    mut rx: fmpsc::UnboundedReceiver<Out>,
    mut abort: fmpsc::UnboundedReceiver<()>,
) {
    loop {
        let first = monoio::select! {
            out = rx.next() => out,
            _ = aborted(&mut abort) => None,
        };
        let Some(first) = first else { break };
        let mut batch = Batch::default();
        batch.take(first);
        drain(&mut rx, &mut batch);
        let buf = match batch.parts.len() {
            0 => Bytes::new(),
            1 => batch.parts.pop().unwrap_or_default(),
            _ => {
                // Gathered for this write only: an idle player holds no buffer (2,400
                // players with a kept 64 KiB each would be 150 MiB).
                let mut joined = Vec::with_capacity(batch.size);
                for b in &batch.parts {
                    joined.extend_from_slice(b);
                }
                Bytes::from(joined)
            }
        };
        let res = monoio::select! {
            r = wr.write_all(buf) => r.0,
            // A write stuck on a full socket is cancelled; the connection is over.
            _ = aborted(&mut abort) => return,
        };
        if let Some((queued, n)) = batch.media {
            queued.set(queued.get().saturating_sub(n));
        }
        if res.is_err() || batch.closing {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// Moves what is waiting into the batch, up to a full write.
pub(super) fn drain(rx: &mut fmpsc::UnboundedReceiver<Out>, batch: &mut Batch) {
    while !batch.full() {
        match rx.try_recv() {
            Ok(out) => batch.take(out),
            Err(_) => break,
        }
    }
}
