//! Deciding for the driver, on the tokio runtime: the listener's access requests decided one
//! task each (`super::super::verdict`), answered as `Command`s; an admitted session held by a
//! guard until the driver lets go of its connection.

use super::*;

/// Decides the listener's access requests on the tokio runtime, one task each, and answers
/// the driver; an admitted session is then held by its guard.
pub(in crate::srt) async fn admission_loop(
    mut requests: mpsc::Receiver<(SessionId, AccessControlRequest)>,
    commands: Commands,
    admission: Admission,
    live: LiveSet,
) {
    while let Some((session, request)) = requests.recv().await {
        let (commands, admission, live) = (commands.clone(), admission.clone(), live.clone());
        tokio::spawn(async move {
            let matches = |k: &KeySettings| request.passphrase_matches(k);
            let caller = Caller {
                remote: request.remote,
                stream_id: request.stream_id.as_ref().map(|s| s.as_bytes()),
                key_size: request.key_size,
                passphrase_matches: &matches,
            };
            let is_live = |k: &Key| live.lock().unwrap_or_else(|p| p.into_inner()).contains(k);
            match verdict(caller, &admission, is_live).await {
                Err(reason) => {
                    let _ = commands.send(Command::Decided { session, verdict: Err(reason) });
                }
                Ok(Accepted { keys, admitted, permit }) => {
                    let (held, released) = oneshot::channel();
                    let role = Role {
                        id: admitted.session.id,
                        keys,
                        key: admitted.key.clone(),
                        publishing: admitted.publishing.as_ref().map(|p| p.counters.clone()),
                        _held: held,
                    };
                    if commands.send(Command::Decided { session, verdict: Ok(role) }).is_ok() {
                        guard(session, admitted, permit, released, commands).await;
                    }
                }
            }
        });
    }
}

/// Holds an admitted session until the driver lets go of its connection, and tells the
/// driver when the session must end.
async fn guard(
    session: SessionId,
    mut admitted: Admitted,
    permit: Permit,
    mut released: oneshot::Receiver<()>,
    commands: Commands,
) {
    tokio::select! {
        reason = admitted.session.ended() => {
            tracing::info!(peer = %session.0, reason = reason.as_str(), "SRT session ended: no longer allowed");
            let _ = commands.send(Command::End { session, id: admitted.session.id });
            let _ = released.await;
        }
        _ = &mut released => {}
    }
    // The slot, the stream's counters, the session's registration and the connection's
    // place under the limit end here.
    drop(admitted);
    drop(permit);
}
