//! Upload streams are flow-controlled (contract section 9): the client sends at most 10
//! items ahead of what the method took, and past that its connection is not read.

mod common;

use std::time::{Duration, Instant};

use common::{start_with_hub, RawClient};
use futures_util::stream;
use ringhub_engine::{hub, ClientStream, HubError, Stream};

const TAKES_AFTER: Duration = Duration::from_millis(1500);

struct Uploads;

#[hub]
impl Uploads {
    /// Takes nothing for a while, then sums the stream.
    async fn slow_sum(&self, mut numbers: ClientStream<i64>) -> Result<i64, HubError> {
        ringhub_engine::runtime::sleep(TAKES_AFTER).await;
        let mut total = 0;
        while let Some(number) = numbers.next().await {
            total += number?;
        }
        Ok(total)
    }

    fn one(&self) -> impl Stream<Item = u8> {
        stream::iter([1u8])
    }
}

#[test]
fn a_full_upload_buffer_stops_reading_the_client_until_the_method_takes_items() {
    let server = start_with_hub(|| Uploads);
    for (items, held) in [(5, false), (40, true)] {
        let mut client = RawClient::connect(server.local_addr(), None);
        client.send(r#"{"type":1,"invocationId":"sum","target":"SlowSum","arguments":[],"streamIds":["s"]}"#);
        for n in 1..=items {
            client.send(&format!(r#"{{"type":2,"invocationId":"s","item":{n}}}"#));
        }
        client.send(r#"{"type":3,"invocationId":"s"}"#);
        // A stream starts as soon as it is read, beside the running invocation.
        let sent = Instant::now();
        client.send(r#"{"type":4,"invocationId":"one","target":"One","arguments":[]}"#);
        let mut waited = None;
        let mut sum = None;
        while waited.is_none() || sum.is_none() {
            let message = client.next_message();
            if message.contains(r#""invocationId":"one""#) && waited.is_none() {
                waited = Some(sent.elapsed());
            }
            if message.contains(r#""invocationId":"sum""#) {
                sum = Some(message);
            }
        }
        let waited = waited.unwrap();
        if held {
            assert!(
                waited >= TAKES_AFTER / 2,
                "{items} items: the client was not read until the method took some ({waited:?})"
            );
        } else {
            assert!(
                waited < TAKES_AFTER / 2,
                "{items} items fit the buffer: the client was read on ({waited:?})"
            );
        }
        let total: i64 = (1..=items).sum();
        assert_eq!(
            sum.unwrap(),
            format!(r#"{{"type":3,"invocationId":"sum","result":{total}}}"#),
            "every item reached the method"
        );
    }
    server.shutdown();
}
