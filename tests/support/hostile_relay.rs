//! The scriptable relay lives in the library (the demo uses it too); tests call it the
//! hostile relay.

pub use grasp_sync::testing::scripted_relay::Script;

pub struct HostileRelay;

impl HostileRelay {
    pub async fn start(script: Script) -> grasp_sync::testing::scripted_relay::ScriptedRelay {
        grasp_sync::testing::scripted_relay::ScriptedRelay::start(script)
            .await
            .expect("start the hostile relay on loopback")
    }
}
