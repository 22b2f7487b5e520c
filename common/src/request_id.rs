//! The `x-request-id` metadata that ties one Recommend's calls together across the services: the
//! gateway takes the caller's (or makes one up) and sends it with its Retrieve and Rank calls,
//! and every service logs it.

use tonic::metadata::MetadataValue;
use tonic::Request;

/// Metadata key carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request id the caller sent, if it sent a readable (ASCII) one.
pub fn received<T>(request: &Request<T>) -> Option<&str> {
    request.metadata().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok())
}

/// The request id to log a call under: the caller's, else empty.
pub fn request_id_of<T>(request: &Request<T>) -> String {
    received(request).unwrap_or_default().to_string()
}

/// Puts `request_id` in the call's metadata (skipped if it is not valid ASCII).
pub fn set_request_id<T>(request: &mut Request<T>, request_id: &str) {
    if let Ok(v) = MetadataValue::try_from(request_id) {
        request.metadata_mut().insert(REQUEST_ID_HEADER, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_then_read_back_and_unreadable_ids_are_skipped() {
        let mut request = Request::new(());
        assert_eq!(received(&request), None);
        assert_eq!(request_id_of(&request), "");
        set_request_id(&mut request, "abc-123");
        assert_eq!(received(&request), Some("abc-123"));
        assert_eq!(request_id_of(&request), "abc-123");
        let mut other = Request::new(());
        set_request_id(&mut other, "caf\u{e9}\n");
        assert_eq!(received(&other), None, "not valid metadata: not sent");
    }
}
