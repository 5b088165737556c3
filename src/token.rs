//! Access tokens baton mints for itself from an API key and secret.

use std::time::Duration;

use livekit_api::access_token::{AccessToken, VideoGrants};

/// Attribute baton sets on itself so adapters can find it without knowing its identity.
pub const ROLE_ATTRIBUTE: &str = "baton.role";
pub const ROLE_COORDINATOR: &str = "coordinator";

#[derive(Debug, thiserror::Error)]
#[error("could not sign an access token: {0}")]
pub struct TokenError(String);

/// A token for baton's own participant: kind agent, publish audio and data, and no subscribe
/// permission, which makes the server treat the publisher connection as primary so baton needs
/// exactly one peer connection.
pub fn participant_token(
    api_key: &str,
    api_secret: &str,
    room: &str,
    identity: &str,
    ttl: Duration,
) -> Result<String, TokenError> {
    AccessToken::with_api_key(api_key, api_secret)
        .with_identity(identity)
        .with_name(identity)
        .with_kind("agent")
        .with_ttl(ttl)
        .with_attributes([(ROLE_ATTRIBUTE, ROLE_COORDINATOR)])
        .with_grants(VideoGrants {
            room_join: true,
            room: room.to_string(),
            can_publish: Some(true),
            can_subscribe: Some(false),
            can_publish_data: Some(true),
            agent: true,
            ..Default::default()
        })
        .to_jwt()
        .map_err(|e| TokenError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_api::access_token::TokenVerifier;

    #[test]
    fn token_carries_single_pc_grants() {
        let jwt = participant_token(
            "key",
            "secret-secret-secret-secret-secret",
            "r1",
            "baton",
            Duration::from_secs(60),
        )
        .expect("sign");
        let claims = TokenVerifier::with_api_key("key", "secret-secret-secret-secret-secret")
            .verify(&jwt)
            .expect("verify");
        assert_eq!(claims.sub, "baton");
        assert_eq!(claims.kind, "agent");
        assert!(claims.video.room_join && claims.video.agent);
        assert_eq!(claims.video.room, "r1");
        assert_eq!(claims.video.can_subscribe, Some(false));
        assert_eq!(claims.video.can_publish, Some(true));
        assert_eq!(claims.attributes.get(ROLE_ATTRIBUTE).map(String::as_str), Some(ROLE_COORDINATOR));
    }
}
