//! A device that was offline gets exactly what it missed, in order, then live events.

use crate::common::{TestServer, assert_quiet, next_event, text};
use plover_client::EventStream;
use plover_proto::Target;
use std::time::Duration;

#[tokio::test]
async fn reconnecting_device_gets_what_it_missed_then_live_events() {
    let server = TestServer::start().await;
    server.register("alice").await;
    server.register("bob").await;
    let alice = server.connect("alice", "phone").await;
    let conv = alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open");

    // Bob's phone takes the first message, then goes away.
    conv.send("one").await.expect("send");
    let mut bob = EventStream::start(server.config("bob", "phone"), None);
    assert_eq!(text(&next_event(&mut bob).await), "one");
    bob.close().await;

    // Offline: three more.
    for t in ["two", "three", "four"] {
        conv.send(t).await.expect("send");
    }

    // Back with no cursor of its own: the server remembers where the phone was.
    let mut bob = EventStream::start(server.config("bob", "phone"), None);
    for t in ["two", "three", "four"] {
        assert_eq!(text(&next_event(&mut bob).await), t);
    }
    assert_quiet(&mut bob, Duration::from_millis(200)).await;
    conv.send("five").await.expect("send");
    assert_eq!(text(&next_event(&mut bob).await), "five");
    let cursor = bob.cursor();
    bob.close().await;

    // A device that keeps its own cursor (a phone with local history) resumes from it.
    conv.send("six").await.expect("send");
    let mut bob = EventStream::start(server.config("bob", "phone"), Some(cursor - 1));
    assert_eq!(text(&next_event(&mut bob).await), "five");
    assert_eq!(text(&next_event(&mut bob).await), "six");
    bob.close().await;

    // A device never seen before starts from the beginning of the user's log.
    let mut tablet = EventStream::start(server.config("bob", "tablet"), None);
    for t in ["one", "two", "three", "four", "five", "six"] {
        assert_eq!(text(&next_event(&mut tablet).await), t);
    }
    tablet.close().await;
    alice.close().await;
    server.stop().await;
}
