//! Media messages chunked once for every player. RTMP's chunk headers are normally compressed
//! against the previous message of the same chunk stream, which makes each connection's bytes
//! its own; a message whose first chunk carries a full (type 0) header depends on no earlier
//! state, so the same bytes serve every player. Media go on chunk streams of their own (the
//! session's control and metadata messages never use them), so the two never mix state.

use bytes::{BufMut, Bytes, BytesMut};

/// The chunk size every player's session announces and the shared chunks are cut to.
pub const CHUNK_SIZE: usize = 4096;
/// The message stream id players get for their first `createStream` (ffmpeg, OBS, VLC all play
/// on it); players on another id get their media chunked by their own session.
pub const SHARED_STREAM_ID: u32 = 1;

const AUDIO_CSID: u8 = 8;
const VIDEO_CSID: u8 = 9;
const AUDIO_TYPE: u8 = 8;
const VIDEO_TYPE: u8 = 9;
/// Timestamps from here on go in the extended timestamp field.
const EXTENDED: u32 = 0x00ff_ffff;

fn chunk(csid: u8, type_id: u8, timestamp: u32, payload: &[u8]) -> Bytes {
    let extended = timestamp >= EXTENDED;
    let chunks = payload.len().div_ceil(CHUNK_SIZE).max(1);
    let mut out = BytesMut::with_capacity(payload.len() + 16 + chunks * 5);
    out.put_u8(csid);
    let stamp = if extended { EXTENDED } else { timestamp };
    out.put_uint(u64::from(stamp), 3);
    out.put_uint(payload.len() as u64, 3);
    out.put_u8(type_id);
    out.put_u32_le(SHARED_STREAM_ID);
    if extended {
        out.put_u32(timestamp);
    }
    for (index, piece) in payload.chunks(CHUNK_SIZE).enumerate() {
        if index > 0 {
            out.put_u8(0xc0 | csid);
            // Continuation chunks repeat the extended timestamp, as Flash, ffmpeg and
            // nginx-rtmp expect.
            if extended {
                out.put_u32(timestamp);
            }
        }
        out.put_slice(piece);
    }
    out.freeze()
}

pub fn video(timestamp: u32, payload: &[u8]) -> Bytes {
    chunk(VIDEO_CSID, VIDEO_TYPE, timestamp, payload)
}

pub fn audio(timestamp: u32, payload: &[u8]) -> Bytes {
    chunk(AUDIO_CSID, AUDIO_TYPE, timestamp, payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rml_rtmp::chunk_io::ChunkDeserializer;

    fn read_back(bytes: &[u8]) -> rml_rtmp::messages::MessagePayload {
        let mut reader = ChunkDeserializer::new();
        reader.set_max_chunk_size(CHUNK_SIZE).unwrap();
        reader
            .get_next_message(bytes)
            .unwrap()
            .expect("a whole message")
    }

    #[test]
    fn messages_read_back_whole() {
        let payload: Vec<u8> = (0..10_000u32).map(|n| n as u8).collect();
        for timestamp in [0, 40, EXTENDED - 1, EXTENDED, 0x7fff_ffff] {
            let message = read_back(&video(timestamp, &payload));
            assert_eq!(message.timestamp.value, timestamp);
            assert_eq!(message.type_id, VIDEO_TYPE);
            assert_eq!(message.message_stream_id, SHARED_STREAM_ID);
            assert_eq!(&message.data[..], &payload[..]);
        }
        let small = read_back(&audio(7, &[0xaf, 1, 2]));
        assert_eq!(
            (small.type_id, &small.data[..]),
            (AUDIO_TYPE, &[0xaf, 1, 2][..])
        );
    }
}
