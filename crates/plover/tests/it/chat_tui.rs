//! `plover chat` driven as a person would, in tmux: ticks go sent -> delivered -> read, the
//! peer's typing and presence show, incoming messages appear, Esc quits.

use crate::common::TestServer;
use plover_client::EventStream;
use plover_proto::Target;
use std::process::Command;
use std::time::{Duration, Instant};

struct Tmux {
    socket: String,
}

impl Tmux {
    /// `plover chat ARGS` as alice, in a 110x20 tmux session named "chat" on a socket of its
    /// own (`name` and this process's id).
    fn chat(name: &str, server: &TestServer, args: &str) -> Self {
        Self::chat_in(name, server, args, &std::env::temp_dir())
    }

    /// [`Tmux::chat`] with `dir` as the chat's working directory (where `/save` writes).
    fn chat_in(name: &str, server: &TestServer, args: &str, dir: &std::path::Path) -> Self {
        let tmux = Tmux {
            socket: format!("{name}-{}", std::process::id()),
        };
        let command = format!(
            "env PLOVER_SERVER={} PLOVER_CA={} PLOVER_TOKEN={} {} chat {args}",
            server.addr,
            server.ca().display(),
            server.token("alice"),
            env!("CARGO_BIN_EXE_plover"),
        );
        tmux.run(&[
            "-u",
            "new-session",
            "-d",
            "-s",
            "chat",
            "-c",
            &dir.display().to_string(),
            "-x",
            "110",
            "-y",
            "20",
            &command,
        ]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env("LANG", "C.UTF-8")
            .output()
            .expect("tmux must be installed to run this test (apt-get install tmux)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "chat"])
    }

    /// Waits until the screen shows `text`; panics with the screen otherwise.
    async fn wait_for(&self, text: &str) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!("screen never showed {text:?}:\n{screen}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

#[tokio::test]
async fn a_chat_in_a_terminal_shows_ticks_typing_and_presence() {
    let server = TestServer::start_with(|c| c.presence.debounce = Duration::from_millis(200)).await;
    server.register("bob").await;
    // Contacts: a stranger would see nothing of bob until he answered.
    server.contacts("alice", "bob").await;
    let alice = server.connect("alice", "setup").await;
    alice
        .open(Target::Direct("bob".into()), true)
        .await
        .expect("open")
        .send("before the chat")
        .await
        .expect("send");
    alice.close().await;

    let tmux = Tmux::chat("plover-test", &server, "--with bob");
    // The backlog and the peer's presence on open.
    tmux.wait_for("alice: before the chat").await;
    tmux.wait_for("bob was last seen").await;

    // Alice types and sends: sent (durable), nothing more yet.
    tmux.run(&["send-keys", "-t", "chat", "hello bob", "Enter"]);
    let screen = tmux.wait_for("alice: hello bob  ✓ sent").await;
    assert!(!screen.contains("hello bob  ✓✓"), "{screen}");

    // Bob's phone comes online: presence flips, the message is delivered.
    let mut bob = EventStream::start(server.config("bob", "phone"), None);
    assert!(bob.synced().await);
    tmux.wait_for("bob is online").await;
    tmux.wait_for("alice: hello bob  ✓✓ delivered").await;

    // Bob opens the conversation and reads it; then he types and replies.
    let bob_conn = server.connect("bob", "laptop").await;
    let conv = bob_conn
        .open(Target::Direct("alice".into()), false)
        .await
        .expect("open");
    conv.mark_read(conv.last_seq()).await.expect("read");
    tmux.wait_for("alice: hello bob  ✓✓ read").await;
    bob_conn.typing(conv.id()).expect("typing");
    tmux.wait_for("bob is typing").await;
    conv.send("hi alice").await.expect("send");
    let screen = tmux.wait_for("bob: hi alice").await;
    assert!(
        !screen.contains("is typing"),
        "a message ends the indicator:\n{screen}"
    );

    // Bob leaves: his presence line turns to "last seen".
    bob.close().await;
    drop(conv);
    bob_conn.close().await;
    tmux.wait_for("bob was last seen").await;

    // The chat marked bob's reply read, since the window was open.
    let check = server.connect("alice", "check").await;
    let info = check.conversations().await.expect("list");
    assert_eq!(info[0].unread, 0);
    check.close().await;

    // Esc quits cleanly.
    tmux.run(&["send-keys", "-t", "chat", "Escape"]);
    let start = Instant::now();
    while tmux.run(&["list-sessions"]).contains("chat") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "chat did not exit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_group_chat_shows_its_title_members_and_membership_events() {
    let server = TestServer::start().await;
    for u in ["bob", "carol"] {
        server.register(u).await;
    }
    let alice = server.connect("alice", "setup").await;
    let id = alice
        .create_group("Weekend", &["bob".into(), "carol".into()])
        .await
        .expect("create");
    alice.close().await;

    let tmux = Tmux::chat("plover-group", &server, &format!("--conversation {id}"));
    tmux.wait_for("Weekend · conversation").await;
    tmux.wait_for("3 members").await;
    tmux.wait_for("alice created \"Weekend\" with alice, bob, carol")
        .await;

    tmux.run(&["send-keys", "-t", "chat", "plans?", "Enter"]);
    tmux.wait_for("alice: plans?  ✓ sent").await;
    // Delivered to all only once both have it.
    let mut bob = EventStream::start(server.config("bob", "phone"), None);
    assert!(bob.synced().await);
    let screen = tmux.wait_for("alice: plans?").await;
    assert!(
        !screen.contains("plans?  ✓✓"),
        "carol has not got it:\n{screen}"
    );
    let mut carol = EventStream::start(server.config("carol", "phone"), None);
    assert!(carol.synced().await);
    tmux.wait_for("alice: plans?  ✓✓ delivered").await;

    let bob_conn = server.connect("bob", "laptop").await;
    let conv = bob_conn
        .open(Target::Conversation(id), false)
        .await
        .expect("open");
    conv.send("beach!").await.expect("send");
    tmux.wait_for("bob: beach!").await;
    carol.close().await;
    let carol_conn = server.connect("carol", "laptop").await;
    carol_conn
        .open(Target::Conversation(id), false)
        .await
        .expect("open")
        .leave()
        .await
        .expect("leave");
    tmux.wait_for("-- carol left --").await;
    tmux.wait_for("2 members").await;

    tmux.run(&["send-keys", "-t", "chat", "Escape"]);
    bob.close().await;
    drop(conv);
    bob_conn.close().await;
    carol_conn.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_chat_sends_again_after_the_server_restarts() {
    let server = TestServer::start().await;
    server.register("alice").await;
    server.register("bob").await;
    server.contacts("alice", "bob").await;
    let tmux = Tmux::chat("plover-test-restart", &server, "--with bob");
    // Open (the terminal in raw mode) once the header shows the peer.
    tmux.wait_for("bob was last seen").await;
    tmux.run(&["send-keys", "-t", "chat", "before", "Enter"]);
    tmux.wait_for("alice: before  ✓ sent").await;

    // The chat's one connection goes with the server; its event stream reconnects, and the
    // next message goes out on the new connection (a try before the reconnect shows failed).
    let server = server.restart().await;
    let start = Instant::now();
    loop {
        tmux.run(&["send-keys", "-t", "chat", "after", "Enter"]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        if tmux.screen().contains("alice: after  ✓") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "never sent after the restart:\n{}",
            tmux.screen()
        );
    }
    tmux.run(&["send-keys", "-t", "chat", "Escape"]);
    server.stop().await;
}

#[tokio::test]
async fn files_go_out_with_send_and_come_in_with_save() {
    use plover_client::media::{Through, prepare};
    use plover_proto::content::Content;

    let server = TestServer::start().await;
    server.register("bob").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let photo = dir.path().join("photo.jpg");
    let photo_bytes: Vec<u8> = (0..12_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(&photo, &photo_bytes).expect("write");
    let tmux = Tmux::chat_in("plover-files", &server, "--with bob", dir.path());
    tmux.wait_for("Esc").await;

    // alice sends a file from the chat.
    let line = format!("/send {}", photo.display());
    tmux.run(&["send-keys", "-t", "chat", &line, "Enter"]);
    tmux.wait_for("alice: [attachment photo.jpg (image/jpeg, 12.0 kB)]  ✓ sent")
        .await;
    // bob gets the same bytes.
    let bob = server.connect("bob", "phone").await;
    let conv = bob
        .open(Target::Direct("alice".into()), false)
        .await
        .expect("open");
    let (page, _) = conv.history(None, None, 10).await.expect("history");
    let message = page.last().expect("a message");
    let Some(Content::Attachment(a)) = Content::decode(&message.body) else {
        panic!("not an attachment: {message:?}");
    };
    let got = dir.path().join("bob-got.jpg");
    let through = Through {
        conversation: conv.id(),
        seq: message.seq,
    };
    bob.download(&a, through, &got, &mut |_| {})
        .await
        .expect("download");
    assert_eq!(std::fs::read(&got).expect("read"), photo_bytes);

    // bob sends a file; alice's chat shows it, and /save writes it beside her.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let doc = elsewhere.path().join("notes.pdf");
    let doc_bytes = vec![42u8; 3000];
    std::fs::write(&doc, &doc_bytes).expect("write");
    let file = prepare(&doc).await.expect("prepare");
    bob.upload(&file, &mut |_| {}).await.expect("upload");
    let attachment = file.attachment("notes.pdf", "application/pdf");
    let ack = conv
        .send_referencing(
            plover_proto::ClientMsgId::random(),
            Content::Attachment(attachment).encode().into(),
            vec![file.object],
        )
        .await
        .expect("send");
    tmux.wait_for("bob: [attachment notes.pdf (application/pdf, 3.0 kB)]")
        .await;
    let line = format!("/save {}", ack.seq);
    tmux.run(&["send-keys", "-t", "chat", &line, "Enter"]);
    tmux.wait_for("saved notes.pdf").await;
    assert_eq!(
        std::fs::read(dir.path().join("notes.pdf")).expect("saved"),
        doc_bytes
    );
    // A message without a file: said so, nothing written.
    tmux.run(&["send-keys", "-t", "chat", "/save 99", "Enter"]);
    tmux.wait_for("no file in message 99").await;
    drop(conv);
    bob.close().await;
    tmux.run(&["send-keys", "-t", "chat", "Escape"]);
    server.stop().await;
}
