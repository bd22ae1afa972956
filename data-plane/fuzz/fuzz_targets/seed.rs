//! Seeds for `srt_listener` and `srt_driver`: an induction and conclusion handshakes (with a streamid, with key
//! material) from srt-protocol's own test vectors of the reference implementation.
//!
//! Seeds for `rtmp_session`: the bytes an rml_rtmp client sends to connect and publish (with
//! metadata, a sequence header, a keyframe and audio), and to connect and play, recorded from
//! a real exchange with a server session, so the fuzzer starts from sessions that reach the
//! decision and media paths.

use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionResult, PublishRequestType, ServerSession, ServerSessionConfig,
    ServerSessionEvent, ServerSessionResult, StreamMetadata,
};
use rml_rtmp::time::RtmpTimestamp;

/// A client and a server session wired together; what the client sends is recorded.
struct Pair {
    client: ClientSession,
    server: ServerSession,
    sent: Vec<u8>,
}

impl Pair {
    fn client_sends(&mut self, results: Vec<ClientSessionResult>) {
        for r in results {
            if let ClientSessionResult::OutboundResponse(p) = r {
                self.sent.extend_from_slice(&p.bytes);
                let answers = self.server.handle_input(&p.bytes).expect("server input");
                self.server_answers(answers);
            }
        }
    }

    fn server_answers(&mut self, results: Vec<ServerSessionResult>) {
        for r in results {
            match r {
                ServerSessionResult::OutboundResponse(p) => {
                    let back = self.client.handle_input(&p.bytes).expect("client input");
                    self.client_sends(back);
                }
                ServerSessionResult::RaisedEvent(
                    ServerSessionEvent::ConnectionRequested { request_id, .. }
                    | ServerSessionEvent::PublishStreamRequested { request_id, .. }
                    | ServerSessionEvent::PlayStreamRequested { request_id, .. },
                ) => {
                    let accepted = self.server.accept_request(request_id).expect("accept");
                    self.server_answers(accepted);
                }
                _ => {}
            }
        }
    }
}

/// `(peer, hex datagram)`: peer 0x20 answers with a passphrase.
const SRT_SEEDS: [(u8, &str); 4] = [
    (0, "8000000000000000000002b00000000000000004000000023c3b0296000005dc00002000000000010669ead20000000000000000000000000000000001000000"),
    (0, "8000000000000000000F9EC400000000000000050000000144BEA60D000005DC00002000FFFFFFFF3D6936B6E3E405DD0100007F00000000000000000000000000010003000103010000002F00780000"),
    (0, "800000000000000000000b1400000000000000050000000563444b2e000005dc00002000ffffffff37eb0ee52154fbd60100007f0000000000000000000000000001000300010401000000bf0014001400050003646362616867666500006a69"),
    (0x20, "800000000000000000175E8A0000000000000005000000036FEFB8D8000005DC00002000FFFFFFFF35E790ED5D16CCEA0100007F00000000000000000000000000010003000103010000002F01F401F40003000E122029010000000002000200000004049D75B0AC924C6E4C9EC40FEB4FE973DB1D215D426C18A2871EBF77E2646D9BAB15DBD7689AEF60EC"),
];

/// The records of `SRT_SEEDS` into `corpus/<target>`, each alone and all in a row, with the
/// control byte `control` makes of each seed's.
fn srt_seeds(target: &str, control: fn(u8) -> u8) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    let mut all = Vec::new();
    for (i, (peer, hex)) in SRT_SEEDS.iter().enumerate() {
        let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|j| u8::from_str_radix(&hex[j..j + 2], 16).expect("hex")).collect();
        let record = [&[bytes.len() as u8, control(*peer)][..], &bytes].concat();
        std::fs::write(dir.join(format!("seed-{i}")), &record).expect("seed");
        all.extend_from_slice(&record);
    }
    // An induction then a conclusion from the same peer.
    std::fs::write(dir.join("seed-handshake"), all).expect("seed");
}

fn main() {
    srt_seeds("srt_listener", |peer| peer);
    // `srt_driver`'s control byte also says how the access request is answered: as a
    // publisher (0x40), and the key-material handshake with a passphrase (0xC0).
    srt_seeds("srt_driver", |peer| if peer == 0 { 0x40 } else { 0xC0 });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/rtmp_session");
    std::fs::create_dir_all(&dir).expect("corpus directory");
    for (name, publish) in [("publish", true), ("play", false)] {
        let (client, initial) = ClientSession::new(ClientSessionConfig::new()).expect("client");
        let (server, server_initial) = ServerSession::new(ServerSessionConfig::new()).expect("server");
        let mut pair = Pair { client, server, sent: Vec::new() };
        pair.server_answers(server_initial);
        pair.client_sends(initial);
        let connect = pair.client.request_connection("live".into()).expect("connect");
        pair.client_sends(vec![connect]);
        if publish {
            let r = pair
                .client
                .request_publishing("cam1?token=abc&expires=1700000000".into(), PublishRequestType::Live)
                .expect("publish");
            pair.client_sends(vec![r]);
            let mut metadata = StreamMetadata::new();
            metadata.video_width = Some(320);
            metadata.video_height = Some(240);
            let r = pair.client.publish_metadata(&metadata).expect("metadata");
            pair.client_sends(vec![r]);
            let header = bytes::Bytes::from_static(&[0x17, 0, 0, 0, 0, 1, 0x64, 0, 0x1f]);
            let key = bytes::Bytes::from_static(&[0x17, 1, 0, 0, 0, 0, 0, 0, 4, 0x65, 0x88, 0x80, 0x40]);
            for data in [header, key] {
                let r = pair.client.publish_video_data(data, RtmpTimestamp::new(0), false).expect("video");
                pair.client_sends(vec![r]);
            }
            let audio = bytes::Bytes::from_static(&[0xaf, 0, 0x12, 0x10]);
            let r = pair.client.publish_audio_data(audio, RtmpTimestamp::new(0), false).expect("audio");
            pair.client_sends(vec![r]);
        } else {
            let r = pair.client.request_playback("cam1?subscriberId=a&subscriberCode=123456".into()).expect("play");
            pair.client_sends(vec![r]);
        }
        std::fs::write(dir.join(name), &pair.sent).expect("seed written");
        println!("seed {name}: {} bytes", pair.sent.len());
    }
}
