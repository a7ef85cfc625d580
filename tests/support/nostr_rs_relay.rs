//! nostr-rs-relay for tests: the library's launcher, with the binary required.

pub struct NostrRsRelay;

impl NostrRsRelay {
    pub async fn start() -> grasp_sync::testing::nostr_rs_relay::NostrRsRelay {
        let bin = grasp_sync::testing::nostr_rs_relay::find_binary(None).unwrap_or_else(|| {
            panic!(
                "nostr-rs-relay not found: set GRASP_SYNC_NOSTR_RS_RELAY or run scripts/test-env.sh"
            )
        });
        grasp_sync::testing::nostr_rs_relay::NostrRsRelay::start(&bin)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}
